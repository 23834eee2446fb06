"""The GPU side as far as this machine can check it: tools/gpu_check.sh says plainly when there is no
CUDA device, and on a machine with one the FBGEMM CUDA kernels must import and run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(120)]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: gpu_check runs for real there")
def test_gpu_check_says_there_is_no_gpu_and_exits_0():
    result = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh"), sys.executable], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "no CUDA device" in result.stdout and "nothing was checked" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_fbgemm_cuda_kernels_run():
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen([(100, 16, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)])
    out = tbe(torch.arange(4, device="cuda"), torch.arange(0, 5, device="cuda"))
    assert out.shape == (4, 16) and out.is_cuda
