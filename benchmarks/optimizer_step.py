"""Time of one dense optimizer step: torch's Adam as a per-tensor loop (its CPU default), foreach,
and fused (what `lightning_hybrid.optim.network_and_table_optimizer` picks where it applies),
side by side in one run on the same parameters, with the ratios to the loop; and the same for
Adagrad, the table's optimizer where HybridStrategy keeps a table on the dense kernel (replicated).

The parameters are those of `benchmarks/hybrid_vs_single.py`'s model outside its table: a separate
output layer over 100k items (d 64, 6.4M weights + bias) and 4 blocks' projections; each variant
steps them ``--steps`` times after 3 warm-up steps, one thread, median step time. The fused kernel
also equals the loop's update (tests/test_optim.py).

    python benchmarks/optimizer_step.py      # ~10 s; benchmarks/results/optimizer_step.json
    python benchmarks/optimizer_step.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lightning_hybrid.optim import fused_kernels_apply  # noqa: E402

FULL = {"items": 100_000, "d_model": 64, "num_blocks": 4, "steps": 20}
SMOKE = {"items": 200, "d_model": 16, "num_blocks": 1, "steps": 2}
DEFAULT_OUT = Path(__file__).parent / "results" / "optimizer_step.json"


def _params(cfg: dict[str, int]) -> list[torch.nn.Parameter]:
    d = cfg["d_model"]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(cfg["items"] + 1, d)), torch.nn.Parameter(torch.randn(cfg["items"] + 1))]
    for _ in range(cfg["num_blocks"]):  # q, k, v, out, two MLP layers (mlp_ratio 1), two norms
        params += [torch.nn.Parameter(torch.randn(d, d)) for _ in range(6)] + [torch.nn.Parameter(torch.randn(d)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    torch.set_num_threads(1)
    fused = fused_kernels_apply(_params(SMOKE))
    variants = {
        "loop": (torch.optim.Adam, {"foreach": False}), "foreach": (torch.optim.Adam, {"foreach": True}),
        "fused": (torch.optim.Adam, {"fused": fused}),
        "adagrad_loop": (torch.optim.Adagrad, {"foreach": False}), "adagrad_fused": (torch.optim.Adagrad, {"fused": fused}),
    }
    step_ms: dict[str, float] = {}
    for name, (cls, kwargs) in variants.items():
        params = _params(cfg)
        optimizer = cls(params, lr=1e-3, **kwargs)
        for _ in range(3):
            optimizer.step()
        times = []
        for _ in range(cfg["steps"]):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        step_ms[name] = statistics.median(times) * 1e3
    parameters = sum(p.numel() for p in _params(cfg))
    result = {
        "benchmark": "optimizer_step", "size": "smoke" if args.smoke else "full", "config": cfg, "parameters": parameters,
        "torch": torch.__version__, "step_ms": step_ms,
        "speedup_vs_loop": {k: step_ms["adagrad_loop" if k.startswith("adagrad") else "loop"] / v for k, v in step_ms.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"Optimizer step over {parameters / 1e6:.2f}M parameters, one thread (Adam, then Adagrad):")
    for name, ms in step_ms.items():
        print(f"  {name:14s} {ms:7.2f} ms  ({result['speedup_vs_loop'][name]:.2f}x the loop)")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
