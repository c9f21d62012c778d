"""Tables sharded inside a group of ranks and replicated across the groups (torchrec's "2D" layout).

With ``HybridStrategy(embedding_shard_group_size=k)`` (or ``"node"``: the processes of one node),
the world splits into consecutive groups of ``k`` ranks. Each group holds every table whole,
sharded between its own ranks by one torchrec plan (made once for ``k`` ranks, its ranks moved
to each group's), so the embedding all-to-alls of a step stay inside a group: inside a node
when the groups are nodes, where links are fast. The groups are copies of one another; after
each backward every table-shard gradient is averaged over the ranks that hold the same shard in
the other groups (one exchange per step across nodes, of the shards' gradients), so every copy
takes the same optimizer step and the job trains exactly as with tables sharded over all ranks.

torchrec's `DMPCollection` builds the same layout on CUDA and keeps the copies together by
averaging weights and optimizer state every few steps (`DMPCollection.sync`); here the gradients
are averaged every step instead, which is exact for any optimizer and leaves nothing to sync.
It needs each shard's gradient, so tables use the dense kernel (fbgemm's fused kernel applies
its update inside backward and keeps no gradient to average).

Usable without Lightning::

    groups = make_table_groups(group_size=2)               # collective: every rank, same order
    plan = plan_sharding_on_rank0(model, env=groups.planning_env(), ...)   # planned for 2 ranks
    move_plan_to_group(plan, groups)                       # placements 0..1 -> this group's ranks
    shard_embeddings_in_place(model, plan=plan, env=groups.sharding_env(), device=device)
    loss.backward(); average_table_gradients(table_params, groups)

Cost per step, across the groups: each shard's gradient, averaged over the ``world / k`` copies.
A step touches few rows of a large catalogue, so where the most rows any copy touched is under a
quarter of the shard the copies exchange just those rows and their indices (an all-gather);
otherwise the whole shard's gradient goes in one all-reduce. Against sharding over all ranks it
pays where the all-to-alls it keeps inside a node are large next to that: many ids per step
against few or wide rows; `benchmarks/table_groups.py` measures both regimes (docs/benchmarks.md).

Under HybridStrategy (``embedding_shard_group_size``) it composes with the dense parameters on
DDP or FSDP2, exact or compressed dp exchange, norm clipping (table norms summed over the shard
group), the tied output (`parallel.tied_output` scores over the shard group), DCP checkpoints,
resuming and `lightning_hybrid.checkpoint.full_state_dict`; tensor/pipeline parallelism, local
SGD / async and the fused kernel are refused at construction (`strategies.options`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_hybrid.comm.compress import ByteCounter


@dataclass(frozen=True)
class TableGroups:
    """This rank's table groups: ``shard_group`` (the ``size`` ranks that share one copy of the
    tables, ``index``-th of ``copies``) and ``replica_group`` (the ranks holding the same shards in
    every copy)."""

    size: int
    copies: int
    index: int
    shard_group: dist.ProcessGroup
    replica_group: dist.ProcessGroup

    @property
    def first_rank(self) -> int:
        """Global rank of this group's first member (its ranks are consecutive)."""
        return self.index * self.size

    def planning_env(self) -> Any:
        """A torchrec ShardingEnv for planning: ``size`` ranks, broadcast over the whole world so
        every copy gets the same plan (global rank 0 plans; see `plan_sharding_on_rank0`)."""
        from torchrec.distributed.types import ShardingEnv

        return ShardingEnv(world_size=self.size, rank=dist.get_rank(), pg=dist.group.WORLD)

    def sharding_env(self) -> Any:
        """The torchrec ShardingEnv the tables are sharded in: this group's ranks only."""
        from torchrec.distributed.types import ShardingEnv

        return ShardingEnv.from_process_group(self.shard_group)


def resolve_group_size(value: int | str | None, *, world: int, local_world_size: int) -> int | None:
    """The group size ``embedding_shard_group_size=value`` asks for on ``world`` ranks, or None for
    one group of every rank (the ordinary layout). Raises ValueError naming the value and the fix."""
    if value is None:
        return None
    size = local_world_size if value == "node" else value
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(
            f"HybridStrategy(embedding_shard_group_size={value!r}): use an integer >= 2 (ranks per copy of the tables) "
            "or 'node'. To keep every table whole on every rank use embedding_sharding={table: 'data_parallel'} or "
            "shard_embeddings=False."
        )
    if world % size:
        raise ValueError(
            f"HybridStrategy(embedding_shard_group_size={value!r}) asks for groups of {size} ranks, which do not divide "
            f"the {world} ranks of this job. Use a divisor of {world} (the processes per node with 'node')."
        )
    return None if size == world else size


def make_table_groups(group_size: int) -> TableGroups:
    """Create the shard and replica groups for consecutive groups of ``group_size`` ranks.
    Collective: every rank calls it, and every group is created on every rank in one order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    copies = world // group_size
    shard_group = replica_group = None
    for index in range(copies):  # consecutive ranks: one node's processes under torchrun and SLURM
        members = list(range(index * group_size, (index + 1) * group_size))
        group = dist.new_group(members)
        if rank in members:
            shard_group = group
    for position in range(group_size):
        members = [index * group_size + position for index in range(copies)]
        group = dist.new_group(members)
        if rank in members:
            replica_group = group
    assert shard_group is not None and replica_group is not None
    return TableGroups(group_size, copies, rank // group_size, shard_group, replica_group)


def move_plan_to_group(plan: Any, groups: TableGroups) -> None:
    """Shift the shard placements of a torchrec ShardingPlan made for ``groups.size`` ranks
    (0..size-1) to this rank's group, in place: torchrec's ShardedTensors name global ranks as
    placements, while its table-wise and column-wise shardings index ``ParameterSharding.ranks``
    within the sharding environment's group (they stay 0..size-1)."""
    offset = groups.first_rank
    for module_plan in plan.plan.values():
        for sharding in module_plan.values():
            spec = sharding.sharding_spec
            for shard in getattr(spec, "shards", None) or []:
                placement = shard.placement
                placement._rank = int(placement.rank()) + offset  # (torch's _remote_device has no setter)


def table_parameters(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters of sharded table modules whose gradients the copies average."""
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def average_table_gradients(params: Iterable[torch.nn.Parameter], groups: TableGroups, *, sparse_below: float = 0.25) -> int:
    """Average the gradients of ``params`` over ``groups.replica_group`` in place, exactly; return
    the bytes this rank sent.

    A table's gradient is non-zero only in the rows some copy looked up. Where the most rows any
    copy touched is under ``sparse_below`` of the shard's rows, the copies exchange just those rows
    and their indices (an all-gather; a step of a long-tailed catalogue touches a small fraction of
    it); otherwise the whole gradient goes in one coalesced all-reduce. A parameter no copy has a
    gradient for keeps none (an optimizer skips it, as on one process); one that only some copies
    have gets the average on all of them.
    """
    params = list(params)
    if groups.copies == 1 or not params:
        return 0
    group, copies = groups.replica_group, groups.copies
    rows = [_touched_rows(p.grad) if p.grad is not None and p.grad.dim() == 2 else None for p in params]
    # rows each copy touched per parameter (-1: no gradient; other than 2-D: every entry): one small
    # all-gather decides the rest (on the parameters' device: NCCL moves device tensors only)
    sizes = [-1 if p.grad is None else len(r) if r is not None else p.grad.numel() for p, r in zip(params, rows, strict=True)]
    counts = torch.tensor(sizes, dtype=torch.int64, device=params[0].device)
    gathered = [torch.empty_like(counts) for _ in range(copies)]
    dist.all_gather(gathered, counts, group=group)
    per_copy = torch.stack(gathered).cpu()  # [copies, params]
    sent = ByteCounter.all_gather_bytes(counts.numel() * 8, copies)
    dense: list[torch.nn.Parameter] = []
    for j, p in enumerate(params):
        if bool((per_copy[:, j] < 0).all()):
            continue  # no copy has a gradient: leave it None everywhere
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        most = int(per_copy[:, j].max())
        if p.grad.dim() == 2 and most < sparse_below * p.grad.shape[0]:
            sent += _average_rows(p.grad, rows[j], per_copy[:, j].clamp(min=0).tolist(), group)
        else:
            dense.append(p)
    if dense:
        flat = torch.cat([p.grad.reshape(-1) for p in dense])
        dist.all_reduce(flat, group=group)  # (gloo has no AVG: sum, then divide)
        flat.div_(copies)
        start = 0
        for p in dense:
            p.grad.copy_(flat[start : start + p.grad.numel()].view_as(p.grad))
            start += p.grad.numel()
        sent += ByteCounter.all_reduce_bytes(flat.numel() * flat.element_size(), copies)
    return int(sent)


def _touched_rows(grad: torch.Tensor) -> torch.Tensor:
    # (amax of |row| != 0: a fast exact test; NaN rows count as touched, so they reach the other copies)
    return grad.abs().amax(dim=1).ne(0).nonzero().squeeze(1)


def _average_rows(grad: torch.Tensor, mine: torch.Tensor | None, counts: list[int], group: dist.ProcessGroup) -> float:
    """Average a [rows, dim] gradient whose non-zero rows are ``mine`` here and ``counts[c]`` rows
    on copy ``c``: every copy all-gathers each copy's rows (padded to the largest count) and adds
    them up in copy order, so all copies get the same sum, bit for bit."""
    copies, width = len(counts), max(counts)
    index = torch.zeros(width, dtype=torch.int64, device=grad.device)
    values = torch.zeros(width, grad.shape[1], dtype=grad.dtype, device=grad.device)
    if mine is not None and len(mine):
        index[: len(mine)] = mine.to(grad.device)
        values[: len(mine)] = grad[mine.to(grad.device)]
    indices = [torch.empty_like(index) for _ in range(copies)]
    rows = [torch.empty_like(values) for _ in range(copies)]
    dist.all_gather(indices, index, group=group)
    dist.all_gather(rows, values, group=group)
    grad.zero_()
    for c in range(copies):
        grad.index_add_(0, indices[c][: counts[c]], rows[c][: counts[c]])
    grad.div_(copies)
    return ByteCounter.all_gather_bytes(index.numel() * 8 + values.numel() * values.element_size(), copies)
