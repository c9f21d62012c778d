"""Tier 1/2: gradient compressors (`lightning_hybrid.comm.compress`) on 2 gloo processes.

Exact where the method is exact (dtype tolerance for fp16/bf16, PowerSGD at full rank, top-k at
density 1); error feedback keeps residual + sent = true sum over steps; top-k decodes correctly
when ranks pick different indices; the byte counters match hand-computed ring-algorithm bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.comm import GradientCompression, build_compressor
from lightning_hybrid.testing import run_distributed

SHAPES = [(32, 48), (64,), (16, 8, 4), (5,)]  # matrices, a vector, a 3-D tensor, a tiny one


def _grads(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(*s, generator=g) for s in SHAPES]


def _mean_over_ranks(step: int) -> list[torch.Tensor]:
    return [(a + b) / 2 for a, b in zip(_grads(0, step), _grads(1, step), strict=True)]


def _reduce(config: dict[str, Any], steps: int) -> dict[str, Any]:
    import torch.distributed as dist

    compressor = build_compressor(GradientCompression(**config), None)
    decoded, per_step_bytes = [], []
    for step in range(steps):
        grads = _grads(dist.get_rank(), step)
        compressor.reduce(grads, key="test")
        decoded.append([g.clone() for g in grads])
        per_step_bytes.append(compressor.counter.take_step())
    residuals = {}
    for key, slot in compressor.state.items():
        if "residual" in slot:
            r = slot["residual"].clone()
            dist.all_reduce(r)
            residuals[key[1]] = (r / 2).reshape(SHAPES[key[1]])
    return {"decoded": decoded, "bytes": per_step_bytes, "residuals": residuals}


def _reduce_many(configs: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    return [_reduce(config, steps) for config in configs]


EXACT = [
    ({"method": "none"}, 1e-6),
    ({"method": "fp16", "start_iter": 0}, 2e-3),
    ({"method": "bf16", "start_iter": 0}, 2e-2),
    ({"method": "powersgd", "rank": 64, "start_iter": 0, "min_numel": 0}, 1e-4),
    ({"method": "topk", "density": 1.0, "start_iter": 0, "min_numel": 0}, 1e-6),
]


def test_exact_methods_equal_the_average() -> None:
    """none; fp16/bf16 within dtype tolerance; PowerSGD at full rank; top-k at density 1."""
    for per_config in run_distributed(_reduce_many, 2, [c for c, _ in EXACT], 2, timeout_s=60):
        for (config, tol), result in zip(EXACT, per_config, strict=True):
            for step, decoded in enumerate(result["decoded"]):
                for got, expected in zip(decoded, _mean_over_ranks(step), strict=True):
                    assert_close(got, expected, rtol=tol, atol=tol, msg=lambda m, c=config: f"{c}: {m}")


LOSSY = [
    {"method": "topk", "density": 0.05, "start_iter": 0, "min_numel": 0},
    {"method": "topk", "density": 0.05, "start_iter": 0, "min_numel": 0, "momentum": 0.0, "warmup_steps": 3},
    {"method": "sign", "start_iter": 0, "min_numel": 0},
    {"method": "powersgd", "rank": 1, "start_iter": 0, "min_numel": 0},
]


def test_error_feedback_keeps_residual_plus_sent_equal_to_the_true_sum() -> None:
    steps = 5
    true_sum = [sum(_mean_over_ranks(t)[i] for t in range(steps)) for i in range(len(SHAPES))]
    for config, result in zip(LOSSY, run_distributed(_reduce_many, 2, LOSSY, steps, timeout_s=60)[0], strict=True):
        sent_sum = [sum(result["decoded"][t][i] for t in range(steps)) for i in range(len(SHAPES))]
        for i in range(len(SHAPES)):
            if i in result["residuals"]:  # compressed tensors: what was sent plus what is still owed
                assert_close(sent_sum[i] + result["residuals"][i], true_sum[i], rtol=1e-4, atol=1e-4, msg=lambda m, c=config: f"{c}: {m}")
                assert result["residuals"][i].abs().sum() > 0  # compression really dropped something
            else:
                assert_close(sent_sum[i], true_sum[i], rtol=1e-5, atol=1e-5)


def _disjoint(density: float) -> list[torch.Tensor]:
    import torch.distributed as dist

    rank = dist.get_rank()
    grad = torch.zeros(100)
    grad[rank * 50 : rank * 50 + 5] = torch.arange(1, 6, dtype=torch.float32) * (rank + 1)  # 5 big entries each
    grad[rank * 50 + 5 : (rank + 1) * 50] = 0.001
    compressor = build_compressor(GradientCompression(method="topk", density=density, start_iter=0, min_numel=0), None)
    grads = [grad]
    compressor.reduce(grads)
    return grads


def test_fast_top_k_selects_exactly_what_torch_topk_does() -> None:
    from lightning_hybrid.comm.compress import top_k_indices

    gen = torch.Generator().manual_seed(0)
    for n, k in ((200_000, 2000), (100_000, 1), (70_000, 4375), (1000, 10)):
        magnitude = torch.randn(n, generator=gen).abs()
        assert set(top_k_indices(magnitude, k).tolist()) == set(magnitude.topk(k).indices.tolist())
    # the sample misses the few large entries (they sit where no sampled index is): still exact
    magnitude = torch.zeros(100_000)
    magnitude[torch.arange(7, 100_000, 10_000)] = 5.0
    assert set(top_k_indices(magnitude, 10).tolist()) == set(range(7, 100_000, 10_000))


def test_topk_decodes_when_ranks_pick_different_indices() -> None:
    expected = torch.zeros(100)
    expected[0:5] = torch.arange(1, 6) / 2
    expected[50:55] = torch.arange(1, 6) * 2 / 2
    for result in run_distributed(_disjoint, 2, 0.05, timeout_s=60):
        assert_close(result[0], expected)


def _topk_layouts(density: float) -> list[torch.Tensor]:
    import torch.distributed as dist

    grads = _grads(dist.get_rank(), 0)
    # a transposed (non-contiguous) gradient and a bf16 one are written back through a copy
    work = [grads[0].t(), grads[1], grads[2].to(torch.bfloat16), grads[3]]
    build_compressor(GradientCompression(method="topk", density=density, start_iter=0, min_numel=0), None).reduce(work)
    return work


def test_topk_over_several_tensors_equals_each_rank_s_torch_topk_averaged() -> None:
    density = 0.05
    expected = []
    for i in range(len(SHAPES)):
        total = torch.zeros(SHAPES[i]).reshape(-1)
        for rank in range(2):
            g = _grads(rank, 0)[i]
            if i == 2:
                g = g.to(torch.bfloat16).float()
            g = (g.t() if i == 0 else g).reshape(-1)
            k = max(1, -(-g.numel() * 5 // 100))
            chosen = g.abs().topk(k).indices
            total[chosen] += g[chosen]
        expected.append(total / 2)
    for result in run_distributed(_topk_layouts, 2, density, timeout_s=60):
        for i, (got, want) in enumerate(zip(result, expected, strict=True)):
            tol = 1e-2 if i == 2 else 1e-6
            assert_close(got.float().reshape(-1), want, rtol=tol, atol=tol, msg=lambda m, i=i: f"tensor {i}: {m}")
        assert result[0].shape == (48, 32) and result[2].dtype == torch.bfloat16


def test_bytes_counted_equal_hand_computed_ring_bytes() -> None:
    configs = [
        {"method": "none"},
        {"method": "fp16", "start_iter": 0},
        {"method": "topk", "density": 0.05, "start_iter": 0, "min_numel": 64},
        {"method": "sign", "start_iter": 0, "min_numel": 64},
        {"method": "powersgd", "rank": 2, "start_iter": 0, "min_numel": 64},
    ]
    none, fp16, topk, sign, powersgd = (r["bytes"] for r in run_distributed(_reduce_many, 2, configs, 1, timeout_s=60)[0])
    n = sum(torch.Size(s).numel() for s in SHAPES)  # 1536 + 64 + 512 + 5 = 2117 floats
    # no compression: one all-reduce of n fp32 over 2 ranks sends 2 * (1/2) * 4n bytes
    assert none == [4 * n]
    # fp16 on gloo: an all-gather of n fp16 values: (w - 1) * 2n
    assert fp16 == [2 * n]
    # top-k 5% of each tensor with >= 64 entries (the 5-entry one is sent dense): k values (fp32) + k indices (int32)
    k = sum(max(1, -(-torch.Size(s).numel() * 5 // 100)) for s in SHAPES[:3])
    dense = 4 * 5
    assert topk == [dense + 8 * k]
    # sign: ceil(bits / 8) bytes + one fp32 scale per compressed tensor
    bits = 1536 + 64 + 512
    assert sign == [dense + -(-bits // 8) + 4 * 3]
    # PowerSGD rank 2: matrices 32x48 and 16x32 (the 64-vector and the tiny tensor go dense): P and Q all-reduced
    pq = (32 + 48) * 2 + (16 + 32) * 2
    assert powersgd == [4 * (64 + 5) + 4 * pq]


def test_compression_config_errors() -> None:
    with pytest.raises(ValueError, match=r"density=0\) must be in \(0, 1\]"):
        GradientCompression(method="topk", density=0)
    with pytest.raises(ValueError, match=r"density=1.5\) must be in \(0, 1\]"):
        GradientCompression(method="topk", density=1.5)
    with pytest.raises(ValueError, match="method='gzip'"):
        GradientCompression(method="gzip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank=0\) must be an integer >= 1"):
        GradientCompression(method="powersgd", rank=0)


def _hierarchical() -> dict[str, Any]:
    import torch.distributed as dist

    from lightning_hybrid.comm.compress import HierarchicalCompressor, node_groups

    intra, inter = node_groups([0, 1, 2, 3], local_world_size=2)  # "nodes" {0, 1} and {2, 3}
    out = {}
    for method in ("none", "topk"):
        config = GradientCompression(method=method, density=0.05, start_iter=0, min_numel=64)  # type: ignore[arg-type]
        compressor = HierarchicalCompressor(intra, build_compressor(config, inter))
        grads = _grads(dist.get_rank(), 0)
        compressor.reduce(grads)
        out[method] = {"grads": grads, "total": compressor.counter.total, "intra": compressor.intra_counter.total, "inter": compressor.inter.counter.total}
    return out


def test_hierarchical_reduction_within_then_across_nodes() -> None:
    """4 processes as 2 nodes x 2: exact within a node, then across nodes (exact or top-k)."""
    ranks = run_distributed(_hierarchical, 4, timeout_s=60)
    expected = [sum(_grads(r, 0)[i] for r in range(4)) / 4 for i in range(len(SHAPES))]
    n = sum(torch.Size(s).numel() for s in SHAPES)
    for result in ranks:
        for got, want in zip(result["none"]["grads"], expected, strict=True):
            assert_close(got, want, rtol=1e-5, atol=1e-6)
        # each hop is a 2-rank ring all-reduce of n fp32: 4n bytes each
        assert (result["none"]["intra"], result["none"]["inter"], result["none"]["total"]) == (4 * n, 4 * n, 8 * n)
        # compression only on the inter-node hop
        topk = result["topk"]
        assert topk["intra"] == 4 * n and topk["inter"] < n and topk["total"] == topk["intra"] + topk["inter"]
        for got, other in zip(topk["grads"], ranks[0]["topk"]["grads"], strict=True):
            assert_close(got, other)  # every rank decodes the same average


def _large_fp16_sum() -> list[float]:
    from lightning_hybrid.comm import GradientCompression
    from lightning_hybrid.comm.compress import CastCompressor

    # two ranks with gradients near fp16's limit: their sum (80000) overflows, their mean does not
    grad = torch.full((8,), 40000.0)
    CastCompressor(GradientCompression(method="fp16"), None, reduce_on_wire=True).reduce([grad])  # (gloo reduces fp16 too)
    return grad.tolist()


def test_low_precision_reduction_sums_averages_not_gradients() -> None:
    """The NCCL path (one all-reduce in fp16) divides before it sums: no overflow at 65504."""
    for result in run_distributed(_large_fp16_sum, 2, timeout_s=60):
        assert result == [40000.0] * 8
