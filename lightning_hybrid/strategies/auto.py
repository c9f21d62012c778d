"""``HybridStrategy(plan="auto")``: the planner's layout, merged with what the user chose.

`choose_layout` is a pure function of the configuration (every rank computes the same without
talking): it prices the job's layouts (`lightning_hybrid.planner`), and takes the fastest one
that, merged with the user's options, passes `options.validate` and agrees with every option the
user set explicitly (a degree, compression, the pipeline schedule or microbatches, a table's
sharding). Options the user set win: a layout that contradicts them is skipped, and when none is
left the error names the options that excluded the candidates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_hybrid.comm.compress import GradientCompression
from lightning_hybrid.strategies.options import HybridOptions, layer_pipeline_refusals, validate

#: the options a planned layout sets, and how (flat option name -> value from the layout)
PLANNED = ("data_parallel", "tensor_parallel", "pipeline_parallel", "pipeline_schedule", "pipeline_microbatches",
           "pipeline_virtual_stages", "pipeline_split", "shard_embeddings", "embedding_sharding", "embedding_shard_group_size",
           "gradient_compression")


def layout_options(layout: Any, options: HybridOptions, table_name: str | None) -> dict[str, Any]:
    """The flat options a planner `Layout` stands for."""
    out: dict[str, Any] = {
        "data_parallel": layout.dp,
        "tensor_parallel": layout.tp,
        "pipeline_parallel": layout.pp,
        "pipeline_schedule": layout.schedule,
        "pipeline_microbatches": layout.microbatches if layout.pp > 1 else None,
        "pipeline_virtual_stages": layout.virtual_stages,
        "shard_embeddings": layout.table != "replicated",
        "embedding_shard_group_size": layout.table_group,
    }
    if layout.pp > 1:  # (without a pipeline the split means nothing: the user's stays)
        out["pipeline_split"] = layout.split if isinstance(layout.split, str) else list(layout.split)
    sharding = dict(options.embedding.embedding_sharding or {})
    if layout.table == "row_wise" and table_name is not None:
        sharding.setdefault(table_name, "row_wise")
    out["embedding_sharding"] = (sharding or None) if layout.table != "replicated" else options.embedding.embedding_sharding
    kwargs = layout.strategy_kwargs().get("gradient_compression")
    out["gradient_compression"] = GradientCompression(**kwargs) if kwargs else None
    return out


def merge(
    layout: Any, options: HybridOptions, table_name: str | None, explicit: set[str] | None = None
) -> tuple[HybridOptions | None, str]:
    """``options`` with the layout's choices where the user made none; (None, why) when the layout
    contradicts an explicit option or the merged options are invalid. ``explicit``: the options
    the user set (default ``options.explicit()``; pass it when merging many layouts)."""
    planned = layout_options(layout, options, table_name)
    explicit = (options.explicit() if explicit is None else explicit) & set(PLANNED)
    flat = options.flat()
    conflicts = [name for name in sorted(explicit) if name in planned and planned[name] != flat[name]]
    if conflicts:
        return None, ", ".join(f"{n}={flat[n]!r} (planned {planned[n]!r})" for n in conflicts)
    merged = options.replace(**{k: v for k, v in planned.items() if k not in explicit})
    try:
        validate(merged)
    except (ValueError, TypeError) as error:
        return None, str(error)
    return merged, ""


def choose_layout(
    options: HybridOptions,
    *,
    module: Any,
    datamodule: Any,
    world_size: int,
    devices_per_node: int,
    device_type: str,
) -> tuple[HybridOptions, Any]:
    """(the options to run with, the planner's Estimate); sets the data module's per-replica
    ``batch_size`` so that the global batch stays what it was."""
    from lightning_hybrid.planner import CostModel, load_calibration, load_cluster, search
    from lightning_hybrid.planner.cost import ModelSpec

    per_replica = getattr(datamodule, "batch_size", None)
    if not isinstance(per_replica, int):
        raise ValueError(
            "HybridStrategy(plan='auto') keeps the global batch, which it reads from the data module's `batch_size` "
            f"attribute; {type(datamodule).__name__ if datamodule else 'no data module'} has none. Pass a data module "
            "with batch_size, or choose the layout yourself (plan='manual')."
        )
    layout = options.layout
    tp = layout.tensor_parallel if isinstance(layout.tensor_parallel, int) else 1
    pp = layout.pipeline_parallel if isinstance(layout.pipeline_parallel, int) else 1
    dp = layout.data_parallel if isinstance(layout.data_parallel, int) else world_size // (tp * pp)
    global_batch = per_replica * dp
    if hasattr(module, "planner_spec"):
        spec = module.planner_spec(global_batch)
    elif any(c.__name__ == "SASRec" for c in type(module).__mro__):
        spec = ModelSpec.from_sasrec(module, global_batch)
    else:
        raise ValueError(
            f"HybridStrategy(plan='auto') cannot describe {type(module).__name__} to the planner: define "
            "`planner_spec(self, global_batch) -> lightning_hybrid.planner.ModelSpec` on it, or use plan='manual'."
        )
    name = options.planning.cluster or ("cpu-2core" if device_type == "cpu" else "h100x8-ib400")
    cluster = load_cluster(name)
    cluster = dataclasses.replace(cluster, nodes=world_size // devices_per_node, devices_per_node=devices_per_node)
    cost = CostModel(cluster)
    if options.planning.planner_calibration:
        cost = cost.with_scale(load_calibration(options.planning.planner_calibration))
    ranked = search(cost, spec)
    table_name = "item_id" if hasattr(module, "item_tables") else None  # the reference recommender's table
    skipped: list[str] = []
    explicit = options.explicit()
    if options.embedding.embedding_shard_group_size == "node":
        # compare the user's "node" with the planner's group sizes as the number it stands for
        node = devices_per_node if devices_per_node < world_size else None
        options = options.replace(embedding_shard_group_size=node)
    for estimate in ranked:
        merged, why = merge(estimate.layout, options, table_name, explicit)
        if merged is not None and estimate.layout.pp > 1 and not hasattr(module, "pipeline_spec"):
            # without a spec the layers run through the layer pipeline, which refuses a schedule's options at setup
            refused = layer_pipeline_refusals(merged)
            if refused:
                merged, why = None, f"{', '.join(refused)} need a pipeline_spec() on {type(module).__name__}"
        if merged is not None:
            per_replica = global_batch // estimate.layout.dp
            datamodule.batch_size = per_replica
            rank_zero_info(
                f"HybridStrategy(plan='auto') on {world_size} devices of {cluster.name}: {estimate.layout.describe()}; "
                f"predicted {estimate.step_s * 1e3:.1f} ms/step, {estimate.samples_per_s:,.0f} samples/s; per-replica "
                f"batch {per_replica}" + (f"; {len(skipped)} faster layouts skipped for your options" if skipped else "") + "."
            )
            return merged, estimate
        skipped.append(f"{estimate.layout.describe()}: {why}")
    detail = "\n".join(f"  - {line}" for line in skipped[:8])
    raise ValueError(
        f"HybridStrategy(plan='auto'): no layout of this model fits on {world_size} devices of {cluster.name} "
        f"(global batch {global_batch}) and agrees with the options you set. "
        + (f"Candidates and why they were skipped:\n{detail}\n" if skipped else "")
        + "Add devices, shrink the model or batch, drop the conflicting options, or use plan='manual'."
    )
