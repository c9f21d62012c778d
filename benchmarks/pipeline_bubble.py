"""Measured pipeline bubble of GPipe, 1F1B, interleaved 1F1B and zero bubble, 2 processes (pp=2).

Eight equal residual-MLP blocks (`lightning_hybrid.testing.toy_pipeline`), one process per core,
gloo. For each schedule and number of microbatches m the bubble fraction is measured on every rank
as 1 - (time in the stage's forward/backward compute) / (time of the whole schedule step),
averaged over the ranks, median over steps; next to the theory (p-1)/(m+p-1) (with v stages per
rank: (p-1)/(v m + p-1)).

    python benchmarks/pipeline_bubble.py            # prints a table, writes benchmarks/results/pipeline_bubble.json
    python benchmarks/pipeline_bubble.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import run_distributed  # noqa: E402

SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zero_bubble": 2}  # name -> stages per rank
FULL = {"d": 256, "hidden": 1024, "blocks": 8, "batch": 512, "microbatches": [2, 4, 8], "steps": 8, "warmup": 2}
SMOKE = {"d": 16, "hidden": 32, "blocks": 4, "batch": 16, "microbatches": [2, 4], "steps": 2, "warmup": 1}


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from lightning_hybrid.parallel.pipeline import PipelineRunner
    from lightning_hybrid.testing.toy_pipeline import ToyPipelineModel, one_core_worker

    _, batch = one_core_worker(cfg["batch"], cfg["d"])
    out: dict[str, Any] = {}
    for schedule, virtual in SCHEDULES.items():
        for m in cfg["microbatches"]:
            if schedule == "1f1b" and m < 2:
                continue
            model = ToyPipelineModel(cfg["d"], [cfg["hidden"]] * cfg["blocks"])
            runner = PipelineRunner(
                model, model.pipeline_spec(), pp_group=dist.group.WORLD, device=torch.device("cpu"),
                schedule=schedule, microbatches=m, virtual_stages=virtual,
            )
            bubbles, steps = [], []
            for step in range(cfg["warmup"] + cfg["steps"]):
                runner.train_step(batch, cfg["batch"])
                metrics = runner.stage_metrics()
                if step >= cfg["warmup"]:
                    bubbles.append(metrics["pipeline/bubble_fraction"])
                    steps.append(runner.last_step["schedule_s"])
            out[f"{schedule}/m={m}"] = {
                "schedule": schedule, "microbatches": m, "virtual_stages": virtual,
                "bubble_measured": statistics.median(bubbles), "step_ms": statistics.median(steps) * 1e3,
                "bubble_theory": metrics["pipeline/theoretical_bubble"],
                "bubble_theory_gpipe_formula": 1 / (m + 1),  # (p-1)/(m+p-1) with p = 2
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline_bubble.json"))
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    results = run_distributed(_worker, 2, cfg, timeout_s=1800)[0]
    table = [
        "| schedule | stages / rank | microbatches m | bubble measured | (p-1)/(m+p-1) | theory for the schedule | step (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        table.append(
            f"| {r['schedule']} | {r['virtual_stages']} | {r['microbatches']} | {r['bubble_measured']:.3f} | "
            f"{r['bubble_theory_gpipe_formula']:.3f} | {r['bubble_theory']:.3f} | {r['step_ms']:.1f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "pipeline_bubble", "config": cfg, "pipeline_parallel": 2, "results": results}, indent=2))
    print("\n".join(table))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
