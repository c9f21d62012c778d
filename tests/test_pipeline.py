"""Tier 2: pipeline parallelism (torch.distributed.pipelining) inside the Lightning Trainer.

Every schedule must train the reference recommender exactly like one process: same step losses
(the mean of the microbatch losses; all users have the same number of targets here, so that
equals the batch mean) and the same parameters after the steps, with the item table sharded by
torchrec across all ranks.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

# 24 users of equal length (every position has a target), one batch per epoch
DATA = dict(format="synthetic", max_len=8, batch_size=64, synthetic_users=24, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)


def _model_class(**kwargs: Any) -> type:
    from tests.helpers import sgd_sasrec_class

    return sgd_sasrec_class(**kwargs)


def _fit(
    devices: int, strategy_kwargs: dict[str, Any] | None, clip: float = 0.0, epochs: int = 3, accumulate: int = 1, model: dict[str, Any] | None = None
) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    options = dict(model or {})
    block = options.pop("block", "pre_norm")  # the rest configure the SGD test class
    model = _model_class(**options)(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0, block=block)
    common = dict(max_epochs=epochs, limit_val_batches=0, gradient_clip_val=clip or None, callbacks=[Losses()], accumulate_grad_batches=accumulate)
    if strategy_kwargs is None:
        trainer = quiet_trainer(devices=1, **common)
    else:
        trainer = quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=devices, **common)
    trainer.fit(model, datamodule=SequenceDataModule(**dict(DATA, batch_size=DATA["batch_size"] // accumulate)))
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = trainer.optimizers[0]
    momentum = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters() if optimizer.state[p].get("momentum_buffer") is not None}
    runner = getattr(trainer.strategy, "pipeline_runner", None)
    exchange = getattr(trainer.strategy, "dense_exchange", None)
    overlap = exchange.overlap if exchange is not None else None
    return {
        "losses": losses, "state": state, "momentum": momentum, "rebalances": list(runner.rebalances) if runner else [],
        # buckets the last step's exchange started from gradient hooks, during the schedule
        "overlapped_buckets": overlap.started_in_backward if overlap is not None else None,
    }


def _check(reference: dict[str, Any], ranks: list[dict[str, Any]], replicas: list[int]) -> None:
    for result in ranks:  # every rank reports the same (broadcast) loss of its replica
        assert len(result["losses"]) == len(reference["losses"])
    mean = [sum(ranks[r]["losses"][i] for r in replicas) / len(replicas) for i in range(len(reference["losses"]))]
    assert_close(torch.tensor(mean), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    state = ranks[0]["state"]
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


SCHEDULES = {
    "gpipe": {"pipeline_schedule": "gpipe"},
    "1f1b": {"pipeline_schedule": "1f1b", "pipeline_microbatches": 4},
    "interleaved_1f1b": {"pipeline_schedule": "interleaved_1f1b", "pipeline_virtual_stages": 2},
    "zero_bubble": {"pipeline_schedule": "zero_bubble", "pipeline_virtual_stages": 2},
}


def _fit_schedules() -> dict[str, Any]:
    base = {"pipeline_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}}
    return {name: _fit(2, {**base, **schedule}) for name, schedule in SCHEDULES.items()}


@functools.cache
def _schedule_results() -> list[dict[str, Any]]:
    # one 2-process job for every schedule: process start-up dominates these tiny fits
    return run_distributed(_fit_schedules, 2, init_process_group=False, timeout_s=300)


@functools.cache
def _single_process_reference() -> dict[str, Any]:
    return _fit(1, None)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_pp2_matches_single_process(schedule: str) -> None:
    ranks = [r[schedule] for r in _schedule_results()]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    _check(_single_process_reference(), ranks, replicas=[0])


# pp2xdp2: also rebalanced mid-training. Pipeline rank 1 runs its blocks 5 ms slower (a slow
# device); after step 2 the adaptive balancer moves block 2 (weights and momentum) to rank 0, and
# the run must still equal one process, momentum buffers included
SLOW_RANK = {"momentum": 0.9, "slow_pp_rank": 1}


def _fit_dp2_pair(kwargs: dict[str, Any], clip: float, model: dict[str, Any] | None) -> dict[str, Any]:
    # one 4-process job for both dp=2 fits: rebalanced (dp exchange after the schedule) and not
    # (the exact exchange overlapped with the schedule's backward, bucket_mb small enough for
    # several buckets)
    from lightning_hybrid.comm import overlap

    rebalanced = _fit(4, kwargs, clip, 3, 1, model)
    plain = {k: v for k, v in kwargs.items() if k != "pipeline_rebalance_every"}
    default_mb = overlap.OverlappedExchange.__init__.__kwdefaults__["bucket_mb"]
    overlap.OverlappedExchange.__init__.__kwdefaults__["bucket_mb"] = 0.002
    try:
        overlapped = _fit(4, plain, clip, 3, 1, model)
    finally:
        overlap.OverlappedExchange.__init__.__kwdefaults__["bucket_mb"] = default_mb
    return {"rebalanced": rebalanced, "overlapped": overlapped}


@pytest.mark.parametrize(
    ("extra", "replicas", "clip", "model"),
    # pp x tp with LiGR blocks: the tp plan then also splits the SwiGLU's gate (the plain blocks' plan is its subset)
    [({"data_parallel": 2, "pipeline_rebalance_every": 2}, [0, 1], 0.05, SLOW_RANK), ({"tensor_parallel": 2}, [0], 0.0, {"block": "ligr"})],
    ids=["pp2xdp2-clipped-rebalanced-and-overlapped", "pp2xtp2-ligr"],
)
def test_pp2_with_dp2_or_tp2_on_4_processes(extra: dict[str, Any], replicas: list[int], clip: float, model: dict[str, Any] | None) -> None:
    reference = _fit(1, None, clip=clip, model=model)
    kwargs = {"pipeline_parallel": 2, "pipeline_schedule": "1f1b", "embedding_sharding": {"item_id": "row_wise"}, **extra}
    if "data_parallel" in extra:
        pairs = run_distributed(_fit_dp2_pair, 4, kwargs, clip, model, init_process_group=False, timeout_s=300)
        ranks = [pair["rebalanced"] for pair in pairs]
        # without the balancer the dp exchange overlaps the schedule's backward: buckets start
        # from the gradient hooks at each stage parameter's last microbatch, and the run still
        # equals one process
        overlapped = [pair["overlapped"] for pair in pairs]
        assert all(r["overlapped_buckets"] is None for r in ranks)
        assert all(r["overlapped_buckets"] > 0 for r in overlapped), [r["overlapped_buckets"] for r in overlapped]
        _check(reference, overlapped, replicas=replicas)
    else:
        ranks = run_distributed(_fit, 4, 4, kwargs, clip, 3, 1, model, init_process_group=False, timeout_s=300)
    # mesh (pp, dp, tp): with dp=2 ranks 0 and 1 are the two replicas of stage 0
    _check(reference, ranks, replicas=replicas)
    if "pipeline_rebalance_every" in extra:
        for rank in ranks:
            assert [(r.step, r.before, r.after, r.moved) for r in rank["rebalances"]] == [(2, [2, 2], [3, 1], [2])]
        assert any(k.startswith("blocks.2.") for k in ranks[0]["momentum"])  # block 2 now lives on stage 0's ranks
        assert not any(k.startswith("blocks.2.") for k in ranks[2]["momentum"])
        held = {**ranks[2]["momentum"], **ranks[0]["momentum"]}
        assert set(held) == set(reference["momentum"])
        for name, value in reference["momentum"].items():
            assert_close(held[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=name: f"momentum of {k}: {m}")


def _fit_validate_resume(tmp: str, pipeline_parallel: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    def trainer(epochs: int, callbacks: list[Any], pp: int) -> Any:
        strategy = HybridStrategy(pipeline_parallel=pp, data_parallel=2 // pp, embedding_sharding={"item_id": "row_wise"})
        return quiet_trainer(strategy=strategy, devices=2, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=bool(callbacks))

    data = dict(DATA, batch_size=8)
    torch.manual_seed(0)
    model = _model_class()(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0)
    saver = ModelCheckpoint(dirpath=tmp, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = trainer(2, [saver], pipeline_parallel)
    first.fit(model, datamodule=SequenceDataModule(**data))
    metrics = {k: float(v) for k, v in first.callback_metrics.items() if k.startswith("val_")}
    # the same checkpoint, evaluated by a model laid out without a pipeline (resharded on load)
    torch.manual_seed(5)
    plain = _model_class()(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0)
    reloaded = trainer(2, [], 1).validate(plain, datamodule=SequenceDataModule(**data), ckpt_path=os.path.join(tmp, "epoch=1.ckpt"))
    return {"metrics": metrics, "reloaded": {k: float(v) for k, v in reloaded[0].items()}}


def test_validation_metrics_and_checkpoint_resharded_to_no_pipeline(tmp_path: Any) -> None:
    """pp=2: validation metrics equal those of the same weights evaluated without a pipeline
    (dp=2), loaded from the pp=2 checkpoint (DCP reshards: each stage saved its own blocks)."""
    for result in run_distributed(_fit_validate_resume, 2, str(tmp_path), 2, init_process_group=False, timeout_s=300):
        assert set(result["metrics"]) >= {"val_hr@10", "val_ndcg@10"}
        for key, value in result["metrics"].items():
            assert result["reloaded"][key] == pytest.approx(value, abs=1e-6), key
        assert 0 < result["metrics"]["val_hr@10"] <= 1


def _resume(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec
    from tests.helpers import LossRecorder, quiet_trainer, with_slow_pp_rank

    def run(seed: int, callbacks: list[Any], ckpt: str | None) -> tuple[list[float], list[Any]]:
        recorder = LossRecorder()
        torch.manual_seed(seed)
        # the default optimizers: Adam for the network, fused Adagrad for the table (state to restore);
        # pp rank 1 is slow, so block 2 moves to rank 0 after step 2 and the epoch-0 checkpoint holds
        # the split [3, 1]; the resumed run starts from the even split [2, 2] (DCP reshards by name)
        model = with_slow_pp_rank(SASRec, 1)(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, dropout=0.0)
        strategy = HybridStrategy(
            pipeline_parallel=2, pipeline_schedule="gpipe", embedding_sharding={"item_id": "row_wise"}, pipeline_rebalance_every=2
        )
        trainer = quiet_trainer(
            strategy=strategy, devices=2, max_epochs=2, limit_val_batches=0, callbacks=[recorder, *callbacks], enable_checkpointing=bool(callbacks)
        )
        trainer.fit(model, datamodule=SequenceDataModule(**dict(DATA, batch_size=8)), ckpt_path=ckpt)
        return recorder.losses, [(r.step, r.after) for r in strategy.pipeline_runner.rebalances if r.moved]

    uninterrupted, moves = run(0, [ModelCheckpoint(dirpath=tmp, save_top_k=-1, every_n_epochs=1, filename="{epoch}")], None)
    resumed, _ = run(7, [], os.path.join(tmp, "epoch=0.ckpt"))
    return {"uninterrupted": uninterrupted, "resumed": resumed, "moves": moves}


def test_pipeline_checkpoint_resume_is_exact(tmp_path: Any) -> None:
    for result in run_distributed(_resume, 2, str(tmp_path), init_process_group=False, timeout_s=300):
        assert result["moves"] == [(2, [3, 1])]
        half = len(result["uninterrupted"]) // 2
        assert len(result["resumed"]) == half > 0
        assert_close(torch.tensor(result["resumed"]), torch.tensor(result["uninterrupted"][half:]), rtol=1e-6, atol=1e-7)


def _bad(case: str) -> str:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import TinyRec, loader, quiet_trainer

    blocks, kwargs, data = 4, {}, dict(DATA, batch_size=8)
    if case == "stages":
        blocks = 1
    elif case == "virtual":
        blocks, kwargs = 3, {"pipeline_schedule": "interleaved_1f1b", "pipeline_virtual_stages": 2}
    elif case == "batch":
        data = dict(DATA, batch_size=7)
    model = _model_class()(num_items=30, max_len=8, d_model=16, num_blocks=blocks, num_heads=2, dropout=0.0) if case != "spec" else TinyRec()
    trainer = quiet_trainer(strategy=HybridStrategy(pipeline_parallel=2, **kwargs), devices=2, max_epochs=1, limit_val_batches=0)
    try:
        if case == "spec":
            trainer.fit(model, train_dataloaders=loader(8))
        else:
            trainer.fit(model, datamodule=SequenceDataModule(**data))
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"{type(err).__name__}: {err}"
    return "no error"


BAD = {
    "stages": "2 stages but the model has only 1 blocks",
    "virtual": "4 stages (interleaved and zero-bubble schedules run several stages per rank) but the model has only 3 blocks",
    "batch": "the training batch size of 7 samples does not split into pipeline_microbatches=2",
    "spec": "needs to know what to cut into stages: define TinyRec.pipeline_spec()",
}


def _bad_all() -> dict[str, str]:
    return {case: _bad(case) for case in BAD}


def test_bad_pipeline_layouts_fail_on_every_rank() -> None:
    """Each bad layout fails with its message on every rank (and the processes stay usable for
    the next case: nothing hangs)."""
    for result in run_distributed(_bad_all, 2, init_process_group=False, timeout_s=180):
        for case, message in BAD.items():
            assert message in result[case], (case, result[case])


def test_pipeline_option_errors() -> None:
    from lightning_hybrid import HybridStrategy

    with pytest.raises(ValueError, match="pipeline_schedule='pipedream'"):
        HybridStrategy(pipeline_parallel=2, pipeline_schedule="pipedream")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runs several stages per rank: set pipeline_virtual_stages >= 2"):
        HybridStrategy(pipeline_parallel=2, pipeline_schedule="interleaved_1f1b")
    with pytest.raises(ValueError, match="'1f1b' runs one stage per rank; pipeline_virtual_stages=2"):
        HybridStrategy(pipeline_parallel=2, pipeline_virtual_stages=2)
    with pytest.raises(ValueError, match=r"'1f1b' needs pipeline_microbatches >= pipeline_parallel \(4\); got 2"):
        HybridStrategy(pipeline_parallel=4, pipeline_microbatches=2)
    with pytest.raises(ValueError, match="dense_parallel='fsdp'\\) is not supported yet"):
        HybridStrategy(pipeline_parallel=2, dense_parallel="fsdp")
    with pytest.raises(ValueError, match="pipeline_split='lopsided'"):
        HybridStrategy(pipeline_parallel=2, pipeline_split="lopsided")  # type: ignore[arg-type]
    from lightning_hybrid.comm import GradientCompression

    for kwargs, message in (
        ({"pipeline_rebalance_every": -1}, r"pipeline_rebalance_every=-1\) must be an integer >= 0"),
        ({"pipeline_rebalance_every": 4}, "pipeline_parallel=1 has one"),
        ({"pipeline_parallel": 2, "pipeline_rebalance_every": 4, "pipeline_rebalance_threshold": 0.9}, "use a value >= 1.0"),
        ({"pipeline_parallel": 2, "tensor_parallel": 2, "pipeline_rebalance_every": 4}, "hold DTensor shards"),
        (
            {"pipeline_parallel": 2, "pipeline_rebalance_every": 4, "gradient_compression": GradientCompression(method="powersgd")},
            "error-feedback state is kept per tensor",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            HybridStrategy(**kwargs)


def _precisions() -> dict[str, list[float]]:
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        warnings.simplefilter("ignore")
        os.environ.pop("PL_GLOBAL_SEED", None)
        import lightning.pytorch as pl

        from lightning_hybrid import HybridStrategy
        from lightning_hybrid.data.sequences import SequenceDataModule
        from tests.helpers import quiet_trainer

        losses: list[float] = []

        class Losses(pl.Callback):
            def __init__(self, sink: list[float]) -> None:
                self.sink = sink

            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                self.sink.append(float(outputs["loss"]))

        torch.manual_seed(0)
        model = _model_class()(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0)
        trainer = quiet_trainer(
            strategy=HybridStrategy(pipeline_parallel=2), devices=2, max_epochs=2, precision=precision, limit_val_batches=0, callbacks=[Losses(losses)]
        )
        trainer.fit(model, datamodule=SequenceDataModule(**dict(DATA, batch_size=8)))
        out[precision] = losses
    return out


def test_bf16_mixed_under_pipelining_tracks_fp32() -> None:
    for result in run_distributed(_precisions, 2, init_process_group=False, timeout_s=180):
        assert len(result["bf16-mixed"]) == len(result["32-true"]) == 6
        assert_close(torch.tensor(result["bf16-mixed"]), torch.tensor(result["32-true"]), rtol=2e-2, atol=0)
        assert result["bf16-mixed"] != result["32-true"]  # autocast really ran


def _fit_toy(devices: int, accumulate: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset, DistributedSampler

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.testing.toy_pipeline import ToyPipelineModel, toy_batch
    from tests.helpers import quiet_trainer

    class Toy(pl.LightningModule):
        """A LightningModule written around a pipeline-able network (no tables)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = ToyPipelineModel(8, [16, 32, 16, 16])
            self.losses: list[float] = []

        def pipeline_spec(self) -> Any:
            spec = self.net.pipeline_spec()
            spec.last_modules = ("net.head",)
            return spec

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x = batch["x"]
            for block in self.net.blocks:
                x = block(x)
            return torch.nn.functional.mse_loss(self.net.head(x), batch["y"])

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.losses.append(float(outputs["loss"]))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = toy_batch(24, 8)

    class Rows(Dataset):
        def __len__(self) -> int:
            return 24

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {k: v[i] for k, v in data.items()}

    model = Toy()
    # (an explicit sampler: Lightning would otherwise shuffle training data under a distributed strategy)
    loader = DataLoader(Rows(), batch_size=4, sampler=DistributedSampler(Rows(), num_replicas=1, rank=0, shuffle=False))
    if devices == 1:
        trainer = quiet_trainer(devices=1, max_epochs=2, accumulate_grad_batches=accumulate)
    else:
        trainer = quiet_trainer(strategy=HybridStrategy(pipeline_parallel=2), devices=2, max_epochs=2, accumulate_grad_batches=accumulate)
    trainer.fit(model, train_dataloaders=loader)
    state = full_state_dict(model) if devices > 1 else {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": model.losses, "state": state}


def test_gradient_accumulation_under_pipelining() -> None:
    """pp=2, 1F1B, 4-sample batches accumulated 3 at a time, a LightningModule with no tables and
    its own training_step: equals one process accumulating the same way."""
    reference = _fit_toy(1, 3)
    ranks = run_distributed(_fit_toy, 2, 2, 3, init_process_group=False, timeout_s=240)
    _check(reference, ranks, replicas=[0])


def _backward_hooks() -> dict[str, int]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    calls = {"on_before_backward": 0, "on_after_backward": 0, "grads_seen_after_backward": 0}

    class Hooks(pl.Callback):
        def on_before_backward(self, trainer: Any, module: Any, loss: Any) -> None:
            calls["on_before_backward"] += 1

        def on_after_backward(self, trainer: Any, module: Any) -> None:
            calls["on_after_backward"] += 1
            calls["grads_seen_after_backward"] += int(any(p.grad is not None for p in module.parameters()))

    torch.manual_seed(0)
    model = _model_class()(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0)
    strategy = HybridStrategy(pipeline_parallel=2, pipeline_schedule="gpipe", embedding_sharding={"item_id": "row_wise"})
    trainer = quiet_trainer(strategy=strategy, devices=2, max_epochs=3, limit_val_batches=0, callbacks=[Hooks()])
    trainer.fit(model, datamodule=SequenceDataModule(**DATA))
    return calls


def test_pipeline_backward_fires_the_precision_plugin_hooks() -> None:
    """Under pipelining the schedule backpropagates inside training_step; Lightning's
    on_before_backward / on_after_backward must still fire once per step, with the gradients there."""
    for calls in run_distributed(_backward_hooks, 2, init_process_group=False, timeout_s=300):
        assert calls == {"on_before_backward": 3, "on_after_backward": 3, "grads_seen_after_backward": 3}


def _plain_validation_step() -> str:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    class PlainEval(_model_class()):
        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
            self(batch["input"])  # what one writes without a pipeline

    model = PlainEval(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0)
    strategy = HybridStrategy(pipeline_parallel=2, pipeline_schedule="gpipe", embedding_sharding={"item_id": "row_wise"})
    try:
        quiet_trainer(strategy=strategy, devices=2, max_epochs=1, limit_val_batches=1).fit(model, datamodule=SequenceDataModule(**DATA))
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_a_plain_validation_step_under_a_pipeline_says_what_to_write() -> None:
    """Calling the module whole under pipeline_parallel > 1 names what runs elsewhere and the fix
    (evaluate through the runner, or with pipeline_parallel=1), on every rank."""
    for message in run_distributed(_plain_validation_step, 2, init_process_group=False, timeout_s=120):
        assert "runs on pipeline rank" in message, message
        assert "pipeline_runner(self)" in message and "pipeline_parallel=1" in message
