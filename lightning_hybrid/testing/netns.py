"""Simulated nodes on one machine: network namespaces joined by rate-limited veth links.

Every figure measured over loopback hides what hybrid parallelism saves: bytes on slow links
between nodes. `SimulatedCluster` makes ``nodes`` network namespaces; node ``k`` gets address
``10.<subnet>.0.<k+1>`` on a veth pair to a bridge namespace, and each veth end is shaped with
``tc``'s token-bucket filter (``tbf``) to ``rate_mbit``. Traffic between ranks of one node stays on
that namespace's own loopback (fast, unshaped); traffic between nodes crosses two shaped veths.
(``netem`` is not available here, so links have a rate but no added delay.)

Ranks are started per node with the launcher users run across nodes: `SimulatedCluster.torchrun`
runs ``torchrun --nnodes N --node-rank k --rdzv-backend c10d --rdzv-endpoint <node 0>`` inside
each namespace, so the strategy's node detection, hierarchical reduction and fault tolerance see
real node boundaries. Needs root and ``ip``/``tc``; `unavailable_reason` says why not otherwise
(tests skip with it). Everything the cluster creates is removed on exit, also on failure and on
SIGTERM (made a SystemExit while the cluster is up); only namespaces it made are touched.

    with SimulatedCluster(nodes=2, rate_mbit=1000) as cluster:
        cluster.torchrun(["-m", "lightning_hybrid.cli", "fit", "-c", "recipes/quickstart.yaml"], nproc_per_node=1)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def unavailable_reason() -> str | None:
    """None when simulated nodes can be made here, else why not."""
    if sys.platform != "linux":
        return "simulated nodes need Linux network namespaces"
    if os.geteuid() != 0:
        return "simulated nodes need root (network namespaces, veth pairs, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"simulated nodes need the `{tool}` command (iproute2)"
    probe = f"lhprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        inside = subprocess.run(["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
        veth = subprocess.run(["ip", "-n", probe, "link", "add", "lhp0", "type", "veth", "peer", "name", "lhp1"], capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    for step, done in (("run a command inside a network namespace", inside), ("create a veth pair", veth)):
        if done.returncode != 0:
            return f"cannot {step} here: {done.stderr.strip()}"
    return None


def _raise_on_sigterm() -> Any:
    """SIGTERM (``kill``, a job's time limit) ends Python without unwinding, so a ``with`` block's
    cleanup would not run and the namespaces would outlive the run. While a cluster is up it raises
    SystemExit instead. Returns the handler to restore (None where nothing was changed: not the main
    thread, or SIGTERM already handled by someone else)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    return signal.SIG_DFL


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"SimulatedCluster: `{' '.join(args)}` failed: {done.stderr.strip()}")


class SimulatedCluster:
    """``nodes`` network namespaces on a bridge, every node's link shaped to ``rate_mbit``."""

    def __init__(self, *, nodes: int = 2, rate_mbit: float | None = 1000.0, subnet: int | None = None, burst_kbyte: int = 512) -> None:
        if nodes < 2:
            raise ValueError(f"SimulatedCluster(nodes={nodes}): a cluster needs at least 2 nodes.")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"SimulatedCluster(rate_mbit={rate_mbit}) must be positive (or None: unshaped).")
        self.nodes, self.rate_mbit, self.burst_kbyte = nodes, rate_mbit, burst_kbyte
        tag = uuid.uuid4().hex[:6]
        self.bridge_ns = f"lhbr{tag}"
        self.names = [f"lhn{k}{tag}" for k in range(nodes)]
        self.subnet = subnet if subnet is not None else 100 + int(tag[:2], 16) % 100
        self._made: list[str] = []
        self._sigterm: Any = None  # the SIGTERM handler to put back on close

    def address(self, node: int) -> str:
        return f"10.{self.subnet}.0.{node + 1}"

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> SimulatedCluster:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"SimulatedCluster: {reason}.")
        self._sigterm = _raise_on_sigterm()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _create(self) -> None:
        _run("ip", "netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for k, ns in enumerate(self.names):
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            inner, outer = "eth0", f"v{k}"
            # the pair is made inside the node's namespace, then one end moves to the bridge's
            _run("ip", "-n", ns, "link", "add", inner, "type", "veth", "peer", "name", outer)
            _run("ip", "-n", ns, "link", "set", outer, "netns", self.bridge_ns)
            _run("ip", "-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", inner)
            _run("ip", "-n", ns, "link", "set", inner, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", self.bridge_ns, "link", "set", outer, "master", "br0")
            _run("ip", "-n", self.bridge_ns, "link", "set", outer, "up")
            if self.rate_mbit is not None:
                # both directions: egress of the node's end and of the bridge's end
                for where, dev in ((ns, inner), (self.bridge_ns, outer)):
                    _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", f"{self.rate_mbit}mbit", "burst", f"{self.burst_kbyte}kb", "latency", "20ms")

    def close(self) -> None:
        """Remove every namespace this cluster made (their veths and qdiscs go with them)."""
        for ns in reversed(self._made):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    # -- running --------------------------------------------------------------------------------

    def popen(self, node: int, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside node ``node``'s namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[node], *argv], env=env, cwd=cwd, **kwargs)

    def torchrun(
        self, args: Sequence[str], *, nproc_per_node: int = 1, port: int = 29517, env: dict[str, str] | None = None,
        cwd: str | Path | None = None, timeout_s: float = 600.0,
    ) -> list[subprocess.CompletedProcess]:
        """``python -m torch.distributed.run <args>`` on every node (one agent per node, c10d
        rendezvous on node 0); returns each node's completed process (stdout and stderr captured)."""
        environment = {**os.environ, **(env or {}), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        rdzv = f"{self.address(0)}:{port}"
        procs = []
        for k in range(self.nodes):
            # (ranks of one node reach each other's eth0 address over the namespace's loopback: unshaped)
            node_env = {**environment, "GLOO_SOCKET_IFNAME": "eth0"}
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nodes}", f"--nproc-per-node={nproc_per_node}",
                    f"--node-rank={k}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}", f"--rdzv-id=lh{self.subnet}",
                    f"--local-addr={self.address(k)}",
                    # node 0 hosts the rendezvous store (torchrun would compare the endpoint with the
                    # machine's host name, which every namespace shares)
                    f"--rdzv-conf=is_host={'true' if k == 0 else 'false'}", *args]
            procs.append(self.popen(k, argv, env=node_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout_s
        results = []
        for k, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # kill every node's agent and say what each printed: a hang is diagnosable from the error
                for q in procs:
                    q.kill()
                tails = []
                for j, q in enumerate(procs):
                    q_out, q_err = q.communicate()
                    tails.append(f"--- node {j} (exit {q.returncode}) stderr tail:\n{(q_err or '')[-3000:]}\n--- stdout tail:\n{(q_out or '')[-1000:]}")
                raise TimeoutError(f"SimulatedCluster.torchrun: node {k} did not finish in {timeout_s:.0f} s; killed every node.\n"
                                   + "\n".join(tails)) from None
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results

    def measure_mbit(self, megabytes: float = 16.0) -> float:
        """The inter-node rate a gloo all-reduce of ``megabytes`` reaches (one process per node, the
        median of 5; what the benchmarks print next to the set rate); 0.0 if the probe printed none."""
        import json

        done = self.torchrun(["-m", "lightning_hybrid.testing.netns", "probe", f"{megabytes:g}"], nproc_per_node=1, timeout_s=300)
        line = next((ln for ln in done[0].stdout.splitlines() if ln.startswith("{")), "{}")
        return float(json.loads(line).get("mbit_per_s", 0.0))

    def run_workers(self, script: str | Path, payload: list[Any], processes: int, *, timeout_s: float = 1800.0) -> list[Any]:
        """``script --node-worker <payload as JSON> <dir>`` under torchrun on every node (``processes``
        ranks in all); every rank writes its JSON result with `write_worker_result`; returns them in
        rank order (raises with the nodes' stderr when a rank fails)."""
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            done = self.torchrun([str(script), "--node-worker", json.dumps(payload), out], nproc_per_node=processes // self.nodes,
                                 cwd=Path(__file__).resolve().parents[2], timeout_s=timeout_s)
            files = sorted(Path(out).glob("rank*.json"), key=lambda f: int(f.stem[4:]))
            if any(p.returncode for p in done) or len(files) != processes:
                raise RuntimeError("SimulatedCluster.run_workers: a rank failed:\n" + "\n".join(p.stderr[-4000:] for p in done))
            return [json.loads(f.read_text()) for f in files]


def link_bytes_sent() -> dict[str, float]:
    """Bytes sent so far by this network namespace on its shaped link (``eth0``) and its loopback
    (``lo``), from ``/proc/net/dev``; zeros for an interface it does not have."""
    out = {"eth0": 0.0, "lo": 0.0}
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() in out:
            out[name.strip()] = float(fields.split()[8])  # (transmit bytes)
    return out


def write_worker_result(out_dir: str, result: Any) -> None:
    """In a `SimulatedCluster.run_workers` rank: its result, for the caller."""
    import json

    Path(out_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


def _probe(megabytes: float, repeats: int) -> None:
    """Under torchrun: time a gloo all-reduce of ``megabytes`` between ranks 0 and the last
    (``python -m lightning_hybrid.testing.netns probe``); rank 0 prints JSON with Mbit/s."""
    import json

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    tensor = torch.ones(int(megabytes * 2**20) // 4)
    dist.all_reduce(tensor)  # warm-up (connections)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    best = sorted(times)[len(times) // 2]
    if dist.get_rank() == 0:
        print(json.dumps({"seconds": best, "mbit_per_s": tensor.numel() * 4 * 8 / best / 1e6, "world": dist.get_world_size()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        _probe(float(sys.argv[2]) if len(sys.argv) > 2 else 16.0, int(sys.argv[3]) if len(sys.argv) > 3 else 5)
