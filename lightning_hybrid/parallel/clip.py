"""Gradient-norm clipping when some gradients are shards of a table.

Clipping by the norm of each rank's local gradients is silently wrong once tables are sharded:
every rank would see a different "total" norm and scale differently. The true norm adds the
replicated gradients once and the squares of every shard, summed over the ranks that hold them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def clip_grad_norm_across_shards(
    parameters: Iterable[torch.Tensor],
    sharded_ids: set[int],
    max_norm: float,
    *,
    group: dist.ProcessGroup | None = None,
    tp_group: dist.ProcessGroup | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return that norm.

    Args:
        parameters: every parameter the optimizer steps (replicated and sharded).
        sharded_ids: ``id()`` of the parameters whose gradient is this rank's shard of a table.
        group: the ranks over which the table shards are spread.
        tp_group: the tensor-parallel group, over which DTensor gradients with a ``Shard``
            placement are split (their ``Replicate`` ones count once).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    device = _local(params[0].grad).device
    replicated_sq = torch.zeros((), device=device, dtype=torch.float64)
    table_sq = torch.zeros((), device=device, dtype=torch.float64)
    tp_sq = torch.zeros((), device=device, dtype=torch.float64)
    for p in params:
        grad = p.grad
        sq = _local(grad).detach().double().pow(2).sum()
        if id(p) in sharded_ids:
            table_sq += sq
        elif _is_split(grad):
            tp_sq += sq
        else:
            replicated_sq += sq
    if dist.is_initialized():
        dist.all_reduce(table_sq, group=group)
        if tp_group is not None:
            dist.all_reduce(tp_sq, group=tp_group)
    total = (replicated_sq + table_sq + tp_sq).sqrt()
    coef = max_norm / (float(total) + eps)
    if coef < 1.0:
        for p in params:
            _local(p.grad).detach().mul_(coef)
    return total.float()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _is_split(tensor: torch.Tensor) -> bool:
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)
