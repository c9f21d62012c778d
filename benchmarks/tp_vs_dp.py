"""Step time and peak memory per rank: tensor parallel (tp=2) vs data parallel (dp=2), 2 processes.

The reference recommender (SASRec, item table sharded row-wise in both variants) at two sizes,
with the same global batch: dp=2 gives each rank half the users and a full copy of the blocks;
tp=2 gives both ranks all users and half of every block (heads and MLP width). Two more variants:
tp=2 with sequence parallelism and a vocabulary-parallel output layer (``tp2_sp_vocab``: the
activations outside the split layers and the full-softmax logits are split too), and dp=2 with
FSDP2 instead of DDP for the dense weights (``fsdp2``: weights and Adam state sharded).

    python benchmarks/tp_vs_dp.py            # prints a table, writes benchmarks/results/tp_vs_dp.json
    python benchmarks/tp_vs_dp.py --smoke    # seconds; what the test suite runs

Peak memory is the growth of the process's peak resident set (ru_maxrss) from just before the
model is built to the end of training: weights, optimizer state, activations and buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import pin_to_core, run_distributed  # noqa: E402

SIZES = {
    "small": {"d_model": 64, "num_blocks": 2, "num_heads": 2, "mlp_ratio": 4, "max_len": 50, "items": 2000, "global_batch": 64},
    "large": {"d_model": 512, "num_blocks": 4, "num_heads": 8, "mlp_ratio": 4, "max_len": 100, "items": 20000, "global_batch": 32},
    # weights and optimizer state dominate: short sequences, a small batch, wide blocks
    "wide": {"d_model": 1024, "num_blocks": 4, "num_heads": 8, "mlp_ratio": 4, "max_len": 20, "items": 2000, "global_batch": 8},
}
VARIANTS = ("dp2", "tp2", "tp2_sp_vocab", "fsdp2")
LABELS = {"dp2": "dp=2 (DDP)", "tp2": "tp=2", "tp2_sp_vocab": "tp=2 + SP + vocab-parallel", "fsdp2": "dp=2 (FSDP2)"}
SMOKE = {"small": {"d_model": 16, "num_blocks": 1, "num_heads": 2, "mlp_ratio": 2, "max_len": 8, "items": 50, "global_batch": 8}}


def _worker(cfg: dict[str, Any], variant: str, steps: int, warmup: int) -> dict[str, float]:
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    import lightning.pytorch as pl
    import torch

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec

    rank = int(os.environ["RANK"])
    pin_to_core(rank)
    tp = 2 if variant.startswith("tp2") else 1
    options = {"sequence_parallel": True, "tensor_parallel_output": "vocab_parallel"} if variant == "tp2_sp_vocab" else {}
    per_rank_batch = cfg["global_batch"] // (2 // tp)
    users = cfg["global_batch"] * (warmup + steps)  # one pass = warmup + steps optimizer steps
    data = SequenceDataModule(
        format="synthetic", max_len=cfg["max_len"], batch_size=per_rank_batch, synthetic_users=users,
        synthetic_items=cfg["items"], synthetic_min_len=cfg["max_len"] + 3, synthetic_max_len=cfg["max_len"] + 3,
    )
    ends: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            ends.append(time.perf_counter())

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = SASRec(
        num_items=cfg["items"], max_len=cfg["max_len"], d_model=cfg["d_model"], num_blocks=cfg["num_blocks"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], dropout=0.0, **options,
    )
    trainer = pl.Trainer(
        strategy=HybridStrategy(
            tensor_parallel=tp, embedding_sharding={"item_id": "row_wise"}, dense_parallel="fsdp" if variant == "fsdp2" else "ddp"
        ),
        accelerator="cpu", devices=2, max_epochs=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
    )
    trainer.fit(model, datamodule=data)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    step_times = [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:], strict=True)]
    return {"step_s": statistics.median(step_times), "peak_mb": peak_mb, "steps": len(ends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tp_vs_dp.json"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS} (dp2 always runs)")
    args = parser.parse_args()
    variants = ["dp2", *[v for v in args.variants.split(",") if v and v != "dp2"]]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")
    sizes = SMOKE if args.smoke else SIZES
    steps, warmup = (3, 1) if args.smoke else (10, 3)
    results: dict[str, Any] = {}
    for name, cfg in sizes.items():
        for variant in variants:  # fresh processes per variant: clean memory peaks
            ranks = run_distributed(_worker, 2, cfg, variant, steps, warmup, init_process_group=False, timeout_s=1200)
            results[f"{name}/{variant}"] = {
                "step_ms": max(r["step_s"] for r in ranks) * 1e3,
                "peak_mb_per_rank": max(r["peak_mb"] for r in ranks),
                "steps": ranks[0]["steps"],
            }
    table = ["| size | variant | step (ms) | peak memory / rank (MB) | time / dp=2 | memory / dp=2 |", "|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for name, cfg in sizes.items():
        dp = results[f"{name}/dp2"]
        summary[name] = {}
        for variant in variants:
            r = results[f"{name}/{variant}"]
            time_ratio = r["step_ms"] / dp["step_ms"]
            memory_ratio = r["peak_mb_per_rank"] / max(dp["peak_mb_per_rank"], 1e-9)
            if variant != "dp2":
                summary[name][variant] = {"time_ratio_over_dp2": time_ratio, "memory_ratio_over_dp2": memory_ratio}
            table.append(
                f"| {name} (d={cfg['d_model']}, {cfg['num_blocks']} blocks) | {LABELS[variant]} | {r['step_ms']:.1f} | "
                f"{r['peak_mb_per_rank']:.0f} | {time_ratio:.2f}x | {memory_ratio:.2f}x |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "tp_vs_dp", "sizes": sizes, "results": results, "ratios": summary}, indent=2))
    print("\n".join(table))
    for name, per_variant in summary.items():
        for variant, s in per_variant.items():
            print(f"{name}: {LABELS[variant]} / dp=2 step time {s['time_ratio_over_dp2']:.2f}x, peak memory {s['memory_ratio_over_dp2']:.2f}x")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
