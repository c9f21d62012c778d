"""Compressors as DDP communication hooks (``DistributedDataParallel.register_comm_hook``).

`register_compressor` installs a hook that averages each DDP bucket with a `Compressor`.
Without compression the hook is an asynchronous all-reduce, like DDP's own. A lossy compressor's
collectives depend on each other (PowerSGD's Q needs the reduced P), so they cannot be one
asynchronous call: the hook hands the bucket to a `CompressorThread`, which compresses and
exchanges it on a worker thread (in bucket order) while backward goes on, and returns the future
DDP's reducer waits for at the end of backward. So compressed buckets overlap with backward as
the exact ones do; the compressor needs process groups of its own for that
(`lightning_hybrid.comm.exchange.build_dp_compressor(own_group=True)`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lightning_hybrid.comm.compress import ByteCounter, Compressor, NoCompression
from lightning_hybrid.comm.overlap import CompressorThread


def _bucket_views(bucket: Any) -> list[torch.Tensor]:
    """The bucket's gradients as views of its flat buffer, in the parameters' shapes."""
    buffer = bucket.buffer()
    views, offset = [], 0
    for param in bucket.parameters():
        n = param.numel()
        views.append(buffer[offset : offset + n].view(param.shape))
        offset += n
    return views


def register_compressor(ddp: DistributedDataParallel, compressor: Compressor) -> CompressorThread | None:
    """Average ``ddp``'s gradient buckets with ``compressor`` (over DDP's ranks; a lossy one on
    process groups of its own). Returns the worker thread lossy compressors run on (close it when
    training ends), None for the exact exchange.

    The compressor's per-tensor state is keyed by parameter name (DDP regroups its buckets after
    the first step and after every restart), and its schedule (``start_iter``, warm-up) follows
    ``compressor.optimizer_steps``, which the caller advances after each optimizer step
    (HybridStrategy does).
    """
    from lightning_hybrid.checkpoint import param_names

    names = param_names(ddp.module)
    world = compressor.world
    if isinstance(compressor, NoCompression):

        # (no annotations: DDP checks them against dist.GradBucket / Future, and this module's are strings)
        def exact(_state, bucket):  # noqa: ANN001, ANN202
            buffer = bucket.buffer()
            compressor.counter.add(ByteCounter.all_reduce_bytes(buffer.numel() * buffer.element_size(), world))
            work = dist.all_reduce(buffer, group=compressor.group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0].div_(world))

        ddp.register_comm_hook(None, exact)
        return None
    thread = CompressorThread(compressor)

    def compressed(_state, bucket):  # noqa: ANN001, ANN202
        return thread.submit(
            _bucket_views(bucket), bucket.buffer(), key=f"bucket{bucket.index()}",
            names=[names[id(p)] for p in bucket.parameters()], iteration=compressor.optimizer_steps,
        )

    ddp.register_comm_hook(None, compressed)
    return thread
