"""Tier 1: ranking metrics against hand-computed values."""

import math

import pytest
import torch

from lightning_hybrid.metrics import RankingMetrics, target_ranks


def test_ranks_count_higher_and_tied_scores_against_the_target() -> None:
    scores = torch.tensor([[float("-inf"), 0.9, 0.1, 0.5], [float("-inf"), 0.2, 0.2, 0.7]])
    assert target_ranks(scores, torch.tensor([3, 1])).tolist() == [1, 2]  # item 1 of row 2 ties item 2: counted above
    assert target_ranks(scores, torch.tensor([1, 3])).tolist() == [0, 0]


def test_a_constant_model_scores_zero_not_one() -> None:
    """Every item scored the same (a collapsed model): each target ranks last, so the metrics are
    ~0; counting only strictly higher scores would have rated it HR = NDCG = MRR = 1."""
    scores = torch.zeros(4, 101)
    ranks = target_ranks(scores, torch.tensor([1, 5, 50, 100]))
    assert ranks.tolist() == [100, 100, 100, 100]
    metric = RankingMetrics(ks=[10])
    metric.update(ranks)
    out = metric.compute()
    assert out["hr@10"].item() == 0.0 and out["ndcg@10"].item() == 0.0
    assert out["mrr"].item() == pytest.approx(1 / 101)


def test_nan_scores_are_an_error() -> None:
    scores = torch.rand(3, 10)
    scores[1, 4] = float("nan")
    with pytest.raises(ValueError, match="contain NaN \\(rows \\[1\\]\\)"):
        target_ranks(scores, torch.tensor([1, 2, 3]))


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
