"""Compressors as DDP communication hooks (``DistributedDataParallel.register_comm_hook``).

`register_compressor` installs a hook that averages each DDP bucket with a `Compressor`.
Without compression the hook is an asynchronous all-reduce, like DDP's own. A lossy compressor's
collectives depend on each other (PowerSGD's Q needs the reduced P), so they cannot be one
asynchronous call: the hook hands the bucket to a `CompressorThread`, which compresses and
exchanges it on a worker thread (in bucket order) while backward goes on, and returns the future
DDP's reducer waits for at the end of backward. So compressed buckets overlap with backward as
the exact ones do; the compressor needs process groups of its own for that
(`lightning_hybrid.comm.exchange.build_dp_compressor(own_group=True)`).

`ExposedWait` times what of DDP's exchange the dense backward did not hide, for the monitor's
``time/dp_exchange_s`` (otherwise DDP's wait for its buckets at the end of backward would count
as compute, and a layout starved by a slow link would look fully utilised).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lightning_hybrid.comm.compress import ByteCounter, Compressor, NoCompression
from lightning_hybrid.comm.overlap import CompressorThread, flat_views
from lightning_hybrid.timing import Stopwatch


def _bucket_views(bucket: Any) -> list[torch.Tensor]:
    """The bucket's gradients as views of its flat buffer, in the parameters' shapes."""
    return flat_views(bucket.buffer(), [param.shape for param in bucket.parameters()])


class ExposedWait:
    """The part of a DDP step's gradient exchange that outlasts the dense backward, added to
    ``counter``'s seconds (the monitor's ``time/dp_exchange_s``).

    On CPU: from the last dense gradient (``post_accumulate_grad`` hooks) to the end of the last
    bucket's exchange or of backward, whichever comes first: what the reducer waited for after the
    dense backward had nothing left to compute. A sharded table's backward runs after the dense
    one (its lookup comes first in forward); buckets still in flight then are counted up to its
    end, no further. On CUDA the reducer makes the compute stream wait for the buckets, so two
    events on that stream (the last dense gradient, the end of backward) measure it, read a step
    later (`lightning_hybrid.timing.Stopwatch`; a table's backward kernels in between count too)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], counter: ByteCounter) -> None:
        self.counter = counter
        self._last_gradient: float | None = None
        self._last_done: float | None = None
        for p in params:
            p.register_post_accumulate_grad_hook(self._gradient)

    def _gradient(self, param: torch.nn.Parameter) -> None:
        if param.device.type == "cuda":
            if self.counter.watch is None:
                self.counter.watch = Stopwatch(param.device)
            self.counter.watch.start("collective")  # (the last one of the step stays open)
        else:
            self._last_gradient = time.perf_counter()

    def bucket_done(self) -> None:
        """A bucket's exchange finished (called from the thread that finished it)."""
        self._last_done = time.perf_counter()

    def after_backward(self) -> None:
        """At the end of a synchronised backward: add the exposed wait, start afresh."""
        if self.counter.watch is not None and self.counter.watch.events:
            self.counter.watch.stop("collective")
        elif self._last_gradient is not None:
            end = time.perf_counter() if self._last_done is None else min(self._last_done, time.perf_counter())
            self.counter.seconds += max(0.0, end - self._last_gradient)
        self._last_gradient = self._last_done = None


def dense_parameters(ddp: DistributedDataParallel) -> list[torch.nn.Parameter]:
    """The parameters ``ddp`` synchronises (trainable, not among those it was told to ignore)."""
    return [p for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ddp.parameters_to_ignore]


def register_compressor(
    ddp: DistributedDataParallel, compressor: Compressor, wait: ExposedWait | None = None
) -> CompressorThread | None:
    """Average ``ddp``'s gradient buckets with ``compressor`` (over DDP's ranks; a lossy one on
    process groups of its own). Returns the worker thread lossy compressors run on (close it when
    training ends), None for the exact exchange. ``wait`` is told when each bucket is done.

    The compressor's per-tensor state is keyed by parameter name (DDP regroups its buckets after
    the first step and after every restart), and its schedule (``start_iter``, warm-up) follows
    ``compressor.optimizer_steps``, which the caller advances after each optimizer step
    (HybridStrategy does).
    """
    from lightning_hybrid.checkpoint import param_names

    names = param_names(ddp.module)
    world = compressor.world

    def done(value: Any) -> Any:
        if wait is not None:
            wait.bucket_done()
        return value

    if isinstance(compressor, NoCompression):

        # (no annotations: DDP checks them against dist.GradBucket / Future, and this module's are strings)
        def exact(_state, bucket):  # noqa: ANN001, ANN202
            buffer = bucket.buffer()
            compressor.counter.add(ByteCounter.all_reduce_bytes(buffer.numel() * buffer.element_size(), world))
            work = dist.all_reduce(buffer, group=compressor.group, async_op=True)
            return work.get_future().then(lambda fut: done(fut.value()[0].div_(world)))

        ddp.register_comm_hook(None, exact)
        return None
    thread = CompressorThread(compressor)

    def compressed(_state, bucket):  # noqa: ANN001, ANN202
        return thread.submit(
            _bucket_views(bucket), bucket.buffer(), key=f"bucket{bucket.index()}",
            names=[names[id(p)] for p in bucket.parameters()], iteration=compressor.optimizer_steps, done=done,
        )

    ddp.register_comm_hook(None, compressed)
    return thread
