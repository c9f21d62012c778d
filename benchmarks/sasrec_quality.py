"""The reference recommender's test quality, variant by variant, through the commands a user runs.

For each variant: ``lightning-hybrid fit -c RECIPE`` with the variant's overrides (early stopping
on validation NDCG@10 as the recipe sets it), then ``lightning-hybrid test`` on the checkpoint the
recipe's header names (``checkpoints/best.ckpt``: the best on validation). Each variant runs in
its own working directory, so the recipe's relative ``runs/...`` paths do not collide. Printed and
written per variant: test HR@10, NDCG@10 (and @20, MRR), the validation NDCG@10 of the chosen
checkpoint and its epoch, the epochs trained and the fit time.

Protocol (`lightning_hybrid.data.sequences`): each user's interactions in time order,
leave-one-out (last item test, second-to-last validation), full ranking over every item, a user's
seen items excluded where the recipe sets `exclude_seen: true` (sasrec_format.yaml does).
Defaults are chosen on validation only; the test columns are reported, not tuned on.

    python benchmarks/sasrec_quality.py --data ../shared/data/ml-latest-small/ratings.csv \\
        --variants recipe,separate --out benchmarks/results/sasrec_quality_ml-latest-small.json
    python benchmarks/sasrec_quality.py --data /path/to/ml-100k/u.data --variants recipe
    python benchmarks/sasrec_quality.py --smoke          # tiny synthetic run: the plumbing only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
M = "--model.init_args."

#: variant -> CLI overrides on top of the recipe (the recipe's own defaults are ``recipe``)
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "separate": [f"{M}output=separate"],
    "tied": [f"{M}output=tied"],
    "full-ce": [f"{M}loss=full"],
    "sampled-256": [f"{M}loss=sampled", f"{M}num_negatives=256", f"{M}logq_correction=false"],
    # gSASRec/eSASRec's sampled softmax: 256 uniform negatives for each position, no logQ
    "sampled-256-position": [f"{M}loss=sampled", f"{M}num_negatives=256", f"{M}logq_correction=false", f"{M}negatives_per=position"],
    "sampled-256-logq": [f"{M}loss=sampled", f"{M}num_negatives=256", f"{M}logq_correction=true"],
    "label-smoothing-0.1": [f"{M}label_smoothing=0.1"],
    "dropout-0.2": [f"{M}dropout=0.2"],
    "dropout-0.5": [f"{M}dropout=0.5"],
    "dropout-0.3": [f"{M}dropout=0.3"],
    "table-adagrad": [f"{M}table_optimizer=adagrad", f"{M}table_lr=0.05"],
    "table-adam": [f"{M}table_optimizer=adam", f"{M}table_lr=0.001"],
    # the history each prediction sees (model and loader alike; jagged batches pay only real positions)
    "max-len-50": [f"{M}max_len=50", "--data.init_args.max_len=50"],
    "max-len-400": [f"{M}max_len=400", "--data.init_args.max_len=400"],
    # the protocol of the Amazon (S3Rec) benchmarks: a user's history is not a candidate
    "exclude-seen": [f"{M}exclude_seen=true"],
    "blocks-1": [f"{M}num_blocks=1"],
    "batch-64": ["--data.init_args.batch_size=64"],
}


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("lightning-hybrid")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_hybrid.cli"]


def _metrics(run_root: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(run_root.glob("**/metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def _recipe_paths(recipe: Path, workdir: Path) -> tuple[Path, Path]:
    """The recipe's run directory (``trainer.default_root_dir``) and its best checkpoint (the
    ModelCheckpoint's ``dirpath``/``filename``), relative to ``workdir`` as the CLI resolves them:
    a copy of a recipe (e.g. with another validation cadence) keeps the paths it names."""
    config = yaml.safe_load(recipe.read_text())
    trainer = config.get("trainer", {})
    run_dir = workdir / trainer.get("default_root_dir", f"runs/{recipe.stem}")
    for callback in trainer.get("callbacks", []):
        args = callback.get("init_args", {}) if str(callback.get("class_path", "")).endswith("ModelCheckpoint") else {}
        if args.get("dirpath") and args.get("filename"):
            return run_dir, workdir / args["dirpath"] / f"{args['filename']}.ckpt"
    # (without both, Lightning names the file by epoch and step under the logger's version folder)
    raise ValueError(
        f"{recipe}: no ModelCheckpoint callback with dirpath and filename, so no known best checkpoint to test; "
        "add one as recipes/sasrec_format.yaml does (dirpath: runs/.../checkpoints, filename: best)."
    )


def run_variant(name: str, overrides: list[str], *, recipe: Path, data: str, extra: list[str], workdir: Path) -> dict[str, Any]:
    """fit + test of one variant in ``workdir``; returns its row (raises with the log on failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "offline"}
    common = ["-c", str(recipe), f"--data.init_args.path={data}", *extra, *overrides]
    run_dir, best = _recipe_paths(recipe, workdir)
    started = time.perf_counter()
    for stage, args in (("fit", common), ("test", [*common, f"--ckpt_path={best}"])):
        log = workdir / f"{stage}.log"
        with log.open("w") as out:
            rc = subprocess.run([*_cli(), stage, *args], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"variant {name!r}: lightning-hybrid {stage} failed (exit {rc}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
        if stage == "fit":
            fit_s = time.perf_counter() - started
    rows = _metrics(run_dir)
    vals = [(int(r["epoch"]), float(r["val_ndcg@10"])) for r in rows if r.get("val_ndcg@10")]
    test = next(r for r in reversed(rows) if r.get("test_ndcg@10"))
    best_epoch, best_val = max(vals, key=lambda v: v[1]) if vals else (-1, float("nan"))
    row = {
        "variant": name, "overrides": overrides, "fit_s": round(fit_s, 1),
        "epochs": max((int(r["epoch"]) for r in rows if r.get("epoch")), default=-1) + 1,
        "best_epoch": best_epoch, "val_ndcg@10": best_val,
    }
    for key in ("test_hr@10", "test_ndcg@10", "test_hr@20", "test_ndcg@20", "test_mrr"):
        if test.get(key):
            row[key] = float(test[key])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="ratings file (MovieLens ratings.csv / u.data) or SASRec lines")
    parser.add_argument("--recipe", default=None, help="recipe YAML (default: recipes/movielens.yaml, or sasrec_format.yaml for .txt data)")
    parser.add_argument("--variants", default="recipe", help=f"comma-separated, each one or several joined by '+', from: {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], help="extra CLI override for every variant (repeatable)")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--smoke", action="store_true", help="two epochs on tiny synthetic data (the plumbing only)")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [part for v in names for part in v.split("+") if part not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)} (join several with '+')")
    extra = list(args.set)
    if args.smoke:
        workroot = Path(args.workdir or tempfile.mkdtemp(prefix="sasrec_quality_"))
        data = workroot / "tiny.txt"
        workroot.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(f"{u} " + " ".join(str(1 + (u * 7 + j * 3) % 40) for j in range(6 + u % 5)) + "\n" for u in range(1, 61)))
        args.data = str(data)
        extra += ["--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", "--data.init_args.max_len=20",
                  f"{M}max_len=20", f"{M}d_model=16", "--data.init_args.batch_size=16"]
    if not args.data:
        parser.error("--data is required (or --smoke)")
    recipe = Path(args.recipe).resolve() if args.recipe else ROOT / "recipes" / ("sasrec_format.yaml" if str(args.data).endswith(".txt") else "movielens.yaml")
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="sasrec_quality_"))
    data = str(Path(args.data).resolve())
    results = {"data": data, "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
               "extra": extra, "rows": []}
    print(f"{'variant':22s} {'test HR@10':>10s} {'NDCG@10':>8s} {'HR@20':>7s} {'NDCG@20':>8s} {'val NDCG@10':>11s} {'best ep':>7s} {'epochs':>6s} {'fit s':>6s}")
    for name in names:
        overrides = [o for part in name.split("+") for o in VARIANTS[part]]
        row = run_variant(name, overrides, recipe=recipe.resolve(), data=data, extra=extra, workdir=workroot / name)
        results["rows"].append(row)
        print(f"{name:22s} {row.get('test_hr@10', float('nan')):10.4f} {row.get('test_ndcg@10', float('nan')):8.4f} "
              f"{row.get('test_hr@20', float('nan')):7.4f} {row.get('test_ndcg@20', float('nan')):8.4f} {row['val_ndcg@10']:11.4f} "
              f"{row['best_epoch']:7d} {row['epochs']:6d} {row['fit_s']:6.0f}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
