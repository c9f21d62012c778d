"""The explicit exact gradient all-reduce, overlapped with backward (what DDP's reducer does, for
the layouts DDP cannot wrap).

Under tensor parallelism the dense parameters are DTensors, which DDP cannot hook, so their dp
exchange is explicit (`lightning_hybrid.comm.exchange`). Run after backward, it adds the whole
all-reduce to every step. `OverlappedAllReduce` starts it during backward instead: parameters
are grouped into buckets of about ``bucket_mb`` in reverse registration order (roughly the order
backward produces their gradients, as DDP assumes); a ``post_accumulate_grad`` hook marks each
parameter ready, and a full bucket is flattened (fp32) and all-reduced asynchronously while
backward goes on. Buckets start strictly in index order, so every rank issues the same
collectives in the same order whatever order its hooks fire in. After the first exchange the
buckets are rebuilt in the order the gradients actually came (rank 0's order, broadcast once;
parameters that got none go last), as DDP does, so an unused or late parameter does not hold back
the buckets behind it. `finish` (after backward) starts the buckets that never filled, with the
gradients that exist (like the after-backward path: a parameter without a gradient on every rank
is skipped), waits for all, and writes the averages back: the same numbers as
`compress.NoCompression` (fp32 sum, divided by the world size).

Hooks act only while ``armed()`` says so (the strategy: not inside ``no_sync`` gradient
accumulation), so accumulating micro-batches exchange once, on the last one. Used for
``data_parallel_mode="sync"`` without compression; the rest keeps the after-backward exchange.

Under a scheduled pipeline a step runs one backward per microbatch, so a stage parameter's
gradient is final only at its ``arrivals()``-th hook of the step (the schedule's microbatch
count); only ``hooked`` parameters (the stages' own) are counted, the rest (e.g. a replicated
table outside the stages, whose gradient the pipeline sums over its ranks after the schedule)
never start a bucket from a hook and go out in `finish`. The averages are written into each
parameter's gradient as it is at `finish` (the pipeline step sets gradients aside and puts them
back between the schedule and the exchange); a parameter that has none by then (a skipped
non-finite step) is left without one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_hybrid.comm.compress import ByteCounter
from lightning_hybrid.parallel.data import local_tensor


class OverlappedAllReduce:
    """Average the gradients of ``params`` over ``group`` during backward (see the module docstring)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        group: dist.ProcessGroup | None,
        *,
        counter: ByteCounter,
        armed: Callable[[], bool] = lambda: True,
        bucket_mb: float = 25.0,
        arrivals: Callable[[], int] = lambda: 1,
        hooked: Sequence[torch.nn.Parameter] | None = None,
    ) -> None:
        """``arrivals()``: backward passes per step that reach each hooked parameter (1; a
        pipeline's microbatch count); ``hooked``: the parameters whose hooks count (None: all)."""
        if bucket_mb <= 0:
            raise ValueError(f"OverlappedAllReduce(bucket_mb={bucket_mb!r}) must be > 0.")
        self.group, self.counter, self.armed, self.arrivals = group, counter, armed, arrivals
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.params = list(params)
        self._hooked = {id(p) for p in (self.params if hooked is None else hooked)}
        self.started_in_backward = 0  # buckets the last step started from hooks (the overlap achieved)
        self.cap = bucket_mb * 2**20
        self._arrival: list[int] | None = []  # parameter indices in gradient order (until rebuilt)
        self._build(list(reversed(range(len(self.params)))))
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._ready)
        self._reset()

    def _build(self, order: list[int]) -> None:
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for i in order:
            if not self.buckets or size >= self.cap:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(self.params[i])
            size += local_tensor(self.params[i]).numel() * 4
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def _rebuild_in_arrival_order(self) -> None:
        arrived = self._arrival or []
        missing = set(range(len(self.params))) - set(arrived)
        order = [arrived + sorted(missing, reverse=True)]
        # (one broadcast, once: every rank must bucket alike even if its hooks fired in another order)
        dist.broadcast_object_list(order, src=dist.get_global_rank(self.group or dist.group.WORLD, 0), group=self.group)
        self._arrival = None
        self._build(order[0])
        self._reset()

    def _reset(self) -> None:
        self._ready_count = [0] * len(self.buckets)
        self._seen: set[int] = set()
        self._hits: dict[int, int] = {}  # hook calls this step, per parameter (pipelines: one per microbatch)
        self._next = 0  # the next bucket to start (they start in index order)
        self._in_flight: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]] = []

    def _ready(self, param: torch.nn.Parameter) -> None:
        key = id(param)
        if self.world == 1 or key not in self._hooked or key in self._seen or not self.armed():
            return
        self._hits[key] = self._hits.get(key, 0) + 1
        if self._hits[key] < self.arrivals():
            return  # more microbatches will add to this gradient
        self._seen.add(key)
        if self._arrival is not None:
            self._arrival.append(self._index[id(param)])
        self._ready_count[self._bucket_of[id(param)]] += 1
        while self._next < len(self.buckets) and self._ready_count[self._next] == len(self.buckets[self._next]):
            self._start(self._next)
            self._next += 1

    def _start(self, index: int) -> None:
        params = [p for p in self.buckets[index] if p.grad is not None]
        if not params:
            return
        flat = torch.cat([local_tensor(p.grad).reshape(-1).float() for p in params])
        self.counter.add(ByteCounter.all_reduce_bytes(flat.numel() * flat.element_size(), self.world))
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._in_flight.append((work, flat, params))

    def finish(self) -> None:
        """Start what backward did not, wait for every bucket, write the averages back."""
        if self.world == 1:
            return
        self.started_in_backward = self._next
        try:
            while self._next < len(self.buckets):
                self._start(self._next)
                self._next += 1
            if self._in_flight:
                with self.counter.timed(self._in_flight[-1][1]):  # the exposed part of the exchange
                    for work, _, _ in self._in_flight:
                        work.wait()
            for _, flat, params in self._in_flight:
                flat /= self.world
                offset = 0
                for p in params:
                    n = local_tensor(p).numel()
                    if p.grad is not None:  # (the gradient as it is now: a pipeline step may have put it back)
                        g = local_tensor(p.grad)
                        g.copy_(flat[offset : offset + n].view_as(g))
                    offset += n
        finally:
            self._reset()
        if self._arrival is not None:  # (the first exchange on every rank alike: the broadcast is collective)
            self._rebuild_in_arrival_order()
