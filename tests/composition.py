"""The composition matrix: which combinations of HybridStrategy's techniques train right.

Axes are listed once (`AXES`); the cells are *generated*: a greedy pairwise covering set over the
combinations the strategy accepts (every pair of axis values that some accepted combination
contains appears in at least one trained cell), plus one cell per refused pair (a pair no accepted
combination contains, which must be refused with an error naming it), plus the triples users run
(`EXTRA_CELLS`). Whether a combination is accepted is not decided here: `expected_refusal` asks
`lightning_hybrid.strategies.options.validate` (the strategy's one rule function) and adds the
rules that need the model (the reference recommender's torchrec ``EmbeddingCollection``).

A trained cell runs the SGD reference recommender (tests.helpers.sgd_sasrec_class) for
`STEPS` optimizer steps on every rank of one shared process group (`run_world`), saves a
checkpoint, and is compared in the test process with a single-process run of the same model on
the same global batch (`reference`): step losses, parameters after the steps, and the weights in
the saved checkpoint, which must equal the trained weights exactly.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

LAYOUTS = {  # name -> (dp, tp, pp)
    "dp2": (2, 1, 1),
    "tp2": (1, 2, 1),
    "pp2": (1, 1, 2),
    "dp2xtp2": (2, 2, 1),
    "pp2xdp2": (2, 1, 2),
    "tp2xpp2": (1, 2, 2),
    # only in planner cells (layouts the planner emits for 4 devices), not a pairwise axis value
    "dp4": (4, 1, 1),
    "pp4": (1, 1, 4),
}
PAIRWISE_LAYOUTS = ("dp2", "tp2", "pp2", "dp2xtp2", "pp2xdp2", "tp2xpp2")

#: The axes and their values, first value = the default.
AXES: dict[str, tuple[Any, ...]] = {
    "tables": ("row_wise", "table_wise", "column_wise", "data_parallel", "replicated"),
    "dense": ("ddp", "fsdp"),
    "layout": PAIRWISE_LAYOUTS,
    "schedule": ("1f1b", "gpipe", "interleaved_1f1b", "zero_bubble"),
    "compression": ("none", "fp16", "powersgd", "topk", "sign"),
    "dp_mode": ("sync", "local_sgd", "async"),
    "accumulate": (1, 2),
    "precision": ("32-true", "bf16-mixed"),
    "clip": (0.0, 0.05),
}


STEPS = 3
USERS = 24  # one optimizer step per epoch: the global batch is every user
DATA = dict(format="synthetic", max_len=8, synthetic_users=USERS, synthetic_items=30, synthetic_min_len=10, synthetic_max_len=10, seed=2)
MODEL = dict(num_items=30, max_len=8, d_model=16, num_blocks=4, num_heads=2, mlp_ratio=2, dropout=0.0)
LOCAL_SGD_PERIOD = STEPS  # the replicas average at the last step, so their final weights agree
ASYNC_STALENESS = 1
#: the reference model as the planner sees it (planner.ModelSpec fields)
PLANNER_SPEC = dict(num_items=30, d_model=16, num_blocks=4, num_heads=2, seq_len=8, global_batch=USERS, mlp_ratio=2)


@dataclass(frozen=True)
class Cell:
    tables: str = "row_wise"
    dense: str = "ddp"
    layout: str = "dp2"
    schedule: str | None = None
    compression: str | None = None
    dp_mode: str | None = None
    accumulate: int = 1
    precision: str = "32-true"
    clip: float = 0.0
    plan: str = "manual"

    @property
    def degrees(self) -> tuple[int, int, int]:
        return LAYOUTS[self.layout]

    @property
    def world_size(self) -> int:
        dp, tp, pp = self.degrees
        return dp * tp * pp

    @property
    def id(self) -> str:
        parts = [self.layout, self.tables, self.dense]
        if self.schedule:
            parts.append(self.schedule)
        if self.compression and self.compression != "none":
            parts.append(self.compression)
        if self.dp_mode and self.dp_mode != "sync":
            parts.append(self.dp_mode)
        if self.accumulate > 1:
            parts.append(f"acc{self.accumulate}")
        if self.precision != "32-true":
            parts.append("bf16")
        if self.clip:
            parts.append("clip")
        if self.plan == "auto":
            parts.append("plan-auto")
        elif self.plan == "planner":
            parts.append("planned-layout")
        return "-".join(parts)

    def normalized(self) -> Cell:
        """Axes that mean nothing in this layout are dropped (no schedule without a pipeline, no
        compression or dp mode with one replica), so they are neither counted as covered nor run."""
        dp, _tp, pp = self.degrees
        return replace(
            self,
            schedule=(self.schedule or "1f1b") if pp > 1 else None,
            compression=(self.compression or "none") if dp > 1 else None,
            dp_mode=(self.dp_mode or "sync") if dp > 1 else None,
        )

    def strategy_kwargs(self) -> dict[str, Any]:
        dp, tp, pp = self.degrees
        kwargs: dict[str, Any] = {
            "data_parallel": dp,
            "tensor_parallel": tp,
            "pipeline_parallel": pp,
            "dense_parallel": self.dense,
            "timeout_s": 120.0,
        }
        if self.tables == "replicated":
            kwargs["shard_embeddings"] = False
        else:
            kwargs["embedding_sharding"] = {"item_id": self.tables}
        if pp > 1:
            kwargs["pipeline_schedule"] = self.schedule
            kwargs["pipeline_microbatches"] = max(2, pp)  # (1F1B needs at least one per stage)
            if self.schedule in ("interleaved_1f1b", "zero_bubble"):
                kwargs["pipeline_virtual_stages"] = 2
        if self.compression not in (None, "none"):
            from lightning_hybrid.comm import GradientCompression

            kwargs["gradient_compression"] = GradientCompression(
                method=self.compression, rank=2, density=0.25, start_iter=0, error_feedback=self.compression in ("topk", "sign"), warmup_steps=0
            )
        if self.dp_mode not in (None, "sync"):
            kwargs["data_parallel_mode"] = "local_sgd" if self.dp_mode == "local_sgd_overlap" else self.dp_mode
            kwargs["local_sgd_overlap"] = self.dp_mode == "local_sgd_overlap"
            kwargs["local_sgd_period"] = LOCAL_SGD_PERIOD
            kwargs["async_staleness"] = ASYNC_STALENESS
        if self.plan == "auto":
            kwargs = {"plan": "auto", "cluster": "cpu-2core", "timeout_s": 120.0}
        return kwargs

    @property
    def exact(self) -> bool:
        """Whether the cell must equal the single-process reference to fp32 rounding (lossy
        compression and local SGD change the arithmetic; bf16 rounds differently per layout)."""
        return self.compression in (None, "none", "fp16") and self.dp_mode not in ("local_sgd", "local_sgd_overlap") and self.precision == "32-true"


def table_is_sharded(cell: Cell) -> bool:
    return cell.tables != "replicated"


def construction_refusal(cell: Cell) -> str | None:
    """The strategy's own rules (`lightning_hybrid.strategies.options.validate`): the error the
    constructor raises for ``cell``, or None."""
    from lightning_hybrid.strategies.options import validate_kwargs

    try:
        validate_kwargs(cell.strategy_kwargs())
    except (ValueError, TypeError) as error:
        return str(error)
    return None


#: limits of the reference model's torchrec EmbeddingCollection, refused at setup (every rank,
#: before the first step): cell predicate -> a fragment of the error
SETUP_RULES = {
    "data_parallel sharding of an EmbeddingCollection": (lambda c: c.tables == "data_parallel", "data_parallel (it fails inside torchrec)"),
}


def expected_refusal(cell: Cell) -> str | None:
    """The refusal message (fragment) for ``cell``, or None when the strategy must accept it."""
    message = construction_refusal(cell)
    if message is not None:
        return message
    for applies, fragment in SETUP_RULES.values():
        if applies(cell):
            return fragment
    return None


def setup_refusal_cells(refused: list[Cell]) -> list[Cell]:
    """One world-size-2 refused cell per setup rule (each needs processes to show)."""
    out = []
    for applies, _fragment in SETUP_RULES.values():
        match = next((c for c in refused if construction_refusal(c) is None and applies(c) and c.world_size == 2), None)
        if match is not None:
            out.append(match)
    return out


def _pairs(cell: Cell) -> set[tuple[tuple[str, Any], tuple[str, Any]]]:
    values = [(axis, getattr(cell, axis)) for axis in AXES if getattr(cell, axis) is not None]
    return set(itertools.combinations(values, 2))


def _all_cells() -> Iterator[Cell]:
    for combo in itertools.product(*AXES.values()):
        yield Cell(**dict(zip(AXES, combo, strict=True))).normalized()


def generate_cells() -> tuple[list[Cell], list[Cell]]:
    """(cells to train, cells that must be refused), deterministic."""
    accepted, refused_pairs_cells = {}, {}
    for cell in _all_cells():
        if cell in accepted or cell in refused_pairs_cells:
            continue
        (refused_pairs_cells if expected_refusal(cell) else accepted)[cell] = None
    possible: set[Any] = set()
    for cell in accepted:
        possible |= _pairs(cell)
    # greedy covering: the accepted cell that covers most uncovered pairs (ties: fewer processes)
    # the triples users run first; the greedy covers what they leave; then the planner's layouts
    chosen: list[Cell] = list(EXTRA_CELLS)
    uncovered = set(possible) - set().union(*(_pairs(c) for c in chosen))
    pool = list(accepted)
    while uncovered:
        best = max(pool, key=lambda c: (len(_pairs(c) & uncovered), -c.world_size))
        chosen.append(best)
        uncovered -= _pairs(best)
    # a refused pair: one no accepted cell has; show each with the first cell that contains it
    impossible: dict[Any, Cell] = {}
    for cell in refused_pairs_cells:
        for pair in _pairs(cell) - possible:
            impossible.setdefault(pair, cell)
    refused = list(dict.fromkeys(impossible.values()))
    chosen += [c for c in planner_cells(chosen) if c not in chosen]
    return chosen, refused


def planner_cells(chosen: list[Cell]) -> list[Cell]:
    """A cell for every layout the planner can emit for the reference model on 2 and 4 devices
    (dp x tp x pp, table replicated or row-wise, compression) whose placement of weights no cell of
    ``chosen`` has (layout and table sharding decide which rank holds which weights; compression
    and microbatches only change how gradients travel): each must save the weights it trained."""
    import dataclasses as dc

    from lightning_hybrid.planner import load_cluster
    from lightning_hybrid.planner.cost import CostModel, ModelSpec
    from lightning_hybrid.planner.search import candidate_layouts

    by_degrees = {v: k for k, v in LAYOUTS.items()}
    have = {(c.layout, c.tables) for c in chosen}
    spec = ModelSpec(**PLANNER_SPEC)
    out = []
    for world in (2, 4):
        cost = CostModel(dc.replace(load_cluster("cpu-2core"), nodes=1, devices_per_node=world))
        for layout in candidate_layouts(spec, world):
            name = by_degrees.get((layout.dp, layout.tp, layout.pp))
            if cost.validate(spec, layout) is not None or name is None:
                continue
            tables = "replicated" if layout.table == "replicated" else "row_wise"
            if (name, tables) in have:
                continue
            have.add((name, tables))
            out.append(Cell(layout=name, tables=tables, compression=layout.compression, plan="planner").normalized())
    return out


#: triples users run (tables + tp + pp, tables + pp + compression), the layouts the planner emits
#: for the reference recommender, and the pipeline with replicated tables (whose copies once drifted)
EXTRA_CELLS = [
    Cell(tables="row_wise", layout="tp2xpp2", schedule="1f1b"),
    Cell(tables="row_wise", layout="pp2xdp2", schedule="1f1b", compression="powersgd", dp_mode="sync"),
    Cell(tables="replicated", layout="pp2", schedule="1f1b"),
    Cell(tables="replicated", layout="pp2xdp2", schedule="gpipe", compression="none", dp_mode="sync", clip=0.05),
    Cell(plan="auto", layout="dp2", compression="none", dp_mode="sync"),
    # sequence table on the dense kernel under a pipeline, accumulating (exact)
    Cell(tables="table_wise", layout="pp2", schedule="gpipe", accumulate=2),
    # local SGD with its average overlapped (`local_sgd_overlap`, a variant of local_sgd rather than an
    # axis value): on tensor-parallel shards, and with a replicated table, accumulation, bf16 and clipping
    Cell(tables="row_wise", layout="dp2xtp2", compression="fp16", dp_mode="local_sgd_overlap"),
    Cell(tables="replicated", layout="dp2", compression="none", dp_mode="local_sgd_overlap", accumulate=2, precision="bf16-mixed", clip=0.05),
]


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def _model() -> Any:
    from tests.helpers import sgd_sasrec_class

    torch.manual_seed(0)
    return sgd_sasrec_class()(**MODEL)


def _record() -> Any:
    """Callback: the loss of every training batch (micro-batch)."""
    from tests.helpers import LossRecorder

    return LossRecorder()


def _delayed_gradients(staleness: int, table_ids: set[int]) -> Any:
    """Callback for the single-process reference of ``data_parallel_mode='async'``: the dense
    gradients applied at step t are those of step t - staleness (none before), tables stay current."""
    import lightning.pytorch as pl

    class Delay(pl.Callback):
        def __init__(self) -> None:
            self.queue: list[dict[int, torch.Tensor]] = []

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            params = [p for p in module.parameters() if p.grad is not None and id(p) not in table_ids]
            self.queue.append({id(p): p.grad.detach().clone() for p in params})
            old = self.queue.pop(0) if len(self.queue) > staleness else {}
            for p in params:
                if id(p) in old:
                    p.grad.copy_(old[id(p)])
                else:
                    p.grad.zero_()

    return Delay()


def reference(cell: Cell, steps: int = STEPS) -> dict[str, Any]:
    """Single process, same model, data, global batch, precision, clipping and accumulation."""
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    model = _model()
    record = _record()
    callbacks = [record]
    if cell.dp_mode == "async":  # sharded tables stay synchronous; replicated ones are dense weights like any other
        synchronous = {id(p) for p in model.item_tables.parameters()} if table_is_sharded(cell) else set()
        callbacks.append(_delayed_gradients(ASYNC_STALENESS, synchronous))
    if cell.clip and not table_is_sharded(cell):
        model.clip_tables = True
    trainer = quiet_trainer(
        devices=1, max_epochs=steps, limit_val_batches=0, gradient_clip_val=cell.clip or None, precision=cell.precision,
        accumulate_grad_batches=cell.accumulate, callbacks=callbacks,
    )
    trainer.fit(model, datamodule=SequenceDataModule(**DATA, batch_size=USERS // cell.accumulate))
    return {"losses": record.losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def resume_cells(cells: list[Cell]) -> list[Cell]:
    """The cells whose checkpoint is loaded into another layout: the first cell of each (layout,
    tables) pair whose arithmetic is exact and whose per-rank state a new layout may drop (sync;
    unclipped, since clipping reaches replicated tables and not fused ones)."""
    seen, out = set(), []
    for cell in cells:
        key = (cell.layout, cell.tables)
        plain = cell.dp_mode in (None, "sync") and cell.accumulate == 1 and not cell.clip and cell.plan == "manual"
        if cell.exact and plain and key not in seen:
            seen.add(key)
            out.append(cell)
    return out


def resume_target(cell: Cell) -> Cell:
    """Another layout on 2 processes for ``cell``'s checkpoint (tables resharded too)."""
    if cell.layout == "dp2":
        return replace(cell, layout="pp2", schedule="gpipe", compression=None, dp_mode=None, dense="ddp",
                       tables="table_wise" if cell.tables != "table_wise" else "row_wise").normalized()
    return replace(cell, layout="dp2", schedule=None, tables="row_wise" if cell.tables != "row_wise" else "table_wise",
                   compression="none", dp_mode="sync").normalized()


def run_resumes(cells: list[Cell], directory: str) -> dict[str, Any]:
    """Rank function (2 processes): each cell's checkpoint resumed in `resume_target` for one more step."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    return {cell.id: _run_one(resume_target(cell), os.path.join(directory, f"{cell.id}-resumed"), steps=STEPS + 1,
                              ckpt_path=os.path.join(directory, cell.id)) for cell in cells}


def _run_one(cell: Cell, checkpoint: str, steps: int = STEPS, ckpt_path: str | None = None) -> dict[str, Any]:
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import quiet_trainer

    os.environ.pop("PL_GLOBAL_SEED", None)
    model = _model()
    record = _record()
    dp = cell.degrees[0]
    try:
        strategy = HybridStrategy(**cell.strategy_kwargs())
        trainer = quiet_trainer(
            strategy=strategy, devices=cell.world_size, max_epochs=steps, limit_val_batches=0,
            gradient_clip_val=cell.clip or None, precision=cell.precision, accumulate_grad_batches=cell.accumulate,
            callbacks=[record],
        )
        trainer.fit(model, datamodule=SequenceDataModule(**DATA, batch_size=USERS // (cell.accumulate * dp)), ckpt_path=ckpt_path)
    except (ValueError, TypeError, NotImplementedError) as error:
        return {"refused": str(error)}
    trainer.save_checkpoint(checkpoint)
    state = full_state_dict(model)
    # this rank's own copy of every whole (non-sharded) dense tensor: replicas must agree
    local = {}
    for key, value in model.state_dict().items():
        if type(value) is torch.Tensor:
            local[key] = value.detach().clone()
    layout = strategy.plan
    degrees = (layout.data_parallel, layout.tensor_parallel, layout.pipeline_parallel)
    return {"losses": record.losses, "state": state, "local": local, "degrees": degrees}


def run_world(cells: list[Cell], directory: str) -> dict[str, Any]:
    """Rank function: every cell of one world size, one after the other, in this process group."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    results = {}
    for cell in cells:
        results[cell.id] = _run_one(cell, os.path.join(directory, cell.id))
    return results
