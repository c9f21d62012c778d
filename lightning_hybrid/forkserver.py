"""Processes started from a warm fork server, as if spawned.

Shared by HybridStrategy's ``spawn`` launcher (`lightning_hybrid.launch`) and the test harness
(`lightning_hybrid.testing.run_distributed`), which use one server in a test session: the server
imports the heavy modules once, and each process forked from it skips them (~8 s per process).
Light on purpose (no Lightning import): spawned harness ranks import it too.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch.multiprocessing as mp

#: imported once by the fork server, so processes forked from it start with them loaded (missing
#: ones are skipped)
PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "torchrec", "lightning_hybrid"]


def default_start_method() -> Literal["forkserver", "spawn"]:
    """A warm fork server where the platform has one, else fresh interpreters."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def context(method: Literal["forkserver", "spawn"]) -> Any:
    """The multiprocessing context for ``method``; a fork server preloads `PRELOAD` (read when the
    server starts: the first use in the process)."""
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def adopt_environment(env: dict[str, str]) -> None:
    """Make ``os.environ`` equal to ``env``: a process forked from the server inherits the server's
    environment (a snapshot from its start), not the caller's of now, which a spawned one gets."""
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
