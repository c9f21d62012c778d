"""Pipeline parallelism over the mesh's ``pp`` axis with ``torch.distributed.pipelining``.

A model takes part by describing itself as a `PipelineSpec`: the ``nn.ModuleList`` of blocks
that is cut into stages, what runs before the first block (``first``: the dense part of the
input, e.g. adding positions to the embedding lookups) and after the last one (``last``: the loss
of one microbatch), and optionally the embedding ``lookup`` of the whole batch. `PipelineRunner`
builds the stages and a schedule and runs one training step or one forward pass.

Stages and ranks: the blocks are cut into ``pp * virtual_stages`` contiguous stages; rank ``r`` of
the pp group runs stages ``r, r + pp, r + 2 pp, ...`` (one stage per rank for GPipe and 1F1B,
several for the interleaved and zero-bubble schedules). Each rank keeps only its own blocks (the
others are replaced by `ElsewhereInThePipeline` placeholders, which hold nothing and, if called,
say how to evaluate under a pipeline), the first stage's rank keeps ``first_modules`` and the
last stage's rank ``last_modules``: weights, gradients and optimizer state exist once per pp group.

Embedding tables and the pipeline: torchrec shards the tables over *all* ranks, and its lookups
are collectives, which must not run inside the schedule (only the first stage would call them).
So the lookup of the whole batch runs on every rank before the schedule, each pp rank looking up
``1/pp`` of it (`lightning_hybrid.parallel.replica_lookup`); the first stage reads its microbatch
rows from the result, detached, so the schedule accumulates their gradient; after the schedule,
every rank runs the lookup's backward together (the gradient reaches each slice's owner, then
torchrec's all-to-all). Tables therefore stay spread over the whole cluster, not over the first
stage's ranks only, and their all-to-alls run once per step, not once per microbatch.

Parameters outside the stages: whatever the stages do not own (a replicated embedding table that
``lookup`` reads, a module ``first`` uses but ``first_modules`` does not name) stays on every pp
rank, yet only the first stage's copy is reached by the loss. Their gradients are summed over the
pp group after each step, so every copy takes the same update and stays equal to the others (the
checkpoint may write any of them). torchrec-sharded tables are excluded: their lookup backward
already runs on every rank together.

Loss: the loss of a step is the mean of the microbatch losses (as with gradient accumulation);
every rank gets it (broadcast from the last stage) so logging and callbacks see the same value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_hybrid.parallel.pipeline_checks import (  # noqa: F401 - re-exported: the runner's checks
    MULTI_STAGE,
    SCHEDULES,
    ScheduleName,
    check_batch_divides,
    check_loader_batches,
    check_stage_count,
    validate_pipeline_options,
)
from lightning_hybrid.timing import Stopwatch


@dataclass
class PipelineSpec:
    """How a model runs as a pipeline (returned by ``LightningModule.pipeline_spec()``).

    Attributes:
        blocks: the layers cut into stages, in order; each maps hidden -> hidden of the same shape.
        first: ``first(microbatch, lookups)`` -> the input of ``blocks[0]``; ``lookups`` are the rows
            of ``lookup(batch)`` for this microbatch (None without ``lookup``). Runs on the first stage.
        last: ``last(hidden, microbatch)`` -> the mean loss of the microbatch. Runs on the last stage.
        block_forward: ``block_forward(block, hidden, microbatch)`` -> hidden; how one block is
            called (e.g. with an attention mask built from the microbatch). Default ``block(hidden)``.
        lookup: ``lookup(batch)`` -> a tensor whose first dimension is the batch: the embedding
            lookups of the whole batch. Runs on every rank (torchrec lookups are collectives).
        first_modules: attribute names of the modules only ``first`` uses (kept on the first stage).
        last_modules: attribute names of the modules only ``last`` uses (kept on the last stage).
        log_name: if set, HybridStrategy logs the step's loss under this name (``training_step``
            itself does not run under pipelining).
    """

    blocks: nn.ModuleList
    first: Callable[[Any, torch.Tensor | None], torch.Tensor]
    last: Callable[[torch.Tensor, Any], torch.Tensor]
    block_forward: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor] = field(default=lambda block, x, mb: block(x))
    lookup: Callable[[Any], torch.Tensor] | None = None
    first_modules: Sequence[str] = ()
    last_modules: Sequence[str] = ()
    log_name: str | None = None


def parameters_outside(model: nn.Module, owned: set[int], exclude: Sequence[str]) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that are not in ``owned`` (ids of this rank's stage
    parameters) nor under the submodules named in ``exclude`` (torchrec-sharded tables, whose
    lookup backward already runs on every rank): one copy per pp rank, kept equal by `sum_gradients`."""
    if "" in exclude:  # the model itself is sharded: nothing of it is ours to share
        return []
    prefixes = tuple(f"{name}." for name in exclude if name)
    return [p for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned and not name.startswith(prefixes)]


def sum_gradients(params: Sequence[nn.Parameter], group: dist.ProcessGroup) -> None:
    """All-reduce (sum) the gradients of ``params`` over ``group`` in one flat buffer; a missing
    gradient counts as zero. DTensor gradients are summed shard by shard."""
    if not params:
        return
    from torch.distributed.tensor import DTensor

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def pipeline_runner(module: nn.Module) -> PipelineRunner | None:
    """The runner HybridStrategy attached to ``module`` (None when it is not pipelined).

    Evaluation code uses it: ``runner.forward(batch, batch_size)`` is the last block's output on
    the last stage's ranks and None on the others (which then skip their metric update).
    """
    return module.__dict__.get("_lightning_hybrid_pipeline")


def even_split(num_blocks: int, num_stages: int) -> list[int]:
    """Blocks per stage, as equal as possible (earlier stages take the remainder)."""
    check_stage_count(num_blocks, num_stages)
    base, extra = divmod(num_blocks, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def stage_ranges(blocks_per_stage: Sequence[int]) -> list[range]:
    """Stage index -> the block indices it runs."""
    ranges, start = [], 0
    for count in blocks_per_stage:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def batch_size_of(batch: Any) -> int:
    """The first dimension of the first tensor in ``batch`` (dicts, lists, tuples, KJTs); -1 if none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else -1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else None
    if values is not None:
        for value in values:
            size = batch_size_of(value)
            if size >= 0:
                return size
        return -1
    stride = getattr(batch, "stride", None)
    return int(stride()) if callable(stride) else -1


def _shapes(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape),)
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return tuple(s for value in values for s in _shapes(value))


def slice_microbatch(batch: Any, index: torch.Tensor, batch_size: int) -> Any:
    """The rows ``index`` of every tensor in ``batch`` whose first dimension is the batch."""
    if isinstance(batch, torch.Tensor):
        return batch[index] if batch.dim() > 0 and batch.shape[0] == batch_size else batch
    if isinstance(batch, dict):
        return {k: slice_microbatch(v, index, batch_size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_microbatch(v, index, batch_size) for v in batch)
    return batch


class ElsewhereInThePipeline(nn.Module):
    """Stands in for a block or module another pipeline rank runs: no parameters (checkpoints and
    optimizers see only this rank's), and a clear error when called, e.g. by a ``validation_step``
    that runs ``self(batch)`` as it would without a pipeline."""

    def __init__(self, name: str, stage_rank: int | None) -> None:
        super().__init__()
        self.name = name
        self.stage_rank = stage_rank

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        where = f"pipeline rank {self.stage_rank}" if self.stage_rank is not None else "another pipeline rank"
        raise RuntimeError(
            f"HybridStrategy(pipeline_parallel > 1): {self.name!r} runs on {where}, not here, so the module cannot be "
            "called whole on this rank. Under a pipeline, evaluate through the stages: in validation_step / test_step / "
            "predict_step write `runner = lightning_hybrid.specs.pipeline_runner(self)` and, when it is not None, "
            "`hidden = runner.forward(batch, batch_size)` (the last block's output on the last stage's ranks, None on the "
            "others, which then skip their metric update); see SASRec.validation_step. Or evaluate the checkpoint "
            "with pipeline_parallel=1 (checkpoints reshard on load)."
        )


class _Stage(nn.Module):
    """One pipeline stage: (first part) + its blocks.

    Only the hidden state travels between stages. Which rows of the batch a forward call is about
    is known locally: every schedule runs a stage's forwards in microbatch order, so the i-th call
    of a step is microbatch i. (torch also calls the stage once on placeholder tensors to infer
    shapes, the first time a schedule runs; `_InferringStage` flags that call, which is then
    given microbatch 0's rows and not counted.)
    """

    def __init__(self, runner: PipelineRunner, index: int, block_ids: range, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self._runner = [runner]  # a list: not registered as a submodule
        self.stage_index = index
        self.block_ids = list(block_ids)
        self.blocks = nn.ModuleList(runner.spec.blocks[i] for i in block_ids)
        self.is_first = is_first
        self.is_last = is_last
        self.calls = 0
        self.inferring = False
        self.busy_s = 0.0
        self.events: list[tuple[str, int, float, float]] = []  # (F/B/W, stage, start, end) of the last step
        model = runner.model
        spec = runner.spec
        # first/last modules are registered here too, so the stage owns (and syncs) their weights
        self.extra = nn.ModuleDict(
            {
                name.replace(".", "__"): model.get_submodule(name)
                for name in [*(spec.first_modules if is_first else ()), *(spec.last_modules if is_last else ())]
            }
        )

    def forward(self, *inputs: torch.Tensor) -> Any:
        runner = self._runner[0]
        index = runner.microbatch_rows(0 if self.inferring else self.calls)
        if not self.inferring:
            self.calls += 1
        mb = runner.microbatch(index)
        # measuring steps (`lightning_hybrid.balance.adaptive`) time each part's forward
        timed = runner.timed if runner.measuring and runner.training_step_running and not self.inferring else _untimed
        if self.is_first:
            x = timed("first", runner.spec.first, mb, runner.lookups_for(index))
        else:
            (x,) = inputs
            if runner.training_step_running and not self.inferring:
                runner.sent_bytes += x.numel() * x.element_size()  # its gradient goes back in backward
        for i, block in zip(self.block_ids, self.blocks, strict=True):
            x = timed(i, runner.spec.block_forward, block, x, mb)
        if self.is_last and runner.training_step_running:
            # the loss is computed inside the last stage, not in the schedule's loss_fn: weights
            # used there (final norm, output layer) would otherwise be outside the stage, and the
            # zero-bubble schedules free the stage output that such a loss_fn saves for backward
            x = timed("last", runner.spec.last, x, mb) * (runner.loss_scale / runner.current_microbatches)
        elif not self.inferring:
            runner.sent_bytes += x.numel() * x.element_size()  # the activation goes to the next stage
        return x


def _inferring_stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class InferringStage(PipelineStage):
        """torch's stage, marking its shape-inference forward on the wrapped `_Stage`, and
        timing its compute (forward, input-grad and weight-grad backward; not the waits for
        neighbouring stages, which the schedule does outside these calls)."""

        def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
            self.submod.inferring = True
            try:
                return super()._forward_metadata_inference(*args, **kwargs)
            finally:
                self.submod.inferring = False

        def _timed(self, kind: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            runner = self.submod._runner[0]
            runner.sync_if_measuring()
            started = time.perf_counter()
            runner.watch.start("busy")
            try:
                return method(*args, **kwargs)
            finally:
                runner.watch.stop("busy")
                runner.sync_if_measuring()
                ended = time.perf_counter()
                self.submod.busy_s += ended - started
                self.submod.events.append((kind, self.stage_index, started, ended))

        def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            return self._timed("F", super().forward_one_chunk, *args, **kwargs)

        def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            return self._timed("B", super().backward_one_chunk, *args, **kwargs)

        def backward_weight_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            return self._timed("W", super().backward_weight_one_chunk, *args, **kwargs)

    return InferringStage


def _untimed(_key: Any, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _InferringStage(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory, imported lazily
    return _inferring_stage_class()(*args, **kwargs)


class PipelineRunner:
    """Runs a `PipelineSpec` model as a pipeline over ``pp_group``.

    Build it after tensor parallelism and embedding sharding (it prunes blocks this rank does not
    run) and before the optimizer is created.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: PipelineSpec,
        *,
        pp_group: dist.ProcessGroup,
        device: torch.device,
        schedule: str = "1f1b",
        microbatches: int | None = None,
        virtual_stages: int = 1,
        blocks_per_stage: Sequence[int] | None = None,
        shared_exclude: Sequence[str] = (),
    ) -> None:
        """``shared_exclude``: names of submodules whose parameters are not this runner's to keep
        equal across stages (torchrec-sharded tables); see the module docstring."""
        self.model = model
        self.spec = spec
        self.group = pp_group
        self.device = device
        self.schedule_name = schedule
        self.pp = dist.get_world_size(pp_group)
        self.pp_rank = dist.get_rank(pp_group)
        validate_pipeline_options(schedule=schedule, pipeline_parallel=self.pp, virtual_stages=virtual_stages, microbatches=microbatches)
        self.num_stages = self.pp * virtual_stages
        num_blocks = len(spec.blocks)
        check_stage_count(num_blocks, self.num_stages, schedule)
        if blocks_per_stage is None:
            blocks_per_stage = even_split(num_blocks, self.num_stages)
        blocks_per_stage = list(blocks_per_stage)
        if len(blocks_per_stage) != self.num_stages or sum(blocks_per_stage) != num_blocks or min(blocks_per_stage) < 1:
            raise ValueError(
                f"Pipeline split {blocks_per_stage} must give each of the {self.num_stages} stages at least one block and "
                f"cover all {num_blocks} blocks exactly."
            )
        self.microbatches = microbatches or self.num_stages
        validate_pipeline_options(schedule=schedule, pipeline_parallel=self.pp, virtual_stages=virtual_stages, microbatches=self.microbatches)
        self.local_stage_ids = list(range(self.pp_rank, self.num_stages, self.pp))
        self.is_first_rank = 0 in self.local_stage_ids
        self.is_last_rank = (self.num_stages - 1) in self.local_stage_ids
        self.last_rank_global = dist.get_global_rank(pp_group, (self.num_stages - 1) % self.pp)
        self.skeletons: dict[int, nn.Module] = {}  # blocks other ranks run, on the meta device (no memory)
        self.measuring = False  # see `lightning_hybrid.balance.adaptive`
        self.watch = Stopwatch(device)  # busy / schedule seconds of last_step (CUDA events, a step late)
        self.part_s: dict[Any, float] = {}  # measured forward seconds per part ("first", block index, "last")
        self.stage_busy_s: dict[int, float] = {}  # measured busy seconds per local stage
        self.rebalances: list[Any] = []  # the moves `lightning_hybrid.balance.adaptive` made
        self.lay_out(blocks_per_stage)
        self.shared_params = self._shared_parameters(shared_exclude)
        model.__dict__["_lightning_hybrid_pipeline"] = self  # not an attribute nn.Module would register
        self._batch: Any = None
        self._batch_size = 0
        self.current_microbatches = 1
        self.sent_bytes = 0  # point-to-point bytes this rank sent in the last step (activations, gradients)
        self.loss_scale = 1.0
        self.training_step_running = False
        self._lookups: torch.Tensor | None = None
        self.last_step: dict[str, float] = {}

    # -- layout --------------------------------------------------------------------------------

    def lay_out(self, blocks_per_stage: Sequence[int]) -> None:
        """Build this rank's stages for a split: at the start, and again after
        `lightning_hybrid.balance.adaptive` moved blocks between ranks (``spec.blocks`` then holds
        every block this rank runs under the new split)."""
        self.blocks_per_stage = list(blocks_per_stage)
        ranges = stage_ranges(self.blocks_per_stage)
        self.stages = [_Stage(self, s, ranges[s], is_first=s == 0, is_last=s == self.num_stages - 1) for s in self.local_stage_ids]
        self._prune(ranges)
        self._schedules: dict[tuple[Any, ...], Any] = {}  # (their stages are these)

    def block_owner(self, blocks_per_stage: Sequence[int]) -> dict[int, int]:
        """Block index -> the pp rank that runs it under ``blocks_per_stage``."""
        return {i: s % self.pp for s, r in enumerate(stage_ranges(blocks_per_stage)) for i in r}

    def _prune(self, ranges: list[range]) -> None:
        """Drop the blocks and first/last modules this rank does not run (memory, checkpoints);
        a dropped block's structure stays as a skeleton on the meta device, for a later move."""
        local = {i for s in self.local_stage_ids for i in ranges[s]}
        owner = self.block_owner(self.blocks_per_stage)
        dropped = {}
        for i in range(len(self.spec.blocks)):
            if i not in local:
                if not isinstance(self.spec.blocks[i], ElsewhereInThePipeline):
                    dropped[i] = self.spec.blocks[i]
                self.spec.blocks[i] = ElsewhereInThePipeline(f"block {i}", owner[i])
        kept = {id(p) for p in self.model.parameters()}
        for i, block in dropped.items():  # (a block sharing weights with what stays cannot move)
            if not any(id(p) in kept for p in block.parameters()):
                self.skeletons[i] = block.to("meta")
        drop = [*(() if self.is_first_rank else self.spec.first_modules), *(() if self.is_last_rank else self.spec.last_modules)]
        for name in drop:
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            first = name in self.spec.first_modules
            setattr(parent, attr, ElsewhereInThePipeline(name, 0 if first else (self.num_stages - 1) % self.pp))

    def _shared_parameters(self, exclude: Sequence[str]) -> list[nn.Parameter]:
        return parameters_outside(self.model, {id(p) for p in self.stage_parameters()}, exclude)

    def _sum_shared_gradients(self) -> None:
        """Every pp rank's copy of a parameter held outside the stages gets the sum of the
        copies' gradients (only the first stage's is non-zero)."""
        if self.pp > 1 and self.shared_params:
            sum_gradients(self.shared_params, self.group)
            # (counted with the activations: e.g. a replicated item table's gradient, every step)
            nbytes = sum(p.numel() * p.element_size() for p in self.shared_params)
            self.sent_bytes += int(2 * (self.pp - 1) / self.pp * nbytes)

    def stage_parameters(self) -> list[nn.Parameter]:
        """Parameters of this rank's stages (what its optimizer steps, besides sharded tables)."""
        seen: dict[int, nn.Parameter] = {}
        for stage in self.stages:
            for p in stage.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    # -- microbatches --------------------------------------------------------------------------

    def sync_if_measuring(self) -> None:
        if self.measuring and self.device.type == "cuda":  # host clocks see GPU work only after a sync
            torch.cuda.synchronize(self.device)

    def timed(self, key: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its seconds added to ``part_s[key]`` (measuring steps only)."""
        self.sync_if_measuring()
        started = time.perf_counter()
        out = fn(*args)
        self.sync_if_measuring()
        self.part_s[key] = self.part_s.get(key, 0.0) + time.perf_counter() - started
        return out

    def microbatch_rows(self, i: int) -> torch.Tensor:
        size = self._batch_size // self.current_microbatches
        return torch.arange(i * size, (i + 1) * size, device=self.device)

    def microbatch(self, index: torch.Tensor) -> Any:
        return slice_microbatch(self._batch, index, self._batch_size)

    def lookups_for(self, index: torch.Tensor) -> torch.Tensor | None:
        return None if self._lookups is None else self._lookups[index]

    def _schedule(self, batch_size: int, train: bool) -> Any:
        # one schedule per batch shape: torch's stages infer the shapes they send once, and jagged
        # batches (`lightning_hybrid.data.lengths`) come in a few sequence lengths
        key = (train, batch_size, _shapes(self._batch))
        if key not in self._schedules:
            self._schedules[key] = self._build_schedule(batch_size, train)
        return self._schedules[key]

    def _build_schedule(self, batch_size: int, train: bool) -> Any:
        from torch.distributed import pipelining as ppl

        stages = [_InferringStage(stage, stage.stage_index, self.num_stages, self.device, group=self.group) for stage in self.stages]
        if not train:
            # forward only: the largest microbatch count <= the training one that divides this batch
            # (evaluation batches may be ragged); the order of forwards is GPipe's in any schedule
            n = max(d for d in range(1, min(self.microbatches, batch_size) + 1) if batch_size % d == 0)
            if len(stages) == 1:
                return ppl.ScheduleGPipe(stages[0], n)
            return ppl.ScheduleLoopedBFS(stages, n)
        check_batch_divides(batch_size, self.microbatches)
        loss_fn = self._loss
        n = self.microbatches
        # scale_grads=False: the loss function already divides by the number of microbatches, so
        # every gradient (stage weights and the embedding rows alike) is that of the mean loss
        if self.schedule_name == "gpipe":
            return ppl.ScheduleGPipe(stages[0], n, loss_fn=loss_fn, scale_grads=False)
        if self.schedule_name == "1f1b":
            return ppl.Schedule1F1B(stages[0], n, loss_fn=loss_fn, scale_grads=False)
        if self.schedule_name == "interleaved_1f1b":
            return ppl.ScheduleInterleaved1F1B(stages, n, loss_fn=loss_fn, scale_grads=False)
        return ppl.ScheduleInterleavedZeroBubble(stages, n, loss_fn=loss_fn, scale_grads=False)

    @staticmethod
    def _loss(output: torch.Tensor, _index: torch.Tensor) -> torch.Tensor:
        return output  # the last stage already returns the microbatch's share of the loss

    # -- running -------------------------------------------------------------------------------

    def _prepare(self, batch: Any, batch_size: int, grad: bool) -> torch.Tensor | None:
        self._batch, self._batch_size = batch, batch_size
        for stage in self.stages:
            stage.calls = 0
            stage.busy_s = 0.0
            stage.events = []
        lookups = None
        if self.spec.lookup is not None:
            with torch.set_grad_enabled(grad):
                lookups = self.spec.lookup(batch)  # every rank: torchrec lookups are collectives
            self._lookups = lookups.detach().requires_grad_(grad and lookups.requires_grad)
        return lookups

    def train_step(
        self, batch: Any, batch_size: int, *, loss_scale: float = 1.0, skip_lookup_backward: Callable[[torch.Tensor], bool] | None = None
    ) -> torch.Tensor:
        """Forward and backward of one batch; returns the mean microbatch loss on every pp rank.

        ``loss_scale`` multiplies the loss that is backpropagated (e.g. 1 / accumulated batches),
        not the one returned. ``skip_lookup_backward(loss)``, called on every rank once the loss
        is known, may return True to keep the loss's gradients out of the embedding tables (whose
        fused optimizers would apply them at once): the NaN-loss policy uses it.
        """
        self.loss_scale = loss_scale
        self.sent_bytes = 0
        step_started = time.perf_counter()
        lookups = self._prepare(batch, batch_size, grad=True)
        index = torch.arange(batch_size, device=self.device)
        losses: list[torch.Tensor] = []
        first_time = (True, batch_size, _shapes(batch)) not in self._schedules  # includes torch's shape inference
        schedule = self._schedule(batch_size, train=True)
        self.current_microbatches = schedule._n_microbatches
        self.training_step_running = True
        measuring, self.measuring = self.measuring, self.measuring and not first_time  # (not torch's set-up step)
        self.schedule_started = time.perf_counter()
        self.watch.discard()
        self.watch.start("schedule")
        try:
            schedule.step(index, target=index, losses=losses, return_outputs=False)
        finally:
            self.training_step_running = False
            self.watch.stop("schedule")
        loss = torch.stack([x.detach() for x in losses]).sum() / loss_scale if losses else torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self.last_rank_global, group=self.group)
        skip = skip_lookup_backward is not None and skip_lookup_backward(loss)
        if lookups is not None and lookups.requires_grad and not skip:
            assert self._lookups is not None
            grad = self._lookups.grad if self._lookups.grad is not None else torch.zeros_like(lookups)
            lookups.backward(grad)  # together on every rank: the gradient reaches each slice, then torchrec
        if not skip:
            self._sum_shared_gradients()
        self._lookups = None
        self._batch = None
        # this step's busy and schedule time on CPU, the previous step's on CUDA (host clocks there
        # would read kernel launches); the measuring steps' per-stage figures sync and are exact
        times = self.watch.lap()
        busy, schedule_s = times.get("busy", 0.0), times.get("schedule", 0.0)
        if self.measuring:
            for stage in self.stages:
                self.stage_busy_s[stage.stage_index] = self.stage_busy_s.get(stage.stage_index, 0.0) + stage.busy_s
        self.measuring = measuring
        self.last_step = {
            "step_s": time.perf_counter() - step_started,
            "schedule_s": schedule_s,
            "busy_s": busy,
            "bubble_fraction": max(0.0, 1.0 - busy / schedule_s) if schedule_s > 0 else 0.0,
            "first_time": float(first_time),
            "sent_bytes": float(self.sent_bytes),
        }
        return loss

    def timeline(self) -> list[tuple[str, int, float, float]]:
        """This rank's compute intervals of the last training step: (F/B/W, stage, start s, end s),
        relative to the start of its schedule."""
        t0 = getattr(self, "schedule_started", 0.0)
        return sorted((k, s, a - t0, b - t0) for stage in self.stages for (k, s, a, b) in stage.events)

    def stage_metrics(self) -> dict[str, float]:
        """This step's pipeline measurements, the same on every rank of the pp group (a collective):
        per-rank busy seconds, bubble fraction (mean over ranks), imbalance (max/mean busy)."""
        local = torch.tensor([self.last_step.get("busy_s", 0.0), self.last_step.get("schedule_s", 0.0)], dtype=torch.float64, device=self.device)
        parts = [torch.zeros_like(local) for _ in range(self.pp)]
        dist.all_gather(parts, local, group=self.group)
        busy = [float(p[0]) for p in parts]
        spans = [float(p[1]) for p in parts]
        mean_busy = sum(busy) / len(busy)
        metrics = {f"pipeline/busy_s_rank{r}": b for r, b in enumerate(busy)}
        metrics["pipeline/bubble_fraction"] = sum(max(0.0, 1 - b / s) if s > 0 else 0.0 for b, s in zip(busy, spans, strict=True)) / len(busy)
        metrics["pipeline/imbalance"] = max(busy) / mean_busy if mean_busy > 0 else 1.0
        metrics["comm/pp_bytes_per_step"] = self.last_step.get("sent_bytes", 0.0)
        metrics["pipeline/rebalances"] = float(sum(1 for r in self.rebalances if r.moved))
        metrics["pipeline/theoretical_bubble"] = (self.pp - 1) / (self.current_microbatches * (self.num_stages // self.pp) + self.pp - 1)
        return metrics

    @torch.no_grad()
    def forward(self, batch: Any, batch_size: int) -> torch.Tensor | None:
        """Forward only: the last block's output for the whole batch on the last stage's rank, else None."""
        self._prepare(batch, batch_size, grad=False)
        index = torch.arange(batch_size, device=self.device)
        schedule = self._schedule(batch_size, train=False)
        self.current_microbatches = schedule._n_microbatches
        out = schedule.eval(index)
        self._lookups = None
        self._batch = None
        return out if self.is_last_rank else None
