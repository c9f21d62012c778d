"""Search over layouts: every dp x tp x pp factorisation of the cluster, microbatches, schedule,
blocks per pipeline stage (equal, or balanced as ``pipeline_split="balanced"`` cuts them), table
layout (replicated, row-wise over all ranks, or row-wise inside groups of ranks with one copy per
group) and compression, priced by a `CostModel`; the ranked candidates that fit in memory.

`single_mode_layouts` are the layouts a user would pick without lightning_hybrid (pure data
parallel with a replicated table, pure model parallel, tensor- or pipeline-parallel only); the
simulator compares the best of those with the best of everything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

from lightning_hybrid.planner.cost import CompressionName, CostModel, Estimate, Layout, ModelSpec

COMPRESSIONS: tuple[CompressionName, ...] = ("none", "fp16", "powersgd", "topk")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    model: ModelSpec,
    world_size: int,
    *,
    devices_per_node: int | None = None,
    compressions: Sequence[CompressionName] = COMPRESSIONS,
    max_microbatch_factor: int = 4,
) -> Iterator[Layout]:
    """Every layout worth pricing. tp stays inside a node (its collectives are the most frequent).
    Table groups (the row-wise table sharded inside groups of ``k`` ranks, one copy per group) are
    priced for every proper divisor ``k >= 2`` of the world where tp = pp = 1."""
    for tp in _divisors(world_size):
        if devices_per_node is not None and tp > devices_per_node:
            continue
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            if model.global_batch % dp:
                continue
            replica = model.global_batch // dp
            micro_options = [1] if pp == 1 else sorted({pp * f for f in (1, 2, max_microbatch_factor) if replica % (pp * f) == 0})
            for microbatches in micro_options:
                groups: list[int | None] = [None]
                if tp == pp == 1:
                    groups += [k for k in _divisors(world_size) if 2 <= k < world_size]
                for table, group in [("replicated", None)] + [("row_wise", k) for k in groups]:
                    for compression in compressions if dp > 1 else ("none",):
                        # (`search` drops a balanced layout that cuts where the even one does)
                        for split in ("even", "balanced") if pp > 1 else ("even",):
                            yield Layout(dp=dp, tp=tp, pp=pp, microbatches=microbatches, table=table,  # type: ignore[arg-type]
                                         compression=compression, table_group=group, split=split)  # type: ignore[arg-type]


def single_mode_layouts(model: ModelSpec, world_size: int) -> list[Layout]:
    """dp (replicated table, exact all-reduce), mp (tp = world, sharded table), tp only, pp only."""
    out = [Layout(dp=world_size, table="replicated")]
    out.append(Layout(dp=1, tp=world_size, table="row_wise"))
    out.append(Layout(dp=1, tp=world_size, table="replicated"))
    replica = model.global_batch
    micro = next((f * world_size for f in (4, 2, 1) if replica % (f * world_size) == 0), world_size)
    out.append(Layout(dp=1, pp=world_size, microbatches=micro, table="replicated"))
    return out


def search(cost: CostModel, model: ModelSpec, layouts: Sequence[Layout] | None = None, *, top: int | None = None) -> list[Estimate]:
    """Price ``layouts`` (default: every candidate), drop the invalid ones and those that do not fit
    in memory, and return the rest fastest first."""
    if layouts is None:
        layouts = list(candidate_layouts(model, cost.cluster.world_size, devices_per_node=cost.cluster.devices_per_node
                                         if cost.cluster.cores_per_node is None else None))
    priced = []
    for layout in layouts:
        if cost.validate(model, layout) is not None:
            continue
        est = cost.estimate(model, layout)
        if est.fits:
            priced.append(est)
    # a balanced split that cuts where the even one does is the same layout twice: keep the even one
    even = {e.layout: e.step_s for e in priced if e.layout.split == "even"}
    priced = [e for e in priced if e.layout.split != "balanced"
              or not math.isclose(even.get(dataclasses.replace(e.layout, split="even"), -1.0), e.step_s, rel_tol=1e-9)]
    priced.sort(key=lambda e: e.step_s)
    return priced[:top] if top else priced


def best(estimates: Sequence[Estimate]) -> Estimate | None:
    return min(estimates, key=lambda e: e.step_s, default=None)
