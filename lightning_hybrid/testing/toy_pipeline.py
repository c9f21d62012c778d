"""A pipeline-able toy model for tests and benchmarks: residual MLP blocks of chosen widths.

Used by the balancing test and `benchmarks/pipeline_bubble.py` to exercise
`lightning_hybrid.parallel.pipeline` without Lightning and without embedding tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_hybrid.parallel.pipeline import PipelineSpec


class ResidualMLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class ToyPipelineModel(nn.Module):
    """``len(hidden_widths)`` residual MLP blocks on [B, d] inputs, MSE loss against ``batch["y"]``."""

    def __init__(self, d: int, hidden_widths: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(ResidualMLP(d, h) for h in hidden_widths)
        self.head = nn.Linear(d, d)

    def pipeline_spec(self) -> PipelineSpec:
        return PipelineSpec(
            blocks=self.blocks,
            first=lambda mb, _lookups: mb["x"],
            last=lambda hidden, mb: torch.nn.functional.mse_loss(self.head(hidden), mb["y"]),
            last_modules=("head",),
        )


def toy_batch(batch_size: int, d: int, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch_size, d, generator=g), "y": torch.randn(batch_size, d, generator=g)}


def one_core_worker(batch_size: int, d: int) -> tuple[int, dict[str, Any]]:
    """For a benchmark's worker process: pin it to the core of its rank, one thread, and return
    (rank, a toy batch) - the set-up `benchmarks/pipeline_bubble.py` and `rebalance.py` share."""
    import warnings

    import torch.distributed as dist

    from lightning_hybrid.testing import pin_to_core

    warnings.simplefilter("ignore")
    rank = dist.get_rank()
    pin_to_core(rank)
    torch.set_num_threads(1)
    return rank, toy_batch(batch_size, d)
