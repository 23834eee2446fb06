#!/usr/bin/env bash
# Install shardrec's CPU stack into a virtual environment, in the only order that works:
# torch, then fbgemm-gpu-cpu, then torchrec WITHOUT its declared deps (they name the ~500 MB CUDA
# fbgemm-gpu, which shares the fbgemm_gpu/ folder with fbgemm-gpu-cpu and breaks the import), then
# the rest. For GPUs see README ("GPU install").
#
#   tools/install_stack.sh [VENV]            CPU stack (fbgemm-gpu-cpu)
#   tools/install_stack.sh --cuda [VENV]     CUDA stack: torch 2.13.0's default Linux wheel (CUDA) and
#                                            fbgemm-gpu 1.8.0 instead of fbgemm-gpu-cpu (never both)
set -euo pipefail
FBGEMM=fbgemm-gpu-cpu==1.8.0
if [ "${1:-}" = "--cuda" ]; then
  FBGEMM=fbgemm-gpu==1.8.0
  shift
fi
VENV=${1:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install "$FBGEMM"
# Everything else before TorchRec: pip checks what it installs against what is already there, and
# TorchRec's declared needs are ones this stack replaces on purpose (fbgemm-gpu: FBGEMM's CUDA build,
# which shares the fbgemm_gpu/ folder with the CPU build; torchmetrics==1.0.3: only torchrec.metrics,
# which shardrec does not use, needs it, and the rest of TorchRec runs with torchmetrics 1.9). Last
# and with --no-deps, TorchRec installs without pip's resolver error about them; `pip check` still
# lists both.
$PIP install tensordict tqdm pyre-extensions iopath numpy \
  'ray[data,train,default]==2.60.0' pyarrow==26.0.1 'torchmetrics==1.9.*' tensorboard \
  matplotlib faiss-cpu pytest pytest-timeout
$PIP install --no-deps torchrec==1.8.0
# MovieLens-100K ships inside this data-only wheel; --no-deps keeps its heavy requirements out.
$PIP install --no-deps recbole==1.2.1
$PIP install --no-deps -e .
"$VENV/bin/python" -c "import torchrec, fbgemm_gpu, ray, pyarrow; print('stack ok: torch', __import__('torch').__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '?', 'ray', ray.__version__)"
