"""Cluster simulator: the planner's best hybrid layout vs the best single-mode layout, 8 to 1024 GPUs.

For the reference recommender at three sizes (about 100M / 1B / 10B dense parameters in the
transformer blocks with 1B / 10B / 100B embedding parameters; item-tied sampled-softmax scoring,
bf16) on H100 nodes (8 per node, NVLink inside, 400 Gb/s InfiniBand per GPU between nodes; the
``h100x8-ib400`` preset, uncalibrated), with a fixed batch of 32 sequences per GPU (weak scaling):

- best single-mode: the fastest of pure data parallel (replicated table, exact all-reduce), pure
  model parallel (tp = all GPUs, sharded table), tensor-only and pipeline-only that fits in memory;
- best hybrid: the fastest layout of the whole search (dp x tp x pp, microbatches, table layout,
  compression) that fits.

Reported: predicted samples/s of both, the ratio, the hybrid's utilization (compute share of the
step) and scaling efficiency (samples/s per GPU relative to 8 GPUs). These are predictions of
the cost model, not measurements.

    python benchmarks/planner_simulation.py       # ~1 min; JSON, Markdown table, docs/img/planner_scaling.png
    python benchmarks/planner_simulation.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.planner import CostModel, ModelSpec, best, preset, search, single_mode_layouts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES: dict[str, dict[str, Any]] = {
    # dense = transformer blocks; embedding = item table (num_items x d_model)
    "100M dense / 1B emb": {"d_model": 1024, "num_blocks": 16, "num_heads": 16, "num_items": 1_000_000},
    "1B dense / 10B emb": {"d_model": 2048, "num_blocks": 40, "num_heads": 16, "num_items": 5_000_000},
    "10B dense / 100B emb": {"d_model": 4096, "num_blocks": 100, "num_heads": 32, "num_items": 25_000_000},
}
GPUS = [8, 16, 32, 64, 128, 256, 512, 1024]


def simulate(sizes: dict[str, dict[str, Any]], gpus: list[int], per_gpu_batch: int, seq_len: int) -> list[dict[str, Any]]:
    base = preset("h100x8-ib400")
    rows = []
    for size_name, size in sizes.items():
        for n in gpus:
            cluster = dataclasses.replace(base, nodes=max(1, n // base.devices_per_node), devices_per_node=min(n, base.devices_per_node))
            model = ModelSpec(seq_len=seq_len, global_batch=per_gpu_batch * n, negatives=1024, bytes_per_value=2, tied_output=True, **size)
            cost = CostModel(cluster)
            hybrid = best(search(cost, model))
            single_candidates = [cost.estimate(model, layout) for layout in single_mode_layouts(model, n) if cost.validate(model, layout) is None]
            single = best([e for e in single_candidates if e.fits])
            rows.append({
                "model": size_name, "gpus": n,
                "hybrid_layout": hybrid.layout.describe() if hybrid else None,
                "hybrid_samples_per_s": hybrid.samples_per_s if hybrid else None,
                "hybrid_utilization": hybrid.utilization if hybrid else None,
                "hybrid_memory_gb": hybrid.memory_bytes / 1e9 if hybrid else None,
                "single_layout": f"{single.layout.kind}: {single.layout.describe()}" if single else None,
                "single_samples_per_s": single.samples_per_s if single else None,
                "single_utilization": single.utilization if single else None,
                "ratio": (hybrid.samples_per_s / single.samples_per_s) if hybrid and single else (math.inf if hybrid else None),
            })
    for size_name in sizes:  # scaling efficiency relative to the smallest cluster
        mine = [r for r in rows if r["model"] == size_name and r["hybrid_samples_per_s"]]
        if mine:
            first = mine[0]
            for r in mine:
                r["hybrid_scaling_efficiency"] = (r["hybrid_samples_per_s"] / r["gpus"]) / (first["hybrid_samples_per_s"] / first["gpus"])
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | GPUs | best hybrid (predicted) | samples/s | util. | scaling eff. | best single-mode | samples/s | hybrid / single |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hybrid = f"{r['hybrid_samples_per_s']:,.0f}" if r["hybrid_samples_per_s"] else "-"
        single = f"{r['single_samples_per_s']:,.0f}" if r["single_samples_per_s"] else "none fits"
        ratio = "-" if r["ratio"] is None else ("only hybrid fits" if math.isinf(r["ratio"]) else f"{r['ratio']:.2f}x")
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['hybrid_layout'] or 'none fits'} | {hybrid} | "
            f"{(r['hybrid_utilization'] or 0):.2f} | {r.get('hybrid_scaling_efficiency', 0):.2f} | "
            f"{r['single_layout'] or '-'} | {single} | {ratio} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        mine = [r for r in rows if r["model"] == size]
        ax.plot([r["gpus"] for r in mine], [r["hybrid_samples_per_s"] or math.nan for r in mine], "o-", label="best hybrid")
        ax.plot([r["gpus"] for r in mine], [r["single_samples_per_s"] or math.nan for r in mine], "s--", label="best single-mode")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(size)
        ax.set_xlabel("GPUs (H100, 8 per node)")
        ax.set_ylabel("predicted samples/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one model size, 8 and 16 GPUs")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "planner_simulation.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "planner_scaling.png")
    args = parser.parse_args(argv)
    sizes = dict(list(SIZES.items())[:1]) if args.smoke else SIZES
    gpus = [8, 16] if args.smoke else GPUS
    rows = simulate(sizes, gpus, per_gpu_batch=32, seq_len=200)
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": "python benchmarks/planner_simulation.py", "rows": rows}, indent=2, default=str))
    plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
