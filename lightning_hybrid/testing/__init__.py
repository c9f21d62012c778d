"""Multi-process test harness, shipped so users can test their own modules the way we test ours.

`run_distributed(fn, world_size)` starts ``world_size`` fresh processes on this machine with the
environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT on a free
port), one thread each, and returns every rank's result. If any rank raises, the others are
stopped at once and `DistributedTestError` carries that rank's traceback; a rank that hangs or
dies without a word fails the call after ``timeout_s`` instead of blocking the test run.
"""

from lightning_hybrid.testing.harness import (
    DistributedTestError,
    benchmark_parser,
    find_free_port,
    pin_to_core,
    run_distributed,
    write_results,
)

__all__ = ["DistributedTestError", "benchmark_parser", "find_free_port", "pin_to_core", "run_distributed", "write_results"]
