"""Write top-K recommendations from ``trainer.predict`` / ``lightning-hybrid predict`` to a CSV file.

Each rank writes its users to a part file; rank 0 then merges them into
``<output_dir>/recommendations.csv`` (``user,rank,item,score``, raw ids from the data module when
it knows them) and removes the parts, so a half-written result never has the final name.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter


class RecommendationWriter(BasePredictionWriter):
    """Args:
    output_dir: where ``recommendations.csv`` goes (created if missing).
    """

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        out = Path(self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = getattr(trainer.datamodule, "data", None) if trainer.datamodule is not None else None
        user_ids = data.user_ids if data is not None else None
        item_ids = data.item_ids if data is not None else None
        part = out / f".recommendations.part{trainer.global_rank}.csv"
        with part.open("w", newline="") as handle:
            writer = csv.writer(handle)
            for batch in predictions:
                for user, items, scores in zip(batch["user"].tolist(), batch["items"].tolist(), batch["scores"].tolist(), strict=True):
                    for position, (item, score) in enumerate(zip(items, scores, strict=True), start=1):
                        raw_user = user_ids[user] if user_ids else user
                        raw_item = item_ids[item - 1] if item_ids and item >= 1 else item
                        writer.writerow([raw_user, position, raw_item, f"{score:.6g}"])
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            rows: list[list[str]] = []
            for rank in range(trainer.world_size):
                rank_part = out / f".recommendations.part{rank}.csv"
                with rank_part.open(newline="") as handle:
                    rows.extend(csv.reader(handle))
                os.remove(rank_part)
            rows.sort(key=lambda r: (0, int(r[0]), int(r[1])) if r[0].isdigit() else (1, r[0], int(r[1])))
            final_tmp = out / ".recommendations.csv.tmp"
            with final_tmp.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["user", "rank", "item", "score"])
                writer.writerows(rows)
            final_tmp.replace(out / "recommendations.csv")
        trainer.strategy.barrier()


class MetricsSummary(pl.Callback):
    """Print the final logged metrics as a small table when fit/validate/test ends (rank 0)."""

    def __init__(self, keys: list[str] | None = None) -> None:
        self.keys = keys

    def _print(self, trainer: pl.Trainer, title: str) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if self.keys is None or k in self.keys}
        if not metrics:
            return
        width = max(len(k) for k in metrics)
        lines = [f"{title} (step {trainer.global_step}):"] + [f"  {k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
        print("\n".join(lines), flush=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, "final metrics")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, "test metrics")
