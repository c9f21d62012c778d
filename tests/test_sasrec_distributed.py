"""Tier 2: distributed evaluation of the recommender counts every user exactly once."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch.testing import assert_close

from lightning_hybrid.data.sequences import SequenceDataModule
from lightning_hybrid.models.sasrec import SASRec
from lightning_hybrid.testing import run_distributed
from tests.helpers import quiet_trainer

# 97 users with >= 3 items: 2 ranks get 49 and 48 users, so one placeholder row is needed
DATA = dict(format="synthetic", max_len=12, eval_batch_size=16, synthetic_users=97, synthetic_items=60, synthetic_min_len=3, synthetic_max_len=15, seed=5)
MODEL = dict(max_len=12, d_model=16, num_blocks=1, num_heads=2, dropout=0.0, side_features=["user", "category", "time"])


def _validate(devices: int) -> dict[str, float]:
    warnings.simplefilter("ignore")
    # An earlier seed_everything (e.g. a CLI test in this session) would make the distributed
    # strategy reseed before the item layers are built, and only there: start both runs alike.
    os.environ.pop("PL_GLOBAL_SEED", None)
    torch.manual_seed(0)
    model = SASRec(**MODEL)
    strategy: Any = "auto"
    if devices > 1:
        from lightning_hybrid import HybridStrategy

        strategy = HybridStrategy()
    trainer = quiet_trainer(strategy=strategy, devices=devices)
    trainer.validate(model, datamodule=SequenceDataModule(**DATA), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_two_rank_metrics_equal_single_process_metrics() -> None:
    reference = _validate(1)
    ranks = run_distributed(_validate, 2, 2, init_process_group=False, timeout_s=120)
    assert set(reference) == {"val_hr@10", "val_ndcg@10", "val_hr@20", "val_ndcg@20", "val_mrr"}
    for result in ranks:
        for key, value in reference.items():
            assert_close(result[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert reference["val_hr@20"] > 0  # not a vacuous comparison
