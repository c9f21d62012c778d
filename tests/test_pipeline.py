"""Tier 2: pipeline parallelism (torch.distributed.pipelining) inside the Lightning Trainer.

Every schedule must train the reference recommender exactly like one process: same step losses
(the mean of the microbatch losses; all users have the same number of targets here, so that
equals the batch mean) and the same parameters after the steps, with the item table sharded by
torchrec across all ranks.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

# 24 users of equal length (every position has a target), one batch per epoch
DATA = dict(format="synthetic", max_len=8, batch_size=64, synthetic_users=24, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)


def _model_class() -> type:
    from lightning_hybrid.models.sasrec import SASRec
    from lightning_hybrid.optim import GroupedOptimizer

    class SGDSASRec(SASRec):
        def configure_optimizers(self) -> Any:
            # SGD (see test_tensor_parallel: Adam/Adagrad amplify rounding noise of exactly-zero grads)
            tables = list(self.item_tables.parameters())
            ids = {id(p) for p in tables}
            dense = [p for p in self.parameters() if id(p) not in ids]
            return GroupedOptimizer([torch.optim.SGD(dense, lr=0.5), torch.optim.SGD(tables, lr=0.1)])

    return SGDSASRec


def _fit(devices: int, strategy_kwargs: dict[str, Any] | None, clip: float = 0.0, epochs: int = 3) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    model = _model_class()(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0)
    common = dict(max_epochs=epochs, limit_val_batches=0, gradient_clip_val=clip or None, callbacks=[Losses()])
    if strategy_kwargs is None:
        trainer = quiet_trainer(devices=1, **common)
    else:
        trainer = quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=devices, **common)
    trainer.fit(model, datamodule=SequenceDataModule(**DATA))
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "state": state}


def _check(reference: dict[str, Any], ranks: list[dict[str, Any]], replicas: list[int]) -> None:
    for result in ranks:  # every rank reports the same (broadcast) loss of its replica
        assert len(result["losses"]) == len(reference["losses"])
    mean = [sum(ranks[r]["losses"][i] for r in replicas) / len(replicas) for i in range(len(reference["losses"]))]
    assert_close(torch.tensor(mean), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    state = ranks[0]["state"]
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(
    "schedule",
    [
        {"pipeline_schedule": "gpipe"},
        {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
        {"pipeline_schedule": "interleaved_1f1b", "pipeline_virtual_stages": 2},
        {"pipeline_schedule": "zero_bubble", "pipeline_virtual_stages": 2},
    ],
    ids=["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"],
)
def test_pp2_matches_single_process(schedule: dict[str, Any]) -> None:
    reference = _fit(1, None)
    kwargs = {"pipeline_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}, **schedule}
    ranks = run_distributed(_fit, 2, 2, kwargs, init_process_group=False, timeout_s=240)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    _check(reference, ranks, replicas=[0])
