"""Tier 2: the public entry points — Trainer(strategy="hybrid"), checkpoints and resume."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.testing import assert_close

import lightning_hybrid  # noqa: F401 - registers strategy="hybrid"
from lightning_hybrid.testing import run_distributed
from tests.helpers import loader, quiet_trainer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig


class PlainDLRM(pl.LightningModule):
    """Written without lightning_hybrid in mind: an EBC, an MLP, BCE loss, Adam."""

    def __init__(self, lr: float = 0.01, optimizer: str = "adam") -> None:
        super().__init__()
        self.lr = lr
        self.optimizer = optimizer
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="users", embedding_dim=4, num_embeddings=24, feature_names=["user"]),
                EmbeddingBagConfig(name="movies", embedding_dim=4, num_embeddings=40, feature_names=["item"]),
                EmbeddingBagConfig(name="cats", embedding_dim=4, num_embeddings=16, feature_names=["category"]),
            ]
        )
        self.bottom = nn.Linear(5, 4)
        self.top = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
        self.losses: list[float] = []

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        emb = self.ebc(batch["sparse"])
        return self.top(torch.cat([self.bottom(batch["dense"]), emb.values()], dim=1)).squeeze(-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(self(batch), batch["labels"])
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adagrad":
            return torch.optim.Adagrad(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def test_fit_with_registered_name_from_pytest() -> None:
    """`Trainer(strategy="hybrid", devices=2)` inside pytest: spawn launcher, results come back whole."""
    torch.manual_seed(0)
    model = PlainDLRM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(strategy="hybrid", devices=2, max_epochs=2)
    # Adam has no fused CPU kernel: the tables use the dense kernel (a warning in the workers says so)
    trainer.fit(model, train_dataloaders=loader(batch_size=8, n=64))
    # 64 samples / 2 ranks / batch 8 = 4 steps per epoch
    assert trainer.global_step == 8
    assert "train_loss" in trainer.callback_metrics
    after = model.state_dict()
    assert set(after) == set(before)
    for key in before:  # every table (gathered from both ranks) and dense weight trained
        assert after[key].shape == before[key].shape
        assert not torch.equal(after[key], before[key]), key


class _LaunchProbe(pl.Callback):
    """Writes, on each rank, what it saw at the start of training."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        seen = {"probe": os.environ.get("LH_LAUNCH_PROBE"), "deterministic": torch.are_deterministic_algorithms_enabled(),
                "shared": [name for name, p in pl_module.named_parameters() if p.is_shared()]}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))


def test_spawned_ranks_see_the_callers_environment_and_state_and_own_their_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher inside pytest forks its ranks from a fork server started before this test
    (by an earlier launch or `run_distributed`): each rank must still see the environment and
    global torch state of the moment of the launch, and hold weights of its own (torch sends CPU
    tensors to such ranks through shared memory; shared weights would be updated by every rank)."""
    import json

    from lightning_hybrid.launch import spawn_start_method

    run_distributed(_noop, 2)  # (make sure a fork server runs already, as in a test session)
    monkeypatch.setenv("LH_LAUNCH_PROBE", "set after the fork server started")
    torch.use_deterministic_algorithms(True)
    try:
        trainer = quiet_trainer(strategy="hybrid", devices=2, max_steps=1, callbacks=[_LaunchProbe(str(tmp_path))])
        trainer.fit(PlainDLRM(), train_dataloaders=loader(batch_size=8, n=32))
    finally:
        torch.use_deterministic_algorithms(False)
    assert trainer.strategy.launcher._start_method == spawn_start_method()
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"probe": "set after the fork server started", "deterministic": True, "shared": []}, (rank, seen)


def _noop() -> None:
    return None


def _resume_worker(tmp: str, optimizer: str, sharding: dict[str, str]) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    from lightning_hybrid import HybridStrategy

    def make_trainer(epochs: int, callbacks: list[Any]) -> pl.Trainer:
        return quiet_trainer(
            strategy=HybridStrategy(embedding_sharding=sharding),
            devices=2,
            max_epochs=epochs,
            callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
        )

    torch.manual_seed(0)
    model = PlainDLRM(optimizer=optimizer)
    saver = ModelCheckpoint(dirpath=tmp, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    make_trainer(2, [saver]).fit(model, train_dataloaders=loader(batch_size=8, n=64))
    uninterrupted = list(model.losses)

    torch.manual_seed(123)  # different init: only the checkpoint can make the runs agree
    resumed = PlainDLRM(optimizer=optimizer)
    trainer = make_trainer(2, [])
    trainer.fit(resumed, train_dataloaders=loader(batch_size=8, n=64), ckpt_path=os.path.join(tmp, "epoch=0.ckpt"))
    return {"uninterrupted": uninterrupted, "resumed": list(resumed.losses), "step": trainer.global_step}


@pytest.mark.parametrize(
    ("optimizer", "sharding"),
    [
        ("adagrad", {"users": "row_wise", "movies": "table_wise", "cats": "column_wise"}),  # fused tables
        ("adam", {"users": "row_wise", "movies": "table_wise", "cats": "data_parallel"}),  # dense kernel
    ],
    ids=["fused-adagrad", "dense-adam"],
)
def test_checkpoint_resume_gives_identical_losses(tmp_path: Path, optimizer: str, sharding: dict[str, str]) -> None:
    ranks = run_distributed(
        _resume_worker, 2, str(tmp_path), optimizer, sharding, init_process_group=False, timeout_s=180
    )
    for result in ranks:
        steps_per_epoch = len(result["uninterrupted"]) // 2
        assert result["step"] == 2 * steps_per_epoch
        assert len(result["resumed"]) == steps_per_epoch
        # the first step after resuming, and every later one, equals the uninterrupted run
        assert_close(
            torch.tensor(result["resumed"]), torch.tensor(result["uninterrupted"][steps_per_epoch:]), rtol=1e-6, atol=1e-7
        )
    checkpoint = tmp_path / "epoch=0.ckpt"
    assert (checkpoint / "meta.pt").is_file() and (checkpoint / ".metadata").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


class _Scored(pl.LightningModule):
    """One weight; validation logs a score the checkpoint callback monitors."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([start]))

    def training_step(self, batch: Any, _i: int) -> torch.Tensor:
        return (self.w - batch[0]).pow(2).sum()

    def validation_step(self, batch: Any, _i: int) -> None:
        self.log("val_score", -(self.w - batch[0]).abs().sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_second_fit_in_the_recipe_s_directory_overwrites_best_ckpt(tmp_path: Path) -> None:
    """The recipes' ModelCheckpoint settings: `test --ckpt_path .../best.ckpt` after a second fit
    in the same directory reads that fit's best (Lightning's default would write best-v1.ckpt
    beside the first fit's best.ckpt, and test would silently read the old one)."""
    import yaml

    settings, recipe_args = set(), {}
    for recipe in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        for callback in yaml.safe_load(recipe.read_text())["trainer"].get("callbacks", []):
            if callback["class_path"].endswith("ModelCheckpoint"):
                args = callback["init_args"]
                settings.add((args["filename"], args["save_last"], args.get("enable_version_counter", True)))
                recipe_args = args
    assert settings == {("best", True, False)}, settings  # every recipe alike
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)
    finals = []
    for start in (5.0, -3.0):  # two fits, different weights
        model = _Scored(start)
        checkpoint = ModelCheckpoint(**{**recipe_args, "dirpath": tmp_path, "monitor": "val_score", "mode": "max"})
        pl.Trainer(max_epochs=2, callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", devices=1).fit(model, data, data)
        finals.append(model.w.detach().clone())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):  # the second fit's weights (its best is its last: the score improves)
        assert_close(torch.load(tmp_path / name, weights_only=False)["state_dict"]["w"], finals[1])


_EXIT_PROBE = '''
import atexit, os, sys
import torch.distributed as dist
out = sys.argv[1]
def report():  # registered before the fit: runs after HybridStrategy's handler (atexit runs last-in, first-out)
    with open(os.path.join(out, "rank" + os.environ["RANK"]), "w") as handle:
        handle.write(str(dist.is_initialized()))
atexit.register(report)
import lightning.pytorch as pl
from lightning_hybrid import HybridStrategy
from lightning_hybrid.data.sequences import SequenceDataModule
from lightning_hybrid.models.sasrec import SASRec
data = SequenceDataModule(format="synthetic", max_len=8, batch_size=8, synthetic_users=32, synthetic_items=30, seed=0)
trainer = pl.Trainer(strategy=HybridStrategy(), accelerator="cpu", devices=2, max_steps=2, limit_val_batches=0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(SASRec(d_model=8, num_heads=1, num_blocks=1, max_len=8), datamodule=data)
'''  # (the script leaves the process group to interpreter exit, as most training scripts do)


def test_under_torchrun_the_process_group_is_destroyed_before_interpreter_exit(tmp_path: Path) -> None:
    """Left to interpreter finalization, gloo's threads can abort a rank that trained fine
    (SIGABRT, "terminate called without an active exception": seen in a benchmark under torchrun);
    HybridStrategy has the group destroyed at exit, before finalization, as Lightning does for NCCL."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(_EXIT_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["False", "False"]
