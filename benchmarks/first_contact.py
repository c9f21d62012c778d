"""First contact: launch-to-first-step and steady per-step time, HybridStrategy vs Lightning's DDP.

The same ordinary LightningModule (a small causal transformer over item sequences, the item table
in a torchrec ``EmbeddingCollection``, SGD) trains on the same synthetic data on 2 CPU processes,
each variant in a fresh interpreter started by this script, one after the other in one run:

  ddp_spawn: ``Trainer(strategy="ddp_spawn")``: the table is a replicated dense weight under DDP;
  hybrid:    ``Trainer(strategy=HybridStrategy(launcher="spawn"))``: the table sharded row-wise;
  hybrid_no_checks: the same without the per-step checks (``validate_inputs=False``,
             ``nonfinite_loss="off"``); hybrid_replicated: also the table replicated
             (``shard_embeddings=False``): where the difference to ddp_spawn goes.

"launch to first step" is wall time from starting the interpreter to the end of the first
training step (imports, process start, process group, sharding, the first step); "per step" is
the median of the later steps. Ratios hybrid / ddp_spawn are printed.

    python benchmarks/first_contact.py             # ~2 min on 2 cores; writes JSON
    python benchmarks/first_contact.py --smoke     # what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fresh_interpreter import run_in_fresh_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"full": {"users": 4096, "items": 2000, "steps": 120, "d_model": 64}, "smoke": {"users": 64, "items": 50, "steps": 3, "d_model": 16}}
VARIANTS = {
    "ddp_spawn": None,
    "hybrid": {"embedding_sharding": {"item_id": "row_wise"}},
    # where the difference goes: without the per-step checks, and with the table replicated
    "hybrid_no_id_check": {"embedding_sharding": {"item_id": "row_wise"}, "validate_inputs": False},
    "hybrid_no_nan_check": {"embedding_sharding": {"item_id": "row_wise"}, "nonfinite_loss": "off"},
    "hybrid_no_checks": {"embedding_sharding": {"item_id": "row_wise"}, "validate_inputs": False, "nonfinite_loss": "off"},
    "hybrid_replicated": {"shard_embeddings": False, "validate_inputs": False, "nonfinite_loss": "off"},
}


def _child(variant: str, size: str, started: float, out: str) -> None:
    """Runs in a fresh interpreter: train, record step end times, write them to ``out``."""
    import warnings

    warnings.simplefilter("ignore")
    import lightning.pytorch as pl

    from benchmarks.first_contact_module import PlainSGD, Times
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule

    cfg = SIZES[size]
    model = PlainSGD(num_items=cfg["items"], max_len=20, d_model=cfg["d_model"], num_blocks=2, num_heads=2, dropout=0.0)
    data = SequenceDataModule(format="synthetic", max_len=20, batch_size=32, synthetic_users=cfg["users"],
                              synthetic_items=cfg["items"], synthetic_min_len=5, synthetic_max_len=40, seed=0)
    options = VARIANTS[variant]
    strategy: Any = "ddp_spawn" if options is None else HybridStrategy(launcher="spawn", monitor=False, **options)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=cfg["steps"], limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Times(out, started)])
    trainer.fit(model, datamodule=data)


def run_variant(variant: str, size: str) -> dict[str, float]:
    times = run_in_fresh_interpreter("benchmarks.first_contact", "_child", [variant, size, time.time()], what=variant, timeout_s=900)
    ends = times["ends"]
    steps = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
    return {
        "launch_to_first_step_s": ends[0] - times["started"],
        "per_step_ms": 1e3 * statistics.median(steps[len(steps) // 4 :]) if steps else float("nan"),
        "total_s": ends[-1] - times["started"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "first_contact.json")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "full"
    results = {variant: run_variant(variant, size) for variant in VARIANTS}
    ratios = {v: {k: results[v][k] / results["ddp_spawn"][k] for k in results[v]} for v in results if v != "ddp_spawn"}
    summary = {"command": "python benchmarks/first_contact.py" + (" --smoke" if args.smoke else ""), "size": SIZES[size],
               "results": results, "over_ddp_spawn": ratios}
    print("| variant | launch to first step (s) | per step (ms) | total (s) |")
    print("|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['launch_to_first_step_s']:.1f} | {r['per_step_ms']:.1f} | {r['total_s']:.1f} |")
    for variant, r in ratios.items():
        print(f"| {variant} / ddp_spawn | {r['launch_to_first_step_s']:.2f}x | {r['per_step_ms']:.2f}x | {r['total_s']:.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
