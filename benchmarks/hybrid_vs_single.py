"""The headline: hybrid layouts vs single-mode parallelism, same model, data and process count.

The reference LLM-style recommender (SASRec: 4 causal transformer blocks, d=64, sampled softmax)
with a 100k-item table and a 100k-item output layer (6.4M parameters each), synthetic sequences,
the same global batch. Sequence lengths (``--lengths``): ``long_tail`` (the default) draws
Amazon Beauty-like lengths (median 6, p99 ~45, capped at 200) and trains on jagged, length-grouped,
token-balanced batches (`lightning_hybrid.data.lengths`), ``max_len`` 50 a cap; ``full`` gives
every user ``max_len`` + 3 items (every batch full width: the earlier headline). Layouts, on P = 2
and 4 CPU processes (gloo, ranks pinned to cores):

- ``dp``: pure data parallel: the table replicated (``shard_embeddings=False``), everything
  all-reduced by DDP;
- ``mp``: pure model parallel: the table sharded row-wise, the dense blocks split over all ranks
  (tp = P), no data parallelism;
- ``tp``: tensor parallel only (tp = P), the table replicated;
- ``pp``: pipeline only (pp = P, 1F1B), the table replicated;
- ``pp_bal``: ``pp`` with the blocks cut by the balancer (``pipeline_split="balanced"``: each
  block profiled at setup, the input part counted on the first stage and the loss head on the
  last); a stricter single-mode baseline than a user would have without lightning_hybrid (not at
  P = 4: with as many stages as blocks there is nothing to balance);
- ``hybrid_ddp``: table sharded (model parallel) + data parallel dense, uncompressed (DDP);
- ``hybrid``: table sharded + data parallel dense with PowerSGD rank 4;
- ``hybrid_tp`` (P = 4): table sharded + dp 2 x tp 2, PowerSGD on dp;
- ``hybrid_pp``: table sharded + pp 2 (1F1B) x dp P/2, PowerSGD on dp (P = 2: no dp, so no
  compression);
- ``hybrid_pp_ddp`` (P = 4): table sharded + pp 2 x dp 2, uncompressed (DDP);
- ``hybrid_pp_bal``: table sharded + pp 2 x dp P/2, uncompressed, balanced split (the paper's
  hybrid with adaptive load balancing: ``hybrid_pp_ddp``, and ``hybrid_pp`` at P = 2, balanced).

Reported per layout: global samples/s and real tokens/s over the measured steps (total samples /
total time: a step that carries local SGD's average counts), utilization (the monitor's compute
fraction weighted by step time, mean over ranks) and the busy fraction (the step less its waits
for the dp exchange, pipeline idle and tp collectives: what a GPU's busy counter would read), bytes sent per step by an average rank on each axis (dp
exchange, tp layers, pp send/recv, embedding all-to-alls; the strategy's and pipeline's own
counters, mean over measured steps) and their sum, and the ratios of the best hybrid to the best
single-mode layout.

Across simulated nodes (``--link-rates 1000,10000``; root and iproute2): the layouts run on 2
network namespaces joined by links shaped to each rate (`lightning_hybrid.testing.netns`), 1 or 2
processes per node (``--procs-per-node 1,2``), launched as users launch across nodes (torchrun, one
agent per node, c10d rendezvous). Added layouts that only differ across nodes: ``hybrid_hier``
(table sharded, PowerSGD across nodes only, exact inside a node) and ``hybrid_localsgd`` (table
sharded, local SGD with period 4 across the replicas), ``hybrid_localsgd_overlap`` (the same with
each average sent in the background and applied a period later: ``local_sgd_overlap=True``), ``hybrid_async`` (table sharded, the exact
dp all-reduce applied one step late, `data_parallel_mode="async"`, so it crosses the link while the
next step computes), and with 2 processes per node
``hybrid_2d`` (the table sharded inside each node, one copy per node, gradients averaged across
the copies: ``embedding_shard_group_size="node"``; its trade-off alone: benchmarks/table_groups.py). Bytes are also measured at the links:
``inter_node_mb`` is what a node sent on its shaped link per step, ``intra_node_mb`` what its
ranks sent each other over its loopback (``/proc/net/dev`` inside each namespace), and every rate's
measured line rate (a 16 MB all-reduce probe) is printed next to the set one. Each pipeline row
records the blocks per stage it ran (``blocks_per_stage``: what a balanced split chose). A layout
whose rank fails runs once more in fresh processes (its row keeps the first error); one that
fails twice is listed under ``"failed"`` in the JSON and the others still run.

GPU variant (``--accelerator gpu``): a larger model (500k items, d=512, 8 heads, 200 positions,
bf16-mixed, NCCL), P = 2, 4, 8 up to the GPUs present, and the model FLOPs utilization against
the detected peak (FLOPs counted per token: 6 x the block weights, the attention scores and
weighted sums, the sampled-softmax logits). With one GPU only the single-device run (absolute
samples/s and MFU) is possible: NCCL needs one GPU per rank. Without torchrec (``--tables torch``,
chosen automatically when it cannot be imported) the tables are plain ``nn.Embedding`` modules,
replicated: the dense side only, so the layouts that differ only by table sharding (``mp``,
``hybrid_ddp``, ``hybrid``) are left out.

    python benchmarks/hybrid_vs_single.py                       # ~12 min on 2 cores; benchmarks/results/hybrid_vs_single.json
    python benchmarks/hybrid_vs_single.py --lengths full --out benchmarks/results/hybrid_vs_single_full_run1.json
    python benchmarks/hybrid_vs_single.py --smoke               # tiny; what the test suite runs
    python benchmarks/hybrid_vs_single.py --accelerator gpu     # benchmarks/results/hybrid_vs_single_gpu.json
    python benchmarks/hybrid_vs_single.py --link-rates 1000,10000 --out benchmarks/results/hybrid_vs_single_links.json
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
from lightning_hybrid.testing.netns import link_bytes_sent  # noqa: E402

GPU_FULL = {
    "items": 500_000, "d_model": 512, "num_blocks": 4, "num_heads": 8, "max_len": 200, "global_batch": 128, "steps": 20, "warmup": 5,
    "processes": [2, 4, 8], "num_negatives": 1024,
}
# layouts that differ from another one only by sharding the table: pointless with nn.Embedding tables
NEEDS_TORCHREC = ("mp", "hybrid_ddp", "hybrid")

POWERSGD = {"method": "powersgd", "rank": 4, "start_iter": 2}
LAYOUTS: dict[str, dict[str, Any]] = {
    "dp": {"shard_embeddings": False},
    "mp": {"tensor_parallel": "P", "data_parallel": 1, "embedding_sharding": {"item_id": "row_wise"}},
    "tp": {"tensor_parallel": "P", "data_parallel": 1, "shard_embeddings": False},
    "pp": {"pipeline_parallel": "P", "data_parallel": 1, "shard_embeddings": False},
    "pp_bal": {"pipeline_parallel": "P", "data_parallel": 1, "shard_embeddings": False, "pipeline_split": "balanced"},
    "hybrid_ddp": {"embedding_sharding": {"item_id": "row_wise"}},
    "hybrid": {"embedding_sharding": {"item_id": "row_wise"}, "gradient_compression": POWERSGD},
    "hybrid_tp": {"tensor_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}, "gradient_compression": POWERSGD},
    "hybrid_pp_ddp": {"pipeline_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}},
    "hybrid_pp": {"pipeline_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}, "gradient_compression": POWERSGD},
    # hybrid_pp_ddp with the blocks cut by the balancer instead of equal shares
    "hybrid_pp_bal": {"pipeline_parallel": 2, "embedding_sharding": {"item_id": "row_wise"}, "pipeline_split": "balanced"},
    # across nodes only (--link-rates): compression on the inter-node hop, local SGD across replicas
    "hybrid_hier": {"embedding_sharding": {"item_id": "row_wise"}, "gradient_compression": {**POWERSGD, "hierarchical": True}},
    "hybrid_localsgd": {"embedding_sharding": {"item_id": "row_wise"}, "data_parallel_mode": "local_sgd", "local_sgd_period": 4,
                        "local_sgd_warmup_steps": 2},
    # the same, each average sent in the background and applied one period later (Overlap Local-SGD)
    "hybrid_localsgd_overlap": {"embedding_sharding": {"item_id": "row_wise"}, "data_parallel_mode": "local_sgd", "local_sgd_period": 4,
                                "local_sgd_warmup_steps": 2, "local_sgd_overlap": True},
    # exact averaged gradients applied one step late: the all-reduce crosses the link during the next step's compute
    "hybrid_async": {"embedding_sharding": {"item_id": "row_wise"}, "data_parallel_mode": "async", "async_staleness": 1},
    # (2 processes per node and up) the table sharded inside each node, one copy per node (`parallel.table_groups`)
    "hybrid_2d": {"embedding_sharding": {"item_id": "row_wise"}, "embedding_shard_group_size": "node"},
}
CROSS_NODE = ("hybrid_hier", "hybrid_localsgd", "hybrid_localsgd_overlap", "hybrid_async", "hybrid_2d")
LINK_LAYOUTS = (
    "dp", "mp", "pp", "hybrid_ddp", "hybrid", "hybrid_hier", "hybrid_localsgd", "hybrid_localsgd_overlap", "hybrid_async", "hybrid_2d",
    "hybrid_pp", "hybrid_pp_ddp", "hybrid_pp_bal", "pp_bal",
)
SINGLE = ("dp", "mp", "tp", "pp", "pp_bal")
DEFAULT_OUT = str(Path(__file__).parent / "results" / "hybrid_vs_single.json")
AXES = ("dp", "tp", "pp", "embedding")
WAITS = ("dp_exchange", "pipeline_idle", "tp_wait")  # the monitor's time/ keys a rank spends waiting
FULL = {"items": 100_000, "d_model": 64, "num_blocks": 4, "num_heads": 4, "max_len": 50, "global_batch": 64, "steps": 16, "warmup": 4, "processes": [2, 4]}
SMOKE = {"items": 200, "d_model": 16, "num_blocks": 4, "num_heads": 4, "max_len": 8, "global_batch": 16, "steps": 2, "warmup": 1, "processes": [2]}


def flops_per_token(cfg: dict[str, Any]) -> float:
    """Training FLOPs per token of the benchmark's SASRec (forward + backward = 3 x forward):
    per block the projections and MLP (2 x 6 d^2 multiply-adds with mlp_ratio 1) and the attention
    scores and weighted sum over all L positions (4 L d); then the sampled-softmax logits
    (d x (1 + negatives)). Lookups and layer norms are left out."""
    d, length, negatives = cfg["d_model"], cfg["max_len"], cfg.get("num_negatives", 256)
    per_block = 2 * 6 * d * d + 4 * length * d
    return 3.0 * (cfg["num_blocks"] * per_block + 2 * d * (1 + negatives))


def _worker(
    cfg: dict[str, Any], layout: dict[str, Any], processes: int, accelerator: str = "cpu", tables: str = "torchrec", lengths: str = "long_tail",
    nodes: int = 1,
) -> dict[str, Any]:
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
    if accelerator == "cpu":
        pin_to_core(rank)
        torch.set_num_threads(1)
    kwargs = {k: (processes if v == "P" else v) for k, v in layout.items()}
    if tables == "torch":  # nn.Embedding tables: nothing for torchrec to shard
        kwargs.pop("embedding_sharding", None)
        kwargs["shard_embeddings"] = False
    if "gradient_compression" in kwargs:
        kwargs["gradient_compression"] = GradientCompression(**kwargs["gradient_compression"])
    tp, pp = int(kwargs.get("tensor_parallel", 1)), int(kwargs.get("pipeline_parallel", 1))
    dp = processes // (tp * pp)
    per_replica = cfg["global_batch"] // dp
    users = cfg["global_batch"] * (cfg["warmup"] + cfg["steps"])
    shape = (
        {"synthetic_lengths": "long_tail", "synthetic_min_len": 3, "synthetic_max_len": 200}
        if lengths == "long_tail"
        else {"synthetic_min_len": cfg["max_len"] + 3, "synthetic_max_len": cfg["max_len"] + 3}
    )
    data = SequenceDataModule(
        format="synthetic", max_len=cfg["max_len"], batch_size=per_replica, synthetic_users=users, synthetic_items=cfg["items"],
        drop_last=True, length_group=32 if lengths == "long_tail" else 1, **shape,  # (length-grouped: a throughput benchmark)
    )
    records: list[dict[str, float]] = []
    bytes_sent: dict[str, list[float]] = {axis: [] for axis in AXES}
    links: list[dict[str, float]] = []  # link counters at the first measured step and at the end (nodes > 1)

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if nodes > 1 and len(records) == cfg["warmup"]:
                links.append(link_bytes_sent())

        def on_train_end(self, trainer: Any, *args: Any) -> None:
            if nodes > 1 and links:
                links.append(link_bytes_sent())

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            monitor = next(c for c in trainer.callbacks if isinstance(c, HybridMonitor))
            records.append(dict(monitor.last))
            strategy = trainer.strategy
            runner = getattr(strategy, "pipeline_runner", None)
            bytes_sent["dp"].append(float(getattr(strategy, "comm_bytes_last_step", 0)))
            bytes_sent["tp"].append(float(getattr(strategy, "tp_bytes_last_step", 0)))
            bytes_sent["pp"].append(float(runner.last_step.get("sent_bytes", 0.0)) if runner is not None and runner.last_step else 0.0)
            bytes_sent["embedding"].append(float(getattr(strategy, "embedding_bytes_last_step", 0)))

    torch.manual_seed(0)
    model = SASRec(
        num_items=cfg["items"], max_len=cfg["max_len"], d_model=cfg["d_model"], num_blocks=cfg["num_blocks"],
        num_heads=cfg["num_heads"], dropout=0.0, loss="sampled", num_negatives=cfg.get("num_negatives", 256), tables=tables,
    )
    if pp > 1:
        kwargs.setdefault("pipeline_microbatches", max(2, pp))  # 1F1B needs at least one microbatch per stage
    trainer = pl.Trainer(
        strategy=HybridStrategy(**kwargs), accelerator=accelerator, devices=processes // nodes, num_nodes=nodes, max_epochs=1, limit_val_batches=0,
        precision="bf16-mixed" if accelerator == "gpu" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Keep(), HybridMonitor(flops_per_token=flops_per_token(cfg))],  # MFU where the peak is known (GPUs)
    )
    trainer.fit(model, datamodule=data)
    measured = records[cfg["warmup"] :] or records
    # Over the whole measured run, not a typical step: total samples / total time, and every
    # fraction weighted by its step's time. A median step hid what local SGD's averaging costs (one
    # step in `period` carries the whole all-reduce) and what jagged batches cost (their steps differ).
    total_s = sum(r["time/step_s"] for r in measured)

    def over_run(key: str) -> float:  # the time-weighted mean of a per-step rate or fraction
        return sum(r.get(key, 0.0) * r["time/step_s"] for r in measured) / total_s

    return {
        "samples_per_s": over_run("throughput/samples_per_s"),
        "tokens_per_s": over_run("throughput/tokens_per_s"),
        "step_ms": total_s / len(measured) * 1e3,
        "compute_fraction": over_run("utilization/compute_fraction"),
        # what a GPU's busy counter would read: the step less its waits (dp exchange, pipeline idle,
        # tp collectives), i.e. dense compute + table lookups + optimizer
        "busy_fraction": 1.0 - sum(r.get(f"time/{k}_s", 0.0) for r in measured for k in WAITS) / total_s,
        "mfu": over_run("utilization/mfu") if "utilization/mfu" in measured[0] else None,
        # the typical step (what this page reported before 2026-12-07 evening), for comparison
        "median_samples_per_s": statistics.median(r["throughput/samples_per_s"] for r in measured),
        "median_step_ms": statistics.median(r["time/step_s"] for r in measured) * 1e3,
        # where the run's time went (the monitor's breakdown, mean ms per step): what the compute fraction leaves out
        "time_ms": {k: sum(r.get(f"time/{k}_s", 0.0) for r in measured) / len(measured) * 1e3
                    for k in ("dense_compute", "embedding", "dp_exchange", "optimizer", "pipeline_idle", "tp_wait")},
        # a mean, not a median: local SGD sends every period-th step
        "bytes_per_step": {axis: statistics.mean(v[cfg["warmup"] :] or v) for axis, v in bytes_sent.items()},
        "layout": {"dp": dp, "tp": tp, "pp": pp},
        # blocks per pipeline stage as run (what pipeline_split="balanced" chose); None without a pipeline
        "blocks_per_stage": getattr(getattr(trainer.strategy, "pipeline_runner", None), "blocks_per_stage", None),
        # per step: what this rank's node sent on its shaped link / over its loopback (local rank 0 reports; 0 elsewhere)
        "link_mb": {k: (links[1][k] - links[0][k]) / max(1, len(records) - cfg["warmup"]) / 1e6 for k in ("eth0", "lo")}
        if len(links) == 2 and os.environ.get("LOCAL_RANK", "0") == "0" else {"eth0": 0.0, "lo": 0.0},
    }


def _node_worker(args_json: str, out_dir: str) -> None:
    """Under torchrun on a simulated node: `_worker`, each rank's result for the caller."""
    from lightning_hybrid.testing.netns import write_worker_result

    write_worker_result(out_dir, _worker(*json.loads(args_json)))


def run_on_links(cluster: Any, cfg: dict[str, Any], layout: dict[str, Any], processes: int, tables: str, lengths: str) -> list[dict[str, Any]]:
    """One layout on a `SimulatedCluster` (``processes`` ranks over its nodes); every rank's result."""
    return cluster.run_workers(__file__, [cfg, layout, processes, "cpu", tables, lengths, cluster.nodes], processes)


def _row(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One layout's row from every rank's result."""
    row = dict(ranks[0])
    row["samples_per_s"] = min(r["samples_per_s"] for r in ranks)  # the job is as fast as its slowest rank
    row["tokens_per_s"] = min(r["tokens_per_s"] for r in ranks)
    row["compute_fraction"] = statistics.mean(r["compute_fraction"] for r in ranks)
    row["busy_fraction"] = statistics.mean(r["busy_fraction"] for r in ranks)
    if all("time_ms" in r for r in ranks):
        row["time_ms"] = {k: statistics.mean(r["time_ms"][k] for r in ranks) for k in ranks[0]["time_ms"]}
    # bytes an average rank sends (ranks of a pipeline or a row-wise table differ)
    row["bytes_per_step"] = {axis: statistics.mean(r["bytes_per_step"][axis] for r in ranks) for axis in AXES}
    row["bytes_per_step"]["total"] = sum(row["bytes_per_step"][axis] for axis in AXES)
    reporting = [r["link_mb"] for r in ranks if r["link_mb"]["eth0"] or r["link_mb"]["lo"]]  # (each node's local rank 0)
    if reporting:
        row["inter_node_mb"] = statistics.mean(m["eth0"] for m in reporting)
        row["intra_node_mb"] = statistics.mean(m["lo"] for m in reporting)
    return row


#: layouts that failed twice in this run (key -> the error's tail), written to the JSON
FAILED: dict[str, str] = {}


def _run_retrying(run: Any, layout: dict[str, Any], processes: int, key: str) -> tuple[list[dict[str, Any]], str | None]:
    """``run(layout, processes)``, once more if a rank fails (fresh processes; the rows stay those of
    one run of the script): (every rank's result, the first attempt's error tail or None)."""
    try:
        return run(layout, processes), None
    except (RuntimeError, TimeoutError) as error:
        print(f"{key}: a rank failed, running it once more:\n{str(error)[-3000:]}", file=sys.stderr, flush=True)
        return run(layout, processes), str(error)[-3000:]


def _measure_all(
    run: Any, chosen: list[str], process_counts: list[int], prefix: str = "", num_blocks: int = 4
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Every chosen layout at every process count (``run(layout, processes)`` -> every rank's
    result): the rows, the markdown table lines and the best-hybrid / best-single summary."""
    results: dict[str, Any] = {}
    lines = [
        "| P | layout | dp x tp x pp | samples/s | tokens/s | step (ms) | utilization | busy | MFU | MB sent / step: dp | tp | pp | emb | total |"
        + (" MB per node and step: inter-node link | intra-node |" if prefix else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if prefix else ""),
    ]
    summary = {}
    for processes in process_counts:
        for name, layout in LAYOUTS.items():
            if name not in chosen:
                continue
            if name in ("hybrid_tp", "hybrid_pp_ddp", "hybrid_2d") and processes < 4:  # (hybrid_pp_ddp = hybrid_pp without dp)
                continue
            if name == "pp_bal" and processes >= num_blocks:  # one block per stage: nothing to balance
                continue
            if name in CROSS_NODE and not prefix:  # (they differ from `hybrid` only across nodes)
                continue
            if processes == 1 and name != "dp":  # one device: no layout to compare, only the absolute figures
                continue
            key = f"{prefix}P{processes}/{name}"
            try:
                ranks, retried = _run_retrying(run, layout, processes, key)
            except (RuntimeError, TimeoutError) as error:  # twice: kept in the JSON, the others still run
                FAILED[key] = str(error)[-3000:]
                lines.append(f"| {processes} | {name} | failed twice (the JSON's \"failed\" has the error) |")
                continue
            row = _row(ranks)
            if retried:
                row["first_attempt_failed"] = retried
            mb = " | ".join(f"{row['bytes_per_step'][axis] / 1e6:.2f}" for axis in (*AXES, "total"))
            mfu = f"{row['mfu']:.3f}" if row.get("mfu") is not None else "-"
            results[key] = row
            lay = row["layout"]
            links = f" {row['inter_node_mb']:.2f} | {row['intra_node_mb']:.2f} |" if "inter_node_mb" in row else ""
            lines.append(
                f"| {processes} | {name} | {lay['dp']} x {lay['tp']} x {lay['pp']} | {row['samples_per_s']:.1f} | {row['tokens_per_s']:.0f} | "
                f"{row['step_ms']:.0f} | {row['compute_fraction']:.2f} | {row['busy_fraction']:.2f} | {mfu} | {mb} |{links}"
            )
            print(prefix, name, processes, row, flush=True)
        here = {k.split("/")[-1]: v for k, v in results.items() if k.startswith(f"{prefix}P{processes}/")}
        if not any(n in here for n in SINGLE) or not any(n.startswith("hybrid") for n in here):
            continue  # nothing to compare at this process count
        best_single = max((n for n in SINGLE if n in here), key=lambda n: here[n]["samples_per_s"])
        best_hybrid = max((n for n in here if n.startswith("hybrid")), key=lambda n: here[n]["samples_per_s"])
        summary[f"{prefix}P{processes}"] = {
            "best_single": best_single, "best_hybrid": best_hybrid,
            "throughput_ratio": here[best_hybrid]["samples_per_s"] / here[best_single]["samples_per_s"],
            "utilization_ratio": here[best_hybrid]["compute_fraction"] / max(here[best_single]["compute_fraction"], 1e-9),
            "busy_ratio": here[best_hybrid]["busy_fraction"] / max(here[best_single]["busy_fraction"], 1e-9),
        }
    return results, lines, summary


def _main_on_links(args: Any, chosen: list[str], cfg: dict[str, Any], tables: str) -> None:
    """--link-rates: every layout on 2 simulated nodes at each rate (see the module docstring)."""
    from lightning_hybrid.testing.netns import SimulatedCluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        sys.exit(f"--link-rates: {reason}")
    if args.layouts == ",".join(LAYOUTS):
        chosen = [n for n in LINK_LAYOUTS if n in chosen]
    per_node = [int(n) for n in args.procs_per_node.split(",")]
    results: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    tables_md: list[str] = []
    measured_rates: dict[str, float] = {}
    for rate in [float(r) for r in args.link_rates.split(",")]:
        with SimulatedCluster(nodes=2, rate_mbit=rate) as cluster:
            measured_rates[f"{rate:g}"] = cluster.measure_mbit(16)
            prefix = f"{rate:g}Mbit/"
            rows, lines, summ = _measure_all(
                lambda layout, processes: run_on_links(cluster, cfg, layout, processes, tables, args.lengths),
                chosen, [2 * n for n in per_node], prefix, cfg["num_blocks"],
            )
        results.update(rows)
        summary.update(summ)
        tables_md += [f"\nlink {rate:g} Mbit/s set, {measured_rates[f'{rate:g}']:.0f} Mbit/s measured (16 MB all-reduce):", *lines]
    out = Path(args.out or DEFAULT_OUT.replace(".json", "_links.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(
        {"benchmark": "hybrid_vs_single", "accelerator": "cpu", "device": "2 simulated nodes", "tables": tables, "lengths": args.lengths,
         "config": cfg, "link_rates_measured_mbit": measured_rates, "results": results, "summary": summary, "failed": FAILED},
        indent=2,
    ))
    print("\n".join(tables_md))
    for key, s in summary.items():
        print(f"{key}: best hybrid {s['best_hybrid']} / best single-mode {s['best_single']}: throughput {s['throughput_ratio']:.2f}x, "
              f"utilization {s['utilization_ratio']:.2f}x (busy {s['busy_ratio']:.2f}x)")
    print(f"JSON: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None, help="JSON results (default: results/hybrid_vs_single.json, gpu: ..._gpu.json)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset; ratios where a single-mode and a hybrid layout ran")
    parser.add_argument("--processes", default=None, help="comma-separated process counts (default: 2,4; smoke: 2; gpu: 2,4,8 up to the GPUs)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--tables", choices=("auto", "torchrec", "torch"), default="auto",
                        help="torchrec EmbeddingCollection (sharded) or plain nn.Embedding (dense side only); auto: torchrec when importable")
    parser.add_argument("--lengths", choices=("long_tail", "full"), default="long_tail",
                        help="Beauty-like long-tailed sequences on jagged batches (default), or every sequence max_len long")
    parser.add_argument("--link-rates", default=None, help="Mbit/s, comma-separated: run on 2 simulated nodes at each rate (root)")
    parser.add_argument("--procs-per-node", default="1", help="with --link-rates: processes per node, comma-separated (1, 2)")
    parser.add_argument("--node-worker", nargs=2, metavar=("ARGS_JSON", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node_worker:
        _node_worker(*args.node_worker)
        return
    chosen = [n for n in args.layouts.split(",") if n]
    if not chosen or set(chosen) - set(LAYOUTS):
        parser.error(f"--layouts {chosen}: choose from {list(LAYOUTS)}")
    tables = args.tables
    if tables == "auto":
        try:
            import torchrec  # noqa: F401
            tables = "torchrec"
        except ImportError:
            tables = "torch"
            print("torchrec cannot be imported: nn.Embedding tables, the dense side only", flush=True)
    if tables == "torch":
        chosen = [n for n in chosen if n not in NEEDS_TORCHREC]
    cfg = SMOKE if args.smoke else (GPU_FULL if args.accelerator == "gpu" else FULL)
    if args.processes:
        process_counts = [int(p) for p in args.processes.split(",")]
    elif args.accelerator == "gpu":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            sys.exit("--accelerator gpu: no CUDA device here; run on a GPU machine, or use the CPU variant")
        process_counts = [p for p in cfg["processes"] if p <= gpus] or [1]
    else:
        process_counts = cfg["processes"]
    if args.link_rates:
        return _main_on_links(args, chosen, cfg, tables)
    results, lines, summary = _measure_all(
        lambda layout, processes: run_distributed(
            _worker, processes, cfg, layout, processes, args.accelerator, tables, args.lengths, init_process_group=False, timeout_s=1800
        ),
        chosen, process_counts, "", cfg["num_blocks"],
    )
    out = Path(args.out or (DEFAULT_OUT if args.accelerator == "cpu" else DEFAULT_OUT.replace(".json", "_gpu.json")))
    out.parent.mkdir(parents=True, exist_ok=True)
    device = "cpu"
    if args.accelerator == "gpu":
        import torch

        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    out.write_text(json.dumps(
        {"benchmark": "hybrid_vs_single", "accelerator": args.accelerator, "device": device, "tables": tables, "lengths": args.lengths, "config": cfg,
         "results": results, "summary": summary, "failed": FAILED},
        indent=2,
    ))
    print("\n".join(lines))
    for key, s in summary.items():
        print(
            f"{key}: best hybrid {s['best_hybrid']} / best single-mode {s['best_single']}: throughput {s['throughput_ratio']:.2f}x, "
            f"utilization {s['utilization_ratio']:.2f}x (busy {s['busy_ratio']:.2f}x)"
        )
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
