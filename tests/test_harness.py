"""Tier 2: the shipped multi-process harness reports results, failures and hangs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from lightning_hybrid.testing import DistributedTestError, run_distributed


def _all_reduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return float(t)


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank one")
    dist.barrier()  # rank 0 would wait here forever without the harness


def _hang() -> None:
    time.sleep(60)


def _probe_env() -> tuple[str | None, str]:
    return os.environ.get("LH_HARNESS_PROBE"), os.environ["RANK"]


def test_results_come_back_in_rank_order() -> None:
    assert run_distributed(_all_reduce_rank, 2) == [1.0, 1.0]


def test_a_failing_rank_fails_the_call_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"rank 1 failed:(.|\n)*RuntimeError: boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, pg_timeout_s=60)
    assert time.monotonic() - start < 30


def test_a_hanging_rank_times_out() -> None:
    with pytest.raises(DistributedTestError, match=r"did not finish within 3 s"):
        run_distributed(_hang, 2, timeout_s=3, init_process_group=False)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_ranks_see_the_callers_environment_of_now(start_method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the fork server is started by the first call; later changes to the caller's environment
    # must still reach the ranks (as they do with spawn), and removed variables must be gone
    run_distributed(_probe_env, 1, init_process_group=False, start_method=start_method)
    monkeypatch.setenv("LH_HARNESS_PROBE", "set after the server started")
    assert run_distributed(_probe_env, 2, init_process_group=False, start_method=start_method) == [
        ("set after the server started", "0"),
        ("set after the server started", "1"),
    ]
    monkeypatch.delenv("LH_HARNESS_PROBE")
    assert run_distributed(_probe_env, 1, init_process_group=False, start_method=start_method) == [(None, "0")]


def _abort_on_rank_zero() -> None:
    if dist.get_rank() == 0:
        import sys

        sys.stderr.write("rank zero's last words\n")
        sys.stderr.flush()
        os.abort()  # dies hard: no traceback reaches the parent
    dist.barrier()  # rank 1's gloo collective then fails with "Connection closed by peer"


def test_a_rank_that_dies_hard_is_named_first_with_its_stderr() -> None:
    # the survivor's "Connection closed by peer" is fallout: the message must lead with the rank
    # that died, its signal and what it printed, whichever report arrived first
    with pytest.raises(DistributedTestError) as caught:
        run_distributed(_abort_on_rank_zero, 2, pg_timeout_s=60)
    message = str(caught.value)
    assert message.startswith("rank 0 failed:"), message[:500]
    assert "rank 0 died with exit code -6 (SIGABRT) without reporting" in message
    assert "rank zero's last words" in message
