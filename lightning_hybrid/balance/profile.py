"""Measure what each pipeline block costs on this hardware, and turn it into a stage split.

`profile_blocks` times forward + backward of every block of a `PipelineSpec` on a real
microbatch (and of the input part and the loss head), and records the memory each block's
activations and weights take. `balanced_split_for` is what ``HybridStrategy(pipeline_split=
"balanced")`` runs at setup: every rank profiles the whole model (before it keeps only its own
stages), the block costs are averaged over the ranks (so every rank computes the same split),
each rank's total measured time gives its relative speed (different devices are slower or
faster by the same factor for every block), and `partition_blocks` picks the split.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_hybrid.balance.partition import partition_blocks


@dataclass
class BlockProfile:
    """Measured costs: seconds of forward + backward per block, of the input part and of the loss
    head, and bytes (weights + saved activations) per block."""

    block_s: list[float]
    first_s: float
    last_s: float
    block_bytes: list[int]

    @property
    def total_s(self) -> float:
        return sum(self.block_s) + self.first_s + self.last_s


def _timed(fn: Callable[[], torch.Tensor], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up (allocations, kernel selection)
        sync()
        started = time.perf_counter()
        out = fn()
        if out.requires_grad:  # (an input part without weights has nothing to backpropagate)
            out.backward()
        sync()
        times.append(time.perf_counter() - started)
    # the minimum, not the median: interference (other processes, the OS) only ever adds time
    return min(times[1:])


def profile_blocks(spec: Any, microbatch: Any, lookups: torch.Tensor | None, *, repeats: int = 3) -> BlockProfile:
    """Time forward + backward of each part of ``spec`` on ``microbatch`` (gradients are cleared after)."""
    device = lookups.device if lookups is not None else next(spec.blocks.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [p for b in spec.blocks for p in b.parameters()]
    lookups = lookups.detach() if lookups is not None else None

    def first() -> torch.Tensor:
        return spec.first(microbatch, lookups).float().sum()

    first_s = _timed(first, repeats, sync)
    with torch.no_grad():
        x = spec.first(microbatch, lookups)
    block_s, block_bytes = [], []
    for block in spec.blocks:
        inp = x.detach().requires_grad_(True)

        def run(block: Any = block, inp: torch.Tensor = inp) -> torch.Tensor:
            return spec.block_forward(block, inp, microbatch).float().sum()

        block_s.append(_timed(run, repeats, sync))
        with torch.no_grad():
            out = spec.block_forward(block, inp, microbatch)
        weights = sum(p.numel() * p.element_size() for p in block.parameters())
        block_bytes.append(int(weights * 4 + out.numel() * out.element_size() * 4))  # weights, grads, Adam; ~4 saved activations
        x = out
    hidden = x.detach().requires_grad_(True)
    last_s = _timed(lambda: spec.last(hidden, microbatch), repeats, sync)
    for p in params:
        p.grad = None
    return BlockProfile(block_s=block_s, first_s=first_s, last_s=last_s, block_bytes=block_bytes)


def balanced_split_for(
    spec: Any, batch: Any, *, pipeline_parallel: int, virtual_stages: int, microbatches: int | None, device: torch.device,
    forward_context: Callable[[], Any] | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """Profile ``spec``'s blocks on a microbatch of ``batch`` on every rank, agree on the costs,
    and return (blocks per stage, a report of the measured costs and the partition) (see module doc).
    ``forward_context``: the training precision's context (Lightning's
    ``precision_plugin.forward_context``: autocast for mixed precision), so a bf16 run is
    profiled at bf16 costs, not fp32's."""
    from lightning_hybrid.parallel.pipeline import batch_size_of, slice_microbatch

    size = batch_size_of(batch)
    if size < 1:
        raise TypeError(f"balanced pipeline split: cannot find the batch size of a {type(batch).__name__}.")
    pp = pipeline_parallel
    stages = pp * virtual_stages
    micro = max(1, size // (microbatches or stages))
    index = torch.arange(micro, device=device)
    with torch.no_grad():
        lookups = spec.lookup(batch) if spec.lookup is not None else None  # every rank: a collective
    mb = slice_microbatch(batch, index, size)
    with forward_context() if forward_context is not None else contextlib.nullcontext():
        profile = profile_blocks(spec, mb, lookups[index] if lookups is not None else None)
    local = torch.tensor([*profile.block_s, profile.first_s, profile.last_s], dtype=torch.float64, device=device)
    world = dist.get_world_size()
    totals = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(totals, local.sum())
    mean = local.clone()
    dist.all_reduce(mean)
    mean /= world
    costs = mean.tolist()
    # a pipeline position is as fast as its slowest rank (mesh order is (pp, dp, tp): rank // (world / pp))
    per_position = [max(float(t) for r, t in enumerate(totals) if r // (world // pp) == q) for q in range(pp)]
    speeds = [statistics.mean(per_position) / per_position[s % pp] for s in range(stages)]
    plan = partition_blocks(costs[:-2], stages, first_cost=costs[-2], last_cost=costs[-1], speeds=speeds)
    report = {"block_s": costs[:-2], "first_s": costs[-2], "last_s": costs[-1], "speeds": speeds, "plan": plan}
    return plan.blocks_per_stage, report
