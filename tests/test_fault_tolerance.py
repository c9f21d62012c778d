"""Tier 2: a rank killed under torchrun is restarted and the job finishes as if nothing happened.

Two torchrun launchers on loopback act as two nodes of 2 processes each (c10d rendezvous, elastic
``--max-restarts=1``), training the reference click model through the CLI with row-wise sharded
tables and data-parallel MLPs whose gradients are averaged hierarchically (exact inside a node,
PowerSGD with error feedback across nodes), checkpointing every 2 steps and resuming with
``--ckpt_path=last``.
Rank 3 (on the second node) is SIGKILLed after step 5: torchrun restarts both nodes' workers,
which resume from the step-4 checkpoint (including each rank's PowerSGD residuals and Q); the
final weights must equal those of the same job run without the kill. This is `benchmarks/fault_injection.py` with one job.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIERARCHICAL = {"method": "powersgd", "rank": 2, "start_iter": 2, "min_numel": 256, "hierarchical": True}


def _fault_injection():  # noqa: ANN202 - the benchmark module
    spec = importlib.util.spec_from_file_location("fault_injection", ROOT / "benchmarks" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.skipif(shutil.which("torchrun") is None and not (ROOT / ".venv" / "bin" / "torchrun").exists(), reason="torchrun missing")
def test_two_node_job_survives_a_killed_rank(tmp_path: Path) -> None:
    summary = _fault_injection().main(
        ["--jobs", "1", "--nodes", "2", "--nproc-per-node", "2", "--steps", "6", "--ckpt-every", "2", "--kill", "3:5",
         "--compression", json.dumps(HIERARCHICAL), "--timeout", "240", "--out", str(tmp_path), "--json", str(tmp_path / "summary.json")]
    )
    # the dp ranks span both "nodes": the exchange is exact inside a node and PowerSGD across them
    assert "hierarchical gradient exchange: exact within each node (2 ranks), powersgd across 2 nodes" in (tmp_path / "reference" / "node0.log").read_text()
    row = summary["rows"][0]
    assert row["completed"], row  # both launchers exited 0 and the last checkpoint is at step 6
    assert row["restarts"] >= 1, row  # the kill happened and torchrun restarted the workers
    assert (tmp_path / "job0" / ".killed-rank3-step5").exists()
    # the restarted attempt's first step is step 5 (the one after the step-4 checkpoint), with the
    # uninterrupted run's loss there: a resume, not a fresh start (which would begin at step 1)
    assert row["resumed_at_step"] == 5, row
    assert row["resumed_loss_matches"], row
    assert row["steps_lost"] == 1
    assert row["mismatched_tensors"] == 0, row  # equal to the uninterrupted run up to float rounding
    assert row["max_abs_diff"] < 1e-6
