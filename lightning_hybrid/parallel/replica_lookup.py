"""Embedding lookups computed once per data-parallel replica when tensor parallelism is on.

With ``tp > 1`` the ranks of one tp group hold the same batch (the sampler splits data over
``dp`` only), because the tensor-parallel blocks need the whole batch on every tp rank. Letting
each of them run the sharded embedding lookup on that batch would do the same lookup ``tp`` times.
`split_lookup_over_group` changes a sharded ``EmbeddingBagCollection`` / ``EmbeddingCollection``
so that tp rank ``r`` looks up only the ``r``-th slice of the batch (torchrec's all-to-alls then
carry ``1/tp`` of the ids) and the slices are all-gathered inside the tp group, so every tp rank
gets the full, replicated embedding output that the tensor-parallel blocks expect.

Backward: the gradient that reaches the embedding output is the same on every tp rank (the TP
blocks all-reduce the gradient of their replicated input), so each rank keeps the rows of its own
slice, without communication, and scales them by ``tp``: torchrec divides table gradients by the
world size (``dp * tp``), which is right when each replica's batch is looked up ``tp`` times, and
each row is now looked up once. Replicated (``data_parallel``) tables need the same: torchrec
averages their gradients over the whole world (it wraps their lookup in DDP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor


def slice_batch(features: KeyedJaggedTensor, start: int, stop: int, size: int) -> KeyedJaggedTensor:
    """Samples ``start:stop`` of every key of ``features``, padded with empty samples to ``size``."""
    keys = features.keys()
    batch = features.stride()
    lengths = features.lengths().view(len(keys), batch)
    weights = features.weights_or_none()
    per_key_start = torch.cat([lengths.new_zeros(1), lengths.sum(1).cumsum(0)])
    values, kept_weights = [], []
    for k in range(len(keys)):
        row = lengths[k]
        first = int(per_key_start[k]) + int(row[:start].sum())
        count = int(row[start:stop].sum())
        values.append(features.values()[first : first + count])
        if weights is not None:
            kept_weights.append(weights[first : first + count])
    new_lengths = lengths.new_zeros(len(keys), size)
    new_lengths[:, : stop - start] = lengths[:, start:stop]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values) if values else features.values()[:0],
        lengths=new_lengths.reshape(-1),
        weights=torch.cat(kept_weights) if weights is not None else None,
        stride=size,
    )


class _GatherSlices(torch.autograd.Function):
    """All-gather equal-sized flat slices; backward keeps this rank's slice of a replicated grad."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup, scale: float, summed: bool) -> torch.Tensor:
        ctx.rank = dist.get_rank(group)
        ctx.scale = scale
        ctx.group = group
        ctx.summed = summed
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.summed:  # the ranks hold different parts of the gradient (pipeline: only the first stage)
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank] * ctx.scale, None, None, None


def _gather_padded(local: torch.Tensor, length: int, group: dist.ProcessGroup, scale: float, summed: bool) -> torch.Tensor:
    """[world, length] from each rank's flat ``local`` (padded with zeros up to ``length``)."""
    padded = torch.nn.functional.pad(local.reshape(-1), (0, length - local.numel()))
    return _GatherSlices.apply(padded, group, scale, summed)


def split_lookup_over_group(
    module: nn.Module, group: dist.ProcessGroup, *, summed_grads: bool = False, grad_scale: float | None = None
) -> None:
    """Make ``module(features)`` look up ``1/size`` of the batch per rank of ``group`` and gather.

    ``module`` is a sharded (or unsharded) EmbeddingBagCollection or EmbeddingCollection; every
    rank of ``group`` must call it with the same ``features``. The result equals the unsplit
    lookup on every rank (values and gradients, see the module docstring for the scaling).

    Gradients: by default each rank's gradient of the output is assumed to be the whole, same
    gradient (tensor parallelism), and each keeps its slice times ``grad_scale`` (default: the
    group size). ``summed_grads=True`` is for groups whose ranks hold different parts of it (the
    ranks of a pipeline, where only the first stage has one): the gradients are summed over the
    group first.
    """
    original: Callable[..., Any] = module.forward
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    scale = float(size) if grad_scale is None else float(grad_scale)

    def forward(features: KeyedJaggedTensor, *args: Any, **kwargs: Any) -> Any:
        batch = features.stride()
        chunk = math.ceil(batch / size)
        start, stop = min(rank * chunk, batch), min((rank + 1) * chunk, batch)
        out = original(slice_batch(features, start, stop, chunk), *args, **kwargs)
        if hasattr(out, "wait") and not isinstance(out, (KeyedTensor, dict)):
            out = out.wait()
        if isinstance(out, KeyedTensor):
            # pooled: [chunk, sum(dims)] per rank -> [batch, sum(dims)]
            values = out.values()
            gathered = _gather_padded(values, values.numel(), group, scale, summed_grads).view(size * chunk, -1)[:batch]
            return KeyedTensor(keys=out.keys(), length_per_key=out.length_per_key(), values=gathered, key_dim=out.key_dim())
        if isinstance(out, dict):
            return _gather_sequences(out, features, chunk, group, scale, summed_grads)
        raise TypeError(f"split_lookup_over_group: {type(module).__name__} returned {type(out).__name__}; expected a KeyedTensor or a dict of JaggedTensor.")

    module.forward = forward  # type: ignore[method-assign]


def _gather_sequences(
    out: dict[str, JaggedTensor], features: KeyedJaggedTensor, chunk: int, group: dist.ProcessGroup, scale: float, summed: bool
) -> dict[str, JaggedTensor]:
    """Unpooled (EmbeddingCollection) outputs: each rank's rows of each feature, re-assembled."""
    size = dist.get_world_size(group)
    keys = features.keys()
    batch = features.stride()
    lengths = features.lengths().view(len(keys), batch)
    padded = torch.nn.functional.pad(lengths, (0, size * chunk - batch)).view(len(keys), size, chunk)
    rows = padded.sum(-1).tolist()  # rows[k][q]: rows of key k looked up by rank q
    dims = [int(out[k].values().shape[-1]) for k in keys]
    per_rank = [sum(rows[k][q] * dims[k] for k in range(len(keys))) for q in range(size)]
    local = torch.cat([out[k].values().reshape(-1) for k in keys])
    gathered = _gather_padded(local, max(per_rank), group, scale, summed)
    result: dict[str, JaggedTensor] = {}
    offsets = [0] * size
    for k, key in enumerate(keys):
        pieces = []
        for q in range(size):
            n = rows[k][q] * dims[k]
            pieces.append(gathered[q, offsets[q] : offsets[q] + n])
            offsets[q] += n
        result[key] = JaggedTensor(values=torch.cat(pieces).view(-1, dims[k]), lengths=lengths[k])
    return result
