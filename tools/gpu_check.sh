#!/usr/bin/env bash
# shardrec's CUDA path on one GPU: the FBGEMM CUDA kernels import; every model config trains a few
# steps with nccl, evaluates, checkpoints and resumes; NCF's losses on the GPU match the CPU's and
# TorchRec's train pipeline matches the plain step; the GPU options (fused Adam, bf16 autocast, fp16
# tables, quantised all-to-all) train; and a lookup micro-benchmark reports the embedding bandwidth
# against the device's own copy bandwidth, measured in the same run.
#
#   tools/gpu_check.sh [PYTHON]        (default: .venv/bin/python; install with `make venv-gpu`)
#
# On a machine without CUDA it says so and exits 0: there is nothing to check there.
set -uo pipefail
PY=${1:-${PYTHON:-.venv/bin/python}}
BIN=$(dirname "$PY")
cd "$(dirname "$0")/.."

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False with $PY): nothing was checked"
  exit 0
fi
failures=0
step() { echo; echo "== $*"; }
fail() { echo "gpu_check: FAILED: $*"; failures=$((failures + 1)); }
compare_losses() {  # RUN_A RUN_B TOLERANCE LABEL: 30 step losses each, every pair closer than TOLERANCE
  "$PY" - "$WORK/runs" "$@" <<'PY'
import json, sys
from pathlib import Path
root, first, second, tolerance, label = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
def losses(name):
    lines = (Path(root) / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"kind": "step"' in line]
a, b = losses(first), losses(second)
worst = max((abs(x - y) for x, y in zip(a, b)), default=float("inf"))
print(f"{len(a)} and {len(b)} steps; largest loss difference {label} {worst:.2e}")
sys.exit(0 if len(a) == len(b) == 30 and worst < tolerance else 1)
PY
}

step "kernels"
"$PY" - <<'PY' || fail "the FBGEMM CUDA kernels do not load"
import torch, fbgemm_gpu, torchrec  # noqa: F401
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen, EmbeddingLocation, ComputeDevice
tbe = SplitTableBatchedEmbeddingBagsCodegen([(1000, 64, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)])
out = tbe(torch.arange(8, device="cuda"), torch.arange(0, 9, device="cuda"))
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, FBGEMM TBE forward on CUDA: {tuple(out.shape)}")
PY

WORK=$(mktemp -d /tmp/shardrec-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$BIN/shardrec" data prepare ml-100k --out "$WORK/ml-100k" >/dev/null || fail "data prepare"
"$BIN/shardrec" data prepare ml-100k --split loo --out "$WORK/ml-100k-loo" >/dev/null 2>&1 || fail "data prepare loo"

for config in ncf two_tower lightgcn sasrec bert4rec gru4rec; do
  step "$config: 1 GPU, nccl, 2 epochs of 20 steps, evaluation, checkpoint, resume to 3"
  data="$WORK/ml-100k"; case $config in sasrec|bert4rec|gru4rec) data="$WORK/ml-100k-loo";; esac
  args=(--config "launcher/configs/${config}_ml100k.toml" --data.path "$data" --cluster.backend nccl
        --trainer.run_root "$WORK/runs" --trainer.run_name "$config" --trainer.max_steps_per_epoch 20)
  "$BIN/torchrun" --nproc-per-node 1 -m trainers "${args[@]}" --trainer.epochs 2 | tail -2 || fail "$config training"
  "$BIN/torchrun" --nproc-per-node 1 -m trainers --resume "$WORK/runs/$config" --trainer.epochs 3 | grep -E "resumed|test at best" \
    || fail "$config resume"
done

step "the CUDA path trains like the CPU path: NCF, 1 rank, 30 steps, no dropout, CPU (gloo) then GPU (nccl)"
for backend in gloo nccl; do
  "$BIN/torchrun" --nproc-per-node 1 -m trainers --config launcher/configs/ncf_ml100k.toml --data.path "$WORK/ml-100k" \
    --cluster.backend "$backend" --model.dropout 0 --trainer.epochs 1 --trainer.max_steps_per_epoch 30 --trainer.log_every 1 \
    --trainer.train_pipeline plain --eval.max_users 50 --trainer.run_root "$WORK/runs" --trainer.run_name "same-$backend" \
    >/dev/null || fail "NCF on $backend"
done
compare_losses same-gloo same-nccl 1e-3 "CPU vs GPU" || fail "CPU and GPU losses differ"

step "TorchRec's train pipeline equals the plain step on the GPU (NCF, 30 steps)"
"$BIN/torchrun" --nproc-per-node 1 -m trainers --config launcher/configs/ncf_ml100k.toml --data.path "$WORK/ml-100k" \
  --cluster.backend nccl --model.dropout 0 --trainer.epochs 1 --trainer.max_steps_per_epoch 30 --trainer.log_every 1 \
  --trainer.train_pipeline sparse_dist --eval.max_users 50 --trainer.run_root "$WORK/runs" --trainer.run_name piped \
  | grep "training step" || fail "NCF with the train pipeline"
compare_losses same-nccl piped 1e-4 "pipeline vs plain step" || fail "pipelined and plain losses differ"

step "GPU options: fused Adam on the tables, bf16 autocast, fp16 table weights, fp16/bf16 all-to-all (NCF, 30 steps each)"
for option in "--trainer.table_optimizer adam --trainer.sparse_lr 0.001" "--trainer.mixed_precision bf16" \
              "--sharding.table_dtype fp16" "--sharding.comms_forward fp16 --sharding.comms_backward bf16"; do
  # shellcheck disable=SC2086
  "$BIN/torchrun" --nproc-per-node 1 -m trainers --config launcher/configs/ncf_ml100k.toml --data.path "$WORK/ml-100k" \
    --cluster.backend nccl --trainer.epochs 1 --trainer.max_steps_per_epoch 30 --eval.max_users 50 \
    --trainer.run_root "$WORK/runs" $option | grep "final loss" | sed "s/^/$option: /" || fail "NCF with $option"
done

step "lookup bandwidth against the device's copy bandwidth (same run)"
"$PY" - <<'PY' || fail "bandwidth benchmark"
import time, torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen, EmbeddingLocation, ComputeDevice
rows, dim, batch = 10_000_000, 128, 65_536
tbe = SplitTableBatchedEmbeddingBagsCodegen([(rows, dim, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)])
ids = torch.randint(0, rows, (batch,), device="cuda")
offsets = torch.arange(0, batch + 1, device="cuda")
def timed(fn, repeat=50):
    fn(); torch.cuda.synchronize(); start = time.perf_counter()
    for _ in range(repeat): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - start) / repeat
lookup_s = timed(lambda: tbe(ids, offsets))
source = torch.empty(batch * dim * 4 // 4, device="cuda"); target = torch.empty_like(source)
copy_s = timed(lambda: target.copy_(source))
lookup_gbs = batch * dim * 4 / lookup_s / 1e9
copy_gbs = 2 * source.numel() * 4 / copy_s / 1e9
print(f"embedding lookup {lookup_gbs:,.0f} GB/s, device copy {copy_gbs:,.0f} GB/s, ratio {lookup_gbs / copy_gbs:.2f}")
PY

echo
if [ "$failures" -gt 0 ]; then echo "gpu_check: $failures check(s) failed"; exit 1; fi
echo "gpu_check: all checks passed"
