"""Tier 2: fp16 loss scaling with sharded gradients skips the same steps on every rank."""

from __future__ import annotations

import torch

from lightning_hybrid.testing import run_distributed


def _step(synchronized: bool) -> tuple[float, float]:
    import torch.distributed as dist

    from lightning_hybrid.parallel.amp import synchronize_found_inf

    param = torch.nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    if synchronized:
        synchronize_found_inf(scaler)
    optimizer = torch.optim.SGD([param], lr=0.1)
    # a "shard" whose gradient overflows on rank 1 only
    factor = float("inf") if dist.get_rank() == 1 else 1.0
    scaler.scale((param * factor).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(param.detach().sum()), float(scaler.get_scale())


def _both() -> tuple[tuple[float, float], tuple[float, float]]:
    return _step(True), _step(False)


def test_overflow_on_one_rank_skips_the_step_everywhere() -> None:
    ranks = run_distributed(_both, 2, timeout_s=60)
    for (value, scale), _ in ranks:
        assert value == 3.0 and scale == 2.0  # step skipped, scale halved, on both ranks
    assert ranks[0][1][0] != 3.0  # what plain GradScaler does: rank 0 steps, rank 1 does not
    assert ranks[1][1][0] == 3.0


def test_fp16_loss_scaling_refuses_fused_torch_optimizers_and_pipelines() -> None:
    """Lightning lets a ``fused=True`` optimizer unscale itself, which bypasses the cross-rank
    overflow agreement (issue 20, item 8): refused at setup, naming the optimizer and the fix."""
    from types import SimpleNamespace

    import pytest

    from lightning_hybrid.strategies.apply import check_loss_scaling

    plugin = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    param = torch.nn.Parameter(torch.ones(2))
    fused = torch.optim.Adam([param], fused=True)
    with pytest.raises(ValueError, match=r"precision='16-mixed' with Adam\(fused=True\) is not supported.*fused=False"):
        check_loss_scaling(plugin, pipelined=False, world_size=1, optimizers=[fused])
    with pytest.raises(ValueError, match=r"pipeline_parallel > 1\) does not support precision='16-mixed'"):
        check_loss_scaling(plugin, pipelined=True, world_size=1)
    check_loss_scaling(plugin, pipelined=False, world_size=1, optimizers=[torch.optim.Adam([param])])  # unfused: fine
    check_loss_scaling(SimpleNamespace(), pipelined=True, world_size=2, optimizers=[fused])  # no loss scaling: nothing to refuse
