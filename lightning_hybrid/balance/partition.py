"""Exact contiguous partition of blocks into pipeline stages that minimises the slowest stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StagePlan:
    """Blocks per stage and the predicted cost of each stage (seconds, or any unit of ``costs``)."""

    blocks_per_stage: list[int]
    stage_costs: list[float]

    @property
    def imbalance(self) -> float:
        """max / mean of the stage costs (1.0 is perfect)."""
        mean = sum(self.stage_costs) / len(self.stage_costs)
        return max(self.stage_costs) / mean if mean > 0 else 1.0


def stage_costs(
    costs: Sequence[float],
    blocks_per_stage: Sequence[int],
    *,
    first_cost: float = 0.0,
    last_cost: float = 0.0,
    speeds: Sequence[float] | None = None,
) -> list[float]:
    """Cost of each stage of a given split (the first also runs ``first_cost``, the last ``last_cost``)."""
    out, start = [], 0
    n = len(blocks_per_stage)
    for s, count in enumerate(blocks_per_stage):
        c = sum(costs[start : start + count]) + (first_cost if s == 0 else 0.0) + (last_cost if s == n - 1 else 0.0)
        out.append(c / (speeds[s] if speeds else 1.0))
        start += count
    return out


def partition_blocks(
    costs: Sequence[float],
    num_stages: int,
    *,
    first_cost: float = 0.0,
    last_cost: float = 0.0,
    speeds: Sequence[float] | None = None,
) -> StagePlan:
    """Split ``costs`` (one per block, in order) into ``num_stages`` contiguous non-empty stages
    minimising the largest stage cost (exact); ties are broken towards smaller sums of squared
    stage costs (more even splits). ``speeds[s]``: relative speed of the rank running stage
    ``s`` (2.0 = twice as fast); a stage's cost is its work divided by its speed.

    Dynamic programming over (stage, blocks used): O(num_stages * n^2), exact.
    """
    n = len(costs)
    if num_stages < 1:
        raise ValueError(f"partition_blocks: num_stages={num_stages} must be >= 1.")
    if num_stages > n:
        raise ValueError(f"partition_blocks: {num_stages} stages but only {n} blocks; every stage needs at least one block.")
    if any(c < 0 for c in costs):
        raise ValueError(f"partition_blocks: block costs must be >= 0, got {list(costs)}.")
    if speeds is not None and (len(speeds) != num_stages or any(v <= 0 for v in speeds)):
        raise ValueError(f"partition_blocks: speeds must give one positive value per stage ({num_stages}), got {list(speeds)}.")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:  # stage s runs blocks i..j-1
        work = prefix[j] - prefix[i] + (first_cost if s == 0 else 0.0) + (last_cost if s == num_stages - 1 else 0.0)
        return work / (speeds[s] if speeds else 1.0)

    inf = (float("inf"), float("inf"))
    # best[s][j]: (max cost, sum of squares) of stages 0..s covering blocks 0..j-1
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n - num_stages + 2):
        c = cost(0, 0, j)
        best[0][j] = (c, c * c)
    for s in range(1, num_stages):
        for j in range(s + 1, n - (num_stages - s) + 2):
            for i in range(s, j):
                prev = best[s - 1][i]
                if prev == inf:
                    continue
                c = cost(s, i, j)
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    sizes, j = [], n
    for s in range(num_stages - 1, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    sizes.append(j)
    sizes.reverse()
    return StagePlan(sizes, stage_costs(costs, sizes, first_cost=first_cost, last_cost=last_cost, speeds=speeds))
