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
    eps: float = 1e-6,
) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return that norm.

    Args:
        parameters: every parameter the optimizer steps (replicated and sharded).
        sharded_ids: ``id()`` of the parameters whose gradient is this rank's shard of a table.
        group: the ranks over which the shards are spread.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    device = params[0].grad.device
    replicated_sq = torch.zeros((), device=device, dtype=torch.float64)
    sharded_sq = torch.zeros((), device=device, dtype=torch.float64)
    for p in params:
        sq = p.grad.detach().double().pow(2).sum()
        if id(p) in sharded_ids:
            sharded_sq += sq
        else:
            replicated_sq += sq
    if dist.is_initialized():
        dist.all_reduce(sharded_sq, group=group)
    total = (replicated_sq + sharded_sq).sqrt()
    coef = max_norm / (float(total) + eps)
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return total.float()
