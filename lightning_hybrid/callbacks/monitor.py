"""Throughput, step-time breakdown, utilization and communication of every training step.

`HybridMonitor` is added by `HybridStrategy` (``monitor=True``, the default) and logs through
Lightning's logger API, so CSV, TensorBoard and wandb all get the same keys, grouped by prefix so a
wandb workspace shows one panel section per group:

- ``throughput/``: ``samples_per_s`` (all replicas), ``samples_per_s_rank``, ``tokens_per_s``
  (non-zero entries of ``batch[token_key]``, when the batch has it);
- ``time/``: ``step_s`` and its parts ``embedding_s`` (forward of the sharded embedding modules:
  input all-to-all, lookup, output all-to-all), ``dp_exchange_s`` (waiting for the data-parallel
  exchange: the part of an overlapped exchange, DDP's or the explicit one, that backward did not
  hide (`lightning_hybrid.comm.hooks.ExposedWait`, `lightning_hybrid.comm.overlap`), local-SGD
  averages, stale-gradient waits), ``pipeline_idle_s`` (schedule time not spent
  in this rank's stage compute), ``optimizer_s`` (from ``on_before_optimizer_step`` to the end of
  the step: clipping and the step), ``tp_wait_s`` (tensor parallelism on CPU: waiting for the
  DTensor collectives, see `lightning_hybrid.parallel.tensor.TPWaitTimer`) and
  ``dense_compute_s``, the rest. On CPU these are host clocks of the step itself; on CUDA they
  are CUDA events on the current stream (`lightning_hybrid.timing.Stopwatch`), read when the
  next step ends (no added sync), so each logged step carries the previous step's times;
- ``utilization/``: ``compute_fraction`` (dense compute / step: the share of the step this rank
  computes rather than waits or communicates) and ``mfu`` (model FLOPs, 6 x dense parameters per
  token or sample, embedding tables left out, per second over ``world x peak_flops``; only with a
  known peak, the device's for the run's precision: bf16/fp16, or TF32/fp32 for fp32 runs; give
  ``flops_per_token`` where that convention is off, e.g. a sampled softmax);
- ``comm/``: bytes this rank sent in the previous step, per axis, logged by the strategy:
  ``dp_bytes_per_step`` (data-parallel exchange), ``tp_bytes_per_step`` (tensor-parallel layers),
  ``embedding_bytes_per_step`` (torchrec's input / output all-to-alls and row-wise
  reduce-scatters, forward and backward; `lightning_hybrid.parallel.embedding_comm`), and by the
  pipeline ``pp_bytes_per_step``; ``pipeline/*`` (bubble, imbalance) also come from the pipeline;
- ``embedding/params_rank{r}``: embedding parameters each rank holds (logged once, at the first step);
- on the steps the loggers write (every ``log_every_n_steps``; one all-reduce and one all-gather of
  a few numbers): ``embedding/lookups_served_rank{r}`` (ids the shards on rank ``r`` served this
  step, forward; the backward sends a gradient row per id to the same shard;
  `lightning_hybrid.parallel.lookup_load`), ``utilization/lookup_imbalance`` (their max/mean) and
  ``utilization/token_imbalance`` (max/mean of the real tokens per dp rank).

At the start of fit the resolved plan (mesh, sharding plan, pipeline split, compression) goes to
every logger's hyper-parameters and the embedding shard load per rank is logged; at the end of fit
`charts_dir` receives ``shard_balance.png`` (embedding rows per rank, and pipeline busy time per
stage when pipelined, and lookups served per rank over the logged steps when counted) and ``pipeline_timeline.png`` (each pp rank's forward/backward intervals of
the last step), also sent to a ``WandbLogger`` as images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_hybrid.parallel.pipeline import batch_size_of
from lightning_hybrid.timing import Stopwatch

# dense peak FLOP/s per device and math mode, for MFU when no peak is given and Lightning's own
# table (`get_available_flops`) does not know the device name (e.g. "NVIDIA H200" without a form factor)
_PEAKS = {
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
}


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting ("bf16-mixed" -> bfloat16, ...)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def detect_peak_flops(device: torch.device, precision: str = "32-true") -> float | None:
    """Peak dense FLOP/s of ``device`` for the run's math: bf16/fp16 peaks for mixed or half
    precision, TF32 or plain fp32 for fp32 runs (whichever torch's matmul setting allows). Lightning's
    table first (it tells H100 SXM from PCIe), then ``_PEAKS``; ``None`` on CPU or unknown devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    dtype = precision_dtype(precision)
    try:
        import warnings

        from lightning.fabric.utilities.throughput import get_available_flops

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (it warns about devices it does not know)
            peak = get_available_flops(device, dtype)
    except (ImportError, KeyError):
        peak = None
    if peak:
        return float(peak)
    name = torch.cuda.get_device_name(device)
    row = next((r for key, r in _PEAKS.items() if key in name), None)
    if row is None:
        return None
    if dtype != torch.float32:
        return row["bf16"]
    return row["tf32"] if torch.get_float32_matmul_precision() != "highest" else row["fp32"]


class HybridMonitor(pl.Callback):
    """Per-step throughput, time breakdown, utilization (see the module docstring for the keys).

    Args:
        token_key: batch entry whose non-zero elements count as tokens (``None``: no tokens/s).
        peak_flops: per-device peak FLOP/s for MFU (default: detected on known GPUs, else no MFU).
        flops_per_token: model FLOPs per token (or per sample without tokens); default 6 x the
            dense parameter count (forward + backward of a dense network; embedding tables, sharded
            or not, are lookups and left out).
        charts_dir: where the PNG charts go (default: ``<trainer.default_root_dir>/charts``).
        prog_bar: show samples/s and compute fraction in the progress bar.
    """

    def __init__(
        self,
        *,
        token_key: str | None = "input",
        peak_flops: float | None = None,
        flops_per_token: float | None = None,
        charts_dir: str | None = None,
        prog_bar: bool = True,
    ) -> None:
        self.token_key = token_key
        self.peak_flops = peak_flops
        self.flops_per_token = flops_per_token
        self.charts_dir = charts_dir
        self.prog_bar = prog_bar
        self._watch = Stopwatch()
        self._handles: list[Any] = []
        self._tp_timer: Any = None
        self._tp_wait_s: float | None = None
        self._logged_load = False
        self._batches = 0
        self._balance_step = False
        self.last: dict[str, float] = {}

    # -- fit start: hooks, plan, shard load ---------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        self._watch = Stopwatch(strategy.root_device)  # CUDA events on GPUs, read a step later
        for module in getattr(strategy, "sharded_modules", {}).values():
            self._handles.append(module.register_forward_pre_hook(self._embedding_start))
            self._handles.append(module.register_forward_hook(self._embedding_end))
        layout = _layout(strategy)
        if getattr(layout, "tensor_parallel", 1) > 1 and strategy.root_device.type == "cpu" and self._tp_timer is None:
            from lightning_hybrid.parallel.tensor import time_tensor_parallel_waits

            self._tp_timer = time_tensor_parallel_waits()  # (host waits mean nothing on CUDA, see TPWaitTimer)
        if self.peak_flops is None:
            self.peak_flops = detect_peak_flops(strategy.root_device, trainer.precision)
        if self.flops_per_token is None:
            tables = _table_parameter_names(strategy, pl_module)
            dense = sum(_global_numel(p) for n, p in pl_module.named_parameters() if p.requires_grad and n not in tables)
            if strategy.world_size > 1 and getattr(strategy, "pipeline_runner", None) is not None:
                total = torch.tensor(float(dense), dtype=torch.float64, device=strategy.root_device)
                dist.all_reduce(total, group=strategy.device_mesh["pp"].get_group())  # stages hold different layers
                dense = int(total)
            self.flops_per_token = 6.0 * dense
        plan = describe_plan(strategy)
        for logger in trainer.loggers:
            logger.log_hyperparams({"lightning_hybrid": plan})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._tp_timer is not None:
            self._tp_timer.close()
            self._tp_timer = None
        try:
            paths = write_charts(trainer, Path(self.charts_dir or Path(trainer.default_root_dir) / "charts"))
        except ImportError:
            return  # (matplotlib missing: no charts)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    for name, path in paths.items():
                        logger.log_image(key=f"charts/{name}", images=[str(path)])

    def _embedding_start(self, module: Any, _args: Any) -> None:
        self._watch.start(f"embedding:{id(module)}")

    def _embedding_end(self, module: Any, _args: Any, _out: Any) -> None:
        self._watch.stop(f"embedding:{id(module)}")

    # -- per step -------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._watch.discard()  # (spans between steps belong to no step)
        self._watch.start("step")
        self._tp_wait_s = None
        if self._tp_timer is not None:
            self._tp_timer.take()  # (waits between steps belong to no step)
        # balance counts on the steps the loggers write: the same steps on every rank (a collective)
        self._batches += 1
        self._balance_step = trainer.world_size > 1 and self._batches % max(1, trainer.log_every_n_steps) == 0
        counter = getattr(trainer.strategy, "lookup_counter", None)
        if counter is not None:
            counter.active = self._balance_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._watch.start("optimizer")
        if self._tp_timer is not None:  # waits from here on (clipping over DTensor shards) are optimizer time
            self._tp_wait_s = self._tp_timer.take()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._watch.stop("optimizer")
        self._watch.stop("step")
        times = self._watch.lap()  # this step's on CPU; the previous step's on CUDA (its events are done)
        if "step" not in times:
            return  # (the first step on CUDA: nothing is due yet)
        step_s = max(times["step"], 1e-9)
        embedding_s = sum(v for k, v in times.items() if k.startswith("embedding:"))
        strategy = trainer.strategy
        samples = max(batch_size_of(batch), 0)
        tokens = _tokens(batch, self.token_key)
        replicas = getattr(_layout(strategy), "data_parallel", 1) or 1
        dp_s = float(getattr(strategy, "comm_seconds_last_step", 0.0))
        # local SGD averages inside the optimizer step: that wait is dp exchange, not optimizer
        exchange = getattr(strategy, "dense_exchange", None)
        optimizer_s = max(0.0, times.get("optimizer", 0.0) - float(getattr(exchange, "seconds_in_optimizer_last_step", 0.0)))
        runner = getattr(strategy, "pipeline_runner", None)
        idle_s = 0.0
        if runner is not None and runner.last_step:
            idle_s = max(0.0, runner.last_step["schedule_s"] - runner.last_step["busy_s"])
        tp_s = 0.0
        if self._tp_timer is not None:
            tp_s = self._tp_wait_s if self._tp_wait_s is not None else self._tp_timer.take()
        compute_s = max(0.0, step_s - embedding_s - dp_s - idle_s - optimizer_s - tp_s)
        metrics = {
            "throughput/samples_per_s": samples * replicas / step_s,
            "throughput/samples_per_s_rank": samples / step_s,
            "time/step_s": step_s,
            "time/embedding_s": embedding_s,
            "time/dp_exchange_s": dp_s,
            "time/pipeline_idle_s": idle_s,
            "time/optimizer_s": optimizer_s,
            "time/dense_compute_s": compute_s,
            **({"time/tp_wait_s": tp_s} if self._tp_timer is not None else {}),
            "utilization/compute_fraction": compute_s / step_s,
        }
        work = tokens if tokens is not None else samples
        if tokens is not None:
            metrics["throughput/tokens_per_s"] = tokens * replicas / step_s
        if self.peak_flops and self.flops_per_token:
            metrics["utilization/mfu"] = self.flops_per_token * work * replicas / step_s / (strategy.world_size * self.peak_flops)
        if self._balance_step:
            metrics.update(balance_metrics(strategy, tokens))
        if not self._logged_load:
            self._logged_load = True
            for rank, held in enumerate(embedding_rows_per_rank(strategy)):
                metrics[f"embedding/params_rank{rank}"] = float(held)
        self.last = metrics
        shown = {"throughput/samples_per_s", "utilization/compute_fraction"} if self.prog_bar else set()
        for key, value in metrics.items():  # (every rank logs its own; loggers write rank 0's)
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=key in shown, batch_size=max(samples, 1))


# -- plan description and charts ----------------------------------------------------------------


def balance_metrics(strategy: Any, tokens: int | None) -> dict[str, float]:
    """Lookups served per rank (and their max/mean) and the max/mean of real tokens over dp ranks
    for this step; a collective: every rank calls it on the same steps."""
    out: dict[str, float] = {}
    counter = getattr(strategy, "lookup_counter", None)
    device = strategy.root_device if strategy.root_device.type == "cuda" else torch.device("cpu")
    if counter is not None:
        counter.active = False
        served = counter.take(device)
        for rank, value in enumerate(served):
            out[f"embedding/lookups_served_rank{rank}"] = value
        mean = sum(served) / len(served)
        out["utilization/lookup_imbalance"] = max(served) / mean if mean > 0 else 1.0
    if tokens is not None and dist.is_initialized():
        mesh = getattr(strategy, "device_mesh", None)
        group = mesh["dp"].get_group() if mesh is not None else None
        size = dist.get_world_size(group)
        mine = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(size)]
        dist.all_gather(gathered, mine, group=group)
        counts = torch.cat(gathered)
        out["utilization/token_imbalance"] = float(counts.max() / counts.mean()) if counts.mean() > 0 else 1.0
    return out


def describe_plan(strategy: Any) -> dict[str, Any]:
    """The resolved layout as plain values (for logger hyper-parameters)."""
    out: dict[str, Any] = {"world_size": strategy.world_size}
    plan = _layout(strategy)
    if plan is not None:
        out["plan"] = dataclasses.asdict(plan)
    sharding = getattr(strategy, "sharding_plan", None)
    if sharding is not None:
        from lightning_hybrid.parallel.embedding import plan_summary

        out["embedding_sharding"] = {t: {"type": s["sharding_type"], "kernel": s["compute_kernel"], "ranks": list(s["ranks"])} for t, s in plan_summary(sharding).items()}
    runner = getattr(strategy, "pipeline_runner", None)
    if runner is not None:
        out["pipeline"] = {"schedule": runner.schedule_name, "stages": runner.num_stages, "microbatches": runner.microbatches, "blocks_per_stage": list(runner.blocks_per_stage)}
    options = getattr(strategy, "options", None)
    compression = options.data.gradient_compression if options is not None else None
    out["gradient_compression"] = dataclasses.asdict(compression) if compression is not None else {"method": "none"}
    out["data_parallel_mode"] = options.data.data_parallel_mode if options is not None else "sync"
    out["dense_parallel"] = options.layout.dense_parallel if options is not None else "ddp"
    return out


def _layout(strategy: Any) -> Any:
    """The strategy's ParallelPlan, or None (another strategy, or before setup)."""
    try:
        return getattr(strategy, "plan", None)
    except RuntimeError:
        return None


def embedding_rows_per_rank(strategy: Any) -> list[int]:
    """Embedding parameters (rows x columns of its shards) each rank holds: the shard load."""
    held = [0] * strategy.world_size
    sharding = getattr(strategy, "sharding_plan", None)
    if sharding is None:
        return held
    for module_plan in sharding.plan.values():
        for param in module_plan.values():  # type: ignore[union-attr]
            spec = param.sharding_spec
            for shard in getattr(spec, "shards", None) or []:
                held[shard.placement.rank()] += int(shard.shard_sizes[0]) * int(shard.shard_sizes[1])
    return held


def write_charts(trainer: pl.Trainer, directory: Path) -> dict[str, Path]:
    """Collectively gather what the charts need; rank 0 draws them. Returns name -> path (rank 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategy = trainer.strategy
    runner = getattr(strategy, "pipeline_runner", None)
    timelines: list[Any] = [runner.timeline() if runner is not None else []]
    busy: list[float] = [runner.last_step.get("busy_s", 0.0) if runner is not None and runner.last_step else 0.0]
    if runner is not None and dist.is_initialized():
        gathered: list[Any] = [None] * runner.pp
        dist.all_gather_object(gathered, (timelines[0], busy[0]), group=runner.group)
        timelines = [g[0] for g in gathered]
        busy = [g[1] for g in gathered]
    if not trainer.is_global_zero:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    rows = embedding_rows_per_rank(strategy)
    counter = getattr(strategy, "lookup_counter", None)
    served = counter.total.tolist() if counter is not None and counter.total.sum() > 0 else None
    panels = 1 + (runner is not None) + (served is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.2), squeeze=False)
    axes[0][0].bar(range(len(rows)), rows, color="tab:blue")
    axes[0][0].set_xticks(range(len(rows)))
    axes[0][0].set_xlabel("rank")
    axes[0][0].set_ylabel("embedding parameters held")
    axes[0][0].set_title("embedding shard load")
    if runner is not None:
        axes[0][1].bar(range(len(busy)), busy, color="tab:orange")
        axes[0][1].set_xticks(range(len(busy)))
        axes[0][1].set_xlabel("pipeline rank")
        axes[0][1].set_ylabel("busy s (last step)")
        axes[0][1].set_title("pipeline stage balance")
    if served is not None:
        ax = axes[0][panels - 1]
        ax.bar(range(len(served)), served, color="tab:green")
        ax.set_xticks(range(len(served)))
        ax.set_xlabel("rank")
        ax.set_ylabel("lookups served (logged steps)")
        ax.set_title("embedding lookup load")
    fig.tight_layout()
    paths["shard_balance"] = directory / "shard_balance.png"
    fig.savefig(paths["shard_balance"], dpi=110)
    plt.close(fig)
    if runner is not None:
        colors = {"F": "tab:green", "B": "tab:red", "W": "tab:purple"}
        fig, ax = plt.subplots(figsize=(8, 0.6 + 0.6 * len(timelines)))
        for rank, events in enumerate(timelines):
            for kind, stage, start, end in events:
                ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (rank - 0.4, 0.8), color=colors.get(kind, "gray"))
                ax.text((start + end) / 2 * 1e3, rank, f"{kind}{stage}", ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(timelines)), [f"pp rank {r}" for r in range(len(timelines))])
        ax.set_xlabel("ms since the schedule started (last step); F forward, B backward, W weight grad")
        ax.set_title("pipeline timeline")
        fig.tight_layout()
        paths["pipeline_timeline"] = directory / "pipeline_timeline.png"
        fig.savefig(paths["pipeline_timeline"], dpi=110)
        plt.close(fig)
    return paths


def _global_numel(p: torch.Tensor) -> int:
    return int(p.numel())  # a DTensor's numel is its global size


def _table_parameter_names(strategy: Any, module: torch.nn.Module) -> set[str]:
    """Parameters of embedding tables (lookups: no FLOPs to speak of), sharded or not: under the
    strategy's sharded modules, in ``nn.Embedding`` / ``nn.EmbeddingBag``, or in a torchrec
    embedding collection (matched by class name, so torchrec need not be installed)."""
    prefixes = set(getattr(strategy, "sharded_modules", {}))
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Embedding | torch.nn.EmbeddingBag) or type(sub).__name__.endswith(
            ("EmbeddingCollection", "EmbeddingBagCollection")
        ):
            prefixes.add(name)
    return {n for n, _ in module.named_parameters() if any(n == f or n.startswith(f"{f}.") for f in prefixes)}


def _tokens(batch: Any, key: str | None) -> int | None:
    if key is None or not isinstance(batch, dict):
        return None
    value = batch.get(key)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    return int((value != 0).sum())
