"""The headline: hybrid layouts vs single-mode parallelism, same model, data and process count.

The reference LLM-style recommender (SASRec: 4 causal transformer blocks, d=64, sampled softmax)
with a 100k-item table and a 100k-item output layer (6.4M parameters each), synthetic sequences,
the same global batch. Layouts, on P = 2 and 4 CPU processes (gloo, ranks pinned to cores):

- ``dp``: pure data parallel: the table replicated (``shard_embeddings=False``), everything
  all-reduced by DDP;
- ``mp``: pure model parallel: the table sharded row-wise, the dense blocks split over all ranks
  (tp = P), no data parallelism;
- ``tp``: tensor parallel only (tp = P), the table replicated;
- ``pp``: pipeline only (pp = P, 1F1B), the table replicated;
- ``hybrid``: table sharded + data parallel dense with PowerSGD rank 4;
- ``hybrid_tp`` (P = 4): table sharded + dp 2 x tp 2, PowerSGD on dp;
- ``hybrid_pp`` (P = 4): table sharded + pp 2 x dp 2 (1F1B), PowerSGD on dp.

Reported per layout: global samples/s (median over measured steps), utilization (the monitor's
compute fraction, mean over ranks), dp bytes per step, and the ratios of the best hybrid to the
best single-mode layout.

    python benchmarks/hybrid_vs_single.py            # ~10 min; benchmarks/results/hybrid_vs_single.json
    python benchmarks/hybrid_vs_single.py --smoke    # tiny; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import pin_to_core, run_distributed  # noqa: E402

POWERSGD = {"method": "powersgd", "rank": 4, "start_iter": 2}
LAYOUTS: dict[str, dict[str, Any]] = {
    "dp": {"shard_embeddings": False},
    "mp": {"tensor_parallel": "P", "data_parallel": 1, "embedding_sharding": {"item_id": "row_wise"}},
    "tp": {"tensor_parallel": "P", "data_parallel": 1, "shard_embeddings": False},
    "pp": {"pipeline_parallel": "P", "data_parallel": 1, "shard_embeddings": False},
    "hybrid": {"embedding_sharding": {"item_id": "row_wise"}, "gradient_compression": POWERSGD},
    "hybrid_tp": {"tensor_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}, "gradient_compression": POWERSGD},
    "hybrid_pp": {"pipeline_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}, "gradient_compression": POWERSGD},
}
SINGLE = ("dp", "mp", "tp", "pp")
FULL = {"items": 100_000, "d_model": 64, "num_blocks": 4, "num_heads": 4, "max_len": 50, "global_batch": 64, "steps": 8, "warmup": 3, "processes": [2, 4]}
SMOKE = {"items": 200, "d_model": 16, "num_blocks": 4, "num_heads": 4, "max_len": 8, "global_batch": 16, "steps": 2, "warmup": 1, "processes": [2]}


def _worker(cfg: dict[str, Any], layout: dict[str, Any], processes: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl
    import torch

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.callbacks import HybridMonitor
    from lightning_hybrid.comm import GradientCompression
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec

    rank = int(os.environ["RANK"])
    pin_to_core(rank)
    torch.set_num_threads(1)
    kwargs = {k: (processes if v == "P" else v) for k, v in layout.items()}
    if "gradient_compression" in kwargs:
        kwargs["gradient_compression"] = GradientCompression(**kwargs["gradient_compression"])
    tp, pp = int(kwargs.get("tensor_parallel", 1)), int(kwargs.get("pipeline_parallel", 1))
    dp = processes // (tp * pp)
    per_replica = cfg["global_batch"] // dp
    users = cfg["global_batch"] * (cfg["warmup"] + cfg["steps"])
    data = SequenceDataModule(
        format="synthetic", max_len=cfg["max_len"], batch_size=per_replica, synthetic_users=users, synthetic_items=cfg["items"],
        synthetic_min_len=cfg["max_len"] + 3, synthetic_max_len=cfg["max_len"] + 3, drop_last=True,
    )
    records: list[dict[str, float]] = []
    bytes_sent: list[float] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            monitor = next(c for c in trainer.callbacks if isinstance(c, HybridMonitor))
            records.append(dict(monitor.last))
            bytes_sent.append(float(getattr(trainer.strategy, "comm_bytes_last_step", 0)))

    torch.manual_seed(0)
    model = SASRec(
        num_items=cfg["items"], max_len=cfg["max_len"], d_model=cfg["d_model"], num_blocks=cfg["num_blocks"],
        num_heads=cfg["num_heads"], dropout=0.0, loss="sampled", num_negatives=256,
    )
    if pp > 1:
        kwargs.setdefault("pipeline_microbatches", max(2, pp))  # 1F1B needs at least one microbatch per stage
    trainer = pl.Trainer(
        strategy=HybridStrategy(**kwargs), accelerator="cpu", devices=processes, max_epochs=1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Keep()],
    )
    trainer.fit(model, datamodule=data)
    measured = records[cfg["warmup"] :] or records
    return {
        "samples_per_s": statistics.median(r["throughput/samples_per_s"] for r in measured),
        "step_ms": statistics.median(r["time/step_s"] for r in measured) * 1e3,
        "compute_fraction": statistics.median(r["utilization/compute_fraction"] for r in measured),
        "dp_bytes_per_step": statistics.median(bytes_sent[cfg["warmup"] :] or bytes_sent),
        "layout": {"dp": dp, "tp": tp, "pp": pp},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hybrid_vs_single.json"))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset (at least one single-mode and one hybrid)")
    parser.add_argument("--processes", default=None, help="comma-separated process counts (default: 2,4; smoke: 2)")
    args = parser.parse_args()
    chosen = [n for n in args.layouts.split(",") if n]
    if set(chosen) - set(LAYOUTS) or not set(chosen) & set(SINGLE) or not any(n.startswith("hybrid") for n in chosen):
        parser.error(f"--layouts {chosen}: choose from {list(LAYOUTS)}, with at least one of {SINGLE} and one hybrid")
    cfg = SMOKE if args.smoke else FULL
    results: dict[str, Any] = {}
    lines = ["| P | layout | dp x tp x pp | samples/s | step (ms) | utilization | dp MB / step |", "|---|---|---|---|---|---|---|"]
    summary = {}
    process_counts = [int(p) for p in args.processes.split(",")] if args.processes else cfg["processes"]
    for processes in process_counts:
        for name, layout in LAYOUTS.items():
            if name not in chosen:
                continue
            if name in ("hybrid_tp", "hybrid_pp") and processes < 4:
                continue
            ranks = run_distributed(_worker, processes, cfg, layout, processes, init_process_group=False, timeout_s=1800)
            row = dict(ranks[0])
            row["samples_per_s"] = min(r["samples_per_s"] for r in ranks)  # the job is as fast as its slowest rank
            row["compute_fraction"] = statistics.mean(r["compute_fraction"] for r in ranks)
            results[f"P{processes}/{name}"] = row
            lay = row["layout"]
            lines.append(
                f"| {processes} | {name} | {lay['dp']} x {lay['tp']} x {lay['pp']} | {row['samples_per_s']:.1f} | {row['step_ms']:.0f} | "
                f"{row['compute_fraction']:.2f} | {row['dp_bytes_per_step'] / 1e6:.2f} |"
            )
            print(name, processes, row, flush=True)
        here = {k.split("/")[1]: v for k, v in results.items() if k.startswith(f"P{processes}/")}
        best_single = max((n for n in SINGLE if n in here), key=lambda n: here[n]["samples_per_s"])
        best_hybrid = max((n for n in here if n.startswith("hybrid")), key=lambda n: here[n]["samples_per_s"])
        summary[f"P{processes}"] = {
            "best_single": best_single, "best_hybrid": best_hybrid,
            "throughput_ratio": here[best_hybrid]["samples_per_s"] / here[best_single]["samples_per_s"],
            "utilization_ratio": here[best_hybrid]["compute_fraction"] / max(here[best_single]["compute_fraction"], 1e-9),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "hybrid_vs_single", "config": cfg, "results": results, "summary": summary}, indent=2))
    print("\n".join(lines))
    for key, s in summary.items():
        print(
            f"{key}: best hybrid {s['best_hybrid']} / best single-mode {s['best_single']}: throughput {s['throughput_ratio']:.2f}x, "
            f"utilization {s['utilization_ratio']:.2f}x"
        )
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
