"""HybridStrategy's options: small frozen groups, and the one function that checks them.

Every constructor argument of `HybridStrategy` is a field of one group below, under the same
name, with its documentation next to it (the strategy's docstring, which LightningCLI shows, is
made from these). `HybridOptions.from_kwargs` sorts the flat arguments into the groups;
`validate` is the single place where the rules between options live. It runs at construction
and again on the layout ``plan="auto"`` picks, so a planner-chosen layout obeys the same rules
as a hand-written one. Rules that need the model or the processes (table kinds, the world size)
are checked at setup, on every rank, before the first step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from lightning_hybrid.comm.compress import GradientCompression
from lightning_hybrid.comm.modes import MODES, DataParallelMode
from lightning_hybrid.launch import LauncherName, resolve_launcher
from lightning_hybrid.parallel.pipeline import ScheduleName, validate_pipeline_options
from lightning_hybrid.plan import AxisSize

KernelName = Literal["fused", "dense"]
NonFinitePolicy = Literal["stop", "skip", "warn", "off"]
DenseParallelName = Literal["ddp", "fsdp"]
PipelineSplitName = Literal["even", "balanced"]
PlanMode = Literal["manual", "auto"]


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True, kw_only=True)
class LayoutOptions:
    """How many ranks each mesh axis gets, and how the dense weights are split on them."""

    data_parallel: AxisSize = _doc("ranks on the data-parallel axis; ``\"auto\"`` uses every rank not used by other axes.", "auto")
    tensor_parallel: AxisSize = _doc("ranks on the tensor-parallel axis (``\"auto\"``: the devices of one node).", 1)
    tensor_parallel_plan: dict[str, str] | None = _doc(
        "module-name pattern -> ``\"colwise\"``/``\"rowwise\"`` (see `lightning_hybrid.parallel.tensor`); default: the "
        "LightningModule's ``tensor_parallel_plan()`` method.", None)
    dense_parallel: DenseParallelName = _doc(
        "how the dense parameters are data-parallel over ``dp``: ``\"ddp\"`` (replicated, gradients all-reduced) or "
        "``\"fsdp\"`` (FSDP2: weights, gradients and optimizer state sharded over ``dp``; composes with tensor_parallel).", "ddp")
    reshard_after_forward: bool = _doc(
        "with ``dense_parallel=\"fsdp\"``, free each block's gathered weights after its forward (less memory, one more "
        "all-gather in backward).", True)
    pipeline_parallel: AxisSize = _doc(
        "pipeline stages on the ``pp`` axis: a scheduled pipeline from the model's ``pipeline_spec()`` "
        "(`lightning_hybrid.parallel.pipeline`), or without one its layer stack split, its own forward routed through it "
        "(``pipeline_layers``).", 1)


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """How the pipeline runs (with ``pipeline_parallel > 1``)."""

    pipeline_schedule: ScheduleName = _doc(
        "``\"gpipe\"``, ``\"1f1b\"``, ``\"interleaved_1f1b\"`` or ``\"zero_bubble\"`` (the last two run "
        "``pipeline_virtual_stages`` >= 2 stages per rank).", "1f1b")
    pipeline_microbatches: int | None = _doc(
        "microbatches per batch (default: the number of stages); the batch size must be divisible by it.", None)
    pipeline_virtual_stages: int = _doc("stages per rank for the interleaved / zero-bubble schedules.", 1)
    pipeline_split: list[int] | PipelineSplitName = _doc(
        "blocks per stage: ``\"even\"``, ``\"balanced\"`` (profile each block on this hardware, then cut where the "
        "slowest stage is fastest; `lightning_hybrid.balance`), or an explicit list such as ``[3, 1]``.", "even")
    pipeline_layers: str | None = _doc(
        "for a module without ``pipeline_spec()``: the dotted path of the ``nn.ModuleList`` whose layers are split over "
        "the pp ranks, the module's own forward routed through them (default: the layer stack a Hugging Face model's "
        "``base_model_pp_plan`` names; `lightning_hybrid.parallel.layer_pipeline`).", None)
    pipeline_rebalance_every: int = _doc(
        "re-measure the stages every this many optimizer steps while training (the last <= 3 steps of each period) and "
        "move blocks, with their optimizer state, between pp ranks when the slowest stage exceeds the mean by "
        "``pipeline_rebalance_threshold`` (`lightning_hybrid.balance.adaptive`); 0: never.", 0)
    pipeline_rebalance_threshold: float = _doc(
        "measured max/mean stage time above which ``pipeline_rebalance_every`` moves blocks (when the new split is "
        "predicted >= 5% faster).", 1.1)


@dataclass(frozen=True, kw_only=True)
class DataParallelOptions:
    """How the dense gradients (or weights) travel on the data-parallel axis."""

    gradient_compression: GradientCompression | None = _doc(
        "a `lightning_hybrid.comm.GradientCompression` (fp16, bf16, PowerSGD, top-k, sign, with error feedback); "
        "default exact all-reduce. See `lightning_hybrid.comm`.", None)
    data_parallel_mode: DataParallelMode = _doc(
        "``\"sync\"`` (every step), ``\"local_sgd\"`` (average the dense weights every ``local_sgd_period`` steps after "
        "``local_sgd_warmup_steps`` synchronous ones) or ``\"async\"`` (apply the averaged gradients of "
        "``async_staleness`` steps ago while newer ones are in flight). Embedding tables stay synchronous.", "sync")
    local_sgd_period: int = _doc("steps between weight averages in ``local_sgd`` mode.", 4)
    local_sgd_warmup_steps: int = _doc("synchronous steps before ``local_sgd`` starts (post-local SGD).", 0)
    local_sgd_overlap: bool = _doc(
        "``local_sgd`` only: send each average in the background and apply it one period later, keeping each "
        "replica's progress since (Overlap Local-SGD): the link is hidden behind the period's steps.", False)
    async_staleness: int = _doc("steps between a gradient and its application in ``async`` mode.", 1)
    find_unused_parameters: bool = _doc("passed to DDP for the dense parameters.", False)
    static_graph: bool = _doc("passed to DDP for the dense parameters.", False)
    gradient_as_bucket_view: bool = _doc(
        "let dense gradients live in DDP's communication buckets (saves a copy and the memory of one gradient set "
        "per step; DDP's own default is False).", True)

    @property
    def compressing(self) -> bool:
        return self.gradient_compression is not None and self.gradient_compression.method != "none"


@dataclass(frozen=True, kw_only=True)
class EmbeddingOptions:
    """How torchrec embedding tables are sharded and which kernel updates them."""

    shard_embeddings: bool = _doc(
        "shard torchrec embedding modules (``False`` keeps them replicated: every rank holds each table whole and "
        "the user's optimizer updates it like any dense layer).", True)
    embedding_sharding: dict[str, str] | None = _doc(
        "table name -> forced sharding type (``\"table_wise\"``, ``\"row_wise\"``, ``\"column_wise\"``, "
        "``\"data_parallel\"``, ``\"table_row_wise\"``, ``\"table_column_wise\"``). Tables not named are placed by "
        "torchrec's planner.", None)
    embedding_kernels: dict[str, KernelName] | None = _doc(
        "table name -> ``\"fused\"`` (fbgemm optimizer inside backward, fast) or ``\"dense\"`` (keeps ``.grad`` for the "
        "module's own optimizer). Unnamed tables: fused when their optimizer has an exact fused equivalent on this "
        "device, else dense (with a warning).", None)
    embedding_constraints: dict[str, Any] | None = _doc(
        "table name -> torchrec ``ParameterConstraints`` for full control of the planner (Python API).", None)
    embedding_memory_per_rank: int | None = _doc(
        "bytes of device memory the planner may fill with tables per rank (default: torchrec's device default).", None)
    embedding_shard_group_size: int | Literal["node"] | None = _doc(
        "shard the tables inside consecutive groups of this many ranks (``\"node\"``: the processes of one node) and keep "
        "one copy of them per group, their gradients averaged across the copies each step (torchrec's 2D layout, "
        "`lightning_hybrid.parallel.table_groups`): the embedding all-to-alls stay inside a node. Dense kernel, "
        "tensor_parallel=1, pipeline_parallel=1. Default: one group of all ranks.", None)

    @property
    def any_set(self) -> bool:
        return bool(
            self.embedding_sharding or self.embedding_kernels or self.embedding_constraints or self.embedding_memory_per_rank
            or self.embedding_shard_group_size is not None
        )


@dataclass(frozen=True, kw_only=True)
class PlanningOptions:
    """Whether the planner chooses the layout."""

    plan: PlanMode = _doc(
        "``\"manual\"`` (the degrees and options given here) or ``\"auto\"``: before the processes connect, "
        "`lightning_hybrid.planner` prices every layout of this job on ``cluster`` and applies the fastest that fits "
        "and that these options allow (options you set yourself win: a planned layout that contradicts them is "
        "skipped), keeping the global batch. Needs the reference recommender (SASRec) or a module with "
        "``planner_spec(global_batch) -> ModelSpec``.", "manual")
    cluster: str | None = _doc(
        "for ``plan=\"auto\"``: a preset name (``lightning_hybrid.planner.PRESETS``) or a cluster YAML; default: "
        "``\"cpu-2core\"`` on CPU, ``\"h100x8-ib400\"`` otherwise, sized to this job.", None)
    planner_calibration: str | None = _doc(
        "JSON file with calibrated multipliers (``\"scale\"``), as written by ``benchmarks/planner_accuracy.py``.", None)


@dataclass(frozen=True, kw_only=True)
class ReliabilityOptions:
    """Input checks, the NaN policy, checkpoint writing, failure handling."""

    validate_inputs: bool = _doc(
        "check every id against its table's size before the lookup, and that the ranks of one tensor/pipeline-parallel "
        "replica got the same batch (first step of each epoch).", True)
    nonfinite_loss: NonFinitePolicy = _doc(
        "what a NaN/inf training loss on any rank does, decided alike on every rank: ``\"stop\"`` (raise on every rank), "
        "``\"skip\"`` (no backward and no update for that batch, anywhere; logged as ``train/skipped_steps``), "
        "``\"warn\"`` (carry on), or ``\"off\"`` (no check, no collective).", "stop")
    async_checkpoint: bool = _doc(
        "write checkpoints in the background (`dcp.async_save` on a separate gloo group): ``save_checkpoint`` returns "
        "once the state is copied to host memory; still atomic; the next save, a load, and the end of training wait for it.",
        False)
    timeout_s: float = _doc("collective timeout of the process group in seconds.", 1800.0)
    failure_grace_s: float = _doc(
        "how long a rank waits for its own error after another rank failed, before it stops itself "
        "(see `lightning_hybrid.failfast`).", 10.0)


@dataclass(frozen=True, kw_only=True)
class ProcessOptions:
    """How processes start and talk, and what is measured."""

    launcher: LauncherName = _doc(
        "``\"auto\"``, ``\"subprocess\"`` (re-run the script, like ``strategy=\"ddp\"``) or ``\"spawn\"``; ignored when "
        "torchrun/SLURM started the processes.", "auto")
    process_group_backend: str | None = _doc("``\"gloo\"``/``\"nccl\"``; default by device.", None)
    monitor: bool = _doc(
        "add a `lightning_hybrid.callbacks.HybridMonitor` (throughput, step-time breakdown, utilization, charts) unless "
        "the Trainer has one already.", True)


GROUPS: dict[str, type] = {
    "layout": LayoutOptions,
    "pipeline": PipelineOptions,
    "data": DataParallelOptions,
    "embedding": EmbeddingOptions,
    "planning": PlanningOptions,
    "reliability": ReliabilityOptions,
    "process": ProcessOptions,
}


@dataclass(frozen=True, kw_only=True)
class HybridOptions:
    """Every option of HybridStrategy, by group."""

    layout: LayoutOptions = field(default_factory=LayoutOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    data: DataParallelOptions = field(default_factory=DataParallelOptions)
    embedding: EmbeddingOptions = field(default_factory=EmbeddingOptions)
    planning: PlanningOptions = field(default_factory=PlanningOptions)
    reliability: ReliabilityOptions = field(default_factory=ReliabilityOptions)
    process: ProcessOptions = field(default_factory=ProcessOptions)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> HybridOptions:
        """Sort flat keyword arguments (HybridStrategy's) into their groups."""
        if isinstance(kwargs.get("gradient_compression"), dict):  # (from YAML without a class_path)
            kwargs["gradient_compression"] = GradientCompression(**kwargs["gradient_compression"])
        owner = _owners()
        unknown = sorted(set(kwargs) - set(owner))
        if unknown:
            raise TypeError(f"HybridStrategy got unknown options {unknown}; the options are {sorted(owner)}.")
        parts: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        for name, value in kwargs.items():
            parts[owner[name]][name] = value
        return cls(**{g: GROUPS[g](**values) for g, values in parts.items()})

    def flat(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, g), f.name) for g, cls in GROUPS.items() for f in fields(cls)}

    def replace(self, **changes: Any) -> HybridOptions:
        """A copy with the named flat options changed (the result is not validated: call `validate`)."""
        return HybridOptions.from_kwargs(**{**self.flat(), **changes})

    def explicit(self) -> set[str]:
        """The options whose value differs from its default (what the user chose)."""
        defaults = HybridOptions().flat()
        return {name for name, value in self.flat().items() if value != defaults[name]}


def _owners() -> dict[str, str]:
    return {f.name: g for g, cls in GROUPS.items() for f in fields(cls)}


def args_doc() -> str:
    """The ``Args:`` section of HybridStrategy's docstring, from the fields' documentation."""
    lines = ["Args:"]
    for cls in GROUPS.values():
        for f in fields(cls):
            lines.append(f"    {f.name}: {f.metadata['doc']}")
    return "\n".join(lines)


def _degree(value: AxisSize) -> int:
    return value if isinstance(value, int) else 1


def layer_pipeline_refusals(options: HybridOptions) -> list[str]:
    """The options the layer pipeline (a module without ``pipeline_spec()``: its stages run in turn
    through its own forward) cannot honour, named as the user would write them; empty when none."""
    opts = options.pipeline
    unsupported = {
        "pipeline_split='balanced'": opts.pipeline_split == "balanced",
        "pipeline_rebalance_every": opts.pipeline_rebalance_every > 0,
        f"pipeline_microbatches={opts.pipeline_microbatches}": opts.pipeline_microbatches is not None,
        f"pipeline_virtual_stages={opts.pipeline_virtual_stages}": opts.pipeline_virtual_stages != 1,
        f"pipeline_schedule={opts.pipeline_schedule!r}": "pipeline_schedule" in options.explicit(),
    }
    return [name for name, bad in unsupported.items() if bad]


def validate(options: HybridOptions, *, torchrec_available: bool = True) -> None:
    """Raise ValueError/TypeError/ImportError naming the options and the fix if ``options`` cannot
    run together. Pure: needs no processes, changes nothing; runs at construction and on the
    layout plan="auto" picks."""
    layout, pipe, data, embedding, reliability = options.layout, options.pipeline, options.data, options.embedding, options.reliability
    if not torchrec_available and embedding.any_set:
        raise ImportError(
            "HybridStrategy(embedding_sharding / embedding_kernels / embedding_constraints / embedding_memory_per_rank=...) "
            "needs torchrec, which cannot be imported here. Install torchrec and fbgemm-gpu (fbgemm-gpu-cpu on CPU), or "
            "drop the embedding options."
        )
    if torchrec_available:
        from lightning_hybrid.parallel.embedding import validate_sharding_types

        validate_sharding_types(embedding.embedding_sharding or {})
    for table, kernel in (embedding.embedding_kernels or {}).items():
        if kernel not in ("fused", "dense"):
            raise ValueError(f"HybridStrategy(embedding_kernels={{{table!r}: {kernel!r}}}): use 'fused' or 'dense'.")
    if not embedding.shard_embeddings and (embedding.embedding_sharding or embedding.embedding_kernels or embedding.embedding_constraints):
        raise ValueError(
            "HybridStrategy(shard_embeddings=False) keeps every table whole on every rank, so embedding_sharding / "
            "embedding_kernels / embedding_constraints have nothing to act on. Drop them, or set shard_embeddings=True."
        )
    _validate_table_groups(options)
    resolve_launcher(options.process.launcher)  # raises on unknown names
    dp = layout.data_parallel
    if dp != "auto" and (isinstance(dp, bool) or not isinstance(dp, int) or dp < 1):
        raise ValueError(f"HybridStrategy(data_parallel={dp!r}) must be a positive integer or 'auto'.")
    if reliability.timeout_s <= 0:
        raise ValueError(f"HybridStrategy(timeout_s={reliability.timeout_s}) must be positive.")
    if layout.dense_parallel not in ("ddp", "fsdp"):
        raise ValueError(f"HybridStrategy(dense_parallel={layout.dense_parallel!r}): use 'ddp' or 'fsdp'.")
    pp = _degree(layout.pipeline_parallel)
    validate_pipeline_options(
        schedule=pipe.pipeline_schedule, pipeline_parallel=pp, virtual_stages=pipe.pipeline_virtual_stages,
        microbatches=pipe.pipeline_microbatches,
    )
    if isinstance(pipe.pipeline_split, str) and pipe.pipeline_split not in ("even", "balanced"):
        raise ValueError(f"HybridStrategy(pipeline_split={pipe.pipeline_split!r}): use 'even', 'balanced' or a list of blocks per stage.")
    _validate_rebalance(pipe, layout, data, pp)
    if pp > 1 and layout.dense_parallel == "fsdp":
        raise ValueError(
            "HybridStrategy(pipeline_parallel > 1, dense_parallel='fsdp') is not supported yet: each stage's weights "
            "exist once per pipeline rank already; use dense_parallel='ddp' with pipelining."
        )
    if data.data_parallel_mode not in MODES:
        raise ValueError(f"HybridStrategy(data_parallel_mode={data.data_parallel_mode!r}): use one of {list(MODES)}.")
    if data.compressing and layout.dense_parallel == "fsdp":
        raise ValueError(
            "HybridStrategy(gradient_compression=..., dense_parallel='fsdp'): FSDP reduce-scatters gradients itself; "
            "use dense_parallel='ddp' to compress, or drop gradient_compression."
        )
    mode = data.data_parallel_mode
    if mode != "sync" and layout.dense_parallel == "fsdp":
        raise ValueError(
            f"HybridStrategy(data_parallel_mode={mode!r}, dense_parallel='fsdp') is not supported: FSDP shards the "
            "weights that local SGD / async updates keep whole on every replica. Use dense_parallel='ddp'."
        )
    if mode == "async" and data.compressing:
        raise ValueError(
            "HybridStrategy(data_parallel_mode='async') sends exact gradients in the background; combining it with "
            f"gradient_compression(method={data.gradient_compression.method!r}) is not supported (error feedback needs "
            "the compressed exchange to finish within the step). Use one or the other."
        )
    if mode != "sync" and pp > 1:
        raise ValueError(
            f"HybridStrategy(data_parallel_mode={mode!r}) with pipeline_parallel > 1 is not supported yet; use "
            "data_parallel_mode='sync' with pipelining."
        )
    if data.local_sgd_overlap and mode != "local_sgd":
        raise ValueError(
            f"HybridStrategy(local_sgd_overlap=True, data_parallel_mode={mode!r}): the overlap is local SGD's (it hides "
            "the weight average); set data_parallel_mode='local_sgd', or leave local_sgd_overlap=False."
        )
    if data.local_sgd_period < 1 or data.local_sgd_warmup_steps < 0 or data.async_staleness < 1:
        raise ValueError(
            f"HybridStrategy: local_sgd_period={data.local_sgd_period} and async_staleness={data.async_staleness} must "
            f"be >= 1, local_sgd_warmup_steps={data.local_sgd_warmup_steps} >= 0."
        )
    if options.planning.plan not in ("manual", "auto"):
        raise ValueError(f"HybridStrategy(plan={options.planning.plan!r}): use 'manual' or 'auto'.")
    if reliability.nonfinite_loss not in ("stop", "skip", "warn", "off"):
        raise ValueError(f"HybridStrategy(nonfinite_loss={reliability.nonfinite_loss!r}): use 'stop', 'skip', 'warn' or 'off'.")


def _validate_table_groups(options: HybridOptions) -> None:
    embedding, layout = options.embedding, options.layout
    size = embedding.embedding_shard_group_size
    if size is None:
        return
    name = f"HybridStrategy(embedding_shard_group_size={size!r}"
    if size != "node" and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
        raise ValueError(
            f"{name}): use an integer >= 2 (ranks per copy of the tables) or 'node'. To keep every table whole on every "
            "rank use embedding_sharding={table: 'data_parallel'} or shard_embeddings=False."
        )
    if not embedding.shard_embeddings:
        raise ValueError(f"{name}, shard_embeddings=False): there are no shards to group. Drop one of them.")
    fused = sorted(t for t, k in (embedding.embedding_kernels or {}).items() if k == "fused")
    if fused:
        raise ValueError(
            f"{name}, embedding_kernels={{{fused[0]!r}: 'fused'}}): the copies of a table average its gradient, which "
            "fbgemm's fused kernel does not keep. Use 'dense' for these tables (the default under table groups)."
        )
    if _degree(layout.tensor_parallel) > 1 or _degree(layout.pipeline_parallel) > 1:
        raise ValueError(
            f"{name}, tensor_parallel={layout.tensor_parallel}, pipeline_parallel={layout.pipeline_parallel}) is not "
            "supported: the ranks of one tp/pp replica split each lookup between them over the whole world. Use "
            "tensor_parallel=1 and pipeline_parallel=1 with table groups, or drop embedding_shard_group_size."
        )
    if options.data.data_parallel_mode != "sync":
        raise ValueError(
            f"{name}, data_parallel_mode={options.data.data_parallel_mode!r}) is not supported yet: the table copies average "
            "their gradients every step, which local SGD / async replicas would not match. Use data_parallel_mode='sync' "
            "(exact or gradient_compression) with table groups, or drop embedding_shard_group_size."
        )


def _validate_rebalance(pipe: PipelineOptions, layout: LayoutOptions, data: DataParallelOptions, pp: int) -> None:
    every = pipe.pipeline_rebalance_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"HybridStrategy(pipeline_rebalance_every={every!r}) must be an integer >= 0 (0: never rebalance).")
    if pipe.pipeline_rebalance_threshold < 1.0:
        raise ValueError(
            f"HybridStrategy(pipeline_rebalance_threshold={pipe.pipeline_rebalance_threshold}) is a max/mean ratio: use a value "
            ">= 1.0 (e.g. 1.1: move blocks when the slowest stage is 10% above the mean)."
        )
    if not every:
        return
    if layout.pipeline_parallel != "auto" and pp == 1:
        raise ValueError(
            f"HybridStrategy(pipeline_rebalance_every={every}) balances pipeline stages, but pipeline_parallel=1 has one. "
            "Set pipeline_parallel > 1, or drop pipeline_rebalance_every."
        )
    if _degree(layout.tensor_parallel) > 1:
        raise ValueError(
            f"HybridStrategy(pipeline_rebalance_every={every}, tensor_parallel={layout.tensor_parallel}) is not supported: "
            "blocks split by tensor parallelism hold DTensor shards, which the balancer does not move. Use "
            "pipeline_split='balanced' (measured once, at setup) with tensor_parallel, or tensor_parallel=1."
        )
    if data.compressing:
        raise ValueError(
            f"HybridStrategy(pipeline_rebalance_every={every}, gradient_compression={data.gradient_compression.method!r}) is "
            "not supported: the compressor's error-feedback state is kept per tensor and would not move with a block. "
            "Drop one of them (pipeline_split='balanced' balances once, at setup)."
        )


def validate_kwargs(kwargs: dict[str, Any], *, torchrec_available: bool = True) -> HybridOptions:
    """`HybridOptions.from_kwargs` then `validate`: what the constructor does with its arguments."""
    options = HybridOptions.from_kwargs(**kwargs)
    validate(options, torchrec_available=torchrec_available)
    return options


def markdown_table() -> str:
    """Every option, by group, with its default and documentation (docs/getting-started.md holds
    this table; a test keeps it equal to the code)."""
    rows = []
    for cls in GROUPS.values():
        rows.append(f"\n**{cls.__doc__.splitlines()[0].rstrip('.')}** (`{cls.__name__}`)\n")
        rows.append("| option | default | meaning |")
        rows.append("|---|---|---|")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            doc = " ".join(f.metadata["doc"].split()).replace("|", "/").replace("``", "`")
            rows.append(f"| `{f.name}` | `{default!r}` | {doc} |")
    return "\n".join(rows).strip() + "\n"


def strategy_doc() -> str:
    """HybridStrategy's docstring: what it does, then every option's documentation."""
    return f"""Hybrid parallelism for Lightning recommenders: torchrec-sharded tables, tensor-parallel and
pipelined dense layers, and compressed or asynchronous data parallelism, behind ``Trainer(strategy=...)``.

Every torchrec ``EmbeddingBagCollection`` / ``EmbeddingCollection`` in the LightningModule is sharded
across ranks by torchrec's planner; the dense rest is split by tensor and pipeline parallelism and
replicated (or FSDP-sharded) over the ``dp`` axis of the device mesh. The tables train with the
optimizer the module's ``configure_optimizers`` asks for (`lightning_hybrid.parallel.embedding_optim`).
Options are grouped and their rules checked in `lightning_hybrid.strategies.options`.

{args_doc()}
"""
