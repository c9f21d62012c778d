"""Tier 2: checkpoints that survive interruption and a change of layout.

- Exact resume from a checkpoint written *mid-epoch*: the loss curve after resuming equals the
  uninterrupted one step for step, with dropout (RNG streams restored), error-feedback top-k
  compression (residuals restored), bounded-staleness async DP (gradients in flight restored) and
  local SGD (its step counter restored).
- Resharding: a checkpoint saved under one layout loads into another with identical parameters,
  and the next training step gives the same loss and the same parameters as continuing in the
  saving layout: dp2 -> dp1, table_wise -> row_wise, dp2 x tp2 -> dp4, pp2 -> pp1.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

SEQ_DATA = dict(format="synthetic", max_len=8, batch_size=4, synthetic_users=32, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)


def _resume_case(tmp: str, name: str, strategy_kwargs: dict[str, Any], dropout: float = 0.2) -> dict[str, Any]:
    """Train 6 steps (4 per epoch per rank) saving after step 3, then resume a fresh model from it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec
    from tests.helpers import LossRecorder, quiet_trainer

    def run(seed: int, callbacks: list[Any], ckpt: str | None) -> list[float]:
        recorder = LossRecorder()
        torch.manual_seed(seed)
        model = SASRec(num_items=30, max_len=8, d_model=16, num_blocks=1, num_heads=2, dropout=dropout)
        trainer = quiet_trainer(
            strategy=HybridStrategy(embedding_sharding={"item_id": "row_wise"}, **strategy_kwargs),
            devices=2,
            max_steps=6,
            limit_val_batches=0,
            callbacks=[recorder, *callbacks],
            enable_checkpointing=bool(callbacks),
        )
        trainer.fit(model, datamodule=SequenceDataModule(**SEQ_DATA), ckpt_path=ckpt)
        return recorder.losses

    folder = os.path.join(tmp, name)
    saver = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=3, filename="{step}")
    uninterrupted = run(0, [saver], None)
    resumed = run(7, [], os.path.join(folder, "step=3.ckpt"))
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def _resume_cases(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid.comm import GradientCompression

    cases = {
        "plain": {},
        "topk": {"gradient_compression": GradientCompression(method="topk", density=0.1, start_iter=1, min_numel=64)},
        "async": {"data_parallel_mode": "async", "async_staleness": 2},
        "local_sgd": {"data_parallel_mode": "local_sgd", "local_sgd_period": 2},
        # saved while the step-2 average is in flight: it must land at step 4 of the resumed run too
        "local_sgd_overlap": {"data_parallel_mode": "local_sgd", "local_sgd_period": 2, "local_sgd_overlap": True},
        "async_checkpoint": {"async_checkpoint": True},  # written in the background: still exact
    }
    return {name: _resume_case(tmp, name, kwargs) for name, kwargs in cases.items()}


@functools.cache
def _resume_results(tmp: str) -> list[dict[str, Any]]:
    return run_distributed(_resume_cases, 2, tmp, init_process_group=False, timeout_s=300)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.mark.parametrize("case", ["plain", "topk", "async", "local_sgd", "local_sgd_overlap", "async_checkpoint"])
def test_mid_epoch_resume_is_exact(module_tmp: Path, case: str) -> None:
    """Saved after step 3 of 4 in the epoch: the resumed run continues with batch 4 (not batch 1),
    the same dropout masks and the same compression / async state."""
    for rank_results in _resume_results(str(module_tmp)):
        result = rank_results[case]
        assert len(result["uninterrupted"]) == 6
        assert len(result["resumed"]) == 3
        assert_close(torch.tensor(result["resumed"]), torch.tensor(result["uninterrupted"][3:]), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Resharding: save under one layout, continue under another
# ----------------------------------------------------------------------------------------------

TP_PLAN = {"layers.*.linear1": "colwise", "layers.*.linear2": "rowwise"}
STEPS_SAVED = 2  # the checkpoint is written after this many steps; one more step follows it


def _encoder_recommender() -> Any:
    """The tests' encoder click model with momentum SGD, so the tables (dense kernel) and the
    blocks both have optimizer state to reshard."""
    from tests.helpers import EncoderRec

    return EncoderRec(momentum=0.9, seed=None)


def _sasrec() -> Any:
    from tests.helpers import sgd_sasrec_class

    return sgd_sasrec_class()(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0)


PP_DATA = dict(format="synthetic", max_len=8, batch_size=64, synthetic_users=24, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)


def _train(model_name: str, world: int, layout: dict[str, Any], steps: int, *, save_to: str | None = None, resume: str | None = None) -> dict[str, Any]:
    """Fit ``steps`` steps under ``layout`` (HybridStrategy kwargs), from scratch or from ``resume``.

    Returns the losses of the steps (this rank's replica), the whole parameters right after the
    checkpoint was loaded (on_train_start) and after the last step.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import TinyClicks, collate, quiet_trainer

    record: dict[str, Any] = {"losses": []}

    class Record(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            record["loaded"] = full_state_dict(module)

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            record["losses"].append(float(outputs["loss"]))

    torch.manual_seed(0 if resume is None else 99)  # a resumed model starts from other weights
    model = _encoder_recommender() if model_name == "encoder" else _sasrec()
    callbacks: list[Any] = [Record()]
    if save_to is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_to, save_top_k=-1, every_n_train_steps=STEPS_SAVED, filename="{step}"))
    trainer = quiet_trainer(
        strategy=HybridStrategy(**layout), devices=world, max_steps=steps, limit_val_batches=0,
        callbacks=callbacks, enable_checkpointing=save_to is not None,
    )
    if model_name == "encoder":
        # a global batch of 16 samples per step, split over the dp replicas in rank order
        tp, pp = layout.get("tensor_parallel", 1), layout.get("pipeline_parallel", 1)
        dp = world // (tp * pp)
        data = TinyClicks(32)
        sampler = DistributedSampler(data, num_replicas=dp, rank=int(os.environ.get("RANK", "0")) // tp, shuffle=False)
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=16 // dp, sampler=sampler, collate_fn=collate), ckpt_path=resume)
    else:
        trainer.fit(model, datamodule=SequenceDataModule(**PP_DATA), ckpt_path=resume)
    record["final"] = full_state_dict(model)
    return record


TABLE_WISE = {"users": "table_wise", "movies": "table_wise", "cats": "table_wise"}
ROW_WISE = {"users": "row_wise", "movies": "row_wise", "cats": "row_wise"}
MIXED = {"users": "row_wise", "movies": "table_wise", "cats": "column_wise"}
SASREC_TABLE = {"item_id": "row_wise"}


def _two_process_layouts(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    dp2, pp2 = os.path.join(tmp, "dp2"), os.path.join(tmp, "pp2")
    ckpt = f"step={STEPS_SAVED}.ckpt"
    steps = STEPS_SAVED + 1
    return {
        "dp2_saved": _train("encoder", 2, {"embedding_sharding": TABLE_WISE}, STEPS_SAVED, save_to=dp2),
        "dp2_table_wise": _train("encoder", 2, {"embedding_sharding": TABLE_WISE}, steps, resume=os.path.join(dp2, ckpt)),
        "dp2_row_wise": _train("encoder", 2, {"embedding_sharding": ROW_WISE}, steps, resume=os.path.join(dp2, ckpt)),
        "pp2_saved": _train("sasrec", 2, {"pipeline_parallel": 2, "embedding_sharding": SASREC_TABLE}, STEPS_SAVED, save_to=pp2),
        "pp2_pp2": _train("sasrec", 2, {"pipeline_parallel": 2, "embedding_sharding": SASREC_TABLE}, steps, resume=os.path.join(pp2, ckpt)),
        "pp2_dp2": _train("sasrec", 2, {"embedding_sharding": SASREC_TABLE}, steps, resume=os.path.join(pp2, ckpt)),
    }


def _one_process_layouts(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    ckpt = f"step={STEPS_SAVED}.ckpt"
    steps = STEPS_SAVED + 1
    return {
        "dp1_from_dp2": _train("encoder", 1, {"embedding_sharding": MIXED}, steps, resume=os.path.join(tmp, "dp2", ckpt)),
        "dp1_from_pp2": _train("sasrec", 1, {"embedding_sharding": SASREC_TABLE}, steps, resume=os.path.join(tmp, "pp2", ckpt)),
        "dp1_from_dp2xtp2": _train("encoder", 1, {"embedding_sharding": MIXED}, steps, resume=os.path.join(tmp, "tp", ckpt)),
        "dp1_from_roundtrip": _train("encoder", 1, {"embedding_sharding": MIXED}, steps, resume=os.path.join(tmp, "roundtrip.ckpt")),
    }


def _four_process_layouts(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    tp = {"tensor_parallel": 2, "tensor_parallel_plan": TP_PLAN, "embedding_sharding": MIXED}
    folder = os.path.join(tmp, "tp")
    steps = STEPS_SAVED + 1
    return {
        "tp_saved": _train("encoder", 4, tp, STEPS_SAVED, save_to=folder),
        "tp_tp": _train("encoder", 4, tp, steps, resume=os.path.join(folder, f"step={STEPS_SAVED}.ckpt")),
        "tp_dp4": _train("encoder", 4, {"embedding_sharding": ROW_WISE}, steps, resume=os.path.join(folder, f"step={STEPS_SAVED}.ckpt")),
    }


@functools.cache
def _reshard_results(tmp: str) -> dict[str, Any]:
    two = run_distributed(_two_process_layouts, 2, tmp, init_process_group=False, timeout_s=300)
    four = run_distributed(_four_process_layouts, 4, tmp, init_process_group=False, timeout_s=300)
    # the conversion command, both ways: sharded dp2 directory -> one file -> sharded directory
    from lightning_hybrid.cli import main

    ckpt = f"step={STEPS_SAVED}.ckpt"
    main(["convert", os.path.join(tmp, "dp2", ckpt), os.path.join(tmp, "dp2.pt")])
    main(["convert", os.path.join(tmp, "dp2.pt"), os.path.join(tmp, "roundtrip.ckpt")])
    main(["convert", os.path.join(tmp, "pp2", ckpt), os.path.join(tmp, "pp2.pt")])
    one = run_distributed(_one_process_layouts, 1, tmp, init_process_group=False, timeout_s=300)
    return {"two": two, "four": four, "one": one[0]}


def _next_step_loss(ranks: list[dict[str, Any]], replicas: list[int]) -> float:
    """The global loss of the step after the checkpoint: the mean over the dp replicas' losses."""
    return sum(ranks[r]["losses"][-1] for r in replicas) / len(replicas)


def _assert_states(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if exact:
            assert torch.equal(actual[key], value), key
        else:
            assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


RESHARDS = {
    # name: (where the reference runs, its key, its replicas, where the target runs, its key, its replicas, saved key)
    "dp2->dp1": ("two", "dp2_table_wise", [0, 1], "one", "dp1_from_dp2", [0], "dp2_saved"),
    "table_wise->row_wise": ("two", "dp2_table_wise", [0, 1], "two", "dp2_row_wise", [0, 1], "dp2_saved"),
    "dp2xtp2->dp4": ("four", "tp_tp", [0, 2], "four", "tp_dp4", [0, 1, 2, 3], "tp_saved"),
    "dp2xtp2->dp1": ("four", "tp_tp", [0, 2], "one", "dp1_from_dp2xtp2", [0], "tp_saved"),
    "pp2->pp1(dp2)": ("two", "pp2_pp2", [0], "two", "pp2_dp2", [0, 1], "pp2_saved"),
    "pp2->pp1(dp1)": ("two", "pp2_pp2", [0], "one", "dp1_from_pp2", [0], "pp2_saved"),
}


def _ranks(results: dict[str, Any], where: str, key: str) -> list[dict[str, Any]]:
    if where == "one":
        return [results["one"][key]]
    return [rank[key] for rank in results[where]]


@pytest.mark.parametrize("name", list(RESHARDS))
def test_checkpoint_loads_into_another_layout(module_tmp: Path, name: str) -> None:
    """Identical parameters after loading; the next step's loss and parameters equal those of
    continuing in the layout that saved the checkpoint (up to float summation order)."""
    ref_where, ref_key, ref_replicas, where, key, replicas, saved_key = RESHARDS[name]
    results = _reshard_results(str(module_tmp))
    saved_where = ref_where
    saved = _ranks(results, saved_where, saved_key)[0]["final"]
    reference = _ranks(results, ref_where, ref_key)
    target = _ranks(results, where, key)
    _assert_states(target[0]["loaded"], saved, exact=True)
    _assert_states(reference[0]["loaded"], saved, exact=True)
    assert len(target[0]["losses"]) == 1  # one step after the checkpoint
    assert _next_step_loss(target, replicas) == pytest.approx(_next_step_loss(reference, ref_replicas), rel=1e-5, abs=1e-6)
    _assert_states(target[0]["final"], reference[0]["final"], exact=False)


def test_convert_to_one_file_for_serving_and_back(module_tmp: Path) -> None:
    """`lightning-hybrid convert`: the single file holds every weight whole (tables gathered from
    their shards) and loads with the model's own ``load_from_checkpoint``, no strategy needed;
    converted back, it resumes training exactly like the original sharded directory."""
    from lightning_hybrid.models.sasrec import SASRec

    results = _reshard_results(str(module_tmp))
    single = torch.load(module_tmp / "dp2.pt", weights_only=False)
    _assert_states(single["state_dict"], results["two"][0]["dp2_saved"]["final"], exact=True)
    assert single["global_step"] == STEPS_SAVED
    served = SASRec.load_from_checkpoint(module_tmp / "pp2.pt", map_location="cpu")  # pipeline stages joined
    _assert_states({k: v for k, v in served.state_dict().items()}, results["two"][0]["pp2_saved"]["final"], exact=True)
    roundtrip, original = results["one"]["dp1_from_roundtrip"], results["one"]["dp1_from_dp2"]
    assert roundtrip["losses"] == original["losses"]
    _assert_states(roundtrip["final"], original["final"], exact=True)
