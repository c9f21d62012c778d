"""Synchronous vs asynchronous data parallelism for the dense parameters.

- ``sync``: gradients averaged every step (DDP or a compressor), the reference.
- ``local_sgd`` (`LocalSGD`): each replica steps on its own gradients; every ``period`` steps the
  parameters are averaged (Lin et al., "Don't use large mini-batches, use local SGD", with
  post-local-SGD: ``warmup_steps`` synchronous steps first). Communication drops by ``period``x;
  replicas drift apart between averages. With period 1 and plain SGD it equals ``sync``.
  ``overlap=True`` hides the average behind the next period's steps (Wang et al., "Overlap
  Local-SGD", 2020, with the pull set to a full step): at an averaging step each replica sends a
  copy of its weights ``s_i`` and goes on training; at the next averaging step it takes the
  average ``s̄`` that has arrived meanwhile and keeps its own progress since: ``x_i <- s̄ + (x_i -
  s_i)``, then sends again. Nothing waits on the link unless the all-reduce outlasts a whole
  period; replicas drift by up to two periods' progress instead of one. At the end of training
  the last average is waited for and applied (the replicas then differ only by the steps after it).
- ``async`` (`StaleGradients`): bounded staleness ``s``. Step t's gradient all-reduce starts
  right after its backward and is waited for ``s`` steps later, so it overlaps with the next ``s``
  steps' compute; the optimizer applies the averaged gradient of step t - s. Every replica applies
  the same averaged gradients, so the parameters stay identical; the first ``s`` steps apply none.

Embedding tables sharded by torchrec stay synchronous in every mode: their updates happen inside
torchrec's backward collectives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from lightning_hybrid.comm.compress import ByteCounter
from lightning_hybrid.parallel.data import local_tensor

DataParallelMode = Literal["sync", "local_sgd", "async"]
MODES: tuple[str, ...] = ("sync", "local_sgd", "async")


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in tensors])


def _unflat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class LocalSGD:
    """Average ``params`` over ``group`` every ``period`` optimizer steps (after ``warmup_steps``);
    with ``overlap``, in the background (see the module docstring). An overlapped average stays in
    flight for a whole period: give it a ``group`` of its own, so other collectives do not queue
    behind it (NCCL)."""

    def __init__(
        self, params: Sequence[torch.nn.Parameter], group: dist.ProcessGroup | None, *, period: int, warmup_steps: int, counter: ByteCounter,
        overlap: bool = False,
    ) -> None:
        if period < 1:
            raise ValueError(f"local_sgd_period={period} must be >= 1.")
        self.params = list(params)
        self.group = group
        self.period = period
        self.warmup_steps = warmup_steps
        self.counter = counter
        self.overlap = overlap
        self.steps = 0
        # overlap: (the all-reduce in flight or None once complete, the weights sent, their sum in progress)
        self.pending: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def syncs_gradients(self) -> bool:
        """True while in the synchronous warm-up (post-local SGD)."""
        return self.steps < self.warmup_steps

    def state_dict(self) -> dict[str, Any]:
        """The step count and, with ``overlap``, the average in flight (waited for here, so a resume
        applies exactly what the uninterrupted run would have applied)."""
        state: dict[str, Any] = {"steps": self.steps}
        if self.pending is not None:
            self._wait()
            state["pending"] = {"sent": self.pending[1].clone(), "sum": self.pending[2].clone()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        pending = state.get("pending")
        # (copies: the sum is divided in place when applied, and the caller's state stays as it was)
        self.pending = None if pending is None else (None, pending["sent"].clone(), pending["sum"].clone())

    def _tensors(self) -> list[torch.Tensor]:
        return [local_tensor(p.detach()) for p in self.params]

    def _wait(self) -> None:
        assert self.pending is not None
        work, sent, total = self.pending
        if work is not None:
            with self.counter.timed(total):  # only what the period's steps did not hide
                work.wait()
            self.pending = (None, sent, total)

    @torch.no_grad()
    def _apply_pending(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """x <- average of what was sent + (x - what this replica sent); the new x, flat."""
        self._wait()
        assert self.pending is not None
        _, sent, total = self.pending
        self.pending = None
        # (x - sent) first: the replica's own progress, exactly 0 when it took no step since, so
        # replicas that did not move land on bitwise the same average; the sum is divided in place
        # (it is not used again: no second weight-sized buffer per period)
        flat = _flat(tensors).sub_(sent).add_(total.div_(dist.get_world_size(self.group)))
        _unflat(flat, tensors)
        return flat

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.steps += 1
        if self.steps <= self.warmup_steps or (self.steps - self.warmup_steps) % self.period != 0:
            return
        world = dist.get_world_size(self.group)
        tensors = self._tensors()
        flat = self._apply_pending(tensors) if self.pending is not None else _flat(tensors)
        self.counter.add(ByteCounter.all_reduce_bytes(flat.numel() * flat.element_size(), world))
        if self.overlap:
            total = flat.clone()
            self.pending = (dist.all_reduce(total, group=self.group, async_op=True), flat, total)
            return
        with self.counter.timed(flat):
            dist.all_reduce(flat, group=self.group)
        _unflat(flat / world, tensors)

    def drain(self) -> None:
        """End of training: wait for the average in flight and apply it (no collective left hanging)."""
        if self.pending is not None:
            self._apply_pending(self._tensors())


class StaleGradients:
    """Bounded-staleness gradient averaging: apply the average of the gradients of ``staleness`` steps ago."""

    def __init__(self, params: Sequence[torch.nn.Parameter], group: dist.ProcessGroup | None, *, staleness: int, counter: ByteCounter) -> None:
        if staleness < 1:
            raise ValueError(f"async_staleness={staleness} must be >= 1 (0 is data_parallel_mode='sync').")
        self.params = list(params)
        self.group = group
        self.staleness = staleness
        self.counter = counter
        self.pending: deque[tuple[Any, torch.Tensor]] = deque()

    @torch.no_grad()
    def exchange(self) -> None:
        """Called after backward: start this step's all-reduce, put the stale average into ``.grad``."""
        grads = [local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p)) for p in self.params]
        flat = _flat(grads)
        world = dist.get_world_size(self.group)
        self.counter.add(ByteCounter.all_reduce_bytes(flat.numel() * flat.element_size(), world))
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.pending.append((work, flat))
        if len(self.pending) > self.staleness:
            old_work, old = self.pending.popleft()
            with self.counter.timed(old):
                if old_work is not None:  # None: restored from a checkpoint, already complete
                    old_work.wait()
            _unflat(old / world, grads)
        else:
            for g in grads:  # nothing old enough yet: no update, on every replica alike
                g.zero_()
        for p, g in zip(self.params, grads, strict=True):
            if p.grad is None:
                p.grad = g

    def state_dict(self) -> dict[str, Any]:
        """The averaged gradients still owed to later steps (in flight now: waited for here, so a
        resume applies exactly what the uninterrupted run would have applied)."""
        for work, _ in self.pending:
            if work is not None:
                work.wait()
        return {"pending": [flat.clone() for _, flat in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = deque((None, flat) for flat in state["pending"])

    def drain(self) -> None:
        """Wait for the all-reduces still in flight (end of training: no collective left hanging)."""
        while self.pending:
            work, _ = self.pending.popleft()
            if work is not None:
                work.wait()
