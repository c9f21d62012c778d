"""Ranking metrics for full-ranking evaluation: HR@K, NDCG@K, MRR, summed across ranks.

The rank of the held-out item is the number of *other* candidates scored at least as high as it:
ties count against the target. So a model that scores every item alike (collapsed, or all NaN
turned constant) ranks each target last and gets HR = NDCG = MRR ~ 0, never 1; the SASRec
evaluation code's convention (only strictly higher scores count) would rate it perfect, and
checkpoint selection on such a metric keeps exactly the broken model. Ties of a working model
(bf16 scores) lower its figures slightly, which is the safe direction; score in fp32 to avoid
them. NaN scores are an error. With one relevant item per user: HR@K = [rank < K],
NDCG@K = [rank < K] / log2(rank + 2), MRR = 1/(rank + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``targets`` (shape [B]) among ``scores`` (shape [B, V]): the other items scored
    at least as high (ties against the target; -inf scores of masked items only tie a -inf target).
    Raises ValueError on NaN scores."""
    if torch.isnan(scores).any():
        rows = torch.isnan(scores).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"target_ranks: the scores of {len(rows)} of {scores.shape[0]} users contain NaN (rows {rows[:5]}); a "
            "ranking of NaN means nothing. The model diverged or its input was bad: check the loss, lower the "
            "learning rate, or use HybridStrategy(nonfinite_loss='stop')."
        )
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores >= target_scores).sum(dim=1) - 1


class RankingMetrics(torchmetrics.Metric):
    """Accumulates HR@K / NDCG@K for each K and MRR over users; ``compute`` returns the means."""

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (10, 20), prefix: str = "") -> None:
        super().__init__()
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"RankingMetrics(ks={list(ks)}): give one or more cut-offs >= 1.")
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        self.prefix = prefix
        for k in self.ks:
            self.add_state(f"hr_{k}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"ndcg_{k}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("mrr", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranks: torch.Tensor, valid: torch.Tensor | None = None) -> None:  # type: ignore[override]
        ranks = ranks.to(torch.float64)
        weight = torch.ones_like(ranks) if valid is None else valid.to(torch.float64)
        for k in self.ks:
            hit = (ranks < k).to(torch.float64) * weight
            setattr(self, f"hr_{k}", getattr(self, f"hr_{k}") + hit.sum())
            setattr(self, f"ndcg_{k}", getattr(self, f"ndcg_{k}") + (hit / torch.log2(ranks + 2)).sum())
        self.mrr += (weight / (ranks + 1)).sum()
        self.count += weight.sum()

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        count = self.count.clamp(min=1)
        out = {}
        for k in self.ks:
            out[f"{self.prefix}hr@{k}"] = (getattr(self, f"hr_{k}") / count).float()
            out[f"{self.prefix}ndcg@{k}"] = (getattr(self, f"ndcg_{k}") / count).float()
        out[f"{self.prefix}mrr"] = (self.mrr / count).float()
        return out
