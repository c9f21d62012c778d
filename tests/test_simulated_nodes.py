"""Tier 3: simulated nodes (`lightning_hybrid.testing.netns`): namespaces joined by shaped links.

The links carry the rate they were set to (within 20%), traffic inside a node is not shaped, and
a HybridStrategy job launched as 2 nodes x 1 process by torchrun (one agent per node, c10d
rendezvous) trains like one process on the same global batch. Skipped, with the reason, where
network namespaces cannot be made (no root, no iproute2).
"""

from __future__ import annotations

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


def test_links_carry_the_set_rate_and_a_node_inside_is_unshaped(tmp_path: Path) -> None:
    """`lightning_hybrid.planner.measure` under torchrun on 2 nodes x 2 processes: the inter-node
    link it measures is the set rate (within 20%), a node's own loopback is faster, and the cluster
    file it writes is one the planner plans with."""
    from lightning_hybrid.planner import Cluster

    target = tmp_path / "cluster.yaml"
    with SimulatedCluster(nodes=2, rate_mbit=1000) as cluster:
        done = cluster.torchrun(["-m", "lightning_hybrid.planner.measure", "--out", str(target), "--repeats", "3"],
                                nproc_per_node=2, cwd=ROOT, timeout_s=180)
        probed = cluster.measure_mbit(16)  # the benchmarks' probe: one process per node
    assert 800 <= probed <= 1200, probed
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    measured = Cluster.from_yaml(target)
    assert (measured.nodes, measured.devices_per_node) == (2, 2)
    across = measured.inter_node.bandwidth * 8 / 1e6
    assert 800 <= across <= 1200, measured.inter_node  # 1 Gbit/s, within 20%
    assert measured.intra_node.bandwidth > 2 * measured.inter_node.bandwidth, measured  # the node's own loopback
    assert "not measurable" not in target.read_text()
    assert "lhn" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout  # cleaned up
    plan = subprocess.run([sys.executable, "-m", "lightning_hybrid.cli", "plan", "-c", "recipes/quickstart.yaml", "--cluster", str(target),
                           "--devices", "4", "--top", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "dp" in plan.stdout, plan.stderr[-2000:]


def test_two_simulated_nodes_train_like_one_process(tmp_path: Path) -> None:
    from tests.composition import Cell, reference

    out = tmp_path / "result.pt"
    with SimulatedCluster(nodes=2, rate_mbit=1000) as cluster:
        done = cluster.torchrun([str(ROOT / "tests" / "netns_job.py"), str(out)], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, timeout_s=180)
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["num_nodes"] == 2
    ref = reference(Cell(tables="row_wise", layout="dp2").normalized())
    steps = torch.tensor(result["losses"])
    assert len(steps) == len(ref["losses"])
    for key, value in ref["state"].items():
        assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_a_killed_run_removes_its_namespaces() -> None:
    """SIGTERM (``kill``, a CI time limit) while a cluster is up: its namespaces are removed all the
    same, and the process exits as terminated (143)."""
    script = (
        "import sys, time\n"
        "from lightning_hybrid.testing.netns import SimulatedCluster\n"
        "with SimulatedCluster(nodes=2, rate_mbit=100) as cluster:\n"
        "    print(cluster.bridge_ns, *cluster.names, flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert len(names) == 3, proc.stderr.read() if proc.poll() is not None else names
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(name in listed for name in names)  # (up while the run is)
        proc.terminate()
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [name for name in names if name in listed], listed
