"""Tier 3: runs only where a CUDA GPU is present (CI has none; these skip there).

The project's GPU machine has torch and Lightning but not torchrec/fbgemm, so the dense tests
below need neither; the sharded-table test skips without torchrec. The acceptance run
(`benchmarks/gpu_acceptance.py`, `bash benchmarks/gpu_session.sh`) checks the rest without pytest.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tier-3 test)")
needs_torchrec = pytest.mark.skipif(importlib.util.find_spec("torchrec") is None, reason="needs torchrec + fbgemm-gpu")


@needs_gpu
@needs_torchrec
def test_single_gpu_fit_with_sharded_tables() -> None:
    from lightning_hybrid import HybridStrategy
    from tests.helpers import TinyRec, loader, quiet_trainer

    torch.manual_seed(0)
    model = TinyRec(optimizer="adam", lr=0.01)  # Adam is fused on CUDA
    trainer = quiet_trainer(strategy=HybridStrategy(launcher="spawn"), accelerator="gpu", devices=1, max_steps=4)
    trainer.fit(model, train_dataloaders=loader(8, n=32))
    assert trainer.global_step == 4


@needs_gpu
def test_dense_sasrec_on_one_gpu_follows_the_cpu_run_on_nccl() -> None:
    """The reference model with plain nn.Embedding tables (no torchrec), fp32 with TF32 off, GPU
    and CPU each in a fresh process (a CPU fit first would leave a gloo group for the GPU run):
    losses and weights within 1e-4, and the GPU run on NCCL."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_acceptance import fit_in_child

    cpu = fit_in_child("cpu", env={"CUDA_VISIBLE_DEVICES": ""})
    gpu = fit_in_child("gpu")
    assert gpu["backend"] == "nccl" and cpu["backend"] == "gloo"
    torch.testing.assert_close(torch.tensor(gpu["losses"]), torch.tensor(cpu["losses"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(gpu["weights"]), torch.tensor(cpu["weights"]), rtol=0, atol=1e-4)
