"""EMAWeightAveraging (lightning_hybrid.callbacks.averaging): Lightning's own EMA callback is the
reference on one process; under HybridStrategy (row-wise sharded tied table; dp, tp, pp, FSDP) the
average, what validation and test see, checkpoints and resuming equal one process."""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

DATA = dict(format="synthetic", max_len=8, synthetic_users=24, synthetic_items=30, synthetic_min_len=4, synthetic_max_len=12, seed=2)
DECAY = 0.6  # (small: the average differs clearly from the weights after a few steps)


class _ValRecorder:
    """A callback keeping the validation metrics of every epoch."""

    def __new__(cls) -> Any:  # (built lazily: Lightning is imported inside the worker)
        import lightning.pytorch as pl

        class ValRecorder(pl.Callback):
            def __init__(self) -> None:
                self.epochs: list[dict[str, float]] = []

            def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
                self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")})

        return ValRecorder()


def _model(output: str) -> Any:
    from tests.helpers import sgd_sasrec_class

    torch.manual_seed(0)
    return sgd_sasrec_class(momentum=0.9)(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, output=output, top_k=5,
                                             loss_normalization="global_tokens")  # (what a one-microbatch pipeline computes)


#: layout -> (HybridStrategy options, ranks that share one batch, the model's output). The tied
#: output keeps the table on the dense kernel; the separate one (pipelines need it) on the fused one
LAYOUTS: dict[str, tuple[dict[str, Any], int, str]] = {
    "dp2": ({}, 1, "tied"),
    "tp2": ({"tensor_parallel": 2}, 2, "tied"),
    "fsdp2": ({"dense_parallel": "fsdp"}, 1, "tied"),
    "pp2": ({"pipeline_parallel": 2, "pipeline_microbatches": 1, "pipeline_schedule": "gpipe"}, 2, "separate"),  # (1: the batch mean, with uneven histories)
}


def _trainer(layout: str | None, epochs: int, root: Path, ema: Any, *extra: Any) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_hybrid import HybridStrategy
    from tests.helpers import LossRecorder, quiet_trainer

    devices = 1 if layout is None else 2
    strategy = HybridStrategy(embedding_sharding={"item_id": "row_wise"}, **LAYOUTS[layout][0]) if layout else "auto"
    callbacks = [ema, ModelCheckpoint(dirpath=root, filename="best", monitor="val_ndcg@10", mode="max", save_last=True), LossRecorder(), _ValRecorder(), *extra]
    return quiet_trainer(strategy=strategy, devices=devices, max_epochs=epochs, callbacks=callbacks, num_sanity_val_steps=0,
                         enable_checkpointing=True, default_root_dir=str(root))


def _weights(model: Any, devices: int) -> dict[str, torch.Tensor]:
    from lightning_hybrid.checkpoint import full_state_dict

    return full_state_dict(model) if devices > 1 else {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(layout: str | None, root: str, ema_class: Any = None, output: str = "tied") -> dict[str, Any]:
    """Fit 4 epochs with EMA (validated each epoch), test the model and last.ckpt; fit 2 epochs and
    resume to 4 from that last.ckpt. ``layout``: a key of LAYOUTS on 2 processes, None: one process."""
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid.callbacks import EMAWeightAveraging
    from lightning_hybrid.data.sequences import SequenceDataModule

    ema_class = ema_class or EMAWeightAveraging
    devices, shared = (1, 1) if layout is None else (2, LAYOUTS[layout][1])
    output = output if layout is None else LAYOUTS[layout][2]
    data = SequenceDataModule(**DATA, batch_size=12 * shared // devices)
    out: dict[str, Any] = {}
    for name, epochs, resume in (("whole", 4, False), ("first", 2, False), ("resumed", 4, True)):
        folder = Path(root) / ("split" if name != "whole" else name)
        model = _model(output)
        trainer = _trainer(layout, epochs, folder, ema_class(decay=DECAY))
        trainer.fit(model, datamodule=data, ckpt_path=str(folder / "last.ckpt") if resume else None)
        found = {type(c).__name__: c for c in trainer.callbacks}
        out[name] = {"losses": found["LossRecorder"].losses, "val": found["ValRecorder"].epochs, "after_fit": _weights(model, devices)}
        if name == "whole":
            out[name]["test"] = trainer.test(model, datamodule=data, verbose=False)[0]
            fresh = _trainer(layout, 1, folder / "test", ema_class(decay=DECAY))
            out[name]["test_last_ckpt"] = fresh.test(_model(output), datamodule=data, ckpt_path=str(folder / "last.ckpt"), verbose=False)[0]
            if devices == 1:
                saved = torch.load(folder / "last.ckpt", weights_only=False)
                out[name]["average_vs_training"] = max(
                    float((saved["state_dict"][k] - v).abs().max()) for k, v in saved["current_model_state"].items() if v.is_floating_point()
                )
    return out


def _layouts(root: str) -> dict[str, Any]:
    """Every layout of LAYOUTS in one pair of processes, then Lightning's own EMA (refused)."""
    out = {layout: _run(layout, str(Path(root) / layout)) for layout in LAYOUTS}
    from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA

    from lightning_hybrid.data.sequences import SequenceDataModule

    data = SequenceDataModule(**DATA, batch_size=6)
    try:  # Lightning's own averaging copies the unsharded module: refused, on every rank
        _trainer("dp2", 1, Path(root) / "refused", LightningEMA(decay=DECAY)).fit(_model("tied"), datamodule=data)
        out["refused"] = None
    except ValueError as err:
        out["refused"] = str(err)
    return out


@functools.cache
def _one_process(ema: str, output: str = "tied") -> dict[str, Any]:
    from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA

    with tempfile.TemporaryDirectory() as root:
        return _run(None, root, LightningEMA if ema == "lightning" else None, output)


def _close_runs(got: dict[str, Any], want: dict[str, Any], *, losses_only_mean: int = 1) -> None:
    for name in ("whole", "resumed"):
        assert len(got[name]["val"]) == len(want[name]["val"]) == (4 if name == "whole" else 2)
        for epoch, (g, w) in enumerate(zip(got[name]["val"], want[name]["val"], strict=True)):
            assert set(g) == set(w) and g, (name, epoch)
            for key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-6), (name, epoch, key)
        assert set(got[name]["after_fit"]) == set(want[name]["after_fit"])
        for key, value in want[name]["after_fit"].items():
            assert_close(got[name]["after_fit"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key, n=name: f"{n} {k}: {m}")


@pytest.mark.parametrize("output", ["tied", "separate"])
def test_ema_on_one_process_equals_lightnings_ema_including_checkpoints_and_resuming(output: str) -> None:
    ours, lightning = _one_process("ours", output), _one_process("lightning", output)
    _close_runs(ours, lightning)
    assert ours["whole"]["losses"] == pytest.approx(lightning["whole"]["losses"], abs=1e-6)
    # the average is not the weights (with decay 0.6 over 8 steps): last.ckpt holds both, apart
    assert ours["whole"]["average_vs_training"] > 1e-3
    assert ours["whole"]["test"] == pytest.approx(lightning["whole"]["test"], abs=1e-6)
    assert ours["whole"]["test_last_ckpt"] == pytest.approx(lightning["whole"]["test_last_ckpt"], abs=1e-6)
    # resumed after epoch 2 = uninterrupted: the training weights (losses of epochs 3-4) and the average
    assert ours["resumed"]["losses"] == pytest.approx(ours["whole"]["losses"][len(ours["first"]["losses"]):], abs=1e-6)
    for key, value in ours["whole"]["after_fit"].items():
        assert_close(ours["resumed"]["after_fit"][key], value, rtol=1e-5, atol=1e-6)
    for g, w in zip(ours["resumed"]["val"], ours["whole"]["val"][2:], strict=True):
        assert g == pytest.approx(w, abs=1e-6)


def test_ema_under_hybrid_strategy_equals_one_process() -> None:
    with tempfile.TemporaryDirectory() as root:
        ranks = run_distributed(_layouts, 2, root, init_process_group=False, timeout_s=400)
    for layout, (_, shared, output) in LAYOUTS.items():
        reference = _one_process("ours", output)
        results = [r[layout] for r in ranks]
        replicas = results[::shared]
        for name in ("whole", "resumed"):
            mean = [sum(r[name]["losses"][i] for r in replicas) / len(replicas) for i in range(len(reference[name]["losses"]))]
            assert_close(torch.tensor(mean), torch.tensor(reference[name]["losses"]), rtol=1e-4, atol=1e-5, msg=lambda m, n=name, k=layout: f"{k} {n}: {m}")
        _close_runs(results[0], reference)
        for result in results:
            assert result["whole"]["test_last_ckpt"] == pytest.approx(reference["whole"]["test_last_ckpt"], abs=1e-6), layout
            assert result["whole"]["test"] == pytest.approx(reference["whole"]["test"], abs=1e-6), layout
    for result in ranks:
        assert result["refused"] is not None and "lightning_hybrid.callbacks.EMAWeightAveraging" in result["refused"]


def test_bad_arguments_and_the_moving_pipeline_balancer_are_refused_naming_the_fix() -> None:
    from types import SimpleNamespace

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.callbacks import EMAWeightAveraging

    with pytest.raises(ValueError, match=r"decay=1.0.*\[0, 1\)"):
        EMAWeightAveraging(decay=1.0)
    with pytest.raises(ValueError, match=r"update_every_n_steps=-1"):
        EMAWeightAveraging(update_every_n_steps=-1)
    with pytest.raises(ValueError, match=r"never updates the average"):
        EMAWeightAveraging(update_every_n_steps=0)
    strategy = HybridStrategy(pipeline_parallel=2, pipeline_microbatches=2, pipeline_rebalance_every=4)
    with pytest.raises(ValueError, match=r"pipeline_rebalance_every=4.*pipeline_split='balanced'"):
        EMAWeightAveraging().on_fit_start(SimpleNamespace(strategy=strategy), torch.nn.Linear(2, 2))  # type: ignore[arg-type]
