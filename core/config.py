"""Typed run configuration: defaults < TOML file < `--section.key value` overrides.

Each section is a dataclass; each component receives only its own section. The `model` section is
special: its `name` picks a model from the registry and every other key is that model's parameter,
validated against the model's own parameter dataclass (core/model_params.py), so a typo in a model
parameter is caught before any rank starts.

Nothing here imports torch: configuration errors must surface in well under a second.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import read_toml
from core.model_params import MODEL_PARAMS, is_sequence_model

SHARDING_TYPES = ("data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")


TABLE_OPTIMIZERS = ("rowwise_adagrad", "sgd", "adam")
TRAIN_PIPELINES = ("auto", "plain", "sparse_dist")
COMMS_PRECISIONS = ("fp32", "fp16", "bf16")
EVICTION_POLICIES = ("lru", "lfu")
MIN_EVICTION_INTERVAL = 20
ROWS_PER_ROUND_STEP = 10_000
"""ids.eviction_interval = 0: a round every (rows of a rank's block / this) steps, at least
MIN_EVICTION_INTERVAL (the cost of rounds against their interval: bench/RESULTS.md, Open-world ids)."""
MANAGED_ID_MODELS = ("ncf", "two_tower", "lightgcn", "sasrec", "bert4rec", "gru4rec")
"""Models whose tables can be managed-collision tables (ids.user_rows / ids.item_rows)."""
RANKING_METRICS = {"full": ("recall", "ndcg", "hit", "mrr"), "sampled": ("hit", "ndcg", "mrr")}
"""The metrics of each evaluation protocol, in the order an evaluation sums them."""


@dataclass
class DataSection:
    path: str = "runs/data/ml-100k"
    """Folder written by `shardrec data prepare` / `shardrec data import`."""
    negatives: int = 4
    """Sampled negatives per positive for pointwise (BCE) training, drawn in the data pipeline."""
    reject_positives: bool = True
    """Resample negatives that are in the user's training items (exact, vectorised membership test)."""
    shuffle_buffer: int = 20_000
    """Rows in each rank's local shuffle buffer, across the blocks of its Ray Data stream (interaction
    models under cluster.launcher = "ray_train"). The other paths shuffle whole windows instead (a
    rank's shards under torchrun, about a million rows at a time; a sequence model's windows each
    epoch) and refuse another value here rather than ignore it."""

    def validate(self) -> None:
        if self.negatives < 1:
            raise UserError(f"data.negatives must be >= 1, got {self.negatives}")
        if self.shuffle_buffer < 0:
            raise UserError("data.shuffle_buffer must be >= 0")


@dataclass
class ModelSection:
    name: str = "ncf"
    """Registered model name (see `shardrec models`)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Model parameters; in TOML and on the command line they sit directly under [model]."""

    def validate(self) -> None:
        if self.name not in MODEL_PARAMS:
            raise UserError(f"unknown model {self.name!r}; known models: {', '.join(sorted(MODEL_PARAMS))}")
        self.resolved_params()

    def resolved_params(self) -> Any:
        """The model's parameter dataclass with defaults filled in; raises UserError on bad keys."""
        params_cls = MODEL_PARAMS[self.name]
        known = {f.name: f for f in dataclasses.fields(params_cls)}
        for key, value in self.params.items():
            if key not in known:
                raise UserError(
                    f"unknown key model.{key} for model {self.name!r}; known keys: {', '.join(sorted(known))}"
                )
            _check_type(f"model.{key}", value, _field_type(params_cls, key))
        instance = params_cls(**self.params)
        if hasattr(instance, "validate"):
            instance.validate()
        return instance


@dataclass
class TrainerSection:
    epochs: int = 20
    """Epochs to train (a resumed run trains up to this many in all)."""
    batch_size: int = 1024
    """Rows per step on each rank (positives and their negatives together)."""
    sparse_lr: float = 0.05
    """Learning rate of the fused row-wise Adagrad applied to the embedding tables in backward."""
    dense_lr: float = 0.001
    """Learning rate of Adam on the dense (replicated) parameters."""
    seed: int = 0
    """Seed of the dense initialisation, the table rows' initialisation, every rank's data order and negatives, and the evaluation's user sample."""
    log_every: int = 50
    """Steps between JSONL step records."""
    eval_every: int = 1
    """Epochs between validation passes."""
    checkpoint_every: int = 1
    """Epochs between checkpoints (the last epoch is always checkpointed)."""
    run_root: str = "runs"
    """Folder that receives one sub-folder per run."""
    run_name: str = ""
    """Run folder name; empty means <model>-<timestamp>."""
    warm_start: str = ""
    """A finished run folder to start from (`shardrec train --warm-start RUN`): its last epoch-end
    checkpoint's tables, dense layers and optimizer state, grown to this dataset's ids when its id
    maps extend the parent's (`data import --extend-ids`). Epochs, data order and best validation
    start afresh. Empty: a fresh initialisation."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many steps inside an epoch (0: at epoch ends only). A resumed run
    continues after the last checkpoint's batch; under torchrun no positive of the epoch is trained
    twice or skipped (the epoch's order is a function of the seed and the epoch)."""
    keep_checkpoints: int = 0
    """Keep only the newest this many checkpoints (0: all); the best-validation one is always kept."""
    async_checkpoints: bool = True
    """Write checkpoints in the background: a step waits for the state's copy to host memory, not
    for the disk (one save in flight at most). false: every rank waits until its shards are written."""
    max_steps_per_epoch: int = 0
    """Stop each epoch after this many steps (0: the whole epoch). For smoke tests."""
    prefetch_batches: int = 2
    """Batches a background thread prepares ahead of the step (read, negatives, tensors)."""
    train_pipeline: str = "auto"
    """"auto" (TorchRec's TrainPipelineSparseDist on CUDA where the model allows it, else the plain
    step), "plain", or "sparse_dist" (the pipeline on any device: for tests and measurements)."""
    table_optimizer: str = "rowwise_adagrad"
    """FBGEMM's fused optimizer on the sharded tables, at sparse_lr: "rowwise_adagrad", "sgd", or
    "adam" (CUDA only: FBGEMM has no CPU kernel for it)."""
    mixed_precision: str = "fp32"
    """"bf16": the forward pass under bfloat16 autocast (dense layers; table lookups stay in their
    own precision); "fp32": none."""
    nonfinite_loss: str = "stop"
    """A batch whose loss is nan or inf: "stop" ends the run with exit 1 (checked every log_every
    steps, before every checkpoint and at each epoch's end, so no checkpoint holds such a step's
    update); "skip" leaves such a batch out on every rank (no update; counted per epoch as
    `nonfinite_skipped`), at the price of one agreement between the ranks per step, and with the
    plain step only."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.sparse_lr) and math.isfinite(self.dense_lr)) or self.sparse_lr <= 0 or self.dense_lr <= 0:
            raise UserError(f"trainer.sparse_lr and trainer.dense_lr must be finite and > 0, got "
                            f"{self.sparse_lr} and {self.dense_lr}")
        if self.checkpoint_every_steps < 0 or self.keep_checkpoints < 0:
            raise UserError("trainer.checkpoint_every_steps and trainer.keep_checkpoints must be >= 0")
        if self.max_steps_per_epoch < 0:
            raise UserError("trainer.max_steps_per_epoch must be >= 0")
        if self.prefetch_batches < 1:
            raise UserError("trainer.prefetch_batches must be >= 1")
        if self.train_pipeline not in TRAIN_PIPELINES:
            raise UserError(f"trainer.train_pipeline must be one of {', '.join(TRAIN_PIPELINES)}, got {self.train_pipeline!r}")
        if self.table_optimizer not in TABLE_OPTIMIZERS:
            raise UserError(f"trainer.table_optimizer must be one of {', '.join(TABLE_OPTIMIZERS)}, got {self.table_optimizer!r}")
        if self.nonfinite_loss not in ("stop", "skip"):
            raise UserError(f"trainer.nonfinite_loss must be stop or skip, got {self.nonfinite_loss!r}")
        if self.nonfinite_loss == "skip" and self.train_pipeline == "sparse_dist":
            raise UserError("trainer.nonfinite_loss = 'skip' needs the plain step (TorchRec's pipeline runs the "
                            "backward of a batch before its loss can be looked at); use train_pipeline 'auto' or 'plain'")
        if self.mixed_precision not in ("fp32", "bf16"):
            raise UserError(f"trainer.mixed_precision must be fp32 or bf16, got {self.mixed_precision!r}")


@dataclass
class ShardingSection:
    default: str = ""
    """Sharding type for every table not named in `tables`; empty lets the TorchRec planner choose."""
    tables: dict[str, str] = field(default_factory=dict)
    """Per-table sharding type, e.g. {gmf_user = "row_wise"}; on the command line --sharding.tables.gmf_user row_wise."""
    plan: str = ""
    """A plan.json from `shardrec plan --out` (or a run folder's): train with exactly those placements.
    It takes precedence: the planner does not run and `default` / `tables` are ignored."""
    topology: str = "auto"
    """The cluster the planner plans for: "auto" describes the running job (its ranks, this node's
    memory); or a preset name / TOML file as in `shardrec plan --topology`, which must have the job's
    world size."""
    reserve: float = 0.15
    """Share of each rank's memory the planner keeps from tables (dense model, activations, slack)."""
    table_dtype: str = "fp32"
    """Table weights in "fp32" or "fp16" (half the memory; the planner counts it)."""
    comms_forward: str = "fp32"
    """Precision of the pooled embeddings' all-to-all in the forward pass: "fp32", "fp16" or "bf16"
    (TorchRec's quantised communication, QCommsConfig)."""
    comms_backward: str = "fp32"
    """The same for the gradients' all-to-all in the backward pass."""

    def validate(self) -> None:
        if not 0.0 <= self.reserve < 1.0:
            raise UserError(f"sharding.reserve must be in [0, 1), got {self.reserve}")
        if self.table_dtype not in ("fp32", "fp16"):
            raise UserError(f"sharding.table_dtype must be fp32 or fp16, got {self.table_dtype!r}")
        for key in ("comms_forward", "comms_backward"):
            if getattr(self, key) not in COMMS_PRECISIONS:
                raise UserError(f"sharding.{key} must be one of {', '.join(COMMS_PRECISIONS)}, got {getattr(self, key)!r}")
        for where, sharding_type in [("sharding.default", self.default)] + [
            (f"sharding.tables.{t}", k) for t, k in self.tables.items()
        ]:
            if sharding_type and sharding_type not in SHARDING_TYPES:
                raise UserError(f"{where}: unknown sharding type {sharding_type!r}; choose from {', '.join(SHARDING_TYPES)}")


@dataclass
class EvalSection:
    protocol: str = "full"
    """"full": rank every item. "sampled": the held-out item against `sampled_negatives` items the user
    never interacted with. "both": full, plus the sampled metrics under sampled_<metric> names."""
    k: int = 10
    """Cut-off of every ranking metric (Recall@k, NDCG@k, Hit@k, MRR@k)."""
    sampled_negatives: int = 99
    """Items each held-out item is ranked against in the sampled protocol."""
    user_batch: int = 256
    """Users scored at once in full ranking (memory ~ user_batch x items floats)."""
    history: str = "auto"
    """Full ranking: "masked" removes the user's earlier items (train; train + valid for test) from the
    ranking, "kept" ranks them too. "auto": kept for sequence models (the usual choice for sequential
    leave-one-out), masked for the others."""
    max_users: int = 0
    """Evaluate a seeded sample of about this many users, the same users at every evaluation (0: all).
    Each user is kept with probability max_users / eligible users, so the count is close to, not
    exactly, max_users; the report gives the number ranked."""
    score_memory_mb: int = 256
    """Full ranking scores items in chunks so one chunk's scores (and NCF's MLP activations) take at
    most this much: memory is user_batch x item_chunk, never user_batch x items."""
    item_cache_mb: int = 1024
    """Item vectors up to this size are gathered once per evaluation; above it each chunk is looked up
    through the sharded tables when it is scored."""
    test: bool = True
    """Rank the test split at each epoch where validation improves (the reported test result is the
    one at the best validation epoch). false: validation only, as in `shardrec tune`'s trials, so a
    search cannot see, let alone choose by, a test metric."""

    def validate(self) -> None:
        if self.protocol not in ("full", "sampled", "both"):
            raise UserError(f"eval.protocol must be 'full', 'sampled' or 'both', got {self.protocol!r}")
        if self.k < 1 or self.user_batch < 1 or self.sampled_negatives < 1:
            raise UserError("eval.k, eval.user_batch and eval.sampled_negatives must be >= 1")
        if self.max_users < 0 or self.score_memory_mb < 1 or self.item_cache_mb < 0:
            raise UserError("eval.max_users and eval.item_cache_mb must be >= 0, eval.score_memory_mb >= 1")
        if self.history not in ("auto", "masked", "kept"):
            raise UserError(f"eval.history must be auto, masked or kept, got {self.history!r}")

    def masks_history(self, sequence_model: bool) -> bool:
        return self.history == "masked" or (self.history == "auto" and not sequence_model)

    def protocols(self) -> tuple[str, ...]:
        """The protocols an evaluation computes, the first one's metrics unprefixed."""
        return ("full", "sampled") if self.protocol == "both" else (self.protocol,)

    def metric_names(self) -> list[str]:
        """Every ranking metric an evaluation reports, e.g. ndcg@10 and, with protocol both,
        sampled_ndcg@10."""
        names = []
        for index, protocol in enumerate(self.protocols()):
            prefix = "sampled_" if index > 0 else ""
            names += [f"{prefix}{name}@{self.k}" for name in RANKING_METRICS[protocol]]
        return names


PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ClusterSection:
    address: str = ""
    """Ray address to attach to ("auto" inside `ray job submit`); empty starts an embedded local cluster."""
    num_workers: int = 2
    """Training ranks (Ray Train workers)."""
    cpus_per_worker: float = 0.5
    """Ray CPU resource per worker. Below 1 on small machines so Ray Data read tasks still get a CPU."""
    use_gpu: bool = False
    """Give each Ray Train worker a GPU (with backend = "nccl")."""
    backend: str = "gloo"
    """torch.distributed backend: gloo on CPU, nccl on GPUs."""
    object_store_mb: int = 512
    """Object store cap of the embedded local cluster."""
    embedded_dashboard: bool = False
    """Start Ray's dashboard (web UI, state and job APIs) on the embedded local cluster; its address
    is printed. Off by default: its module processes take CPU from the ranks, and a run uses none."""
    max_failures: int = 0
    """Times a failed job restarts its whole group of ranks (from the last checkpoint)."""
    min_workers: int = 0
    """Ray Train launcher: 0 keeps the job at num_workers. Above 0 the job is elastic: a restart
    (cluster.max_failures >= 1 of them) runs on as many workers as the cluster holds then, at least
    this many and at most num_workers, continuing from the last checkpoint (even one taken inside
    an epoch by more or fewer workers); below min_workers the job ends."""
    placement_timeout_s: float = 60.0
    """How long a start or restart waits for Ray to place every rank (a lost node may be replaced
    meanwhile, by an autoscaler or by hand). Past it the job ends with an error instead of waiting
    for ever; raise it on clusters whose replacement nodes take minutes to come."""
    launcher: str = "ray_train"
    """How ranks start: "ray_train" (Ray Train workers fed by Ray Data) or "torchrun" (one Ray actor
    per node runs torchrun there; ranks read their own Parquet shards, as under plain torchrun)."""
    num_nodes: int = 1
    """torchrun launcher: nodes to spread the num_workers ranks over (num_workers / num_nodes each)."""
    placement: str = "PACK"
    """Ray placement of the workers: PACK (fill a node first), SPREAD, STRICT_PACK (one node) or
    STRICT_SPREAD (one worker per node: e.g. one rank per host)."""
    bind_cpus: bool = True
    """Bind each rank to its own share of its node's CPUs (the node's CPUs split evenly among its
    ranks; not done for a node's only rank, or with fewer CPUs than ranks). false: the scheduler
    moves every thread freely, e.g. where other heavy work shares the machine."""
    interface: str = ""
    """Network interface the ranks' collectives use between hosts (gloo and NCCL), e.g. "eth0". Empty:
    the libraries' default, right on one machine; set it for multi-host jobs whose hostname does not
    resolve to the interface the hosts share."""

    def validate(self) -> None:
        if self.num_workers < 1:
            raise UserError("cluster.num_workers must be >= 1")
        if self.cpus_per_worker <= 0:
            raise UserError("cluster.cpus_per_worker must be > 0")
        if self.backend not in ("gloo", "nccl"):
            raise UserError(f"cluster.backend must be gloo or nccl, got {self.backend!r}")
        if self.max_failures < 0:
            raise UserError("cluster.max_failures must be >= 0")
        if not 0 <= self.min_workers <= self.num_workers:
            raise UserError(f"cluster.min_workers must be between 0 (a fixed-size job) and cluster.num_workers "
                            f"({self.num_workers}), got {self.min_workers}")
        if self.min_workers and not self.max_failures:
            raise UserError("cluster.min_workers makes restarts elastic: set cluster.max_failures >= 1 (how many "
                            "restarts the job may take)")
        if self.min_workers and self.launcher != "ray_train":
            raise UserError("cluster.min_workers applies to the ray_train launcher; with cluster.launcher = "
                            "'torchrun' resume on another size with --resume RUN --cluster.num_workers M")
        if not self.placement_timeout_s > 0:
            raise UserError(f"cluster.placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.launcher not in ("ray_train", "torchrun"):
            raise UserError(f"cluster.launcher must be ray_train or torchrun, got {self.launcher!r}")
        if self.num_nodes < 1 or self.num_workers % self.num_nodes:
            raise UserError(f"cluster.num_nodes ({self.num_nodes}) must be >= 1 and divide cluster.num_workers "
                            f"({self.num_workers})")
        if self.placement not in PLACEMENTS:
            raise UserError(f"cluster.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.interface and not self.interface.replace("-", "").replace(".", "").replace("_", "").isalnum():
            raise UserError(f"cluster.interface {self.interface!r} is not an interface name")

    def worker_env(self) -> dict[str, str]:
        """Environment the training workers need (the collectives' interface, when set)."""
        if not self.interface:
            return {}
        return {"GLOO_SOCKET_IFNAME": self.interface, "NCCL_SOCKET_IFNAME": self.interface}


@dataclass
class IdsSection:
    """How ids become table rows. By default a table has one row per id of the dataset (the
    closed world the import's contiguous ids give). A table given a number of rows here becomes a
    managed-collision table of that many rows (TorchRec's zero-collision hashing): an id is
    admitted to a row of its own once it has been seen `admit_after` times within one round of
    `eviction_interval` steps; when the table is full, the round's new ids take the rows of the
    least recently (lru) or least frequently (lfu) used ones; ids without a row share the default
    row. The remapping state is part of every checkpoint. On a dataset imported with raw ids
    (`data import --ids raw|hash`) rows are keyed by the raw id, so they carry over to the next
    day's dataset (`--warm-start`)."""

    user_rows: int = 0
    """Rows of each table that user ids read (NCF's gmf_user and mlp_user, two-tower's user_id,
    LightGCN's user);
    0: one per user of the dataset. Row-wise sharded; a multiple of the number of ranks."""
    item_rows: int = 0
    """The same for the tables item ids read (a sequence model's item table too)."""
    eviction: str = "lru"
    """Which rows new ids take when a managed table is full: "lru" (least recently seen ids) or
    "lfu" (least often seen ids)."""
    admit_after: int = 1
    """Times an id must be seen within one round before it gets a row of its own."""
    eviction_interval: int = 0
    """Training steps per round of admission and eviction (ids seen in a round are admitted at its
    end). 0: one step per 10,000 rows of a rank's block of the table, and at least 20: a round
    sorts and merges the whole block, so large tables run rounds less often."""

    def validate(self) -> None:
        for key in ("user_rows", "item_rows"):
            if getattr(self, key) < 0:
                raise UserError(f"ids.{key} must be 0 (one row per id) or a number of rows, got {getattr(self, key)}")
        if self.eviction not in EVICTION_POLICIES:
            raise UserError(f"ids.eviction must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}")
        if self.admit_after < 1:
            raise UserError(f"ids.admit_after must be at least 1 (times an id is seen before it gets a row), "
                            f"got {self.admit_after}")
        if self.eviction_interval < 0:
            raise UserError(f"ids.eviction_interval must be a number of steps (0: chosen by the table's size), "
                            f"got {self.eviction_interval}")

    @property
    def managed(self) -> bool:
        return bool(self.user_rows or self.item_rows)

    def interval_for(self, rows: int, ranks: int) -> int:
        """Steps per round of a managed table of `rows` rows split over `ranks` ranks."""
        if self.eviction_interval:
            return self.eviction_interval
        return max(MIN_EVICTION_INTERVAL, -(-rows // ranks) // ROWS_PER_ROUND_STEP)

    def check_ranks(self, ranks: int) -> None:
        """A managed table is split into one block of rows per rank: refused before any rank starts
        when it cannot be."""
        for key in ("user_rows", "item_rows"):
            rows = getattr(self, key)
            if rows and (rows < ranks or rows % ranks):
                raise UserError(f"ids.{key} = {rows} cannot be split evenly over {ranks} ranks: choose a multiple "
                                f"of {ranks}")


@dataclass
class RunConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    sharding: ShardingSection = field(default_factory=ShardingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    ids: IdsSection = field(default_factory=IdsSection)

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.cluster.launcher == "torchrun":
            refuse_stream_only_settings(self, "cluster.launcher = 'torchrun'")
        if is_sequence_model(self.model.resolved_params()):
            refuse_stream_only_settings(self, f"the sequence model {self.model.name!r}")
        if self.ids.managed and self.model.name not in MANAGED_ID_MODELS:
            raise UserError(f"ids.user_rows / ids.item_rows (managed-collision tables) are built for "
                            f"{', '.join(MANAGED_ID_MODELS)} so far, not {self.model.name!r}: leave them at 0")
        if self.ids.managed and self.model.name == "lightgcn" and self.model.resolved_params().propagation != "sampled":
            raise UserError("LightGCN with managed-collision tables ([ids]) needs model.propagation = 'sampled': full "
                            "propagation looks up every id at every step, so every id would count as seen")
        if self.ids.managed and is_sequence_model(self.model.resolved_params()):
            if self.ids.user_rows:
                raise UserError(f"{self.model.name} has no user table: ids.user_rows must stay 0 (ids.item_rows sizes "
                                "its item table)")
            if not self.model.resolved_params().tie_output:
                raise UserError("a managed item table ([ids] item_rows) needs model.tie_output = true: an output "
                                "table of its own would still have one row per item of the dataset")
        if self.ids.managed and self.cluster.min_workers:
            raise UserError("cluster.min_workers (elastic restarts) cannot be used with managed-collision tables "
                            "([ids] user_rows / item_rows): they resume only on the world size that wrote them")
        if self.trainer.table_optimizer == "adam" and self.cluster.backend != "nccl":
            raise UserError("trainer.table_optimizer = 'adam' runs on CUDA only (cluster.backend nccl): FBGEMM has "
                            "no CPU kernel for fused Adam; on CPU use rowwise_adagrad (the default) or sgd")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        model = out.pop("model")
        out["model"] = {"name": model["name"], **model["params"]}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        config = cls()
        for section_name, values in raw.items():
            if not isinstance(values, dict):
                raise UserError(f"config: {section_name!r} must be a [section], got a plain value")
            for key, value in values.items():
                config.set(f"{section_name}.{key}", value)
        return config

    def key_type(self, dotted: str) -> Any:
        """The declared type of `section.key` (a model parameter's from the model named now, a
        `section.table.key` entry's the table's value type); raises UserError for an unknown key."""
        probe = copy.deepcopy(self)
        probe.set(dotted, _PROBE)  # raises for an unknown section or key; the type check comes after
        parts = dotted.split(".")
        section = getattr(self, parts[0])
        if isinstance(section, ModelSection):
            if parts[1] == "name":
                return str
            params_cls = MODEL_PARAMS.get(section.name)
            known = {f.name for f in dataclasses.fields(params_cls)} if params_cls else set()
            if parts[1] not in known:
                raise UserError(f"unknown key {dotted} for model {section.name!r}; known keys: {', '.join(sorted(known))}")
            return _field_type(params_cls, parts[1])
        expected = _field_type(type(section), parts[1])
        if len(parts) > 2:
            return typing.get_args(expected)[1]
        return expected

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.key` (or `section.dictfield.key`), checking the key exists and the type fits."""
        parts = dotted.split(".")
        if len(parts) < 2:
            raise UserError(f"override {dotted!r} must look like section.key")
        section_name, key, rest = parts[0], parts[1], parts[2:]
        sections = {f.name for f in dataclasses.fields(self)}
        if section_name not in sections:
            raise UserError(f"unknown config section {section_name!r}; known: {', '.join(sorted(sections))}")
        section = getattr(self, section_name)
        if isinstance(section, ModelSection):
            if key == "name" and not rest:
                _check_type(dotted, value, str)
                section.name = value
            elif rest:
                raise UserError(f"unknown key {dotted!r}: model parameters are flat (model.<param>)")
            else:
                # Checked against the model's parameters in validate(), once the name is final.
                section.params[key] = value
            return
        known = {f.name for f in dataclasses.fields(section)}
        if key not in known:
            raise UserError(f"unknown key {section_name}.{key}; known keys: {', '.join(sorted(known))}")
        expected = _field_type(type(section), key)
        if typing.get_origin(expected) is dict:
            _, value_type = typing.get_args(expected)
            if rest:
                _check_type(dotted, value, value_type)
                getattr(section, key)[".".join(rest)] = value
                return
            if not isinstance(value, dict):
                raise UserError(f"{dotted} must be a table of values, got {value!r}")
            for sub_key, sub_value in value.items():
                _check_type(f"{dotted}.{sub_key}", sub_value, value_type)
            setattr(section, key, dict(value))
            return
        if rest:
            raise UserError(f"unknown key {dotted!r}")
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        _check_type(dotted, value, expected)
        setattr(section, key, value)


def refuse_stream_only_settings(config: RunConfig, path: str) -> None:
    """Settings of the Ray Data stream alone, refused on a path (`path`) that would ignore them."""
    default = DataSection.shuffle_buffer
    if config.data.shuffle_buffer != default:
        raise UserError(f"data.shuffle_buffer ({config.data.shuffle_buffer}) sets the Ray Data stream's buffer; "
                        f"with {path} each rank shuffles whole windows of its data instead: leave it at "
                        f"{default:_}")


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


class _Probe:
    """A value every type check lets through: `RunConfig.key_type` sets it to find a key."""


_PROBE = _Probe()


def _check_type(where: str, value: Any, expected: Any) -> None:
    if value is _PROBE:
        return
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        for item in value:
            _check_type(where, item, item_type)
        return
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    if expected is int and isinstance(value, bool):
        raise UserError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise UserError(f"{where} must be {expected.__name__}, got {type(value).__name__} {value!r}")


def parse_override_value(text: str) -> Any:
    """Command-line values are read as TOML values (42, 0.5, true, [64, 32]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None, overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """Defaults < TOML file (or a resolved config as JSON, e.g. a run's config.json) < overrides;
    validated. Raises UserError with a one-line reason."""
    if path is not None and str(path).endswith(".json"):
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"config file {path}: cannot read it as JSON ({exc})") from None
    else:
        raw = read_toml(path, "config file") if path is not None else {}
    config = RunConfig.from_dict(raw)
    for dotted, text in overrides:
        config.set(dotted, parse_override_value(text))
    return config.validate()


def config_from_json(text: str) -> RunConfig:
    return RunConfig.from_dict(json.loads(text)).validate()
