"""Tier 2: the HybridMonitor callback (on by default with HybridStrategy).

Known timings: a module that sleeps a fixed time in its dense compute, in the embedding lookup and
in the optimizer step; the logged breakdown must recover them. Also: byte counts equal the
exchange's own count, a wandb offline run holds the expected keys and the plan, and the PNG charts
are written (pipeline timeline and stage/shard balance under pp=2).
"""

from __future__ import annotations

import glob
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_hybrid.testing import run_distributed

DENSE_S, EMBED_S, OPT_S = 0.06, 0.03, 0.02


def _fit_sleepy(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning.pytorch.loggers import WandbLogger

    from lightning_hybrid import HybridStrategy
    from tests.helpers import TinyRec, loader, quiet_trainer

    class SlowSGD(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            out = super().step(closure)
            time.sleep(OPT_S)
            return out

    class Sleepy(TinyRec):
        def on_train_start(self) -> None:  # the tables are sharded by now
            self.tables.register_forward_pre_hook(lambda *_: time.sleep(EMBED_S))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            time.sleep(DENSE_S)
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            return SlowSGD(self.parameters(), lr=0.1)

    recorded: list[dict[str, float]] = []
    import lightning.pytorch as pl

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            monitor = next(c for c in trainer.callbacks if type(c).__name__ == "HybridMonitor")
            recorded.append(dict(monitor.last))

    logger = WandbLogger(save_dir=tmp, offline=True, project="lh-test") if os.environ["RANK"] == "0" else False
    trainer = quiet_trainer(
        strategy=HybridStrategy(embedding_sharding={"t_user": "row_wise", "t_item": "row_wise", "t_category": "table_wise"}),
        devices=2, max_steps=6, callbacks=[Keep()], logger=logger, default_root_dir=tmp, log_every_n_steps=1,
    )
    trainer.fit(Sleepy(), train_dataloaders=loader(8, n=96, ranks=2))
    if logger:
        logger.experiment.finish()
    return {"steps": recorded[2:], "bytes": float(trainer.callback_metrics["comm/dp_bytes_per_step"]), "dp_bytes": trainer.strategy.comm_bytes_last_step}


def test_breakdown_recovers_known_timings_and_wandb_gets_the_keys(tmp_path: Path) -> None:
    ranks = run_distributed(_fit_sleepy, 2, str(tmp_path), init_process_group=False, timeout_s=180)
    for result in ranks:
        for step in result["steps"]:
            # the sleeps, plus the real lookup / step work and all-to-all waits on a 2-core machine
            assert EMBED_S - 0.002 <= step["time/embedding_s"] <= EMBED_S + 0.04
            assert OPT_S - 0.002 <= step["time/optimizer_s"] <= OPT_S + 0.03
            assert step["time/dense_compute_s"] >= DENSE_S - 0.005
            assert step["time/step_s"] >= DENSE_S + EMBED_S + OPT_S
            # samples/s are the batch over the step time, times the two replicas
            assert step["throughput/samples_per_s"] == pytest.approx(2 * 8 / step["time/step_s"], rel=1e-6)
            assert step["utilization/compute_fraction"] == pytest.approx(step["time/dense_compute_s"] / step["time/step_s"], rel=1e-6)
        mlp_floats = (5 + 8 * 3) * 16 + 16 + 16 + 1
        assert result["bytes"] == result["dp_bytes"] == 4.0 * mlp_floats  # the logged count is the exchange's own
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    data = Path(runs[0]).read_bytes()
    for key in ("throughput/samples_per_s", "time/embedding_s", "time/dense_compute_s", "utilization/compute_fraction",
                "comm/dp_bytes_per_step", "embedding/params_rank0", "lightning_hybrid", "embedding_sharding", "row_wise"):
        assert key.encode() in data, key
    assert (tmp_path / "charts" / "shard_balance.png").stat().st_size > 1000


def _fit_pipelined_charts(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec
    from tests.helpers import quiet_trainer

    data = SequenceDataModule(format="synthetic", max_len=8, batch_size=8, synthetic_users=32, synthetic_items=30, drop_last=True)
    trainer = quiet_trainer(strategy=HybridStrategy(pipeline_parallel=2, pipeline_microbatches=4), devices=2, max_epochs=1, limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(SASRec(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2), datamodule=data)
    charts = sorted(os.listdir(os.path.join(tmp, "charts"))) if os.environ["RANK"] == "0" else []  # rank 0 draws
    return {"charts": charts, "pp_bytes": float(trainer.callback_metrics["comm/pp_bytes_per_step"])}


def test_pipeline_charts_are_written(tmp_path: Path) -> None:
    ranks = run_distributed(_fit_pipelined_charts, 2, str(tmp_path), init_process_group=False, timeout_s=180)
    assert ranks[0]["charts"] == ["pipeline_timeline.png", "shard_balance.png"]
    # stage 0 sends each microbatch's activations [2, 8, 16] fp32 forward, stage 1 their gradients back
    for result in ranks:
        assert result["pp_bytes"] == 4 * (2 * 8 * 16 * 4)
    assert (tmp_path / "charts" / "pipeline_timeline.png").stat().st_size > 1000
