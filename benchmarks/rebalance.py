"""What adaptive pipeline balancing (`lightning_hybrid.balance.adaptive`) costs and what it buys, 2 processes (pp=2).

Eight equal residual-MLP blocks (`lightning_hybrid.testing.toy_pipeline`), 1F1B with 4
microbatches, Adam, one process per core, gloo. "A slow device" is emulated on pipeline rank 1:
each block forward there runs ``slowdown`` times (the extra runs without autograd: real compute,
forward only). Four variants side by side in one run:

- ``even``: ranks alike, the even split, no rebalancing (the baseline);
- ``even+rebalance``: the same with ``every`` = 10: the cost of the measuring steps when nothing moves;
- ``slow``: rank 1 slow, the even split kept;
- ``slow+rebalance``: rank 1 slow, rebalancing every 10 steps: the split it moves to, the
  seconds the move took, and the steps/s after it.

    python benchmarks/rebalance.py            # prints a table, writes benchmarks/results/rebalance.json
    python benchmarks/rebalance.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import benchmark_parser, run_distributed, write_results  # noqa: E402

FULL = {"d": 256, "hidden": 1024, "blocks": 8, "batch": 256, "microbatches": 4, "steps": 60, "every": 10, "slowdown": 3}
SMOKE = {"d": 16, "hidden": 32, "blocks": 4, "batch": 16, "microbatches": 2, "steps": 6, "every": 2, "slowdown": 3}
VARIANTS = {"even": (False, False), "even+rebalance": (False, True), "slow": (True, False), "slow+rebalance": (True, True)}


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from lightning_hybrid.balance.adaptive import AdaptiveBalancer
    from lightning_hybrid.parallel.pipeline import PipelineRunner
    from lightning_hybrid.testing.toy_pipeline import ToyPipelineModel, one_core_worker

    rank, batch = one_core_worker(cfg["batch"], cfg["d"])
    out: dict[str, Any] = {}
    for name, (slow, rebalance) in VARIANTS.items():
        model = ToyPipelineModel(cfg["d"], [cfg["hidden"]] * cfg["blocks"])
        spec = model.pipeline_spec()
        if slow and rank == 1:
            def slow_forward(block: Any, x: torch.Tensor, mb: Any) -> torch.Tensor:
                with torch.no_grad():
                    for _ in range(cfg["slowdown"] - 1):
                        block(x)
                return block(x)

            spec.block_forward = slow_forward
        runner = PipelineRunner(model, spec, pp_group=dist.group.WORLD, device=torch.device("cpu"), schedule="1f1b", microbatches=cfg["microbatches"])
        optimizer = torch.optim.Adam(runner.stage_parameters(), lr=1e-4)
        balancer = AdaptiveBalancer(runner, every=cfg["every"], threshold=1.1) if rebalance else None
        steps, move_s, moved_at = [], 0.0, None
        for step in range(cfg["steps"]):
            started = time.perf_counter()
            if balancer is not None:
                balancer.before_training_step()
            runner.train_step(batch, cfg["batch"])
            optimizer.step()
            optimizer.zero_grad()
            check = time.perf_counter()
            if balancer is not None:
                record = balancer.after_optimizer_step([optimizer])
                if record is not None and record.moved:
                    move_s, moved_at = time.perf_counter() - check, step
            steps.append(time.perf_counter() - started)
        # steps/s over the second half of the run (after a first move at step `every`)
        tail = steps[len(steps) // 2 :]
        out[name] = {
            "step_ms": 1e3 * statistics.median(tail),
            "split": list(runner.blocks_per_stage),
            "moved_at_step": moved_at,
            "move_s": move_s,
            "checks": len(runner.rebalances),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = benchmark_parser(__doc__, Path(__file__).parent / "results", "rebalance.json").parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    ranks = run_distributed(_worker, 2, cfg, timeout_s=900)
    rows = {}
    for name in VARIANTS:
        row = dict(ranks[0][name])
        row["step_ms"] = max(r[name]["step_ms"] for r in ranks)  # a step ends when the slowest rank's ends
        rows[name] = row
    base, slow = rows["even"]["step_ms"], rows["slow"]["step_ms"]
    ratios = {
        "measuring_overhead (even+rebalance / even step time)": rows["even+rebalance"]["step_ms"] / base,
        "rebalanced_speedup (slow / slow+rebalance step time)": slow / rows["slow+rebalance"]["step_ms"],
    }
    print(f"| variant | step ms (median, 2nd half) | split | moved at step | move s | checks |   (config {cfg})")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['step_ms']:.1f} | {row['split']} | {row['moved_at_step']} | {row['move_s']:.3f} | {row['checks']} |")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    return write_results(args.out, {"config": cfg, "results": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
