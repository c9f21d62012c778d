"""Tier 1: GroupedOptimizer behaves like its sub-optimizers stepped separately."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.optim import GroupedOptimizer


def _params() -> tuple[torch.nn.Linear, torch.nn.Embedding]:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2), torch.nn.Embedding(6, 4)


def _loss(lin: torch.nn.Linear, emb: torch.nn.Embedding) -> torch.Tensor:
    return lin(emb(torch.tensor([1, 3, 5]))).pow(2).sum()


def test_same_updates_as_separate_optimizers() -> None:
    lin_a, emb_a = _params()
    lin_b, emb_b = _params()
    grouped = GroupedOptimizer([torch.optim.Adam(lin_a.parameters(), lr=0.01), torch.optim.Adagrad(emb_a.parameters(), lr=0.1)])
    adam, adagrad = torch.optim.Adam(lin_b.parameters(), lr=0.01), torch.optim.Adagrad(emb_b.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(grouped, step_size=1, gamma=0.5)
    for _ in range(3):
        grouped.zero_grad()
        _loss(lin_a, emb_a).backward()
        grouped.step()
        sched.step()
        adam.zero_grad()
        adagrad.zero_grad()
        _loss(lin_b, emb_b).backward()
        adam.step()
        adagrad.step()
        for opt in (adam, adagrad):  # what StepLR does to each group
            for g in opt.param_groups:
                g["lr"] *= 0.5
    assert_close(lin_a.weight, lin_b.weight)
    assert_close(emb_a.weight, emb_b.weight)
    assert [g["lr"] for g in grouped.param_groups] == [0.01 / 8, 0.1 / 8]
    # state is routed to the owner, and the state dict round-trips
    assert set(grouped.state[lin_a.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(grouped.state[emb_a.weight]) == {"step", "sum"}
    restored = GroupedOptimizer([torch.optim.Adam(lin_a.parameters(), lr=1.0), torch.optim.Adagrad(emb_a.parameters(), lr=1.0)])
    restored.load_state_dict(grouped.state_dict())
    assert_close(restored.state[emb_a.weight]["sum"], grouped.state[emb_a.weight]["sum"])
    assert restored.param_groups[1]["lr"] == grouped.param_groups[1]["lr"]


def test_a_parameter_in_two_optimizers_is_refused() -> None:
    lin, _ = _params()
    with pytest.raises(ValueError, match="appears in two optimizers"):
        GroupedOptimizer([torch.optim.SGD(lin.parameters(), lr=0.1), torch.optim.SGD(lin.parameters(), lr=0.1)])


def test_network_and_table_optimizers_use_torchs_fused_kernels_where_they_apply_and_step_like_the_loop() -> None:
    """The dense Adam (and a CPU table's Adagrad) are torch's fused kernels for plain CPU/CUDA
    tensors, several times faster than the CPU default's per-tensor loop, and update as the loop does."""
    from lightning_hybrid.optim import fused_kernels_apply, network_and_table_optimizer

    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(50, 8)), torch.nn.Parameter(torch.randn(8))]
    table = [torch.nn.Parameter(torch.randn(20, 8))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in dense + table]
    opt = network_and_table_optimizer(dense + table, table, lr=0.01, weight_decay=0.0, table_optimizer="adagrad", table_lr=0.05)
    loop = GroupedOptimizer([torch.optim.Adam(reference[:2], lr=0.01, betas=(0.9, 0.98), foreach=False),
                             torch.optim.Adagrad(reference[2:], lr=0.05, foreach=False)])
    assert [o.defaults["fused"] for o in opt.optimizers] == [True, True]
    # plain tensors, then DTensors (none here): the same groups whatever the strategy made DTensors
    assert [len(g["params"]) for g in opt.param_groups] == [2, 0, 1]
    for step in range(3):
        grads = [torch.randn_like(p) * (step + 1) for p in dense + table]
        for p, r, g in zip(dense + table, reference, grads, strict=True):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        loop.step()
    for p, r in zip(dense + table, reference, strict=True):
        assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert fused_kernels_apply([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]) is True
    assert fused_kernels_apply([torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)]) is None
    assert fused_kernels_apply([]) is None
    # (DTensors beside plain tensors get a param group of their own: tests/test_tensor_parallel.py
    # fails with one fused group over both)


def test_weight_decay_changes_only_the_decay() -> None:
    # AdamW's own default betas are (0.9, 0.999): turning weight_decay on must not also change the
    # second-moment horizon the recipes were tuned with. Check: one step from the same state equals
    # Adam(0.9, 0.98) on weights first shrunk by lr * weight_decay (decoupled decay, by hand).
    from lightning_hybrid.optim import network_and_table_optimizer

    torch.manual_seed(0)
    net, table = torch.nn.Linear(4, 3), torch.nn.Parameter(torch.randn(5, 4))
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(net.state_dict())
    opt = network_and_table_optimizer(list(net.parameters()) + [table], [table], lr=0.01, weight_decay=0.1, table_optimizer="adagrad", table_lr=0.1)
    plain = torch.optim.Adam(reference.parameters(), lr=0.01, betas=(0.9, 0.98))
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, optimizer in ((net, opt), (reference, plain)):
            optimizer.zero_grad()
            (model(x) ** 2).sum().backward()
            if model is reference:
                with torch.no_grad():
                    for p in reference.parameters():
                        p.mul_(1 - 0.01 * 0.1)
            optimizer.step()
    assert_close(net.weight, reference.weight)
    assert_close(net.bias, reference.bias)
