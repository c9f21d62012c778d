"""Tier 3: runs only where a CUDA GPU is present (CI has none; these skip there)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TinyRec, loader, quiet_trainer

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tier-3 test)")


@needs_gpu
def test_single_gpu_fit_with_sharded_tables() -> None:
    from lightning_hybrid import HybridStrategy

    torch.manual_seed(0)
    model = TinyRec(optimizer="adam", lr=0.01)  # Adam is fused on CUDA
    trainer = quiet_trainer(strategy=HybridStrategy(launcher="spawn"), accelerator="gpu", devices=1, max_steps=4)
    trainer.fit(model, train_dataloaders=loader(8, n=32))
    assert trainer.global_step == 4
