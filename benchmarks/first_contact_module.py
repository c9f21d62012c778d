"""The module and callback of `benchmarks/first_contact.py` (module level: spawned ranks import them)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_hybrid.models.sasrec import SASRec


class PlainSGD(SASRec):
    """The reference model written as an ordinary module: one SGD optimizer for everything."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Times(pl.Callback):
    """Rank 0 writes the wall time at the end of every training step to ``out``."""

    def __init__(self, out: str, started: float) -> None:
        self.out, self.started = out, started
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.ends.append(time.time())
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps({"started": self.started, "ends": self.ends}))
