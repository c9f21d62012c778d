"""Implementation of `lightning_hybrid.testing.run_distributed` (see the package docstring)."""

from __future__ import annotations

import io
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_hybrid.forkserver import adopt_environment, default_start_method
from lightning_hybrid.forkserver import context as forkserver_context


class DistributedTestError(RuntimeError):
    """A rank of a `run_distributed` job failed, hung or died; the message holds its traceback."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dumps(obj: Any) -> bytes:
    # Tensors travel as bytes: spawn queues would otherwise share memory with a dying process.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    init_process_group: bool,
    backend: str,
    pg_timeout_s: float,
    extra_env: dict[str, str],
    queue: Any,
    parent_env: dict[str, str],
    stderr_path: str,
) -> None:
    adopt_environment(parent_env)  # (a forkserver child has the server's environment from its start)
    # this rank's stderr (Python's and C++'s: an abort's "terminate called ..." is often the only
    # trace of a rank that died hard) goes to a file the parent reads after the job
    with open(stderr_path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_RANK": "0",
            "NODE_RANK": "0",
            "OMP_NUM_THREADS": "1",
        }
    )
    os.environ.update(extra_env)
    torch.set_num_threads(1)
    try:
        if init_process_group:
            torch.distributed.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
            )
        result = fn(*args, **kwargs)
        queue.put((rank, "ok", _dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if init_process_group and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown after a failure may find peers gone
                pass


def _context(start_method: str | None) -> Any:
    method = start_method or default_start_method()
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"run_distributed(start_method={method!r}): use 'forkserver' or 'spawn'.")
    # (HybridStrategy's spawn launcher uses the same fork server in a test session)
    return forkserver_context(method)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init_process_group: bool = True,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    pg_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    start_method: Literal["forkserver", "spawn"] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` new processes; return results ordered by rank.

    Args:
        fn: a module-level function (it is pickled by reference into spawned processes).
        world_size: number of processes.
        init_process_group: initialise the default process group before calling ``fn``; leave it
            to the code under test (e.g. a Lightning Trainer) with ``False``.
        backend: process-group backend, ``"gloo"`` on CPU.
        timeout_s: wall-clock limit for the whole job; ranks still running then are killed.
        pg_timeout_s: collective timeout of the process group (short, so a stuck collective
            fails the test instead of hanging it).
        env: extra environment variables for every rank.
        start_method: how the ranks start. Default ``"forkserver"`` where the platform has it: a
            server process imports torch, Lightning, torchrec and this package once, and each rank
            is forked from it (about 4 s less per rank than ``"spawn"``, which imports everything
            afresh; the test suite runs hundreds of ranks). ``fn``'s own module is still imported
            by each rank, and each rank sees the caller's current environment either way.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size={world_size} must be >= 1.")
    ctx = _context(start_method)
    queue = ctx.SimpleQueue()
    port = find_free_port()
    logs = tempfile.TemporaryDirectory(prefix="run_distributed-")
    stderr_paths = [os.path.join(logs.name, f"rank{rank}.stderr") for rank in range(world_size)]
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                rank,
                world_size,
                port,
                fn,
                args,
                kwargs,
                init_process_group,
                backend,
                pg_timeout_s,
                dict(env or {}),
                queue,
                dict(os.environ),
                stderr_paths[rank],
            ),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            if not queue.empty():
                rank, status, payload = queue.get()
                if status == "ok":
                    results[rank] = _loads(payload)
                else:
                    errors[rank] = payload
                    # Give the other ranks a moment to report their own (often secondary) errors.
                    grace = time.monotonic() + 2.0
                    while time.monotonic() < grace and len(results) + len(errors) < world_size:
                        if not queue.empty():
                            r, s, p = queue.get()
                            if s == "ok":
                                results[r] = _loads(p)
                            else:
                                errors[r] = p
                        else:
                            time.sleep(0.02)
                    break
                continue
            dead = _dead_without_report(procs, results, errors)
            if dead and queue.empty():
                time.sleep(0.2)  # a result may still be in flight
                if queue.empty():
                    break
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if r not in results and r not in errors]
                raise DistributedTestError(
                    f"run_distributed: ranks {missing} did not finish within {timeout_s:.0f} s "
                    f"(finished: {sorted(results)}, failed: {sorted(errors)})"
                    + _stderr_tails(stderr_paths, missing)
                )
            time.sleep(0.01)
        # a rank that died hard (abort, segfault, OOM kill) reports nothing: often the root cause
        # of the others' "Connection closed by peer"
        for r in _dead_without_report(procs, results, errors):
            errors[r] = f"rank {r} died with exit code {procs[r].exitcode}{_signal_name(procs[r].exitcode)} without reporting"
    finally:
        # after a failure or timeout the survivors are stuck in collectives: don't wait for them
        finished_cleanly = not errors and len(results) == world_size
        for proc in procs:
            proc.join(timeout=10.0 if finished_cleanly else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if finished_cleanly:
            _replay_stderr(stderr_paths)
        tails = _stderr_tails(stderr_paths, sorted(errors)) if errors else ""  # (read before the folder goes)
        logs.cleanup()

    if errors:
        raise DistributedTestError(_failure_message(errors) + tails)
    return [results[r] for r in range(world_size)]


#: what a rank raises when a peer died or failed first: fallout, listed after the root cause
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "failed first with", "Broken pipe")


def _dead_without_report(procs: list[Any], results: dict[int, Any], errors: dict[int, str]) -> list[int]:
    return [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None) and r not in results and r not in errors]


def _signal_name(exitcode: int | None) -> str:
    import signal

    if exitcode is None or exitcode >= 0:
        return ""
    try:
        return f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        return ""


def _failure_message(errors: dict[int, str]) -> str:
    """Every failed rank's last line first, root causes before fallout, then the tracebacks in that order."""
    order = sorted(errors, key=lambda r: (any(m in errors[r] for m in _SECONDARY), r))
    last = {r: (errors[r].strip().splitlines() or [""])[-1][:300] for r in order}
    summary = "".join(f"\n  rank {r}: {last[r]}" for r in order)
    first = order[0]
    others = "".join(f"\n--- rank {r} ---\n{errors[r]}" for r in order[1:])
    return f"rank {first} failed:{summary}\n--- rank {first} ---\n{errors[first]}{others}"


def _read_log(path: str) -> str:
    try:
        return Path(path).read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _stderr_tails(paths: list[str], ranks: list[int], limit: int = 3000) -> str:
    tails = ((r, _read_log(paths[r]).strip()) for r in ranks)
    return "".join(f"\n--- rank {r} stderr (last {limit} characters) ---\n{text[-limit:]}" for r, text in tails if text)


def _replay_stderr(paths: list[str]) -> None:
    """A job that succeeded: its ranks' warnings still reach the caller's stderr."""
    import sys

    for r, path in enumerate(paths):
        text = _read_log(path)
        if text.strip():
            sys.stderr.write(f"[run_distributed rank {r}]\n{text}")


def pin_to_core(rank: int) -> None:
    """Pin this process to one core (rank modulo the available cores): steadier timings for
    benchmarks and timing-based tests on small machines. No-op where affinity is unsupported."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= 2:
            os.sched_setaffinity(0, {cores[rank % len(cores)]})


def write_results(path: str | os.PathLike[str], result: dict[str, Any]) -> dict[str, Any]:
    """Write a benchmark's ``result`` as indented JSON to ``path`` (its folder made); returns it."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    return result


def benchmark_parser(doc: str, results_dir: str | os.PathLike[str], name: str) -> Any:
    """The command line every benchmark starts from: its first doc line, ``--smoke`` (tiny, for
    the test suite) and ``--out`` (default ``results_dir/name``)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(Path(results_dir) / name))
    return parser
