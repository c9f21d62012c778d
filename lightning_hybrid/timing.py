"""One small timer for phase times that are right on CPU and on CUDA.

On CPU an operation runs while its Python call runs, so host clocks (``time.perf_counter``) time
it. On CUDA a call only queues kernels: a host clock around it reads the launch cost (an NCCL
all-reduce reads ~0) and the first host synchronisation absorbs all the work queued before it.
`Stopwatch` therefore records CUDA events on the current stream instead of reading the clock,
and reads a step's spans one step later, when their events have completed, so timing adds no
synchronisation of its own (waiting for step N-1's last event while step N is queued costs
nothing in a steady state: the loss check already syncs every step). On CPU it reads host clocks
at once.

Used by the monitor (step, embedding lookup and optimizer phases), the byte counters of gradient
exchange (``time/dp_exchange_s``), the tensor-parallel wait clock and the pipeline's per-step busy
and schedule times. The pipeline balancer's profile and its measuring steps synchronise the device
explicitly (few steps, and they need the figures at once).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


class Stopwatch:
    """Spans named by phase, grouped in laps (one lap per training step).

    ``start(name)`` / ``stop(name)`` (or ``with span(name)``) add a span to the current lap;
    ``lap()`` closes it and returns ``{name: seconds}`` summed per name for the lap that is due:
    on CPU the one just closed, on CUDA the one before it (``{}`` at the first lap). ``lag`` says
    which (0 or 1). ``event_factory`` makes the CUDA events (tests pass a stand-in)."""

    def __init__(self, device: torch.device | str | None = None, *, event_factory: Callable[[], Any] | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.events = self.device.type == "cuda"
        self._new_event = event_factory or _cuda_event
        self.lag = 1 if self.events else 0
        self._open: dict[str, Any] = {}
        self._lap: list[tuple[str, Any, Any]] = []
        self._pending: list[tuple[str, Any, Any]] | None = None

    def _mark(self) -> Any:
        if not self.events:
            return time.perf_counter()
        event = self._new_event()
        event.record()
        return event

    def start(self, name: str) -> None:
        self._open[name] = self._mark()

    def stop(self, name: str) -> None:
        started = self._open.pop(name, None)
        if started is not None:
            self._lap.append((name, started, self._mark()))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def lap(self) -> dict[str, float]:
        """Close the current lap; the seconds per name of the lap that is due (see the class)."""
        closed, self._lap = self._lap, []
        if not self.events:
            return _sum((name, end - start) for name, start, end in closed)
        due, self._pending = self._pending, closed
        if due is None:
            return {}
        if due:
            due[-1][2].synchronize()  # events complete in stream order: the last one implies the rest
        return _sum((name, start.elapsed_time(end) / 1000.0) for name, start, end in due)

    def discard(self) -> None:
        """Drop the open spans and the current lap (waits between steps belong to no step)."""
        self._open.clear()
        self._lap = []


def _sum(spans: Any) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name, seconds in spans:
        out[name] += seconds
    return dict(out)
