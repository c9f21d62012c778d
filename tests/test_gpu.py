"""Tier 3: runs only where a CUDA GPU is present (CI has none; these skip there).

The project's GPU machine has torch and Lightning but not torchrec/fbgemm, so the dense tests
below need neither; the sharded-table test skips without torchrec.
"""

from __future__ import annotations

import importlib.util
from typing import Any

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


def _dense_sasrec_losses(accelerator: str) -> list[float]:
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec

    losses: list[float] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    model = SASRec(num_items=50, max_len=8, d_model=32, num_blocks=2, num_heads=2, dropout=0.0, tables="torch")
    data = SequenceDataModule(format="synthetic", max_len=8, batch_size=8, synthetic_users=64, synthetic_items=50, drop_last=True)
    trainer = pl.Trainer(
        strategy=HybridStrategy(launcher="subprocess"), accelerator=accelerator, devices=1,  # one device: nothing to launch, the run stays here
        max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Keep()],
    )
    trainer.fit(model, datamodule=data)
    return losses


@needs_gpu
def test_dense_sasrec_on_one_gpu_follows_the_cpu_run() -> None:
    """The reference model with plain nn.Embedding tables (no torchrec): the same four losses on
    the GPU as on the CPU, to fp32 accumulation-order differences."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = _dense_sasrec_losses("cpu")
    gpu = _dense_sasrec_losses("gpu")
    assert len(cpu) == len(gpu) == 4
    torch.testing.assert_close(torch.tensor(gpu), torch.tensor(cpu), rtol=1e-3, atol=1e-4)
