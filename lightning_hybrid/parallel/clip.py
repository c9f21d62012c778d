"""Gradient-norm clipping when some gradients are shards of a table.

Clipping by the norm of each rank's local gradients is silently wrong once tables are sharded:
every rank would see a different "total" norm and scale differently. The true norm adds the
replicated gradients once and the squares of every shard, summed over the ranks that hold them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lightning_hybrid.parallel.data import local_tensor


def clip_grad_norm_across_shards(
    parameters: Iterable[torch.Tensor],
    sharded_ids: set[int],
    max_norm: float,
    *,
    group: dist.ProcessGroup | None = None,
    stage_group: dist.ProcessGroup | None = None,
    stage_shared_ids: set[int] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return that norm.

    Args:
        parameters: every parameter the optimizer steps (replicated and sharded).
        sharded_ids: ``id()`` of the parameters whose gradient is this rank's shard of a table.
        group: the ranks over which the table shards are spread.
        stage_group: the pipeline group: each of its ranks holds other layers, so their dense
            squares are summed over it.
        stage_shared_ids: ``id()`` of parameters every rank of ``stage_group`` holds with the
            same gradient (see `lightning_hybrid.parallel.pipeline`): counted once, not per stage.

    DTensor gradients (tensor parallelism, FSDP2) count once per shard: their squares are summed
    over the mesh dimensions on which they are ``Shard``-placed (``Replicate`` ones count once).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    device = local_tensor(params[0].grad).device
    replicated_sq = torch.zeros((), device=device, dtype=torch.float64)
    table_sq = torch.zeros((), device=device, dtype=torch.float64)
    stage_shared_sq = torch.zeros((), device=device, dtype=torch.float64)
    shared_ids = stage_shared_ids or set()
    # (mesh, sharded mesh dims) -> sum of squares of the local shards placed that way
    split_sq: dict[tuple[int, tuple[int, ...]], tuple[DeviceMesh, torch.Tensor]] = {}
    for p in params:
        grad = p.grad
        sq = local_tensor(grad).detach().double().pow(2).sum()
        dims = _shard_dims(grad)
        if id(p) in sharded_ids:
            table_sq += sq
        elif id(p) in shared_ids and stage_group is not None:
            stage_shared_sq += sq
        elif dims:
            key = (id(grad.device_mesh), dims)
            mesh, acc = split_sq.get(key, (grad.device_mesh, torch.zeros_like(sq)))
            split_sq[key] = (mesh, acc + sq)
        else:
            replicated_sq += sq
    total_sq = replicated_sq + table_sq
    if dist.is_initialized():
        dist.all_reduce(table_sq, group=group)
        dense_sq = replicated_sq
        for (_mesh_id, dims), (mesh, acc) in split_sq.items():
            for dim in dims:  # summing over each sharded dim in turn sums over their product
                dist.all_reduce(acc, group=mesh.get_group(dim))
            dense_sq = dense_sq + acc
        if stage_group is not None:
            dist.all_reduce(dense_sq, group=stage_group)
        total_sq = dense_sq + table_sq + stage_shared_sq
    total = total_sq.sqrt()
    coef = max_norm / (float(total) + eps)
    if coef < 1.0:
        for p in params:
            local_tensor(p.grad).detach().mul_(coef)
    return total.float()


def _shard_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return ()
    # (FSDP over a tp-sharded dim places the dp split as a _StridedShard, whose is_shard() is False)
    return tuple(i for i, p in enumerate(placements) if p.is_shard() or type(p).__name__ == "_StridedShard")
