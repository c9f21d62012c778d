"""End every rank quickly, with the original error, when one rank fails.

Without this, an exception on one rank leaves the others blocked in their next collective until
the process-group timeout (30 minutes by default), and what they finally print is a timeout, not
the cause. The failing rank writes its error into the job's c10d store; a small watcher thread on
every other rank polls the store and, if the main thread has not failed by itself within a grace
period (gloo raises promptly once the failed process exits; NCCL may not), prints the remote error
and ends the process. A rank whose own collective broke because of the remote failure re-raises
with the remote error attached, so every rank's log names the real cause.

A lost store is a failure too: under ``env://`` rank 0 hosts the store, and if it dies hard
(SIGKILL, OOM) nobody can publish anything, while NCCL collectives may wait for the full
timeout. When the store stays unreachable for ``grace_s``, the watcher ends the process with a
message that says so. The flip side is a clean exit: rank 0 must not take the store down while
another rank is still watching it (a rank that reaches teardown a few seconds later would read
its finished peer as lost and end a successful job with exit 1). So every rank says "done" when
it stops watching, and rank 0 keeps the store up until all have, or until ``exit_wait_s``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import torch.distributed as dist


def _failed_key(namespace: str) -> str:
    return f"lightning_hybrid/{namespace}/failed_rank"


def _error_key(namespace: str, rank: int) -> str:
    return f"lightning_hybrid/{namespace}/error/{rank}"


def _done_key(namespace: str, rank: int) -> str:
    return f"lightning_hybrid/{namespace}/done/{rank}"


class FailFast:
    """Cross-rank error propagation through the default process group's store."""

    def __init__(
        self, *, rank: int, namespace: str = "", grace_s: float = 10.0, poll_s: float = 0.25, world_size: int | None = None,
        exit_wait_s: float = 120.0,
    ) -> None:
        """``namespace``: the same string on every rank of one job and new for every start. The
        store may outlive a job attempt (torchrun's agent keeps it across elastic restarts), and
        the next attempt must not read the previous one's failure. ``exit_wait_s``: how long rank 0
        waits in `stop` for the others to stop watching (only when nobody failed)."""
        self.rank = rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.exit_wait_s = exit_wait_s
        self.namespace = namespace
        self.grace_s = grace_s
        self.poll_s = poll_s
        self._store = dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self._failed_locally = False
        self._thread: threading.Thread | None = None
        self._unreachable_since: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="lightning_hybrid-failfast", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # wait until the watcher is out of any store call: the process group (and its store) may
        # be destroyed right after, and a C++ call in flight then aborts the process at exit
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * self.poll_s)
        if self._failed_locally or self.remote_error() is not None or self.store_lost():
            return  # a failing job: nobody waits for anybody (the launcher restarts or ends it)
        try:
            self._store.set(_done_key(self.namespace, self.rank), "1")
            if self.rank == 0:
                # keep the store (hosted here under env://) up until every rank has stopped
                # watching; a rank that fails meanwhile ends the wait (it is a failing job then)
                keys = [_done_key(self.namespace, r) for r in range(self.world_size)]
                deadline = time.monotonic() + self.exit_wait_s
                while not self._store.check(keys) and not self._store.check([_failed_key(self.namespace)]):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(self.poll_s)
        except Exception:  # noqa: BLE001 - the store is already gone (its host exited)
            pass

    def publish(self, exception: BaseException) -> None:
        """Record this rank's error for the others (first failing rank wins the 'failed' key)."""
        self._failed_locally = True
        text = "".join(traceback.format_exception_only(type(exception), exception)).strip()
        try:
            self._store.set(_error_key(self.namespace, self.rank), text)
            self._store.compare_set(_failed_key(self.namespace), "", str(self.rank))
        except Exception:  # noqa: BLE001 - the store may already be gone (rank 0 exited)
            pass

    def remote_error(self) -> tuple[int, str] | None:
        """(rank, message) of the first rank that failed, if another rank did."""
        try:
            found = self._store.check([_failed_key(self.namespace)])
            self._unreachable_since = None
            if not found:
                return None
            rank = int(self._store.get(_failed_key(self.namespace)).decode())
            if rank == self.rank:
                return None
            return rank, self._store.get(_error_key(self.namespace, rank)).decode()
        except Exception:  # noqa: BLE001 - the store is unreachable (its host may be gone)
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
            return None

    def store_lost(self) -> bool:
        """Whether the store has been unreachable for longer than ``grace_s``."""
        return self._unreachable_since is not None and time.monotonic() - self._unreachable_since > self.grace_s

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            remote = self.remote_error()
            if self._failed_locally:
                continue
            if remote is None and self.store_lost():
                sys.stderr.write(
                    f"[lightning_hybrid] rank {self.rank}: stopping because the job's store has been unreachable for "
                    f"{self.grace_s:.0f} s: the rank that hosts it (rank 0 under env://, or torchrun's agent) has most "
                    "likely died without an error (killed, out of memory). Its own log or the launcher's says why.\n"
                )
                sys.stderr.flush()
                os._exit(1)
            if remote is None:
                continue
            rank, message = remote
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline:
                if self._stop.wait(self.poll_s) or self._failed_locally:
                    return
            sys.stderr.write(
                f"[lightning_hybrid] rank {self.rank}: stopping because rank {rank} failed: {message}\n"
            )
            sys.stderr.flush()
            os._exit(1)


def augment_with_remote_error(exception: BaseException, remote: tuple[int, str] | None) -> None:
    """Prefix a secondary error (e.g. 'Connection closed by peer') with the remote root cause."""
    if remote is None or not exception.args:
        return
    rank, message = remote
    note = f"rank {rank} failed first with: {message}\n(this rank's own error follows) "
    first = exception.args[0]
    if isinstance(first, str) and note not in first:
        exception.args = (note + first, *exception.args[1:])
