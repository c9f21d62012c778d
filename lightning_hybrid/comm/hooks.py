"""Compressors as DDP communication hooks (``DistributedDataParallel.register_comm_hook``).

`register_compressor` installs a hook that averages each DDP bucket with a `Compressor`.
Without compression the hook is an asynchronous all-reduce, like DDP's own, so communication
still overlaps with the rest of backward; the lossy compressors work synchronously inside the
hook (their collectives depend on each other: PowerSGD's Q needs the reduced P), which gives up
that overlap for the bucket being compressed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lightning_hybrid.comm.compress import ByteCounter, Compressor, NoCompression


def _bucket_views(bucket: Any) -> list[torch.Tensor]:
    """The bucket's gradients as views of its flat buffer, in the parameters' shapes."""
    buffer = bucket.buffer()
    views, offset = [], 0
    for param in bucket.parameters():
        n = param.numel()
        views.append(buffer[offset : offset + n].view(param.shape))
        offset += n
    return views


def register_compressor(ddp: DistributedDataParallel, compressor: Compressor) -> None:
    """Average ``ddp``'s gradient buckets with ``compressor`` (its group must be DDP's).

    The compressor's per-tensor state is keyed by parameter name (DDP regroups its buckets after
    the first step and after every restart), and its schedule (``start_iter``, warm-up) follows
    ``compressor.optimizer_steps``, which the caller advances after each optimizer step
    (HybridStrategy does).
    """
    from lightning_hybrid.checkpoint import param_names

    names = param_names(ddp.module)

    # (no annotations: DDP checks them against dist.GradBucket / Future, and this module's are strings)
    def hook(_state, bucket):  # noqa: ANN001, ANN202
        buffer = bucket.buffer()
        world = compressor.world
        if isinstance(compressor, NoCompression):
            compressor.counter.add(ByteCounter.all_reduce_bytes(buffer.numel() * buffer.element_size(), world))
            work = dist.all_reduce(buffer, group=compressor.group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0].div_(world))
        compressor.reduce(
            _bucket_views(bucket),
            key=f"bucket{bucket.index()}",
            names=[names[id(p)] for p in bucket.parameters()],
            iteration=compressor.optimizer_steps,
        )
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done

    ddp.register_comm_hook(None, hook)
