"""Step time of HybridStrategy vs a hand-written torchrec + DDP loop doing the same sharding.

Both variants run in the same 2 processes, alternately, on identical per-rank batches:
  hand:   torchrec shard_modules with the same ShardingPlan, fused Adagrad tables via
          apply_optimizer_in_backward, DDP over the dense rest, a plain for-loop;
  hybrid: the same model through Trainer(strategy=HybridStrategy(...)).
The ratio hybrid/hand is the overhead of the strategy (and of Lightning's loop) per step.

    python benchmarks/strategy_overhead.py            # full run, prints a table, writes JSON
    python benchmarks/strategy_overhead.py --smoke    # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import run_distributed  # noqa: E402

SIZES = {
    "full": {"tables": [200_000, 200_000, 50_000, 10_000], "dim": 64, "batch": 512, "warmup": 10, "steps": 50, "repeats": 5},
    "smoke": {"tables": [100, 100, 50, 20], "dim": 8, "batch": 16, "warmup": 1, "steps": 3, "repeats": 1},
}
VARIANTS = {
    "hand": "hand-written torchrec + DDP loop (DDP defaults)",
    "hand_bucket_view": "same, DDP(gradient_as_bucket_view=True)",
    "hybrid": "Trainer + HybridStrategy (defaults)",
}
SHARDING = {"t0": "row_wise", "t1": "table_wise", "t2": "table_wise", "t3": "column_wise"}


_DATA: dict[tuple[int, int], Any] = {}


def _batches(cfg: dict[str, Any], rank: int, count: int) -> list[dict[str, Any]]:
    from lightning_hybrid.data.clicks import ClickDataset, collate_clicks

    key = (rank, count)
    if key not in _DATA:
        _DATA[key] = ClickDataset(
            num_samples=cfg["batch"] * count, num_dense=13, table_sizes=cfg["tables"], seed=0, sample_seed=rank + 1
        )
    data = _DATA[key]
    collate = collate_clicks(data.feature_names)
    return [collate([data[i] for i in range(b * cfg["batch"], (b + 1) * cfg["batch"])]) for b in range(count)]


def _model(cfg: dict[str, Any]):  # noqa: ANN202
    from lightning_hybrid.models.dlrm import DLRM

    class BenchDLRM(DLRM):
        """DLRM without per-step metrics: both variants do exactly forward, loss, backward, step."""

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            logits = self(batch["dense"], batch["sparse"])
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])

    torch.manual_seed(0)
    return BenchDLRM(num_dense=13, table_sizes=cfg["tables"], embedding_dim=cfg["dim"], bottom_mlp=[256, 128], top_mlp=[256, 128])


def _step_times(ends: list[float], cfg: dict[str, Any]) -> list[float]:
    """Durations between consecutive step ends, after warm-up (robust to one-off stalls via median)."""
    return [b - a for a, b in zip(ends[cfg["warmup"] : -1], ends[cfg["warmup"] + 1 :], strict=True)]


def _hand_loop(cfg: dict[str, Any], batches: list[dict[str, Any]], bucket_view: bool = False) -> list[float]:
    """torchrec used directly: what a user would write without the strategy."""
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torch.nn.parallel import DistributedDataParallel
    from torchrec.distributed.shard import shard_modules
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim import Adagrad as FusedAdagrad

    from lightning_hybrid.parallel import embedding as emb

    model = _model(cfg)
    _apply_optimizer_in_backward(FusedAdagrad, model.ebc.parameters(), {"lr": 0.05, "eps": 1e-10})
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    infos = emb.table_infos(emb.find_embedding_modules(model))
    constraints = emb.build_constraints(infos, emb.EmbeddingShardingSpec(sharding_types=SHARDING), {i.table_name: "fused" for i in infos})
    plan = emb.plan_sharding_on_rank0(model, env=env, device=torch.device("cpu"), constraints=constraints)
    shard_modules(model, env=env, device=torch.device("cpu"), plan=plan, sharders=emb.default_sharders())
    ignored = [n for n, _ in model.named_parameters() if n.startswith("ebc.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    dense = [p for n, p in model.named_parameters() if not n.startswith("ebc.")]
    opt = torch.optim.Adagrad(dense, lr=0.01)
    ends = []
    for batch in batches:
        logits = ddp(batch["dense"], batch["sparse"])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ends.append(time.perf_counter())
    return _step_times(ends, cfg)


def _hybrid(cfg: dict[str, Any], batches: list[dict[str, Any]]) -> list[float]:
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.ends.append(time.perf_counter())

    clock = StepClock()
    trainer = pl.Trainer(
        strategy=HybridStrategy(embedding_sharding=SHARDING),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[clock],
    )
    # the loop sees the same pre-built batches, one per step
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(_model(cfg), train_dataloaders=loader)
    return _step_times(clock.ends, cfg)


def _worker(size: str) -> dict[str, list[list[float]]]:
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    cfg = SIZES[size]
    rank = int(os.environ["RANK"])
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % 2]})  # one core per rank: less noise
    import torch.distributed as dist

    dist.init_process_group("gloo")  # the Trainer reuses it
    times: dict[str, list[list[float]]] = {k: [] for k in VARIANTS}
    count = cfg["warmup"] + cfg["steps"]
    for _ in range(cfg["repeats"]):  # interleave, so drifts of the shared machine hit all alike
        # fresh batches per run: torchrec caches derived data inside a KeyedJaggedTensor
        times["hand"].append(_hand_loop(cfg, _batches(cfg, rank, count)))
        times["hand_bucket_view"].append(_hand_loop(cfg, _batches(cfg, rank, count), bucket_view=True))
        times["hybrid"].append(_hybrid(cfg, _batches(cfg, rank, count)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (for tests)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "strategy_overhead.json"))
    args = parser.parse_args()
    size = "smoke" if args.smoke else "full"
    ranks = run_distributed(_worker, 2, size, init_process_group=False, timeout_s=1200)
    # Ranks run in lock-step (collectives every step): a step lasts as long as its slower rank.
    def slower(k: str, rep: int) -> list[float]:
        return [max(a, b) for a, b in zip(ranks[0][k][rep], ranks[1][k][rep], strict=True)]

    repeats = len(ranks[0]["hand"])
    per_step = {k: [t for rep in range(repeats) for t in slower(k, rep)] for k in VARIANTS}
    median = {k: statistics.median(v) for k, v in per_step.items()}
    result = {
        "benchmark": "strategy_overhead",
        "size": size,
        "config": SIZES[size],
        "sharding": SHARDING,
        "processes": 2,
        "statistic": "median over all measured steps of the slower rank's step time",
        "step_ms": {k: median[k] * 1e3 for k in VARIANTS},
        "median_per_repeat_ms": {k: [round(statistics.median(slower(k, r)) * 1e3, 3) for r in range(repeats)] for k in VARIANTS},
        "overhead_ratio": median["hybrid"] / median["hand"],
        "overhead_ratio_same_ddp_settings": median["hybrid"] / median["hand_bucket_view"],
        "target_ratio_max": 1.05,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| variant | step time (ms) | ratio to hand-written |\n|---|---|---|")
    for k, label in VARIANTS.items():
        print(f"| {label} | {median[k] * 1e3:.2f} | {median[k] / median['hand']:.3f} |")
    print(
        f"overhead vs hand-written: {(result['overhead_ratio'] - 1) * 100:+.1f}%, vs hand-written with the same "
        f"DDP settings: {(result['overhead_ratio_same_ddp_settings'] - 1) * 100:+.1f}% (target <= +5%); JSON: {args.out}"
    )

if __name__ == "__main__":
    main()
