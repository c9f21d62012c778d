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


class StepLog(pl.Callback):
    """Rank 0 appends one JSON line per training step to ``path``: the attempt (a fresh id per
    process start), the global step after it and the step's loss. A fault-injection check reads
    it to *prove* a resume: the restarted attempt's first step must be the one after the last
    checkpoint, with the uninterrupted run's loss at that step (not step 1 again)."""

    def __init__(self, *, path: str) -> None:
        self.path = path
        self.attempt = f"{os.getpid()}-{os.urandom(4).hex()}"

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, *args: Any) -> None:
        if trainer.global_rank != 0:
            return
        import json

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        line = {"attempt": self.attempt, "step": trainer.global_step, "loss": float(loss)}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")


def read_step_log(path: str | os.PathLike[str]) -> list[list[dict[str, Any]]]:
    """The lines of a `StepLog` file, grouped by attempt in order of appearance."""
    import json

    attempts: dict[str, list[dict[str, Any]]] = {}
    for line in Path(path).read_text().splitlines():
        entry = json.loads(line)
        attempts.setdefault(entry["attempt"], []).append(entry)
    return list(attempts.values())
