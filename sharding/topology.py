"""Cluster specs (sharding/topologies/*.toml) and their TorchRec planner Topology."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

from torchrec.distributed.planner import Topology

from core.errors import UserError
from core.files import read_toml

GIB = 1024**3
PRESET_DIR = Path(__file__).resolve().parent / "topologies"


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: int
    devices_per_node: int
    device: str
    """"cuda" (tables in HBM, host memory for UVM) or "cpu" (tables in host memory)."""
    hbm_gb: float
    """Memory per accelerator, GiB (0 for CPU ranks)."""
    host_memory_gb: float
    """Host memory per node, GiB."""
    intra_node_bw_gbps: float
    """Per-device bandwidth inside a node, GB/s."""
    inter_node_bw_gbps: float
    """Per-device bandwidth across nodes, GB/s."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def host_memory_per_rank(self) -> int:
        return int(self.host_memory_gb * GIB / self.devices_per_node)

    @property
    def device_memory_per_rank(self) -> int:
        """Bytes a rank's tables may occupy in its fast memory (HBM, or host memory on CPU)."""
        return int(self.hbm_gb * GIB) if self.device == "cuda" else self.host_memory_per_rank

    def describe(self) -> str:
        memory = f"{self.hbm_gb:g} GiB HBM" if self.device == "cuda" else f"{self.host_memory_per_rank / GIB:.1f} GiB host"
        return f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} {self.device} ranks, {memory} per rank"


def load_topology(name_or_path: str) -> ClusterSpec:
    """A preset name (e.g. 8x8xH100) or a TOML file path."""
    path = Path(name_or_path)
    if not path.is_file():
        preset = PRESET_DIR / f"{name_or_path}.toml"
        if not preset.is_file():
            presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
            raise UserError(f"topology {name_or_path!r}: no such file or preset; presets: {presets}")
        path = preset
    raw = read_toml(path, "topology file")
    known = {f.name: f.type for f in fields(ClusterSpec)}
    unknown = sorted(set(raw) - set(known))
    missing = sorted(set(known) - set(raw))
    if unknown or missing:
        raise UserError(f"{path}: unknown keys {unknown} / missing keys {missing}")
    for field in fields(ClusterSpec):
        value = raw[field.name]
        wanted = str if field.name in ("name", "device") else int if field.name in ("nodes", "devices_per_node") else float
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, wanted) or isinstance(value, bool):
            kind = {str: "string", int: "whole number", float: "number"}[wanted]
            raise UserError(f"{path}: {field.name} must be a {kind}, got {value!r}")
    spec = ClusterSpec(**raw)
    if spec.device not in ("cuda", "cpu"):
        raise UserError(f"{path}: device must be cuda or cpu, got {spec.device!r}")
    if spec.nodes < 1 or spec.devices_per_node < 1:
        raise UserError(f"{path}: nodes and devices_per_node must be >= 1")
    if spec.device == "cuda" and spec.hbm_gb <= 0:
        raise UserError(f"{path}: a cuda topology needs hbm_gb > 0")
    if spec.host_memory_gb <= 0 or spec.intra_node_bw_gbps <= 0 or spec.inter_node_bw_gbps <= 0:
        raise UserError(f"{path}: host_memory_gb, intra_node_bw_gbps and inter_node_bw_gbps must be > 0")
    return spec


def running_cluster(world_size: int, local_world_size: int, device: str, hbm_gb: float = 0.0) -> ClusterSpec:
    """The cluster a training job runs on, described like a preset: its ranks, this node's memory
    and the bandwidth figures of the matching preset (cpu-local for CPU ranks, 1x8xH100 for GPUs).
    On the 2-rank CPU test machine it is the cpu-local preset, so `shardrec plan --topology
    cpu-local` shows the plan `shardrec train` gets."""
    if world_size % local_world_size:
        raise UserError(f"{world_size} ranks do not divide into nodes of {local_world_size}")
    base = load_topology("cpu-local" if device == "cpu" else "1x8xH100")
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    nodes = world_size // local_world_size
    return dataclasses.replace(
        base, name=f"this job ({nodes}x{local_world_size}x{device})", nodes=nodes, devices_per_node=local_world_size,
        device=device, hbm_gb=hbm_gb if device == "cuda" else 0.0, host_memory_gb=round(host_gb),
    )


def to_planner_topology(spec: ClusterSpec) -> Topology:
    bytes_per_ms = 1e9 / 1000  # GB/s -> bytes per millisecond, TorchRec's bandwidth unit
    return Topology(
        world_size=spec.world_size,
        compute_device=spec.device,
        hbm_cap=int(spec.hbm_gb * GIB) if spec.device == "cuda" else None,
        ddr_cap=spec.host_memory_per_rank,
        local_world_size=spec.devices_per_node,
        intra_host_bw=spec.intra_node_bw_gbps * bytes_per_ms,
        inter_host_bw=spec.inter_node_bw_gbps * bytes_per_ms,
    )
