"""Tier 2: training through HybridStrategy on 2 gloo processes equals single-process training.

For every sharding type, the same module is trained (a) by a plain single-process Trainer on the
global batch and (b) through HybridStrategy on 2 ranks with half the batch each. We compare the
first step's outputs, the dense gradients the optimizer sees, the per-step loss and every
parameter (tables gathered whole) after the last step. SGD makes table updates exact functions of
their gradients, so equal tables after steps also prove equal table gradients.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed
from tests.helpers import GradRecorder, TinyRec, loader, quiet_trainer

BATCH = 8  # per rank
STEPS = 3

# name -> (module kind, strategy kwargs, model kwargs, trainer kwargs)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "ebc-table_wise": ("ebc", {"embedding_sharding": {"t_user": "table_wise", "t_item": "table_wise", "t_category": "table_wise"}}, {}, {}),
    "ebc-row_wise": ("ebc", {"embedding_sharding": {"t_user": "row_wise", "t_item": "row_wise", "t_category": "row_wise"}}, {}, {}),
    "ebc-column_wise": ("ebc", {"column_wise_min_partition": 4}, {}, {}),
    "ebc-data_parallel": ("ebc", {"embedding_sharding": {"t_user": "data_parallel", "t_item": "data_parallel", "t_category": "data_parallel"}}, {}, {}),
    "ebc-mixed-planner": ("ebc", {"embedding_sharding": {"t_user": "row_wise"}}, {}, {}),
    # sharding groups outputs by type, reordering keys; .values() must still see the model's order
    "ebc-mixed-values": ("ebc", {"embedding_sharding": {"t_user": "table_wise", "t_item": "row_wise", "t_category": "table_wise"}}, {"use_values": True}, {}),
    "ebc-row_wise-adagrad-fused": ("ebc", {"embedding_sharding": {"t_user": "row_wise", "t_item": "row_wise", "t_category": "row_wise"}}, {"optimizer": "adagrad"}, {}),
    "ebc-table_wise-adam-dense": ("ebc", {"embedding_sharding": {"t_user": "table_wise", "t_item": "row_wise", "t_category": "table_wise"}}, {"optimizer": "adam", "lr": 0.01}, {}),
    "ebc-row_wise-lr-scheduler": ("ebc", {"embedding_sharding": {"t_user": "row_wise", "t_item": "row_wise", "t_category": "table_wise"}}, {"scheduler": True}, {}),
    "ebc-row_wise-accumulate": ("ebc", {"embedding_sharding": {"t_user": "row_wise", "t_item": "row_wise", "t_category": "data_parallel"}}, {}, {"accumulate_grad_batches": 2}),
    "ebc-dense-kernel-clipping": ("ebc", {"embedding_sharding": {"t_user": "row_wise", "t_item": "table_wise", "t_category": "data_parallel"}, "embedding_kernels": {"t_user": "dense", "t_item": "dense"}}, {"lr": 0.5}, {"gradient_clip_val": 0.05}),
    "ec-table_wise": ("ec", {"embedding_sharding": {"t_user": "table_wise", "t_item": "table_wise", "t_category": "table_wise"}}, {}, {}),
    "ec-row_wise": ("ec", {"embedding_sharding": {"t_user": "row_wise", "t_item": "row_wise", "t_category": "row_wise"}}, {}, {}),
    "ec-column_wise": ("ec", {"column_wise_min_partition": 4}, {}, {}),
    # the dense kernel of sequence tables (torch lookup on the local shards): Adam, accumulation
    "ec-table_wise-adam-dense": ("ec", {"embedding_sharding": {"t_user": "table_wise", "t_item": "table_wise", "t_category": "table_wise"}}, {"optimizer": "adam", "lr": 0.01}, {}),
    "ec-row_wise-adam-dense": ("ec", {"embedding_sharding": {"t_user": "row_wise", "t_item": "row_wise", "t_category": "row_wise"}}, {"optimizer": "adam", "lr": 0.01}, {}),
    "ec-column_wise-adam-dense": ("ec", {"column_wise_min_partition": 8}, {"optimizer": "adam", "lr": 0.01}, {}),
    "ec-row_wise-accumulate": ("ec", {"embedding_sharding": {"t_user": "row_wise", "t_item": "table_wise", "t_category": "row_wise"}}, {}, {"accumulate_grad_batches": 2}),
    # Adam for the network, fused Adagrad for the tables, one LR scheduler over both
    "ec-row_wise-grouped-optimizer": ("ec", {"embedding_sharding": {"t_user": "row_wise", "t_item": "row_wise", "t_category": "table_wise"}}, {"optimizer": "grouped", "lr": 0.01, "scheduler": True}, {}),
}


def _strategy_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(raw)
    min_partition = kwargs.pop("column_wise_min_partition", None)
    if min_partition is not None:
        from torchrec.distributed.planner.types import ParameterConstraints

        kwargs["embedding_constraints"] = {
            t: ParameterConstraints(sharding_types=["column_wise"], min_partition=min_partition)
            for t in ("t_user", "t_item", "t_category")
        }
    return kwargs


def _hybrid_worker(names: list[str]) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict

    results = {}
    for name in names:
        kind, strategy_kwargs, model_kwargs, trainer_kwargs = CASES[name]
        torch.manual_seed(0)
        model = TinyRec(kind=kind, dim=16 if "column" in name else 8, **model_kwargs)
        recorder = GradRecorder()
        strategy = HybridStrategy(**_strategy_kwargs(strategy_kwargs))
        steps = STEPS * trainer_kwargs.get("accumulate_grad_batches", 1)
        trainer = quiet_trainer(strategy=strategy, devices=2, max_steps=STEPS, callbacks=[recorder], **trainer_kwargs)
        trainer.fit(model, train_dataloaders=loader(BATCH, n=BATCH * 2 * steps, ranks=2))
        plan = {t: s["sharding_type"] for t, s in __import__("lightning_hybrid").parallel.embedding.plan_summary(strategy.sharding_plan).items()}
        kernels = {t: s["compute_kernel"] for t, s in __import__("lightning_hybrid").parallel.embedding.plan_summary(strategy.sharding_plan).items()}
        results[name] = {
            "outputs": model.outputs[0],
            "losses": model.losses,
            "grads": recorder.first_grads,
            "state": full_state_dict(model),
            "plan": plan,
            "kernels": kernels,
            "global_step": trainer.global_step,
        }
    return results


def _reference(name: str) -> dict[str, Any]:
    kind, _strategy_kwargs_unused, model_kwargs, trainer_kwargs = CASES[name]
    torch.manual_seed(0)
    model = TinyRec(kind=kind, dim=16 if "column" in name else 8, **model_kwargs)
    recorder = GradRecorder()
    accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
    trainer = quiet_trainer(devices=1, max_steps=STEPS, callbacks=[recorder], **trainer_kwargs)
    trainer.fit(model, train_dataloaders=loader(BATCH * 2, n=BATCH * 2 * STEPS * accumulate))
    return {
        "outputs": model.outputs[0],
        "losses": model.losses,
        "grads": recorder.first_grads,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


@functools.cache
def _hybrid_results() -> dict[str, Any]:
    # One 2-process job runs every case: process start-up dominates the cost of these tiny fits.
    ranks = run_distributed(_hybrid_worker, 2, list(CASES), init_process_group=False, timeout_s=400)
    return {"rank0": ranks[0], "rank1": ranks[1]}


@pytest.mark.parametrize("name", list(CASES))
def test_hybrid_matches_single_process(name: str) -> None:
    results = _hybrid_results()
    r0, r1 = results["rank0"][name], results["rank1"][name]
    ref = _reference(name)

    # the requested layout was really used
    forced = _strategy_kwargs(CASES[name][1]).get("embedding_sharding", {})
    for table, sharding_type in forced.items():
        assert r0["plan"][table] == sharding_type
    if "column_wise" in name:
        assert set(r0["plan"].values()) == {"column_wise"}
    if "adam" in name or "accumulate" in name or "dense-kernel" in name:
        assert set(r0["kernels"].values()) == {"dense"}  # exactness needs the user's optimizer
    elif "data_parallel" not in name:
        assert "fused" in set(r0["kernels"].values())
    assert r0["global_step"] == STEPS

    # first-step outputs: rank r saw samples r, r+2, ... of the global batch
    assert_close(r0["outputs"], ref["outputs"][0::2], rtol=1e-5, atol=1e-6)
    assert_close(r1["outputs"], ref["outputs"][1::2], rtol=1e-5, atol=1e-6)
    # dense grads after DDP averaging equal the global-batch grads
    assert r0["grads"] is not None and set(r0["grads"]) == set(ref["grads"])
    for key in ref["grads"]:
        assert_close(r0["grads"][key], ref["grads"][key], rtol=1e-5, atol=1e-6)
        assert_close(r1["grads"][key], ref["grads"][key], rtol=1e-5, atol=1e-6)
    # the mean of the ranks' losses is the global loss, step by step
    hybrid_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"], strict=True)]
    assert_close(torch.tensor(hybrid_losses), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
    # every parameter after the optimizer steps, tables gathered whole
    assert set(r0["state"]) == set(ref["state"])
    for key, expected in ref["state"].items():
        assert_close(r0["state"][key], expected, rtol=1e-5, atol=2e-6, msg=lambda m, k=key: f"{k}: {m}")
