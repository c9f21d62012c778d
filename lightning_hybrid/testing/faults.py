"""Fault injection for tests and the fault-injection benchmark: kill a rank mid-training.

`KillRank` is an ordinary Lightning callback (so a recipe YAML can name it): once per job it
SIGKILLs one rank right after a chosen training step, before that step's checkpoint is written — the worst moment, short of a crash
inside the save itself (which the atomic save covers). A SIGKILL leaves no chance to clean up,
like an OOM kill or a lost node.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class KillRank(pl.Callback):
    """SIGKILL global rank ``rank`` right after global step ``step``, once per job.

    "Once" is remembered in a marker file (default: in the trainer's ``default_root_dir``), not
    in torchrun's restart counter: after a restart the nodes of a multi-node job may disagree on
    that counter (a node restarted for a membership change does not count it).
    """

    def __init__(self, *, rank: int, step: int, marker: str | None = None) -> None:
        if rank < 0 or step < 1:
            raise ValueError(f"KillRank(rank={rank}, step={step}): rank must be >= 0 and step >= 1.")
        self.rank = rank
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        marker = Path(self.marker or os.path.join(trainer.default_root_dir, f".killed-rank{self.rank}-step{self.step}"))
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
