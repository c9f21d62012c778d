"""The explicit dp exchange, overlapped with backward (what DDP's reducer does, for the layouts
DDP cannot wrap), exact or compressed.

Under tensor parallelism the dense parameters are DTensors, which DDP cannot hook, and a
pipeline stage's replicas are a sub-group, so their dp exchange is explicit
(`lightning_hybrid.comm.exchange`). Run after backward, it adds the whole exchange to every step.
`OverlappedExchange` starts it during backward instead: parameters are grouped into buckets of
about ``bucket_mb`` in reverse registration order (roughly the order backward produces their
gradients, as DDP assumes); a ``post_accumulate_grad`` hook marks each parameter ready, and a full
bucket's gradients are copied into one flat fp32 buffer and exchanged while backward goes on.
Buckets start strictly in index order, so every rank issues the same collectives in the same
order whatever order its hooks fire in. After the first exchange the buckets are rebuilt in the
order the gradients actually came (rank 0's order, broadcast once over ``group``; parameters that
got none go last), as DDP does, so an unused or late parameter does not hold back the buckets
behind it. `finish` (after backward) starts the buckets that never filled, with the gradients
that exist (like the after-backward path: a parameter without a gradient on every rank is
skipped), waits for all, and writes the averages into the gradients.

How a bucket is exchanged depends on the compressor:

- `NoCompression`: an asynchronous all-reduce of the flat buffer on ``group`` (the collective
  runs in the backend while backward goes on), divided by the world size at `finish`: the same
  numbers as `compress.NoCompression` after backward.
- any other (fp16/bf16, PowerSGD, top-k, sign, hierarchical): ``compressor.reduce`` on views of
  the flat buffer, run by one worker thread in bucket order (a compressor's collectives depend on
  each other, PowerSGD's Q on the reduced P, so they cannot be one asynchronous call; torch ops
  and collectives release the GIL, so backward computes meanwhile). Each tensor is compressed on
  its own, with its state keyed by parameter name, so the averages equal the after-backward
  ``compressor.reduce`` of the same gradients. The compressor must own its process groups
  (`DenseExchange.build` gives it a dp group of its own): the worker's collectives run while the
  main thread may use the mesh's groups (a pipeline's forward of the next microbatch, a loss's
  token count), and one group's collectives must come in one order on every rank. On CUDA the
  worker runs on a side stream that waits for the bucket's copy (an event recorded where the hook
  fired), and `finish` makes the current stream wait for the worker's stream.

Hooks act only while ``armed()`` says so (the strategy: not inside ``no_sync`` gradient
accumulation), so accumulating micro-batches exchange once, on the last one.

Under a scheduled pipeline a step runs one backward per microbatch, so a stage parameter's
gradient is final only at its ``arrivals()``-th hook of the step (the schedule's microbatch
count); only ``hooked`` parameters (the stages' own) are counted, the rest (e.g. a replicated
table outside the stages, whose gradient the pipeline sums over its ranks after the schedule)
never start a bucket from a hook and go out in `finish`. The averages are written into each
parameter's gradient as it is at `finish` (the pipeline step sets gradients aside and puts them
back between the schedule and the exchange); a parameter that has none by then (a skipped
non-finite step) is left without one.

The time the monitor logs as ``time/dp_exchange_s`` is the exposed part: the wait in `finish`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from lightning_hybrid.comm.compress import ByteCounter, Compressor, NoCompression, untimed
from lightning_hybrid.parallel.data import local_tensor

#: the name of the thread compressed buckets run on
WORKER_THREAD_PREFIX = "lightning-hybrid-dp-exchange"


def flat_views(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Consecutive views of the 1-D ``flat``, one per shape (a bucket's gradients in its buffer)."""
    views, offset = [], 0
    for shape in shapes:
        views.append(flat[offset : offset + shape.numel()].view(shape))
        offset += shape.numel()
    return views


class CompressorThread:
    """Runs ``compressor.reduce`` calls on one worker thread, in the order they were submitted, so
    a compressed exchange goes on while backward computes (torch ops and collectives release the
    GIL). Used by `OverlappedExchange` and by the DDP comm hook (`lightning_hybrid.comm.hooks`).

    The compressor's process groups must be its own: the worker's collectives run while the
    calling thread may run others, and one group's collectives must come in the same order on
    every rank. On CUDA the worker runs on a side stream that first waits for the calling
    stream (where backward wrote the gradients), and the returned future is CUDA-aware: whoever
    waits on it has its current stream wait for the worker's (DDP's reducer does, and so does
    `OverlappedExchange.finish`). Collectives run here are not timed one by one
    (`compress.untimed`): the caller times its exposed wait."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_THREAD_PREFIX, initializer=untimed)
        self._side_stream: Any = None

    def submit(
        self, tensors: list[torch.Tensor], result: torch.Tensor, *, done: Callable[[Any], Any] = lambda value: value, **reduce_kwargs: Any
    ) -> torch.futures.Future:
        """Average ``tensors`` in place with ``compressor.reduce(tensors, **reduce_kwargs)``; the
        future's value is ``done(result)`` (DDP's hook returns its bucket buffer; ``done`` runs on
        the worker when the exchange has finished)."""
        device = result.device
        cuda = device.type == "cuda"
        future: torch.futures.Future = torch.futures.Future(devices=[device] if cuda else None)
        written = None
        if cuda:
            written = torch.cuda.Event()
            written.record()  # (on the stream the gradients were written on)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=device)

        def run() -> None:
            try:
                if written is None:
                    self.compressor.reduce(tensors, **reduce_kwargs)
                    future.set_result(done(result))
                    return
                with torch.cuda.stream(self._side_stream):
                    self._side_stream.wait_event(written)
                    self.compressor.reduce(tensors, **reduce_kwargs)
                    future.set_result(done(result))  # (records the side stream's work on the future)
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(error)

        self._executor.submit(run)
        return future

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class OverlappedExchange:
    """Average the gradients of ``params`` over the dp ranks during backward (see the module docstring)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        group: dist.ProcessGroup | None,
        *,
        compressor: Compressor,
        names: dict[int, str] | None = None,
        armed: Callable[[], bool] = lambda: True,
        bucket_mb: float = 25.0,
        arrivals: Callable[[], int] = lambda: 1,
        hooked: Sequence[torch.nn.Parameter] | None = None,
    ) -> None:
        """``group``: the dp group (the exact all-reduce's, and the one-time bucket-order
        broadcast's); ``compressor``: `NoCompression` for the exact exchange, else one on groups of
        its own; ``names``: parameter names by ``id`` (key the compressor's per-tensor state);
        ``arrivals()``: backward passes per step that reach each hooked parameter (1; a
        pipeline's microbatch count); ``hooked``: the parameters whose hooks count (None: all)."""
        if bucket_mb <= 0:
            raise ValueError(f"OverlappedExchange(bucket_mb={bucket_mb!r}) must be > 0.")
        self.group, self.compressor, self.armed, self.arrivals = group, compressor, armed, arrivals
        self.counter = compressor.counter
        self.exact = isinstance(compressor, NoCompression)
        self.world = compressor.world
        self.params = list(params)
        self.names = [(names or {}).get(id(p), str(i)) for i, p in enumerate(self.params)]
        self._hooked = {id(p) for p in (self.params if hooked is None else hooked)}
        self.started_in_backward = 0  # buckets the last step started from hooks (the overlap achieved)
        self.cap = bucket_mb * 2**20
        self._thread: CompressorThread | None = None  # compressed buckets: one thread, buckets in order
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
        if self.exact:
            self.counter.add(ByteCounter.all_reduce_bytes(flat.numel() * flat.element_size(), self.world))
            work: Any = dist.all_reduce(flat, group=self.group, async_op=True)
        else:
            work = self._submit(index, flat, params)
        self._in_flight.append((work, flat, params))

    def _submit(self, index: int, flat: torch.Tensor, params: list[torch.nn.Parameter]) -> Any:
        views = flat_views(flat, [local_tensor(p).shape for p in params])
        if self._thread is None:
            self._thread = CompressorThread(self.compressor)
        names = [self.names[self._index[id(p)]] for p in params]
        return self._thread.submit(views, flat, key=f"bucket{index}", names=names, iteration=self.compressor.optimizer_steps)

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
                        work.wait()  # (a compressed bucket's future re-raises what the worker raised)
            for _, flat, params in self._in_flight:
                if self.exact:
                    flat /= self.world
                for p, average in zip(params, flat_views(flat, [local_tensor(p).shape for p in params]), strict=True):
                    if p.grad is not None:  # (the gradient as it is now: a pipeline step may have put it back)
                        local_tensor(p.grad).copy_(average)
        finally:
            self._reset()
        if self._arrival is not None:  # (the first exchange on every rank alike: the broadcast is collective)
            self._rebuild_in_arrival_order()

    def close(self) -> None:
        """Stop the worker thread (compressed exchanges; idle between steps)."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None
