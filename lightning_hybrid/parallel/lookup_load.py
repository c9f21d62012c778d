"""Embedding lookups served per rank: which shard each looked-up id goes to, counted from the batches.

"Shard load" in parameters held says how the memory is spread; with popularity-skewed ids the
work is not: under row-wise sharding the rank holding the popular rows serves most lookups (and
receives most of the backward's gradient rows). `LookupCounter` counts, from the ids each rank
feeds a sharded embedding module, how many lookups each rank's shards serve, using the shard
metadata of torchrec's ``ShardingPlan``: an id is served by every shard whose row range holds it
(one shard for table-wise and row-wise, each column shard for column-wise, the rank itself for
data-parallel tables). The backward sends one gradient row per looked-up id to the same shard,
so the same counts hold for it.

Counting runs only while ``active`` (`HybridMonitor` turns it on for the steps it logs) and is a
few comparisons per id; `take` is one all-reduce of a ``world``-long vector. Ranks of one dp
replica (tensor / pipeline parallel) feed the same batch, each counted once (the module-level
counts are divided by the replica size; `lightning_hybrid.parallel.replica_lookup` then splits
the lookup itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class LookupCounter:
    """Lookups served per rank by the tables of ``plan`` (see the module docstring).

    Args:
        plan: torchrec ``ShardingPlan``.
        features: feature name -> table name, for every feature the sharded modules read.
        world: number of ranks; ``replicas``: ranks that feed one batch (tp x pp).
    """

    def __init__(self, plan: Any, features: Mapping[str, str], *, world: int, rank: int, replicas: int = 1) -> None:
        self.world, self.rank, self.replicas = world, rank, replicas
        self.features = dict(features)
        self.shards: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # table -> (starts, ends, ranks)
        for module_plan in plan.plan.values():
            for table, sharding in module_plan.items():
                spec = sharding.sharding_spec
                shards = getattr(spec, "shards", None) or []
                if not shards:  # data_parallel: every rank serves its own lookups
                    self.shards[table] = (torch.zeros(1, dtype=torch.long), torch.full((1,), 2**62), torch.tensor([-1]))
                    continue
                self.shards[table] = (
                    torch.tensor([int(s.shard_offsets[0]) for s in shards]),
                    torch.tensor([int(s.shard_offsets[0]) + int(s.shard_sizes[0]) for s in shards]),
                    torch.tensor([s.placement.rank() for s in shards]),
                )
        self.active = False
        self.local = torch.zeros(world, dtype=torch.float64)
        self.total = torch.zeros(world, dtype=torch.float64)  # over every `take` (rank 0's view after it)

    def attach(self, modules: Iterable[nn.Module]) -> list[Any]:
        """Count the ids fed to each module (forward pre-hooks); returns the hook handles."""
        return [module.register_forward_pre_hook(self._hook, with_kwargs=True) for module in modules]

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.active:
            return
        features = args[0] if args else next(iter(kwargs.values()), None)
        if features is not None and hasattr(features, "keys") and hasattr(features, "length_per_key"):
            self.count(features)

    def count(self, features: Any) -> None:
        """Add the lookups of a KeyedJaggedTensor to this rank's counts."""
        values = features.values()
        for key, ids in zip(features.keys(), torch.split(values, features.length_per_key()), strict=True):
            table = self.features.get(key)
            if table is None or table not in self.shards or ids.numel() == 0:
                continue
            starts, ends, ranks = (t.to(ids.device) for t in self.shards[table])
            hits = ((ids[:, None] >= starts) & (ids[:, None] < ends)).sum(0).to(torch.float64).cpu()
            ranks = ranks.cpu()
            own = ranks < 0
            if own.any():
                self.local[self.rank] += float(hits[own].sum())
            self.local.index_add_(0, ranks[~own], hits[~own])

    def take(self, device: torch.device) -> list[float]:
        """Lookups each rank served since the last call, summed over ranks (a collective)."""
        served = self.local.to(device)
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dist.all_reduce(served)
        served = served.cpu() / self.replicas
        self.local.zero_()
        self.total += served
        return served.tolist()
