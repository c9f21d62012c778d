"""Padded vs jagged batches: the reference recommender on Beauty-like sequence lengths.

The same SASRec (d=64, 2 blocks, the item table row-wise sharded by HybridStrategy) trains on the
same synthetic data with Amazon Beauty-like lengths (median 6, p99 43, max 204;
``synthetic_lengths="long_tail"``) on 2 CPU processes, each variant in a fresh interpreter, one
after the other in one run:

  padded: ``SequenceDataModule(batching="padded")`` + ``SASRec(padding_lookups=True)``: every batch
          ``max_len`` wide, random batches, padding ids looked up (the behaviour before 0.2);
  jagged: the defaults: batches cut to their longest sequence, drawn at random, only real ids
          looked up;
  grouped: jagged with ``length_group=32`` (each run of 32 global batches sorted by length, so a
          batch holds similar lengths: less padding, but it changes what is learnt, see
          ``SequenceDataModule``); ``grouped+balanced_rows``: also ``row_balance_shards=2`` (items
          renumbered by frequency so each row-wise shard serves about the same lookups).

Per variant and ``max_len`` (50 and 200): samples/s (median step time of the measured steps),
embedding all-to-all bytes per step, ids looked up per rank and served per shard (max/mean over
the shards: row 0, the padding id, lives on shard 0), real tokens per rank (max/mean). Ratios
jagged / padded and grouped / padded are printed.

    python benchmarks/jagged.py            # ~3 min on 2 cores; writes benchmarks/results/jagged.json
    python benchmarks/jagged.py --smoke    # what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fresh_interpreter import run_in_fresh_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 2  # the item table, row-wise over the 2 processes
SIZES = {
    "full": {"users": 6000, "items": 3000, "warmup": 5, "steps": 40, "batch": 64},
    "smoke": {"users": 64, "items": 50, "warmup": 1, "steps": 2, "batch": 8},
}


class Probe(Callback):
    """Per step (rank 0 keeps it): time, bytes, ids looked up, shard and token balance."""

    def __init__(self, batching: str, out: str, warmup: int) -> None:
        self.batching, self.out, self.warmup = batching, out, warmup
        self.current: dict[str, float] = {}
        self.rows: list[dict[str, float]] = []
        self.started = 0.0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        import torch
        import torch.distributed as dist

        items = batch["input"]
        looked_up = items.numel() if self.batching == "padded" else int((items != 0).sum())
        ids = items.reshape(-1) if self.batching == "padded" else items[items != 0]
        block = -(-(module.num_items + 1) // SHARDS)  # row-wise: shard k holds rows [k * block, (k + 1) * block)
        served = torch.bincount(ids // block, minlength=SHARDS).double()
        tokens = torch.tensor([float((items != 0).sum())], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(served)
            gathered = [torch.zeros_like(tokens) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, tokens)
            tokens = torch.cat(gathered)
        self.current = {"looked_up": float(looked_up), "served_max_over_mean": float(served.max() / served.mean()),
                        "tokens_max_over_mean": float(tokens.max() / tokens.mean()), "width": float(items.shape[1])}
        self.started = time.perf_counter()  # (the probe's own collectives are not timed)

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        row = dict(self.current, step_s=time.perf_counter() - self.started,
                   embedding_bytes=float(trainer.strategy.embedding_bytes_last_step))
        self.rows.append(row)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps(self.rows[self.warmup :]))


def _child(variant: str, max_len: int, size: str, balance_rows: bool, out: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import lightning.pytorch as pl
    import torch

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec

    cfg = SIZES[size]
    batching = "padded" if variant == "padded" else "jagged"
    probe = Probe(batching, out, cfg["warmup"])
    data = SequenceDataModule(format="synthetic", max_len=max_len, batch_size=cfg["batch"], synthetic_users=cfg["users"],
                              synthetic_items=cfg["items"], synthetic_min_len=5, synthetic_max_len=204, synthetic_lengths="long_tail",
                              seed=0, batching=batching, length_group=32 if variant == "grouped" else 1,
                              row_balance_shards=SHARDS if balance_rows else None)
    torch.manual_seed(0)
    model = SASRec(max_len=max_len, d_model=64, num_blocks=2, num_heads=2, dropout=0.0, padding_lookups=batching == "padded")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=HybridStrategy(launcher="spawn", monitor=False, embedding_sharding={"item_id": "row_wise"}),
                         max_steps=cfg["warmup"] + cfg["steps"], limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(model, datamodule=data)


def run_variant(variant: str, max_len: int, size: str, balance_rows: bool = False) -> dict[str, float]:
    """``variant``: ``padded``, ``jagged`` or ``grouped`` (module docstring)."""
    rows = run_in_fresh_interpreter("benchmarks.jagged", "_child", [variant, max_len, size, balance_rows], what=f"{variant} max_len={max_len}")
    step = statistics.median(r["step_s"] for r in rows)
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    return {
        "samples_per_s": 2 * SIZES[size]["batch"] / step,
        "step_ms": 1e3 * step,
        "embedding_bytes_per_step": mean("embedding_bytes"),
        "ids_looked_up_per_rank": mean("looked_up"),
        "served_per_shard_max_over_mean": mean("served_max_over_mean"),
        "tokens_per_rank_max_over_mean": mean("tokens_max_over_mean"),
        "batch_width": mean("width"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "jagged.json")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "full"
    results: dict[str, Any] = {}
    for max_len in (50, 200):
        for variant in ("padded", "jagged", "grouped"):
            results[f"{variant}@{max_len}"] = run_variant(variant, max_len, size)
    # the item rows renumbered by frequency over the 2 row-wise shards
    results["grouped+balanced_rows@50"] = run_variant("grouped", 50, size, balance_rows=True)
    print("| variant | samples/s | step (ms) | batch width | embedding bytes/step | ids looked up/rank | served max/mean over shards | tokens max/mean over ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_s']:.0f} | {r['step_ms']:.1f} | {r['batch_width']:.1f} | {r['embedding_bytes_per_step']:.0f} | "
              f"{r['ids_looked_up_per_rank']:.0f} | {r['served_per_shard_max_over_mean']:.2f} | {r['tokens_per_rank_max_over_mean']:.3f} |")
    ratios: dict[str, dict[int, dict[str, float]]] = {"jagged": {}, "grouped": {}}
    for variant in ratios:
        for max_len in (50, 200):
            p, j = results[f"padded@{max_len}"], results[f"{variant}@{max_len}"]
            ratios[variant][max_len] = {"samples_per_s": j["samples_per_s"] / p["samples_per_s"],
                                        "embedding_bytes": j["embedding_bytes_per_step"] / max(p["embedding_bytes_per_step"], 1.0)}
            print(f"| {variant} / padded @ {max_len} | {ratios[variant][max_len]['samples_per_s']:.2f}x samples/s | | | "
                  f"{ratios[variant][max_len]['embedding_bytes']:.3f}x bytes | | | |")
    summary = {"command": "python benchmarks/jagged.py" + (" --smoke" if args.smoke else ""), "size": SIZES[size], "results": results,
               "jagged_over_padded": ratios["jagged"], "grouped_over_padded": ratios["grouped"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
