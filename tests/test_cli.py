"""The lightning-hybrid command (LightningCLI) and the recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_hybrid.cli import main

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_parses_and_shows_every_strategy_option(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_hybrid.HybridStrategy"
    for option in ("data_parallel", "embedding_sharding", "embedding_kernels", "launcher", "timeout_s"):
        assert option in strategy["init_args"]


def test_unknown_recipe_key_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPES[0].read_text().replace("embedding_sharding:", "embeding_sharding:"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "embeding_sharding" in capsys.readouterr().err


def test_two_process_fit_through_the_cli(tmp_path: Path) -> None:
    main(
        [
            "fit",
            "-c",
            str(RECIPES[0]),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.num_samples=1024",
            "--data.init_args.num_val_samples=256",
        ]
    )
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["epoch=0-step=4.ckpt"]
    assert (checkpoints[0] / "meta.pt").is_file() and (checkpoints[0] / ".metadata").is_file()


def test_sequential_recommender_fit_then_predict_through_the_cli(tmp_path: Path) -> None:
    """The main job's recipe, shrunk: 2-process fit, then predict from its sharded checkpoint."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    common = [
        "-c",
        str(recipe),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.synthetic_users=96",
        "--data.init_args.synthetic_items=40",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=16",
        "--model.init_args.d_model=16",
        # the item-text tower too: a second sharded EmbeddingCollection (text tokens)
        "--model.init_args.text_tower=true",
        "--data.init_args.item_text=true",
        # and every side feature, in the same sharded EmbeddingCollection as the item ids
        "--model.init_args.side_features=[user, category, time]",
    ]
    callbacks = (
        '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
        f'"init_args": {{"dirpath": "{tmp_path}/ckpt", "save_last": true}}}}, '
        '{"class_path": "lightning_hybrid.callbacks.RecommendationWriter", '
        f'"init_args": {{"output_dir": "{tmp_path}/pred"}}}}]'
    )
    main(["fit", *common, "--trainer.max_epochs=1", callbacks])
    assert (tmp_path / "ckpt" / "last.ckpt" / "meta.pt").is_file()
    main(["predict", *common, callbacks, f"--ckpt_path={tmp_path}/ckpt/last.ckpt"])
    lines = (tmp_path / "pred" / "recommendations.csv").read_text().splitlines()
    assert lines[0] == "user,rank,item,score"
    rows = [line.split(",") for line in lines[1:]]
    users = {r[0] for r in rows}
    assert users == {str(u) for u in range(96)}  # every user exactly once ...
    assert len(rows) == 96 * 10  # ... with top_k=10 items each
    assert all(1 <= int(r[2]) <= 40 for r in rows)

    # export: one file that serves in one process, with the item embeddings keyed by raw id
    main(["export", f"{tmp_path}/ckpt/last.ckpt", f"{tmp_path}/serving.pt"])
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.export import load_serving

    serving = load_serving(tmp_path / "serving.pt")
    assert serving["model_class"] == "lightning_hybrid.models.sasrec.SASRec"
    data = SequenceDataModule(format="synthetic", synthetic_users=96, synthetic_items=40)
    assert serving["item_ids"] == list(data.load().item_ids)
    whole = torch.load(tmp_path / "serving.pt", weights_only=False)["state_dict"]
    table = "item_tables.embeddings.item_id.weight"
    assert {table, "output.weight"} <= set(serving["item_tensors"])
    assert torch.equal(serving["item_tensors"][table], whole[table][1:41])  # row k + 1 <-> item_ids[k]
    # the same recommendations from the export in one process (default strategy) as from the
    # sharded checkpoint on 2 processes
    single = [a.replace("/pred", "/pred1") for a in common + [callbacks]]
    main(["predict", *single, "--trainer.devices=1", "--trainer.strategy=auto", f"--ckpt_path={tmp_path}/serving.pt"])
    lines1 = (tmp_path / "pred1" / "recommendations.csv").read_text().splitlines()
    ranked = {(r[0], r[1]): (r[2], float(r[3])) for r in rows}
    ranked1 = {(r[0], r[1]): (r[2], float(r[3])) for r in (line.split(",") for line in lines1[1:])}
    assert ranked.keys() == ranked1.keys()
    assert all(abs(ranked[k][1] - ranked1[k][1]) < 1e-4 for k in ranked)
    assert sum(ranked[k][0] == ranked1[k][0] for k in ranked) >= 0.99 * len(ranked)  # (ties may swap)


def _fit_shrunk_recipe(name: str, tmp_path: Path, batch_size: int) -> None:
    """A multi-process recipe through the CLI, shrunk to seconds; it must leave one DCP checkpoint."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / name
    main(
        [
            "fit",
            "-c",
            str(recipe),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]",
            "--data.init_args.synthetic_users=64",
            "--data.init_args.synthetic_items=40",
            f"--data.init_args.batch_size={batch_size}",
            "--data.init_args.eval_batch_size=16",
            "--model.init_args.d_model=16",
        ]
    )
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "meta.pt").is_file()


def test_two_dimensional_fit_through_the_cli(tmp_path: Path) -> None:
    """recipes/tp_dp.yaml, shrunk: dp=2 x tp=2 on 4 processes with a sharded item table."""
    _fit_shrunk_recipe("tp_dp.yaml", tmp_path, batch_size=16)


def test_pipeline_fit_through_the_cli(tmp_path: Path) -> None:
    """recipes/pipeline.yaml, shrunk: pp=2 x dp=2 on 4 processes, balanced split, sharded item table."""
    _fit_shrunk_recipe("pipeline.yaml", tmp_path, batch_size=8)


def test_top_level_help_lists_every_subcommand(capsys: Any) -> None:
    from lightning_hybrid.cli import main

    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "convert", "plan"):
        assert command in out


def test_the_package_and_the_light_commands_import_nothing_heavy() -> None:
    """`import lightning_hybrid`, `--help`, `convert`/`export --help` load neither Lightning nor
    torchrec; strategy="hybrid" is still registered, whichever of the two is imported first."""
    import subprocess
    import sys

    light = (
        "import sys, lightning_hybrid, lightning_hybrid.cli as c\n"
        "c.main(['--help'])\n"
        "for argv in (['convert', '--help'], ['export', '--help']):\n"
        "    try:\n        c.main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in ('lightning', 'torchrec', 'lightning_hybrid.strategies') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    orders = {
        "package first": "import lightning_hybrid\nimport lightning.pytorch as pl\n",
        "lightning first": "import lightning.pytorch as pl\nimport lightning_hybrid\n",
    }
    codes = [light] + [
        order + "t = pl.Trainer(strategy='hybrid', accelerator='cpu', devices=1, logger=False)\n"
        "assert type(t.strategy).__name__ == 'HybridStrategy', t.strategy\n"
        for order in orders.values()
    ]
    # (fresh interpreters, started together: each is mostly import time)
    running = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for code in codes]
    try:
        for proc in running:
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
    finally:
        for proc in running:
            proc.kill()
