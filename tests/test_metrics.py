"""Tier 1: ranking metrics against hand-computed values."""

import math

import pytest
import torch

from lightning_hybrid.metrics import RankingMetrics, target_ranks


def test_ranks_count_strictly_higher_scores() -> None:
    scores = torch.tensor([[float("-inf"), 0.9, 0.1, 0.5], [float("-inf"), 0.2, 0.2, 0.7]])
    assert target_ranks(scores, torch.tensor([3, 1])).tolist() == [1, 1]
    assert target_ranks(scores, torch.tensor([1, 3])).tolist() == [0, 0]


def test_metric_values_by_hand() -> None:
    metric = RankingMetrics(ks=[1, 3])
    metric.update(torch.tensor([0, 2, 5, 1]), torch.tensor([True, True, True, False]))
    out = metric.compute()
    # valid ranks 0, 2, 5
    assert out["hr@1"].item() == pytest.approx(1 / 3)
    assert out["hr@3"].item() == pytest.approx(2 / 3)
    assert out["ndcg@3"].item() == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 3)
    assert out["ndcg@1"].item() == pytest.approx(1 / 3)
    assert out["mrr"].item() == pytest.approx((1 + 1 / 3 + 1 / 6) / 3)


def test_bad_cutoffs() -> None:
    with pytest.raises(ValueError, match="cut-offs"):
        RankingMetrics(ks=[0])
