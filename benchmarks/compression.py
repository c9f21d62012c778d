"""Compressed and asynchronous data parallelism on the reference recommender, 2 CPU processes.

One run, the variants side by side in fresh process pairs: exact all-reduce, fp16, PowerSGD rank 4,
top-k 1%, 1-bit sign, local SGD (period 4; and with its average overlapped) and async (staleness 1). For each: bytes sent per rank
and step on the dp axis (mean over the steps from step 21 on, i.e. after start_iter and the
warm-ups; ratio to exact), mean step time (ratio
to exact; a mean, so that local SGD's averaging step counts) and test HR@10 / NDCG@10 after the same budget of epochs.

    python benchmarks/compression.py --data ../shared/data/ml-latest-small/ratings.csv
    python benchmarks/compression.py --smoke         # synthetic data, seconds; what the test suite runs
    python benchmarks/compression.py --data ../shared/data/ml-latest-small/ratings.csv --link-rate 1000   # 2 simulated nodes (root)
    python benchmarks/compression.py --data ... --link-rate 1000 --batch-size 16      # less compute per step

With ``--link-rate R`` the two processes are two simulated nodes (`lightning_hybrid.testing.netns`)
joined by a link shaped to R Mbit/s, launched by torchrun, one agent per node: the step times then
include what the bytes cost on a slow link. Several rates (``--link-rate 100,1000,10000``) run
side by side in one invocation: the first trains every variant for the whole budget and tests it
(the quality columns); each further rate times every variant for ``--timing-steps`` steps only,
since the link changes how long a step takes, not what it computes (the same seeds, data and
collectives: each timing run's per-step training losses are compared with the first rate's and the
largest difference is reported, 0 when the runs are the same). Per variant and rate: the steady
mean step (from step 21 on, past every warm-up: a few dozen steps would otherwise be dominated by
the exact steps a compressor takes before ``start_iter``), speedup over exact, bytes; and where the
variant pays (at least 5% faster per step than exact), from its speedups at the rates the probe
measured: "below ~R" (R interpolated in log rate between the two measured rates it crosses), "above
~R", "at every measured rate" or "at no measured rate".

    python benchmarks/compression.py --data ../shared/data/ml-latest-small/ratings.csv --link-rate 100,1000,10000 --batch-size 16

Writes benchmarks/results/compression.json and a plot (quality vs bytes) next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import pin_to_core, run_distributed  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "exact": {},
    "fp16": {"gradient_compression": {"method": "fp16"}},
    "powersgd-r4": {"gradient_compression": {"method": "powersgd", "rank": 4, "start_iter": 10}},
    "topk-1%": {"gradient_compression": {"method": "topk", "density": 0.01, "start_iter": 10, "warmup_steps": 10}},
    "sign-1bit": {"gradient_compression": {"method": "sign", "start_iter": 10}},
    "local-sgd-H4": {"data_parallel_mode": "local_sgd", "local_sgd_period": 4, "local_sgd_warmup_steps": 10},
    "local-sgd-H4-overlap": {"data_parallel_mode": "local_sgd", "local_sgd_period": 4, "local_sgd_warmup_steps": 10, "local_sgd_overlap": True},
    "async-s1": {"data_parallel_mode": "async", "async_staleness": 1},
}
STEADY_FROM = 21
FULL = {"d_model": 256, "num_heads": 2, "num_blocks": 2, "max_len": 50, "batch_size": 64, "epochs": 15, "loss": "sampled"}
SMOKE = {"d_model": 16, "num_heads": 2, "num_blocks": 1, "max_len": 8, "batch_size": 8, "epochs": 2, "loss": "sampled"}


def _worker(cfg: dict[str, Any], variant: dict[str, Any], data_path: str | None, nodes: int = 1) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.comm import GradientCompression
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec

    rank = int(os.environ["RANK"])
    pin_to_core(rank)
    kwargs = dict(variant)
    if "gradient_compression" in kwargs:
        kwargs["gradient_compression"] = GradientCompression(**kwargs["gradient_compression"])
    ends: list[float] = []
    sent: list[int] = []
    losses: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            ends.append(time.perf_counter())
            sent.append(trainer.strategy.comm_bytes_last_step)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss) if loss is not None else float("nan"))

    if data_path:
        data = SequenceDataModule(path=data_path, format="movielens", max_len=cfg["max_len"], batch_size=cfg["batch_size"], eval_batch_size=256)
    else:
        data = SequenceDataModule(format="synthetic", max_len=cfg["max_len"], batch_size=cfg["batch_size"], synthetic_users=64, synthetic_items=50)
    pl.seed_everything(0, verbose=False)
    model = SASRec(
        d_model=cfg["d_model"], num_heads=cfg["num_heads"], num_blocks=cfg["num_blocks"], max_len=cfg["max_len"], loss=cfg["loss"], dropout=0.2
    )
    timing_steps = cfg.get("timing_steps")  # a timing-only run: step times, no test (see the module docstring)
    trainer = pl.Trainer(
        strategy=HybridStrategy(embedding_sharding={"item_id": "row_wise"}, **kwargs), accelerator="cpu", devices=2 // nodes, num_nodes=nodes,
        max_epochs=cfg["epochs"], max_steps=timing_steps or -1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
    )
    trainer.fit(model, datamodule=data)
    metrics = {} if timing_steps else trainer.test(model, datamodule=data, verbose=False)[0]
    durations = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]  # durations[i]: step i + 1
    steps = durations[5:] or [0.0]
    # steady state, for the step time and the bytes: the steps after start_iter and every warm-up
    # (10 + 10 steps: a compressor sends exactly, and local SGD averages every step, until then;
    # what a timing run of a few dozen steps compares); local SGD sends only every period-th step,
    # so a mean, not a median
    steady = durations[STEADY_FROM - 1 :] or steps
    late = sent[STEADY_FROM:] if len(sent) > STEADY_FROM else sent
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("item_tables"))
    return {
        # the mean step, not the median: local SGD's averaging lands on one step in `period`
        "step_ms": statistics.mean(steps) * 1e3, "median_step_ms": statistics.median(steps) * 1e3, "steady_step_ms": statistics.mean(steady) * 1e3,
        "bytes_per_step": statistics.mean(late) if late else 0.0, "steps": len(ends), "step_times_ms": [d * 1e3 for d in durations],
        "hr10": float(metrics["test_hr@10"]) if metrics else None, "ndcg10": float(metrics["test_ndcg@10"]) if metrics else None,
        "dense_params": dense, "bytes_each_step": sent, "losses": losses,
    }


PAYS_MARGIN = 1.05  # "pays": at least 5% faster per step than exact (less is within this machine's run-to-run noise)


def where_it_pays(speedup_by_rate: dict[float, float], margin: float = PAYS_MARGIN) -> str:
    """Where a variant pays against exact, from its speedups at the measured rates (Mbit/s):
    "at every measured rate", "at no measured rate", "below ~R" / "above ~R" (R interpolated in
    log rate between the two measured rates where the speedup crosses ``margin``), or the rates
    themselves when they do not split into one slow and one fast side."""
    rates = sorted(speedup_by_rate)
    if len(rates) < 2:
        raise ValueError(f"where_it_pays needs at least 2 rates, got {rates}")
    pays = [speedup_by_rate[r] >= margin for r in rates]
    if all(pays):
        return "at every measured rate"
    if not any(pays):
        return "at no measured rate"
    flips = [i for i in range(len(rates) - 1) if pays[i] != pays[i + 1]]
    if len(flips) > 1:
        return "at " + ", ".join(f"{r:.0f}" for r, p in zip(rates, pays, strict=True) if p)
    lo, hi = rates[flips[0]], rates[flips[0] + 1]
    s_lo, s_hi = speedup_by_rate[lo], speedup_by_rate[hi]
    # where the speedup reaches the margin, linear in log rate between the two measured points
    at = math.exp(math.log(lo) + (margin - s_lo) / (s_hi - s_lo) * (math.log(hi) - math.log(lo)))
    return f"{'below' if pays[0] else 'above'} ~{at:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--data", default=None, help="MovieLens ratings.csv (default: synthetic)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression.json"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (exact is always run)")
    parser.add_argument("--link-rate", default=None,
                        help="Mbit/s, one or comma-separated: run on 2 simulated nodes joined by a link of each rate (the first: quality)")
    parser.add_argument("--timing-steps", type=int, default=80, help="steps per variant at every link rate after the first")
    parser.add_argument("--batch-size", type=int, default=None, help=f"users per process and step (default {FULL['batch_size']})")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {FULL['epochs']})")
    parser.add_argument("--node-worker", nargs=2, metavar=("ARGS_JSON", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node_worker:
        from lightning_hybrid.testing.netns import write_worker_result

        write_worker_result(args.node_worker[1], _worker(*json.loads(args.node_worker[0])))
        return
    cfg = dict(SMOKE if args.smoke else FULL)
    # fewer users per step: less compute per byte of gradient, the regime of a slow link
    cfg.update({k: v for k, v in (("batch_size", args.batch_size), ("epochs", args.epochs)) if v is not None})
    chosen = ["exact", *[v for v in args.variants.split(",") if v and v != "exact"]]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    try:
        rates = [float(r) for r in args.link_rate.split(",")] if args.link_rate else []
    except ValueError:
        rates = [-1.0]
    if any(not r > 0 for r in rates) or len(set(rates)) != len(rates):
        parser.error(f"--link-rate {args.link_rate}: give distinct positive rates in Mbit/s, e.g. 100,1000,10000")
    if args.timing_steps <= STEADY_FROM:
        parser.error(f"--timing-steps {args.timing_steps}: must exceed the {STEADY_FROM} warm-up steps the step time leaves out")
    if rates:
        from lightning_hybrid.testing.netns import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            sys.exit(f"--link-rate: {reason}")
    data_path = str(Path(args.data).resolve()) if args.data else None
    by_rate: dict[str, dict[str, Any]] = {}
    measured: dict[str, float] = {}
    for i, rate in enumerate(rates or [None]):
        # the first rate (or loopback) trains the whole budget and tests; the others time a few steps
        run_cfg = cfg if i == 0 else {**cfg, "timing_steps": args.timing_steps}
        here: dict[str, Any] = {}
        from lightning_hybrid.testing.netns import SimulatedCluster

        with SimulatedCluster(nodes=2, rate_mbit=rate) if rate is not None else contextlib.nullcontext() as cluster:
            if cluster is not None:
                measured[f"{rate:g}"] = cluster.measure_mbit(16)
            for name in chosen:
                variant = VARIANTS[name]
                if cluster is not None:
                    here[name] = cluster.run_workers(__file__, [run_cfg, variant, data_path, 2], 2, timeout_s=3600)[0]
                else:
                    here[name] = run_distributed(_worker, 2, run_cfg, variant, data_path, init_process_group=False, timeout_s=3600)[0]
                print(f"{'loopback' if rate is None else f'{rate:g} Mbit/s'} {name}",
                      {k: v for k, v in here[name].items() if k not in ("bytes_each_step", "losses", "step_times_ms")}, flush=True)
        by_rate["loopback" if rate is None else f"{rate:g}"] = here
    results = next(iter(by_rate.values()))
    base = results["exact"]
    table = [
        "| variant | bytes / step / rank | bytes vs exact | step (ms) | step vs exact | test HR@10 | test NDCG@10 | NDCG vs exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        r["bytes_ratio"] = base["bytes_per_step"] / r["bytes_per_step"] if r["bytes_per_step"] else float("inf")
        r["time_ratio"] = r["step_ms"] / base["step_ms"] if base["step_ms"] else 1.0
        r["ndcg_relative"] = r["ndcg10"] / base["ndcg10"] if base["ndcg10"] else 1.0
        table.append(
            f"| {name} | {r['bytes_per_step'] / 1e6:.3f} MB | {r['bytes_ratio']:.1f}x less | {r['step_ms']:.0f} | {r['time_ratio']:.2f}x | "
            f"{r['hr10']:.4f} | {r['ndcg10']:.4f} | {r['ndcg_relative']:.3f} |"
        )
    rate_table, pays = _across_rates(by_rate, measured, chosen)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "compression", "config": cfg, "data": args.data, "link_rates_mbit": rates or None,
                               "link_rates_measured_mbit": measured, "timing_steps": args.timing_steps, "results": results,
                               "by_rate": by_rate, "pays": pays}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in results.items():
            ax.scatter(r["bytes_per_step"] / 1e6, r["ndcg10"])
            ax.annotate(name, (r["bytes_per_step"] / 1e6, r["ndcg10"]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("MB sent per step per rank (dp axis, log)")
        ax.set_ylabel("test NDCG@10")
        ax.set_title("quality vs bytes on the wire")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"plot: {out.with_suffix('.png')}")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    print("\n".join(table))
    if rate_table:
        print("\n".join(rate_table))
    print(f"JSON: {out}")


def _across_rates(by_rate: dict[str, dict[str, Any]], measured: dict[str, float], chosen: list[str]) -> tuple[list[str], dict[str, str]]:
    """With several link rates: each variant's steady mean step (from step ``STEADY_FROM`` on, after
    every warm-up) and speedup over exact at each rate, the
    largest training-loss difference of each timing run from the first rate's run, and where the
    variant pays (`where_it_pays` over the measured rates). Adds ``speedup`` and
    ``max_loss_diff`` to every row of ``by_rate``."""
    if len(by_rate) < 2:
        return [], {}
    first = next(iter(by_rate.values()))
    for here in by_rate.values():
        for name, row in here.items():
            row["speedup"] = here["exact"]["steady_step_ms"] / row["steady_step_ms"]
            pairs = [(a, b) for a, b in zip(first[name]["losses"], row["losses"], strict=False) if not (math.isnan(a) or math.isnan(b))]
            row["max_loss_diff"] = max((abs(a - b) for a, b in pairs), default=float("nan"))
    # at the rates the probe measured (10 Gbit/s set moves 5-8 here), the set rate where none was
    pays = {
        name: where_it_pays({measured.get(k) or float(k): here[name]["speedup"] for k, here in by_rate.items()}) for name in chosen if name != "exact"
    }
    heads = [f"{k} Mbit/s ({measured.get(k, 0):.0f} measured)" for k in by_rate]
    lines = [
        f"\nmean step ms from step {STEADY_FROM} on (speedup over exact) [largest loss difference from the first rate's run]:",
        "| variant | " + " | ".join(heads) + " | pays |", "|---|" + "---|" * (len(heads) + 1),
    ]
    for name in chosen:
        cells = [f"{here[name]['steady_step_ms']:.0f} ({here[name]['speedup']:.2f}x) [{here[name]['max_loss_diff']:.1e}]" for here in by_rate.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pays.get(name, '-')} |")
    return lines, pays


if __name__ == "__main__":
    main()
