"""Memory per rank of the output layer at 1M items: a separate ``Linear`` vs the tied, shard-parallel softmax.

One training step of the scoring layer alone (full softmax over ``items`` + 1 rows, ``rows`` hidden
states of width ``d`` per rank), each variant in fresh processes; the peak resident memory the
step adds on each rank (``ru_maxrss`` after minus before, the inputs already built):

- ``separate``: ``Linear(d, items + 1)`` replicated on every rank (its weight and gradient live on
  every rank; an Adam optimizer would add two more copies, counted analytically in the table),
  logits ``rows x (items + 1)`` materialised by ``F.cross_entropy`` (the model before 0.3);
- ``separate, chunked``: the same layer through `lightning_hybrid.models.losses.full_softmax_loss`
  (what ``SASRec(output="separate")`` runs now): rows scored in ~256 MB chunks, recomputed in backward;
- ``tied``, over P = 2 and 4 processes: the item table row-wise over the ranks (its rows are the
  input table's: no extra weight), hidden states gathered, logits computed in chunks of rows
  (`lightning_hybrid.parallel.tied_output`).

    python benchmarks/tied_output_memory.py            # ~1 min; benchmarks/results/tied_output_memory.json
    python benchmarks/tied_output_memory.py --smoke
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import benchmark_parser, run_distributed, write_results  # noqa: E402

FULL = {"items": 1_000_000, "d": 64, "rows": 256}
SMOKE = {"items": 2_000, "d": 16, "rows": 32, "chunk_bytes": 2_000 * 4 * 8}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # (kB on Linux)


def _step(cfg: dict[str, Any], variant: str) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from lightning_hybrid.parallel.tied_output import TableRows, sharded_cross_entropy

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    n = cfg["items"] + 1
    hidden = torch.randn(cfg["rows"], cfg["d"], generator=gen, requires_grad=True)
    targets = torch.randint(1, n, (cfg["rows"],), generator=gen)
    if variant in ("separate", "chunked"):
        from lightning_hybrid.models.losses import full_softmax_loss

        layer = torch.nn.Linear(cfg["d"], n, bias=False)
        before = _peak_mb()
        if variant == "chunked":
            full_softmax_loss(hidden, targets, layer.weight, chunk_bytes=cfg.get("chunk_bytes", 256 * 2**20)).backward()
        else:
            logits = layer(hidden)
            mask = torch.zeros(n)
            mask[0] = float("-inf")
            torch.nn.functional.cross_entropy(logits + mask, targets).backward()
        weight_mb = 2 * layer.weight.numel() * 4 / 2**20  # weight + gradient (Adam: 2 more copies)
    else:
        block = -(-n // world)
        rows = min(block, n - rank * block)
        table = torch.randn(rows, cfg["d"], generator=gen, requires_grad=True)  # (the input table's own rows)
        before = _peak_mb()
        sharded_cross_entropy(hidden, targets, TableRows(table, rank * block, n, dist.group.WORLD)).mean().backward()
        weight_mb = table.numel() * 4 / 2**20  # the table's gradient (the rows themselves are the input table)
    return {"step_peak_mb": _peak_mb() - before, "weight_and_grad_mb": weight_mb}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = benchmark_parser(__doc__, Path(__file__).parent / "results", "tied_output_memory.json").parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    rows = {}
    variants = (("separate", "separate", 1), ("separate, chunked", "chunked", 1), ("tied P=2", "tied", 2), ("tied P=4", "tied", 4))
    for name, variant, world in variants:
        ranks = run_distributed(_step, world, cfg, variant, timeout_s=600)
        rows[name] = {key: max(r[key] for r in ranks) for key in ranks[0]}
    adam_mb = 2 * (cfg["items"] + 1) * cfg["d"] * 4 / 2**20
    print(f"| variant | step peak MB per rank (logits and their gradient) | weight + gradient MB per rank | + Adam state MB |   (config {cfg})")
    print("|---|---|---|---|")
    for name, row in rows.items():
        extra = f"{adam_mb:.0f}" if name.startswith("separate") else "0 (the input table's)"
        print(f"| {name} | {row['step_peak_mb']:.0f} | {row['weight_and_grad_mb']:.0f} | {extra} |")
    return write_results(args.out, {"config": cfg, "results": rows, "separate_adam_mb": adam_mb})


if __name__ == "__main__":
    main()
