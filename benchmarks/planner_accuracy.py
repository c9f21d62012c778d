"""Planner accuracy on this machine: calibrate the cost model on measured step times, then check
(1) predicted vs measured step time for every measured layout (in-sample, and leave-one-out:
each layout predicted by a model calibrated without it), and (2) plan quality: the planner's
first choice among all layouts that fit on 4 processes, measured, against the fastest measured.

The measurements are `benchmarks/hybrid_vs_single.py`'s (the reference recommender, 100k items,
4 blocks, d 64, global batch 64; dp / mp / tp / pp / hybrids on 2 and 4 CPU processes):

    python benchmarks/hybrid_vs_single.py && python benchmarks/planner_accuracy.py
    python benchmarks/planner_accuracy.py --measure-choice   # also run the planner's choice if it was not measured

Step time of a layout = global batch / its samples/s (the slowest rank's pace).

On shaped links (``--links``, from ``hybrid_vs_single.py --link-rates``): every measured layout on
2 simulated nodes at each rate, the cluster's inter-node link set to the rate the probe measured
(2 CPU cores shared by the nodes: one core per node), calibrated on all rows, leave-one-out
errors, and at each rate and size the planner's first choice among the layouts it models against
the fastest measured one (local SGD and hierarchical compression are not in the cost model: left
out; tables sharded per node, ``hybrid_2d``, are):

    python benchmarks/planner_accuracy.py --links benchmarks/results/hybrid_vs_single_links.json benchmarks/results/hybrid_vs_single_links_p4.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.planner import (  # noqa: E402
    CostModel,
    Layout,
    Measurement,
    ModelSpec,
    calibrate,
    preset,
    relative_errors,
    search,
)

ROOT = Path(__file__).resolve().parents[1]


def _hybrid_vs_single() -> Any:
    # imported by name (not from a file spec) so spawned ranks can unpickle its worker function
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hybrid_vs_single

    return hybrid_vs_single


def layout_of(
    name: str, strategy: dict[str, Any], measured: dict[str, int], per_node: int | None = None, blocks_per_stage: list[int] | None = None
) -> Layout:
    """The planner's Layout of a hybrid_vs_single layout (its strategy options and resolved degrees;
    ``per_node``: processes per simulated node, what ``embedding_shard_group_size="node"`` means;
    ``blocks_per_stage``: the split the run used, where it recorded it: a balanced split is priced
    as the balancer cut it, not as the cost model would)."""
    # (with dp = 1 there is nothing to compress: the strategy's compressor is a no-op there)
    compression = (strategy.get("gradient_compression") or {}).get("method", "none") if measured["dp"] > 1 else "none"
    pp = measured["pp"]
    group = strategy.get("embedding_shard_group_size")
    return Layout(
        table_group=per_node if group == "node" else group,
        dp=measured["dp"], tp=measured["tp"], pp=pp, microbatches=max(2, pp) if pp > 1 else 1,
        table="replicated" if strategy.get("shard_embeddings") is False else "row_wise", compression=compression,
        powersgd_rank=(strategy.get("gradient_compression") or {}).get("rank", 4),
        split=(tuple(blocks_per_stage) if blocks_per_stage and strategy.get("pipeline_split", "even") != "even"
               else strategy.get("pipeline_split", "even")) if pp > 1 else "even",
    )


def cpu_cluster(processes: int) -> Any:
    return dataclasses.replace(preset("cpu-2core"), devices_per_node=processes)


#: the width jagged Beauty-like batches are cut to at max_len 50 (docs/sequence-lengths.md: 12.3 on
#: average): what the cost model counts as positions per sample for --lengths long_tail measurements
JAGGED_WIDTH = 12


def link_cluster(rate_mbit: float, processes: int) -> Any:
    """2 simulated nodes on this machine: half the processes each, one core each, the measured link."""
    from lightning_hybrid.planner import Cluster, Link

    base = preset("cpu-2core")
    return Cluster(nodes=2, devices_per_node=processes // 2, cores_per_node=1, device=base.device, intra_node=base.intra_node,
                   inter_node=Link(bandwidth=rate_mbit * 1e6 / 8, latency=base.inter_node.latency), name=f"2 nodes at {rate_mbit:.0f} Mbit/s")


def links(paths: list[Path], out: Path) -> dict[str, Any]:
    """Calibration and plan quality on the shaped-link measurements (see the module docstring)."""
    hvs = _hybrid_vs_single()
    rows, measured_rates, cfg = {}, {}, None
    for path in paths:
        data = json.loads(path.read_text())
        rows.update(data["results"])
        measured_rates.update(data["link_rates_measured_mbit"])
        cfg = data["config"]
    assert cfg is not None
    model = ModelSpec(num_items=cfg["items"], d_model=cfg["d_model"], num_blocks=cfg["num_blocks"], num_heads=cfg["num_heads"],
                      seq_len=JAGGED_WIDTH, global_batch=cfg["global_batch"], negatives=256)
    names, measurements = [], []
    for key, row in rows.items():
        rate, size, name = key.split("/")
        if name in hvs.CROSS_NODE and name != "hybrid_2d":
            continue
        cluster = link_cluster(measured_rates[rate.removesuffix("Mbit")], int(size[1:]))
        layout = layout_of(name, hvs.LAYOUTS[name], row["layout"], per_node=cluster.devices_per_node, blocks_per_stage=row.get("blocks_per_stage"))
        measurements.append(Measurement(model, layout, cfg["global_batch"] / row["samples_per_s"], cluster))
        names.append(key)
    base = CostModel(measurements[0].cluster)
    fitted = calibrate(base, measurements)
    in_sample = relative_errors(fitted, measurements)
    held_out = [relative_errors(calibrate(base, measurements[:i] + measurements[i + 1 :]), [m])[0] for i, m in enumerate(measurements)]
    lines = ["| link, P | layout | measured (ms) | predicted (ms) | error | error, left out |", "|---|---|---|---|---|---|"]
    for key, m, e1, e2 in zip(names, measurements, in_sample, held_out, strict=True):
        predicted = dataclasses.replace(fitted, cluster=m.cluster).estimate(model, m.layout).step_s
        lines.append(f"| {key.rsplit('/', 1)[0]} | {key.rsplit('/', 1)[1]} | {m.step_s * 1e3:.0f} | {predicted * 1e3:.0f} | {e1:.0%} | {e2:.0%} |")
    choices = {}
    for group in sorted({k.rsplit("/", 1)[0] for k in names}):
        here = {m.layout: (k, m.step_s) for k, m in zip(names, measurements, strict=True) if k.startswith(group + "/")}
        cluster = next(m.cluster for k, m in zip(names, measurements, strict=True) if k.startswith(group + "/"))
        ranked = search(dataclasses.replace(fitted, cluster=cluster), model, list(here))
        fastest_key, fastest = min(here.values(), key=lambda x: x[1])
        choice_key, choice_s = here[ranked[0].layout]
        choices[group] = {"choice": choice_key, "choice_s": choice_s, "fastest": fastest_key, "fastest_s": fastest, "ratio": choice_s / fastest}
        lines.append(f"\n{group}: planner's first choice {choice_key} ({choice_s * 1e3:.0f} ms), fastest {fastest_key} "
                     f"({fastest * 1e3:.0f} ms): {choice_s / fastest:.2f}x")
    summary = {"scale": fitted.scale, "median_error": statistics.median(in_sample), "median_error_left_out": statistics.median(held_out),
               "rows": len(names), "choices": choices}
    print("\n".join(lines))
    print(f"\nmedian |error| over {len(names)} layouts x rates: {summary['median_error']:.1%} (calibrated on all), "
          f"{summary['median_error_left_out']:.1%} (each left out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measurements", type=Path, default=ROOT / "benchmarks" / "results" / "hybrid_vs_single_full_run1.json",
                        help="hybrid_vs_single.py --lengths full results (the cost model counts max_len positions per sample)")
    parser.add_argument("--measure-choice", action="store_true", help="run the planner's 4-process choice if it was not measured")
    parser.add_argument("--json", type=Path, default=None, help="default: results/planner_accuracy.json (--links: ..._links.json)")
    parser.add_argument("--links", type=Path, nargs="+", default=None, help="hybrid_vs_single.py --link-rates results (see above)")
    args = parser.parse_args(argv)
    if args.links:
        return links(args.links, args.json or ROOT / "benchmarks" / "results" / "planner_accuracy_links.json")
    args.json = args.json or ROOT / "benchmarks" / "results" / "planner_accuracy.json"
    hvs = _hybrid_vs_single()
    data = json.loads(args.measurements.read_text())
    if data.get("lengths", "full") != "full":
        parser.error(f"--measurements {args.measurements}: measured with --lengths {data['lengths']}; the planner's cost model "
                     "counts max_len positions per sample: use hybrid_vs_single.py --lengths full measurements")
    cfg = data["config"]
    model = ModelSpec(num_items=cfg["items"], d_model=cfg["d_model"], num_blocks=cfg["num_blocks"], num_heads=cfg["num_heads"],
                      seq_len=cfg["max_len"], global_batch=cfg["global_batch"], negatives=256)
    names, measurements = [], []
    for key, row in data["results"].items():
        processes, name = int(key.split("/")[0][1:]), key.split("/")[1]
        layout = layout_of(name, hvs.LAYOUTS[name], row["layout"], blocks_per_stage=row.get("blocks_per_stage"))
        measurements.append(Measurement(model, layout, cfg["global_batch"] / row["samples_per_s"], cpu_cluster(processes)))
        names.append(key)
    base = CostModel(cpu_cluster(2))
    fitted = calibrate(base, measurements)
    in_sample = relative_errors(fitted, measurements)
    held_out = [
        relative_errors(calibrate(base, measurements[:i] + measurements[i + 1 :]), [m])[0] for i, m in enumerate(measurements)
    ]
    lines = ["| P | layout | planner layout | measured (ms) | predicted (ms) | error | error, left out of the fit |", "|---|---|---|---|---|---|---|"]
    for key, m, e1, e2 in zip(names, measurements, in_sample, held_out, strict=True):
        predicted = dataclasses.replace(fitted, cluster=m.cluster).estimate(model, m.layout).step_s
        lines.append(f"| {key.split('/')[0][1:]} | {key.split('/')[1]} | {m.layout.describe()} | {m.step_s * 1e3:.0f} | "
                     f"{predicted * 1e3:.0f} | {e1:.0%} | {e2:.0%} |")
    summary: dict[str, Any] = {
        "scale": fitted.scale, "median_error": statistics.median(in_sample), "median_error_left_out": statistics.median(held_out),
        "rows": [{"layout": k, "measured_s": m.step_s, "error": e1, "error_left_out": e2}
                 for k, m, e1, e2 in zip(names, measurements, in_sample, held_out, strict=True)],
    }
    print("\n".join(lines))
    print(f"\nmedian |error|: {summary['median_error']:.1%} (calibrated on all), {summary['median_error_left_out']:.1%} (each left out)")
    print("multipliers:", {k: round(v, 3) for k, v in fitted.scale.items()})

    # plan quality on 4 processes
    four = dataclasses.replace(fitted, cluster=cpu_cluster(4))
    ranked = search(four, model)
    choice = ranked[0]
    measured4 = {m.layout: (k, m.step_s) for k, m in zip(names, measurements, strict=True) if k.startswith("P4/")}
    fastest_key, fastest = min(((k, s) for k, s in measured4.values()), key=lambda x: x[1])
    if choice.layout in measured4:
        choice_key, choice_measured = measured4[choice.layout]
    elif args.measure_choice:
        layout_kwargs = choice.layout.strategy_kwargs()
        if choice.layout.table == "row_wise":
            layout_kwargs["embedding_sharding"] = {"item_id": "row_wise"}
        ranks = hvs.run_distributed(hvs._worker, 4, hvs.FULL, layout_kwargs, 4, "cpu", "torchrec", data.get("lengths", "full"),
                                    init_process_group=False, timeout_s=1800)
        choice_key, choice_measured = "planner choice", cfg["global_batch"] / min(r["samples_per_s"] for r in ranks)
    else:
        choice_key, choice_measured = None, None
    summary["plan_quality"] = {
        "choice": choice.layout.describe(), "choice_predicted_s": choice.step_s, "choice_measured_s": choice_measured,
        "choice_is": choice_key, "fastest_measured": fastest_key, "fastest_measured_s": fastest,
        "ratio": (choice_measured / fastest) if choice_measured else None,
        "top5": [e.layout.describe() for e in ranked[:5]],
    }
    print(f"\nplanner's first choice on 4 processes: {choice.layout.describe()} (predicted {choice.step_s * 1e3:.0f} ms)")
    if choice_measured:
        print(f"measured {choice_measured * 1e3:.0f} ms ({choice_key}); fastest measured: {fastest_key} {fastest * 1e3:.0f} ms; "
              f"choice / fastest = {choice_measured / fastest:.3f}")
    else:
        print("not among the measured layouts; rerun with --measure-choice")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2, default=str))
    summary["table"] = "\n".join(lines)
    return summary


if __name__ == "__main__":
    main()
