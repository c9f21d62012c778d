"""The steps of HybridStrategy's setup other than table sharding (`strategies.tables`), each a
plain function the strategy calls in its fixed order (see `strategies.hybrid`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_hybrid.comm.exchange import DenseExchange
from lightning_hybrid.parallel import clip, pipeline
from lightning_hybrid.parallel import data as data_parallel
from lightning_hybrid.plan import ParallelPlan
from lightning_hybrid.strategies.options import HybridOptions, layer_pipeline_refusals


@dataclass
class TensorParallelApplied:
    loss_parallel: bool = False  # vocab-parallel logits: the loss runs under torch's loss_parallel()
    byte_counter: Any = None  # counts the tp collectives' bytes per step (None: the module split itself)


def apply_tensor_parallel(model: torch.nn.Module, mesh: DeviceMesh, plan: dict[str, str] | None, degree: int) -> TensorParallelApplied:
    """Step 1: split the blocks by ``plan``; without one, by the module's ``tensor_parallel_plan()``,
    else by the ``base_model_tp_plan`` of the Hugging Face models it holds (`parallel.hf`)."""
    from lightning_hybrid.parallel import hf
    from lightning_hybrid.parallel.tensor import apply_tensor_parallel as apply_plan
    from lightning_hybrid.parallel.tensor import count_tensor_parallel_bytes, uses_loss_parallel

    if plan is None:
        make_plan = getattr(model, "tensor_parallel_plan", None)
        if make_plan is None and data_parallel.has_dtensor_parameters(model):
            return TensorParallelApplied()  # the module split itself in configure_model (self.device_mesh["tp"])
        plan = make_plan() if make_plan is not None else hf.tensor_parallel_plan_of(model)
        if plan is None:
            raise ValueError(
                f"HybridStrategy(tensor_parallel={degree}) needs a plan: pass tensor_parallel_plan={{'pattern': "
                f"'colwise'|'rowwise', ...}}, define {type(model).__name__}.tensor_parallel_plan(), hold a Hugging Face "
                "model whose config has a base_model_tp_plan, or split the module yourself in configure_model() with "
                "self.device_mesh['tp']."
            )
        if make_plan is None:
            hf.check_divisible(model, degree)
            rank_zero_info(f"HybridStrategy(tensor_parallel={degree}): the Hugging Face models' own plan: {plan}")
    apply_plan(model, mesh["tp"], plan)
    return TensorParallelApplied(uses_loss_parallel(plan), count_tensor_parallel_bytes(model, plan, degree))


def apply_pipeline(
    model: torch.nn.Module,
    *,
    options: HybridOptions,
    mesh: DeviceMesh,
    device: torch.device,
    sharded: list[str],
    first_batch: Callable[[], Any],
    precision: Any = None,
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Step 3: this rank's stages. From the module's ``pipeline_spec()``: returns (PipelineRunner,
    spec, the balancer's report when ``pipeline_split="balanced"``); without one, the layer stack
    named by ``pipeline_layers`` or a Hugging Face model's ``base_model_pp_plan`` is split and the
    module's forward routed through it: returns (LayerPipeline, None, None)."""
    pp = mesh["pp"].size()
    make_spec = getattr(model, "pipeline_spec", None)
    opts = options.pipeline
    if make_spec is None:
        return _layer_pipeline(model, options, mesh, sharded), None, None
    spec = make_spec()
    split, report = opts.pipeline_split, None
    if split == "balanced":
        from lightning_hybrid.balance import balanced_split_for

        split, report = balanced_split_for(
            spec, first_batch(), pipeline_parallel=pp, virtual_stages=opts.pipeline_virtual_stages,
            microbatches=opts.pipeline_microbatches, device=device,
            forward_context=precision.forward_context if precision is not None else None,  # bf16 costs for a bf16 run
        )
    runner = pipeline.PipelineRunner(
        model, spec, pp_group=mesh["pp"].get_group(), device=device, blocks_per_stage=None if split == "even" else list(split),
        shared_exclude=sharded, schedule=opts.pipeline_schedule, microbatches=opts.pipeline_microbatches,
        virtual_stages=opts.pipeline_virtual_stages,
    )
    predicted = f", predicted max/mean stage time {report['plan'].imbalance:.3f}" if report else ""
    rank_zero_info(
        f"HybridStrategy pipeline: {runner.num_stages} stages over pp={runner.pp} ({opts.pipeline_schedule}, "
        f"{runner.microbatches} microbatches), blocks per stage {runner.blocks_per_stage}{predicted}"
    )
    return runner, spec, report


def _layer_pipeline(model: torch.nn.Module, options: HybridOptions, mesh: DeviceMesh, sharded: list[str]) -> Any:
    from lightning_hybrid.parallel import hf
    from lightning_hybrid.parallel.layer_pipeline import LayerPipeline

    pp, opts = mesh["pp"].size(), options.pipeline
    path = opts.pipeline_layers or hf.pipeline_layers_of(model)
    if path is None:
        raise ValueError(
            f"HybridStrategy(pipeline_parallel={pp}) needs to know what to cut into stages: define "
            f"{type(model).__name__}.pipeline_spec() returning a lightning_hybrid.parallel.pipeline.PipelineSpec (a scheduled "
            "pipeline), pass HybridStrategy(pipeline_layers='path.to.ModuleList') to split that layer stack with the "
            "module's own forward routed through it, or hold a Hugging Face model whose config has a base_model_pp_plan."
        )
    refused = layer_pipeline_refusals(options)
    if refused:
        raise ValueError(
            f"HybridStrategy(pipeline_parallel={pp}, {', '.join(refused)}): {type(model).__name__} has no pipeline_spec(), "
            f"so its layers {path!r} run one stage after another through its own forward (no schedule, no microbatches). "
            "Drop these options (pipeline_split may be 'even' or a list), or define pipeline_spec() for a scheduled pipeline."
        )
    split = None if opts.pipeline_split == "even" else list(opts.pipeline_split)
    layers = LayerPipeline(model, path, pp_group=mesh["pp"].get_group(), blocks_per_stage=split, shared_exclude=sharded)
    rank_zero_info(
        f"HybridStrategy pipeline: the layers {path!r} split over pp={pp} ({layers.blocks_per_stage} per stage), the "
        f"module's forward routed through them (no pipeline_spec(): stages run in turn, no microbatches)"
    )
    return layers


def pipeline_overlap(
    runner: Any, options: Any, accumulate_grad_batches: int
) -> tuple[Callable[[], int], list[torch.nn.Parameter]] | None:
    """What the dp exchange needs to overlap with a scheduled pipeline's backward (its
    microbatch count, its stages' parameters), or None where it must wait for the schedule:
    no scheduled pipeline; gradient accumulation (the earlier micro-batches' gradients are set
    aside during the schedule, so a bucket started then would miss them); the zero-bubble
    schedule (it writes weight gradients itself, past the hooks); the adaptive balancer (it
    moves parameters between stages)."""
    if runner is None or accumulate_grad_batches != 1 or options.pipeline_rebalance_every > 0:
        return None
    if runner.schedule_name not in ("gpipe", "1f1b", "interleaved_1f1b"):
        return None
    return (lambda: runner.current_microbatches), runner.stage_parameters()


def apply_data_parallel(
    model: torch.nn.Module,
    *,
    options: HybridOptions,
    layout: ParallelPlan,
    mesh: DeviceMesh,
    sharded: list[str],
    device: torch.device,
    names: Callable[[], dict[int, str]],
    local_world_size: int,
    sync_allowed: Callable[[], bool] = lambda: True,
    pipeline_overlap: tuple[Callable[[], int], list[torch.nn.Parameter]] | None = None,
) -> tuple[torch.nn.Module, DenseExchange | None]:
    """Step 4 (fitting): FSDP2, DDP, or the explicit exchange over the dense rest; returns (the
    module Lightning should call, the exchange). ``sync_allowed``: False inside the strategy's
    ``block_backward_sync`` (gradient accumulation); ``pipeline_overlap``: see
    `DenseExchange.build`."""
    data = options.data
    dp_group = mesh["dp"].get_group()

    def exchange(explicit: list[torch.nn.Parameter] | None) -> DenseExchange:
        return DenseExchange.build(
            mesh=mesh, compression=data.gradient_compression, mode=data.data_parallel_mode, local_world_size=local_world_size,
            explicit_params=explicit, names=names() if explicit is not None else None, local_sgd_period=data.local_sgd_period,
            local_sgd_warmup_steps=data.local_sgd_warmup_steps, local_sgd_overlap=data.local_sgd_overlap, async_staleness=data.async_staleness,
            sync_allowed=sync_allowed, pipeline_overlap=pipeline_overlap,
        )

    if options.layout.dense_parallel == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            data_parallel.shard_dense_fully(
                model, ignored_modules=sharded, dp_mesh=mesh["dp"], reshard_after_forward=options.layout.reshard_after_forward
            )
        return model, None
    if layout.tensor_parallel > 1 or layout.pipeline_parallel > 1 or data.data_parallel_mode != "sync":
        # DDP cannot hook DTensor parameters, a pipeline stage's replicas are a sub-group, and
        # local SGD / async decide themselves when to communicate: an explicit exchange
        params = dense_params(model, sharded)
        if data.data_parallel_mode != "sync" and layout.tensor_parallel == 1:  # (DDP would have made the replicas equal)
            data_parallel.broadcast_dense_state(model, ignored_modules=sharded, process_group=dp_group)
        return model, exchange(params)
    wrapped = data_parallel.wrap_dense_data_parallel(
        model, ignored_modules=sharded, process_group=dp_group, device=device,
        find_unused_parameters=data.find_unused_parameters, static_graph=data.static_graph,
        gradient_as_bucket_view=data.gradient_as_bucket_view,
    )
    dense = exchange(None)
    if isinstance(wrapped, DistributedDataParallel):
        dense.register_ddp_hook(wrapped)
    return wrapped, dense


def dense_params(model: torch.nn.Module, sharded: list[str]) -> list[torch.nn.Parameter]:
    """The trainable parameters outside the torchrec-sharded modules ``sharded`` (what the
    explicit dp exchange all-reduces)."""
    names_sharded = set(data_parallel.names_under(model, sharded))
    return [p for n, p in model.named_parameters() if p.requires_grad and n not in names_sharded]


def apply_clipping(
    plugin: Any,
    *,
    tables: Any,
    layout: ParallelPlan,
    options: HybridOptions,
    mesh: DeviceMesh,
    runner: pipeline.PipelineRunner | None,
    clip_val: float | None,
) -> None:
    """Make the precision plugin's norm clipping use the global norm across table shards, tp
    shards and pipeline stages (`lightning_hybrid.parallel.clip`)."""
    fused_ids = tables.fused_param_ids()
    dp_ids = {id(p) for p in tables.dp_table_params}
    sharded_ids = {id(p) for m in tables.modules.values() for p in m.parameters() if id(p) not in fused_ids and id(p) not in dp_ids}
    if clip_val and fused_ids:
        rank_zero_warn(
            "HybridStrategy: gradient clipping does not reach embedding tables on the fused kernel (fbgemm updates them "
            "inside backward). Set HybridStrategy(embedding_kernels={table: 'dense'}) for tables that must be clipped."
        )
    pp = layout.pipeline_parallel
    if not sharded_ids and layout.tensor_parallel == 1 and options.layout.dense_parallel == "ddp" and pp == 1:
        return
    stage_group = mesh["pp"].get_group() if pp > 1 else None
    stage_shared = {id(p) for p in runner.shared_params} if runner is not None else set()

    def clip_grad_by_norm(optimizer: Optimizer, value: float) -> None:
        clip.clip_grad_norm_across_shards(
            plugin.main_params(optimizer), sharded_ids, float(value), group=tables.shard_group, stage_group=stage_group,
            stage_shared_ids=stage_shared,
        )

    plugin.clip_grad_by_norm = clip_grad_by_norm  # (Lightning's plugin owns clipping; only the norm changes)


def check_loss_scaling(plugin: Any, *, pipelined: bool, world_size: int, tables: Any = None, optimizers: Any = ()) -> None:
    """fp16 loss scaling (precision="16-mixed"): refused under pipelining, with fused tables and
    with ``fused=True`` torch optimizers; otherwise every rank must skip the same steps (shards
    overflow on one rank only: `lightning_hybrid.parallel.amp`)."""
    scaler = getattr(plugin, "scaler", None)
    if scaler is None:
        return
    if pipelined:
        raise ValueError(
            "HybridStrategy(pipeline_parallel > 1) does not support precision='16-mixed' (fp16 loss scaling is not "
            "wired into the pipeline schedule). Use precision='bf16-mixed' or '32-true'."
        )
    fused_tables = sorted(tables.choice.fused) if tables is not None and tables.choice is not None else []
    if fused_tables:
        # fbgemm updates fused tables inside backward with the gradient as it arrives: the loss-scaled
        # one (steps 2**16 times too large), and before GradScaler can see an overflow and skip
        raise ValueError(
            f"HybridStrategy: precision='16-mixed' with fused embedding tables {fused_tables} is not supported: fbgemm "
            "updates them inside backward with the loss-scaled gradient, before an overflow can skip the step. Use "
            "precision='bf16-mixed' (no loss scaling), or embedding_kernels={table: 'dense'} for these tables."
        )
    for optimizer in optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)
        if any(group.get("fused") for group in getattr(inner, "param_groups", [])):
            raise ValueError(
                f"HybridStrategy: precision='16-mixed' with {type(inner).__name__}(fused=True) is not supported: Lightning "
                "lets fused optimizers unscale themselves, which skips the cross-rank overflow agreement, so ranks whose "
                "shards overflowed would skip steps the others take. Use fused=False, or precision='bf16-mixed'."
            )
    if world_size > 1:
        from lightning_hybrid.parallel.amp import synchronize_found_inf

        synchronize_found_inf(scaler)
