"""``lightning-hybrid plan``: choose a layout for a recipe on a cluster and write it as YAML.

    lightning-hybrid plan -c recipes/quickstart.yaml --cluster cpu-2core
    lightning-hybrid plan -c recipes/quickstart.yaml --cluster cluster.yaml --devices 64 \\
        --calibration benchmarks/results/planner_accuracy.json --out plan.yaml
    lightning-hybrid fit -c recipes/quickstart.yaml -c plan.yaml

The recipe's model must be the reference recommender (`lightning_hybrid.models.sasrec.SASRec`):
its hyper-parameters give the `ModelSpec`. The global batch is the recipe's per-replica
``data.batch_size`` times its data-parallel degree, and is kept fixed: the written plan sets
``data.init_args.batch_size`` to global batch / the new dp.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lightning_hybrid.planner.calibrate import load_calibration
from lightning_hybrid.planner.cluster import PRESETS, Cluster, load_cluster
from lightning_hybrid.planner.cost import CostModel, ModelSpec
from lightning_hybrid.planner.search import search


def model_spec_from_recipe(recipe: dict[str, Any]) -> tuple[ModelSpec, int]:
    """(spec, world size) of a LightningCLI recipe whose model is SASRec."""
    model = recipe.get("model") or {}
    path = model.get("class_path", "")
    if not path.endswith("SASRec"):
        raise ValueError(
            f"lightning-hybrid plan: the recipe's model is {path or 'missing'}; the planner's cost model describes the "
            "reference recommender (lightning_hybrid.models.sasrec.SASRec). Use the Python API "
            "(lightning_hybrid.planner.ModelSpec) for other models."
        )
    args = model.get("init_args") or {}
    data = (recipe.get("data") or {}).get("init_args") or {}
    items = args.get("num_items") or data.get("synthetic_items")
    if not items:
        raise ValueError("lightning-hybrid plan: give model.init_args.num_items (the data's item count) in the recipe.")
    trainer = recipe.get("trainer") or {}
    world = int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1))
    strategy = trainer.get("strategy") or {}
    options = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    tp, pp = int(options.get("tensor_parallel", 1)), int(options.get("pipeline_parallel", 1))
    dp = options.get("data_parallel", "auto")
    dp = world // (tp * pp) if dp == "auto" else int(dp)
    spec = ModelSpec(
        num_items=int(items), d_model=int(args.get("d_model", 64)), num_blocks=int(args.get("num_blocks", 2)),
        num_heads=int(args.get("num_heads", 2)), seq_len=int(args.get("max_len", 50)), mlp_ratio=int(args.get("mlp_ratio", 1)),
        global_batch=int(data.get("batch_size", 128)) * dp,
        negatives=int(args.get("num_negatives", 256)) if args.get("loss", "full") == "sampled" else None,
    )
    return spec, world


def sized_cluster(text: str, devices: int | None) -> Cluster:
    cluster = load_cluster(text)
    if devices is not None:
        if devices <= cluster.devices_per_node or cluster.cores_per_node is not None:
            cluster = dataclasses.replace(cluster, nodes=1, devices_per_node=devices)
        elif devices % cluster.devices_per_node:
            raise ValueError(f"--devices {devices} is not a whole number of {cluster.devices_per_node}-device nodes.")
        else:
            cluster = dataclasses.replace(cluster, nodes=devices // cluster.devices_per_node)
    return cluster


def plan_yaml(estimate: Any, spec: ModelSpec) -> dict[str, Any]:
    layout = estimate.layout
    # every layout option is written, so the plan overrides whatever the recipe had
    options: dict[str, Any] = {
        "data_parallel": layout.dp, "tensor_parallel": layout.tp, "pipeline_parallel": layout.pp,
        "pipeline_schedule": layout.schedule, "pipeline_microbatches": layout.microbatches if layout.pp > 1 else None,
        "pipeline_virtual_stages": layout.virtual_stages, "pipeline_split": layout.strategy_kwargs().get("pipeline_split", "even"),
        "shard_embeddings": layout.table != "replicated",
        "embedding_sharding": {"item_id": "row_wise"} if layout.table == "row_wise" else {},
        "embedding_shard_group_size": layout.table_group,
        "gradient_compression": layout.strategy_kwargs().get("gradient_compression"),
    }
    return {
        "trainer": {"strategy": {"class_path": "lightning_hybrid.HybridStrategy", "init_args": options}},
        "data": {"init_args": {"batch_size": spec.global_batch // layout.dp}},
    }


def main(argv: list[str]) -> list[Any]:
    import yaml

    parser = argparse.ArgumentParser(prog="lightning-hybrid plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="the recipe YAML (as for lightning-hybrid fit)")
    parser.add_argument("--cluster", default="cpu-2core", help=f"a cluster YAML or a preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--devices", type=int, default=None, help="plan for this many devices (default: the recipe's)")
    parser.add_argument("--calibration", default=None, help="JSON with calibrated multipliers ('scale'), e.g. from planner_accuracy.py")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the chosen plan here as YAML for `fit -c recipe.yaml -c plan.yaml`")
    args = parser.parse_args(argv)
    recipe = yaml.safe_load(Path(args.config).read_text())
    spec, world = model_spec_from_recipe(recipe)
    cluster = sized_cluster(args.cluster, args.devices or (world if args.cluster in PRESETS and PRESETS[args.cluster].cores_per_node else None))
    cost = CostModel(cluster)
    if args.calibration:
        cost = cost.with_scale(load_calibration(args.calibration))
    ranked = search(cost, spec)
    if not ranked:
        raise SystemExit(f"lightning-hybrid plan: no layout of {spec} fits on {cluster.name} ({cluster.world_size} devices).")
    print(f"{cluster.name}: {cluster.world_size} devices; global batch {spec.global_batch}; "
          f"{spec.dense_params / 1e6:.1f}M dense, {spec.table_params / 1e6:.1f}M embedding parameters")
    print("| rank | layout | predicted step (ms) | samples/s | utilization | memory (GB) |")
    print("|---|---|---|---|---|---|")
    for i, est in enumerate(ranked[: args.top]):
        print(f"| {i + 1} | {est.layout.describe()} | {est.step_s * 1e3:.1f} | {est.samples_per_s:,.0f} | {est.utilization:.2f} | "
              f"{est.memory_bytes / 1e9:.2f} |")
    if args.out:
        Path(args.out).write_text(yaml.safe_dump(plan_yaml(ranked[0], spec), sort_keys=False))
        print(f"wrote {args.out}: lightning-hybrid fit -c {args.config} -c {args.out}")
    return ranked
