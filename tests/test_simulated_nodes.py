"""Tier 3: simulated nodes (`lightning_hybrid.testing.netns`): namespaces joined by shaped links.

The links carry the rate they were set to (within 20%), traffic inside a node is not shaped, and
a HybridStrategy job launched as 2 nodes x 1 process by torchrun (one agent per node, c10d
rendezvous) trains like one process on the same global batch. Skipped, with the reason, where
network namespaces cannot be made (no root, no iproute2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing.netns import SimulatedCluster, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _probe_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def test_links_carry_the_set_rate_and_a_node_inside_is_unshaped() -> None:
    with SimulatedCluster(nodes=2, rate_mbit=1000) as cluster:
        across = _probe_json(cluster.torchrun(["-m", "lightning_hybrid.testing.netns", "probe", "16", "5"], cwd=ROOT, timeout_s=120)[0])
        inside = cluster.popen(0, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                   "-m", "lightning_hybrid.testing.netns", "probe", "16", "5"],
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = inside.communicate(timeout=120)
        within = _probe_json(subprocess.CompletedProcess(inside.args, inside.returncode, out, err))
    assert 800 <= across["mbit_per_s"] <= 1200, across  # 1 Gbit/s, within 20%
    assert within["mbit_per_s"] > 2 * across["mbit_per_s"], (within, across)  # the node's own loopback
    assert "lhn" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout  # cleaned up


def test_two_simulated_nodes_train_like_one_process(tmp_path: Path) -> None:
    from tests.composition import Cell, reference

    out = tmp_path / "result.pt"
    with SimulatedCluster(nodes=2, rate_mbit=1000) as cluster:
        done = cluster.torchrun([str(ROOT / "tests" / "netns_job.py"), str(out)], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, timeout_s=300)
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["num_nodes"] == 2
    ref = reference(Cell(tables="row_wise", layout="dp2").normalized())
    steps = torch.tensor(result["losses"])
    assert len(steps) == len(ref["losses"])
    for key, value in ref["state"].items():
        assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
