"""Adaptive pipeline balancing: re-measure the stages while training, and move blocks (with their
optimizer state) between pipeline ranks when the slowest stage drifts above the mean.

`lightning_hybrid.balance.profile` measures every block once, at setup. What a stage costs then
changes while training: sequence lengths drift (attention grows with the square of the length,
the loss head with the number of targets), a device slows down (thermal limits, a neighbour's
job), a planner's first guess was wrong. ``HybridStrategy(pipeline_rebalance_every=N)`` runs an
`AdaptiveBalancer`:

- **Measure, cheaply.** The last ``window`` (<= 3) training steps of every ``N`` optimizer steps are
  measuring steps: the runner times each part's forward (input part, each block, loss head) and
  each stage's busy time (forward + backward; on CUDA with a device sync around each part, so
  those steps are slower; the other steps are untouched). A part's cost is its stage's busy time
  shared in proportion to the forward times. Costs are averaged over the ranks that ran them with
  two all-reduces, so every rank holds the same numbers and reaches the same decision.
- **Tell a slow device from an expensive stage.** When every block has the same parameter shapes
  (a transformer stack), a pp rank's speed is read from the mean cost of its blocks, and each
  part's work is its cost times the speed of the rank that ran it; otherwise ranks count as
  equally fast (the setup profile, ``pipeline_split="balanced"``, is the way to measure speeds).
- **Decide.** `partition_blocks` (exact) gives the best split for that work. Blocks move when the
  measured max/mean busy time over pp ranks exceeds ``threshold`` *and* the new split's slowest
  stage is predicted at least ``MIN_GAIN`` faster than the current one's (no moves for noise).
- **Move.** For every block that changes rank, its owner sends the parameters and buffers and,
  per parameter, the optimizer state and param-group index; the new owner builds the block from
  its meta-device skeleton (`PipelineRunner.skeletons`), loads both, and adds the parameters to
  the same param groups. Ranks walk the moves in block order (each sends, receives or skips),
  which cannot deadlock. The runner then lays out its stages anew, and the strategy gives the dp
  exchange the new parameter list. Training continues exactly as without the move (tested
  against one process).

Composes with every schedule and virtual stages, data parallelism (each dp replica's pp group
moves the same blocks), torchrec-sharded tables (they live outside the stages and do not move),
gradient accumulation (moves happen after an optimizer step) and bf16-mixed. Refused at
construction: tensor parallelism (blocks hold DTensor shards), gradient compression (its
error-feedback state is per tensor and would stay behind) and, at setup, the layer pipeline
(without ``pipeline_spec()`` stages run in turn, so balance changes memory, not step time).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_hybrid.balance.partition import partition_blocks, stage_costs

MIN_GAIN = 0.05  # the predicted slowest stage must be at least this much faster for blocks to move


@dataclass(frozen=True)
class Rebalance:
    """One check: the split before and after, what was measured and predicted, which blocks moved."""

    step: int
    before: list[int]
    after: list[int]
    measured_imbalance: float
    predicted_vs_now: float  # the proposed split's slowest stage / the current one's (predicted)
    moved: list[int]


@dataclass(frozen=True)
class MeasuredCosts:
    """Seconds per block, for the input part and the loss head (averaged over ranks), and the
    busy seconds of each pp rank over the measuring window (averaged over dp replicas)."""

    block_s: list[float]
    first_s: float
    last_s: float
    rank_busy_s: list[float]

    @property
    def imbalance(self) -> float:
        mean = sum(self.rank_busy_s) / len(self.rank_busy_s)
        return max(self.rank_busy_s) / mean if mean > 0 else 1.0


def measured_costs(runner: Any) -> MeasuredCosts:
    """Turn the runner's measuring-step timings into per-part costs every rank agrees on (two
    all-reduces over the world); clears the timings."""
    n = len(runner.spec.blocks)
    cost = torch.zeros(2, n + 2, dtype=torch.float64)  # row 0: seconds, row 1: how many ranks measured
    ranges = [list(stage.block_ids) for stage in runner.stages]
    for stage, blocks in zip(runner.stages, ranges, strict=True):
        keys = [*(["first"] if stage.is_first else []), *blocks, *(["last"] if stage.is_last else [])]
        forward = sum(runner.part_s.get(k, 0.0) for k in keys)
        busy = runner.stage_busy_s.get(stage.stage_index, 0.0)
        for k in keys:
            column = n if k == "first" else n + 1 if k == "last" else k
            cost[0, column] += busy * runner.part_s.get(k, 0.0) / forward if forward > 0 else 0.0
            cost[1, column] += 1.0
    busy = torch.zeros(runner.pp, dtype=torch.float64)
    busy[runner.pp_rank] = sum(runner.stage_busy_s.values())
    device = runner.device if runner.device.type == "cuda" else torch.device("cpu")  # (NCCL needs device tensors)
    cost, busy = cost.to(device), busy.to(device)
    dist.all_reduce(cost)
    dist.all_reduce(busy)
    runner.part_s.clear()
    runner.stage_busy_s.clear()
    per_part = (cost[0] / cost[1].clamp(min=1)).tolist()
    replicas = dist.get_world_size() // runner.pp
    return MeasuredCosts(per_part[:n], per_part[n], per_part[n + 1], [b / replicas for b in busy.tolist()])


def _alike(runner: Any) -> bool:
    """Whether every block has the same parameter names and shapes (meta skeletons included)."""
    blocks = [runner.skeletons.get(i, runner.spec.blocks[i]) for i in range(len(runner.spec.blocks))]
    signatures = {tuple((name, tuple(p.shape)) for name, p in b.named_parameters()) for b in blocks}
    return len(signatures) == 1


def propose_split(
    costs: MeasuredCosts, current: list[int], *, pp: int, alike: bool
) -> tuple[list[int], float, float]:
    """(the best split for the measured work, its predicted slowest stage, the current split's
    predicted slowest stage), in the units of ``costs`` (see the module docstring)."""
    from lightning_hybrid.parallel.pipeline import stage_ranges

    stages = len(current)
    owner = {i: s % pp for s, blocks in enumerate(stage_ranges(current)) for i in blocks}
    speed = [1.0] * pp
    if alike:
        per_rank = [[costs.block_s[i] for i, q in owner.items() if q == r] for r in range(pp)]
        means = [sum(c) / len(c) if c else 0.0 for c in per_rank]
        known = [m for m in means if m > 0]
        if known:
            overall = sum(known) / len(known)
            speed = [overall / m if m > 0 else 1.0 for m in means]
    work = [costs.block_s[i] * speed[owner[i]] for i in range(len(costs.block_s))]
    first = costs.first_s * speed[0]
    last = costs.last_s * speed[(stages - 1) % pp]
    speeds = [speed[s % pp] for s in range(stages)]
    plan = partition_blocks(work, stages, first_cost=first, last_cost=last, speeds=speeds)
    now = stage_costs(work, current, first_cost=first, last_cost=last, speeds=speeds)
    return plan.blocks_per_stage, max(plan.stage_costs), max(now)


def _find(optimizers: list[Optimizer], param: torch.nn.Parameter) -> tuple[int, int] | None:
    for o, optimizer in enumerate(optimizers):
        for g, group in enumerate(optimizer.param_groups):
            if any(q is param for q in group["params"]):
                return o, g
    return None


def _pack(block: torch.nn.Module, optimizers: list[Optimizer]) -> dict[str, Any]:
    """A block's tensors (parameters and every buffer, persistent or not) and its parameters'
    optimizer state, on the CPU; the parameters leave this rank's optimizers."""
    tensors = {name: t.detach().cpu() for name, t in itertools.chain(block.named_parameters(), block.named_buffers())}
    state = []
    for p in block.parameters():
        where = _find(optimizers, p)
        entry: dict[str, Any] = {}
        if where is not None:
            optimizer = optimizers[where[0]]
            for key, value in optimizer.state.pop(p, {}).items():
                entry[key] = (value.detach().cpu(), value.device.type == "cpu") if torch.is_tensor(value) else value
            group = optimizer.param_groups[where[1]]
            group["params"] = [q for q in group["params"] if q is not p]
        state.append((where, entry))
    return {"tensors": tensors, "state": state}


def _unpack(skeleton: torch.nn.Module, payload: dict[str, Any], optimizers: list[Optimizer], device: torch.device) -> torch.nn.Module:
    block = skeleton.to_empty(device=device)
    with torch.no_grad():
        for name, t in itertools.chain(block.named_parameters(), block.named_buffers()):
            t.copy_(payload["tensors"][name])
    for p, (where, entry) in zip(block.parameters(), payload["state"], strict=True):
        if where is None:
            continue
        optimizer = optimizers[where[0]]
        optimizer.param_groups[where[1]]["params"].append(p)
        if entry:
            # (a tensor stays where the optimizer keeps it: Adam's `step` lives on the CPU)
            optimizer.state[p] = {
                k: (v[0].to("cpu" if v[1] else device) if isinstance(v, tuple) else v) for k, v in entry.items()
            }
    return block


def _leaves(optimizers: list[Optimizer]) -> list[Optimizer]:
    """The torch optimizers that hold parameter groups (a `GroupedOptimizer`'s sub-optimizers)."""
    from lightning_hybrid.optim import GroupedOptimizer

    return [leaf for o in optimizers for leaf in (_leaves(o.optimizers) if isinstance(o, GroupedOptimizer) else [o])]


def move_blocks(runner: Any, new_split: list[int], optimizers: list[Optimizer]) -> list[int]:
    """Move the blocks whose pp rank changes under ``new_split`` (with their optimizer state),
    then lay out the runner's stages anew; returns the moved block indices. Every rank of the
    world calls it with the same split."""
    from lightning_hybrid.optim import GroupedOptimizer

    grouped, optimizers = [o for o in optimizers if isinstance(o, GroupedOptimizer)], _leaves(optimizers)
    old, new = runner.block_owner(runner.blocks_per_stage), runner.block_owner(new_split)
    moved = [i for i in sorted(old) if old[i] != new[i]]
    device = runner.device if runner.device.type == "cuda" else None
    # a block that shares weights with modules outside it has no skeleton (`PipelineRunner._prune`):
    # every rank learns it before any transfer starts, so none waits on a send that never comes
    missing = [i for i in moved if new[i] == runner.pp_rank and i not in runner.skeletons]
    flag = torch.tensor([float(bool(missing))], device=device or "cpu")
    dist.all_reduce(flag)
    if flag.item():
        rank_zero_warn(
            f"HybridStrategy(pipeline_rebalance_every): blocks {missing or '(on another rank)'} share parameters with modules "
            "outside them and cannot move between pipeline ranks; the split stays. Untie them, or set pipeline_rebalance_every=0."
        )
        return []
    for i in moved:  # in block order on every rank: each move waits only on moves before it
        if runner.pp_rank == old[i]:
            payload = [_pack(runner.spec.blocks[i], optimizers)]
            dist.send_object_list(payload, group=runner.group, group_dst=new[i], device=device)
        elif runner.pp_rank == new[i]:
            payload = [None]
            dist.recv_object_list(payload, group=runner.group, group_src=old[i], device=device)
            runner.spec.blocks[i] = _unpack(runner.skeletons.pop(i), payload[0], optimizers, runner.device)
    runner.lay_out(new_split)  # blocks sent away become skeletons again
    for o in grouped:
        o.reindex()
    return moved


class AdaptiveBalancer:
    """Measures every ``every`` optimizer steps and moves blocks when it pays (module docstring)."""

    def __init__(self, runner: Any, *, every: int, threshold: float) -> None:
        self.runner = runner
        self.every = every
        self.threshold = threshold
        self.window = min(3, every)
        self.steps = 0  # optimizer steps so far

    def before_training_step(self) -> None:
        self.runner.measuring = self.steps % self.every >= self.every - self.window

    def after_optimizer_step(self, optimizers: list[Optimizer]) -> Rebalance | None:
        """Count the step; at the end of a period, decide and maybe move (a collective on every rank)."""
        self.steps += 1
        self.runner.measuring = False
        if self.steps % self.every:
            return None
        runner = self.runner
        costs = measured_costs(runner)
        before = list(runner.blocks_per_stage)
        proposed, predicted, now = propose_split(costs, before, pp=runner.pp, alike=_alike(runner))
        move = costs.imbalance > self.threshold and proposed != before and predicted < now * (1 - MIN_GAIN)
        moved = move_blocks(runner, proposed, optimizers) if move else []
        move = bool(moved)
        record = Rebalance(self.steps, before, proposed if move else before, costs.imbalance, predicted / now if now > 0 else 1.0, moved)
        runner.rebalances.append(record)
        if move:
            rank_zero_info(
                f"HybridStrategy pipeline: rebalanced at step {self.steps}: blocks per stage {before} -> {proposed} "
                f"(measured max/mean stage time {costs.imbalance:.2f}; slowest stage predicted {predicted / now:.2f}x of now)"
            )
        return record
