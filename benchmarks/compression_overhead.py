"""What gradient compression costs to compute, next to the exact all-reduce it replaces, on shaped links.

The dense gradients of the quickstart recommender at ``d_model`` 256 (the SASRec of
``recipes/quickstart.yaml`` on its embedded data: every parameter outside the item table, about
1M values, 4.2 MB in fp32), exchanged between 2 simulated nodes (1 process each; network
namespaces joined by veth links shaped with ``tc tbf``, `lightning_hybrid.testing.netns`) at each
link rate, and over loopback. For each method, the median over ``repeats`` calls of
`Compressor.reduce` on the same gradients:

- ``total_ms``: the whole call;
- ``comm_ms``: the time spent in its collectives (the compressor's own clock);
- ``compute_ms``: the rest, the compressor's own work (matmuls, QR, top-k, packing, error feedback);
- ``compute / exact``: ``compute_ms`` over the exact all-reduce's ``total_ms`` at the same rate:
  the issue's bound is 25% at 1 Gbit/s;
- ``speedup``: the exact all-reduce's ``total_ms`` over the method's.

    python benchmarks/compression_overhead.py                     # rates 1000,100 Mbit/s + loopback (root, iproute2)
    python benchmarks/compression_overhead.py --rates none        # loopback only (no root needed)
    python benchmarks/compression_overhead.py --smoke --rates none

Writes benchmarks/results/compression_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS: dict[str, dict[str, Any]] = {
    "exact": {"method": "none"},
    "powersgd-r4": {"method": "powersgd", "rank": 4, "start_iter": 0},
    "topk-1%": {"method": "topk", "density": 0.01, "start_iter": 0},
}
FULL = {"d_model": 256, "items": 1000, "repeats": 15}
SMOKE = {"d_model": 16, "items": 50, "repeats": 2}


def gradients(cfg: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """Random gradients shaped like the quickstart SASRec's dense parameters (seeded per rank)."""
    import torch

    from lightning_hybrid.models.sasrec import SASRec

    model = SASRec(num_items=cfg["items"], max_len=50, d_model=cfg["d_model"], num_blocks=2, num_heads=2, loss="full")
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("item_tables")]
    gen = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
    return [torch.randn(p.shape, generator=gen) for _, p in named], [n for n, _ in named]


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Inside a process group: time every method on the same gradients."""
    import torch.distributed as dist

    from lightning_hybrid.comm.compress import GradientCompression, build_compressor

    grads, names = gradients(cfg)
    out: dict[str, Any] = {"values": sum(g.numel() for g in grads), "tensors": len(grads)}
    for method, options in METHODS.items():
        compressor = build_compressor(GradientCompression(**options), None)
        totals, comms = [], []
        for i in range(cfg["repeats"] + 2):  # two warm-up calls (connections, PowerSGD's first Q)
            work = [g.clone() for g in grads]
            dist.barrier()
            before = compressor.counter.seconds
            started = time.perf_counter()
            compressor.reduce(work, names=names, iteration=100 + i)
            total = time.perf_counter() - started
            if i >= 2:
                totals.append(total)
                comms.append(compressor.counter.seconds - before)
        out[method] = {"total_ms": 1e3 * statistics.median(totals), "comm_ms": 1e3 * statistics.median(comms),
                       "compute_ms": 1e3 * statistics.median(t - c for t, c in zip(totals, comms, strict=True))}
    return out


def _worker_under_torchrun(cfg_json: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = measure(json.loads(cfg_json))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _loopback(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lightning_hybrid.testing import pin_to_core

    pin_to_core(int(os.environ["RANK"]))
    torch.set_num_threads(1)
    return measure(cfg)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lightning_hybrid.testing import benchmark_parser

    parser = benchmark_parser(__doc__, Path(__file__).parent / "results", "compression_overhead.json")
    parser.add_argument("--rates", default="1000,100", help="link rates in Mbit/s, comma-separated, or 'none' (loopback only)")
    parser.add_argument("--worker", nargs=2, metavar=("CFG_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_under_torchrun(*args.worker)
        return {}
    cfg = SMOKE if args.smoke else FULL
    from lightning_hybrid.testing import run_distributed

    runs: dict[str, Any] = {"loopback": run_distributed(_loopback, 2, cfg, timeout_s=600)[0]}
    rates = [] if args.rates == "none" else [float(r) for r in args.rates.split(",") if r]
    if rates:
        from lightning_hybrid.testing.netns import SimulatedCluster, unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            sys.exit(f"--rates {args.rates}: {reason}; use --rates none for loopback only")
        for rate in rates:
            with SimulatedCluster(nodes=2, rate_mbit=rate) as cluster, tempfile.TemporaryDirectory() as tmp:
                target = os.path.join(tmp, "result.json")
                done = cluster.torchrun([__file__, "--worker", json.dumps(cfg), target], nproc_per_node=1, cwd=ROOT, timeout_s=900)
                if any(p.returncode for p in done) or not os.path.exists(target):
                    sys.exit("a simulated-node run failed:\n" + "\n".join(p.stderr[-3000:] for p in done))
                runs[f"{rate:g} Mbit/s"] = json.loads(Path(target).read_text())
    lines = ["| link | method | total ms | in collectives ms | compute ms | compute / exact | speedup vs exact |", "|---|---|---|---|---|---|---|"]
    for link, result in runs.items():
        exact = result["exact"]["total_ms"]
        for method in METHODS:
            if method not in result:
                continue
            r = result[method]
            r["compute_over_exact"] = r["compute_ms"] / exact
            r["speedup"] = exact / r["total_ms"]
            lines.append(f"| {link} | {method} | {r['total_ms']:.1f} | {r['comm_ms']:.1f} | {r['compute_ms']:.1f} | "
                         f"{r['compute_over_exact']:.2f} | {r['speedup']:.2f}x |")
    first = next(iter(runs.values()))
    print(f"{first['values']:,} gradient values in {first['tensors']} tensors ({4 * first['values'] / 1e6:.2f} MB fp32), config {cfg}")
    print("\n".join(lines))
    from lightning_hybrid.testing import write_results

    return write_results(args.out, {"config": cfg, "runs": runs})


if __name__ == "__main__":
    main()
