"""Tier 2: the composition matrix (tests/composition.py): every generated cell either trains like
one process (losses, parameters, and the saved checkpoint's weights) or is refused with an error
that names the combination.

The cells of one world size run one after another in one shared process group (start-up
dominates these tiny fits). ``LH_WRITE_MATRIX=1`` also writes the table to
docs/composition-matrix.md.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed
from tests import composition as comp

CELLS, REFUSED = comp.generate_cells()
SETUP_REFUSED = comp.setup_refusal_cells(REFUSED)
_DIR = tempfile.mkdtemp(prefix="lh-matrix-")


@functools.cache
def _world_results(world: int) -> dict[str, Any]:
    cells = [c for c in CELLS if c.world_size == world] + [c for c in SETUP_REFUSED if c.world_size == world]
    return run_distributed(comp.run_world, world, cells, _DIR, init_process_group=False, timeout_s=900, pg_timeout_s=120)


@functools.cache
def _reference(cell: comp.Cell, steps: int = comp.STEPS) -> dict[str, Any]:
    return comp.reference(cell, steps)


RESUMED = comp.resume_cells(CELLS)


@functools.cache
def _resume_results() -> dict[str, Any]:
    for world in sorted({c.world_size for c in RESUMED}):
        _world_results(world)  # the checkpoints to resume from
    return run_distributed(comp.run_resumes, 2, RESUMED, _DIR, init_process_group=False, timeout_s=600, pg_timeout_s=120)


@pytest.mark.parametrize("cell", RESUMED, ids=lambda c: c.id)
def test_checkpoint_loads_into_another_layout(cell: comp.Cell) -> None:
    """The cell's checkpoint, resumed in another layout (other degrees, tables resharded), takes the
    next step exactly as one process trained for one step more."""
    ranks = [rank[cell.id] for rank in _resume_results()]
    result = ranks[0]
    assert "refused" not in result, result.get("refused")
    reference = _reference(_reference_key(cell), comp.STEPS + 1)
    assert len(result["losses"]) == 1  # it resumed at step 4 and took one step, not four from scratch
    dp, tp, _pp = result["degrees"]
    mean = sum(ranks[d * tp]["losses"][0] for d in range(dp)) / dp  # each replica reports its shard's loss
    assert_close(torch.tensor([mean]), torch.tensor(reference["losses"][-1:]), rtol=1e-4, atol=1e-5)
    for key, value in reference["state"].items():
        assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _reference_key(cell: comp.Cell) -> comp.Cell:
    # what the single-process reference depends on
    replicated_matters = cell.clip or cell.dp_mode == "async"  # (clipping and async delay reach replicated tables)
    return comp.Cell(
        tables="replicated" if not comp.table_is_sharded(cell) and replicated_matters else "row_wise",
        accumulate=cell.accumulate, precision=cell.precision, clip=cell.clip,
        dp_mode="async" if cell.dp_mode == "async" else None,
    )


def _step_losses(losses: list[float], accumulate: int) -> torch.Tensor:
    t = torch.tensor(losses)
    return t.view(-1, accumulate).mean(1)


def test_the_matrix_covers_every_pair_the_strategy_accepts() -> None:
    accepted_pairs: set[Any] = set()
    for cell in comp._all_cells():
        if comp.expected_refusal(cell) is None:
            accepted_pairs |= comp._pairs(cell)
    covered = set().union(*(comp._pairs(c) for c in CELLS))
    assert accepted_pairs <= covered
    assert all(comp.expected_refusal(c) is None for c in CELLS)
    # and each refused pair is in some refused cell
    for cell in REFUSED:
        assert comp.expected_refusal(cell) is not None


@pytest.mark.parametrize("cell", [c for c in REFUSED if comp.construction_refusal(c) is not None], ids=lambda c: c.id)
def test_refused_at_construction(cell: comp.Cell) -> None:
    from lightning_hybrid import HybridStrategy

    with pytest.raises((ValueError, TypeError)) as error:
        HybridStrategy(**cell.strategy_kwargs())
    message = str(error.value)
    assert message == comp.construction_refusal(cell)  # the rule's own error, from the one validate()
    assert message.startswith("HybridStrategy") and ("Use " in message or "use " in message), message  # names it and the fix
    _STATUS[cell.id] = "refused at construction (checked)"


@pytest.mark.parametrize("cell", SETUP_REFUSED, ids=lambda c: c.id)
def test_refused_at_setup(cell: comp.Cell) -> None:
    results = _world_results(cell.world_size)
    for rank in results:  # every rank refuses, with the rule's message
        assert "refused" in rank[cell.id], rank[cell.id].keys()
        assert comp.expected_refusal(cell) in rank[cell.id]["refused"]
    _STATUS[cell.id] = "refused at setup (checked)"


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_cell_trains_like_one_process(cell: comp.Cell) -> None:
    warnings.simplefilter("ignore")
    ranks = _world_results(cell.world_size)
    for rank in ranks:
        assert "refused" not in rank[cell.id], rank[cell.id].get("refused")
    result = ranks[0][cell.id]
    reference = _reference(_reference_key(cell))
    dp, tp, pp = result["degrees"]
    # mesh order (pp, dp, tp): replica d's ranks are p*dp*tp + d*tp + t; each reports its replica's loss
    losses = [_step_losses(rank[cell.id]["losses"], cell.accumulate) for rank in ranks]
    mean = torch.stack([losses[d * tp] for d in range(dp)]).mean(0)
    ref = _step_losses(reference["losses"], cell.accumulate)
    # sign: one bit per gradient value; top-k under bf16: the CPU's bf16 kernels (AMX, AVX512-BF16
    # or emulated) round differently, and the rounding changes which entries top-k selects
    lossier = cell.compression == "sign" or (cell.compression == "topk" and cell.precision != "32-true")
    loose = 5e-2 if lossier else 3e-2
    tol = dict(rtol=1e-4, atol=1e-5) if cell.exact else dict(rtol=loose, atol=loose)
    assert_close(mean, ref, **tol, msg=lambda m: f"step losses: {m}")
    state = result["state"]
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        if cell.exact:
            assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        else:  # lossy exchange / bf16: the update is approximately the reference's
            assert torch.isfinite(state[key]).all(), key
            assert_close(state[key], value, rtol=0.1, atol=0.05, msg=lambda m, k=key: f"{k}: {m}")
    # the checkpoint holds exactly the trained weights (not a stale copy from another rank)
    from lightning_hybrid.checkpoint import to_single_file

    saved = to_single_file(os.path.join(_DIR, cell.id), os.path.join(_DIR, f"{cell.id}.ckpt"))["state_dict"]
    assert set(saved) == set(state)
    for key, value in state.items():
        assert torch.equal(saved[key], value), f"checkpoint {key} differs from the trained weights"
    # every data-parallel replica holds the same dense weights (sync and async apply the same
    # averaged gradients; local SGD averages at the last step here)
    for r, rank in enumerate(ranks):
        twin = ranks[r % (dp * tp) % tp + (r // (dp * tp)) * dp * tp]  # the same (pp, tp) position of replica 0
        for key, value in rank[cell.id]["local"].items():
            if key in twin[cell.id]["local"] and not key.startswith("item_tables"):
                assert torch.equal(value, twin[cell.id]["local"][key]), f"rank {r}: {key} differs from replica 0"
    _STATUS[cell.id] = "equal to one process" + ("" if cell.exact else " (to bf16 / lossy-exchange tolerance)")


_STATUS: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def _matrix_doc() -> Any:
    """With LH_WRITE_MATRIX=1, write what this run found to docs/composition-matrix.md."""
    yield
    if os.environ.get("LH_WRITE_MATRIX") == "1":
        write_matrix_doc(Path(__file__).resolve().parents[1] / "docs" / "composition-matrix.md")


def _row(cell: comp.Cell, result: str) -> str:
    dp, tp, pp = cell.degrees
    layout = {"manual": cell.layout, "planner": f"{cell.layout} (planner's)", "auto": "plan='auto'"}[cell.plan]
    values = [layout, cell.tables, cell.dense, cell.schedule or "-",
              cell.compression or "-", cell.dp_mode or "-", str(cell.accumulate), cell.precision, "yes" if cell.clip else "-"]
    return f"| {cell.world_size} | " + " | ".join(values) + f" | {result} |"


def write_matrix_doc(path: Path) -> None:
    head = "| procs | layout | tables | dense dp | schedule | compression | dp mode | accumulate | precision | clip | result |"
    rows = [head, "|" + "---|" * 11]
    for cell in CELLS:
        rows.append(_row(cell, _STATUS.get(cell.id, "not run")))
    refused = [head, "|" + "---|" * 11]
    for cell in REFUSED:
        where = "construction" if comp.construction_refusal(cell) is not None else "setup"
        message = " ".join(comp.expected_refusal(cell).split())[:150].replace("|", "/")
        status = _STATUS.get(cell.id, "refused at " + where)
        refused.append(_row(cell, f"{status}: {message}"))
    text = (path.read_text().split("<!-- matrix:start -->")[0] if path.exists() else "# Composition matrix\n\n")
    path.write_text(
        text + "<!-- matrix:start -->\n" + f"{len(CELLS)} trained cells, {len(REFUSED)} refused cells "
        f"(`LH_WRITE_MATRIX=1 make test PYTEST_ARGS='-k composition'`).\n\n### Trained\n\n" + "\n".join(rows)
        + "\n\n### Refused\n\n" + "\n".join(refused) + "\n"
    )
