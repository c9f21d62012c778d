"""Tables sharded over all ranks vs inside each node (one copy per node): step time and link bytes.

`lightning_hybrid.parallel.table_groups` keeps a table's embedding all-to-alls inside a node and
pays instead one all-reduce across nodes of every shard's gradient per step (dense kernel: the
whole shard, rows x dim, whatever the batch touched). Which costs less depends on the ids a step
looks up against the rows a rank holds. This benchmark measures both layouts side by side in one
run, with the library's plain functions (no Lightning): a row-wise EmbeddingCollection on the
dense kernel, jagged long-tailed id sequences, SGD on the table, for two regimes:

- ``catalogue``: 100k x 64 items, 64 sequences of up to 50 ids per rank and step (the reference
  recommender's table and batches): few ids against many rows;
- ``dense_ids``: 4k x 256, 128 sequences of up to 200 ids per rank: many ids against few, wide rows.

On 2 simulated nodes x 2 processes (``--link-rates``, root; `lightning_hybrid.testing.netns`)
each rate's row gives the median step time of both layouts, their ratio, and what a node sent on
its shaped link per step. After the same batches both layouts hold the same table (the largest
difference is printed: the layouts are exact, they differ in where bytes go).

    python benchmarks/table_groups.py --link-rates 1000 --out benchmarks/results/table_groups_links.json   # ~2 min; root
    python benchmarks/table_groups.py --smoke           # tiny, on loopback; what the test suite runs
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_hybrid.testing import benchmark_parser, run_distributed  # noqa: E402
from lightning_hybrid.testing.netns import link_bytes_sent  # noqa: E402

REGIMES: dict[str, dict[str, int]] = {
    "catalogue": {"rows": 100_000, "dim": 64, "sequences": 64, "max_len": 50},
    "dense_ids": {"rows": 4_000, "dim": 256, "sequences": 128, "max_len": 200},
}
SMOKE = {"tiny": {"rows": 64, "dim": 8, "sequences": 4, "max_len": 6}}
LAYOUTS = ("world", "node")
STEPS, WARMUP = 12, 3


def _batch(cfg: dict[str, int], rank: int, step: int) -> Any:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(1, cfg["max_len"] + 1, (cfg["sequences"],), generator=g)
    # long-tailed ids: a few rows take most lookups, as item popularity does
    ids = (cfg["rows"] * torch.rand(int(lengths.sum()), generator=g) ** 3).long().clamp_(max=cfg["rows"] - 1)
    return KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths)


def _layout_steps(cfg: dict[str, int], layout: str, local_world_size: int) -> dict[str, Any]:
    """Shard one table by ``layout`` and time STEPS steps; every rank returns its timings."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.parallel import embedding as emb
    from lightning_hybrid.parallel import table_groups as tg

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.ec = EmbeddingCollection(tables=[EmbeddingConfig(name="t", embedding_dim=cfg["dim"], num_embeddings=cfg["rows"], feature_names=["f"])])
    spec = emb.EmbeddingShardingSpec(sharding_types={"t": "row_wise"}, compute_kernels={"t": "dense"})
    constraints = emb.build_constraints(emb.table_infos(emb.find_embedding_modules(model)), spec, {"t": "dense"})
    groups = tg.make_table_groups(local_world_size) if layout == "node" else None
    env = groups.sharding_env() if groups else ShardingEnv.from_process_group(dist.group.WORLD)
    plan = emb.plan_sharding_on_rank0(model, env=groups.planning_env() if groups else env, device=torch.device("cpu"), constraints=constraints,
                                      local_world_size=local_world_size)
    if groups:
        tg.move_plan_to_group(plan, groups)
    modules = emb.shard_embeddings_in_place(model, plan=plan, env=env, device=torch.device("cpu"))
    params = tg.table_parameters(modules.values())
    optimizer = torch.optim.SGD(params, lr=0.05)
    weight = torch.randn(cfg["dim"], generator=torch.Generator().manual_seed(7)) / cfg["dim"] ** 0.5
    times, link = [], []
    for step in range(STEPS):
        batch = _batch(cfg, rank, step)
        dist.barrier()
        before, start = link_bytes_sent(), time.perf_counter()
        # (tanh: bounded, so rows keep a non-zero gradient step after step)
        loss = (model.ec(batch)["f"].values() @ weight).tanh().sum() / cfg["sequences"]
        loss.backward()
        if groups:
            tg.average_table_gradients(params, groups)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()  # (the step ends when the slowest rank's does)
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
            after = link_bytes_sent()
            link.append({k: after[k] - before[k] for k in after})
    table = full_state_dict(model.ec).get("embeddings.t.weight")
    return {"step_s": statistics.median(times), "link_mb": {k: statistics.median(m[k] for m in link) / 1e6 for k in ("eth0", "lo")},
            "table": table.tolist() if table is not None and cfg["rows"] * cfg["dim"] <= 4096 else None,
            "table_sum": float(table.double().abs().sum()) if table is not None else None}


def _worker(regimes: dict[str, dict[str, int]], local_world_size: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    return {name: {layout: _layout_steps(cfg, layout, local_world_size) for layout in LAYOUTS} for name, cfg in regimes.items()}


def _node_worker(args_json: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from lightning_hybrid.testing.netns import write_worker_result

    dist.init_process_group("gloo")
    write_worker_result(out_dir, _worker(json.loads(args_json)[0], int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.destroy_process_group()


def _rows(ranks: list[dict[str, Any]], regimes: dict[str, Any], label: str) -> tuple[dict[str, Any], list[str]]:
    results, lines = {}, []
    for name in regimes:
        row: dict[str, Any] = {}
        for layout in LAYOUTS:
            per_rank = [r[name][layout] for r in ranks]
            reporting = [r["link_mb"] for r in per_rank if r["link_mb"]["eth0"] or r["link_mb"]["lo"]]
            row[layout] = {"step_ms": 1e3 * max(r["step_s"] for r in per_rank),
                           "inter_node_mb": statistics.mean(m["eth0"] for m in reporting) if reporting else None,
                           "intra_node_mb": statistics.mean(m["lo"] for m in reporting) if reporting else None}
        world, node = ranks[0][name]["world"], ranks[0][name]["node"]
        row["table_abs_sum"] = {"world": world["table_sum"], "node": node["table_sum"]}
        row["node_speedup"] = row["world"]["step_ms"] / row["node"]["step_ms"]
        results[name] = row
        mb = {k: (f"{v['inter_node_mb']:.2f}" if v["inter_node_mb"] is not None else "-") for k, v in row.items() if k in LAYOUTS}
        lines.append(f"| {label} | {name} | {row['world']['step_ms']:.1f} | {row['node']['step_ms']:.1f} | {row['node_speedup']:.2f}x | "
                     f"{mb['world']} | {mb['node']} |")
    return results, lines


HEADER = ["| link | regime | all ranks: step (ms) | per node: step (ms) | per node / all ranks | all ranks: inter-node MB / step | per node: inter-node MB / step |",
          "|---|---|---|---|---|---|---|"]


def main() -> None:
    parser = benchmark_parser(__doc__, Path(__file__).parent / "results", "table_groups_links.json")
    parser.add_argument("--link-rates", default="1000", help="Mbit/s between the 2 simulated nodes, comma-separated (root)")
    parser.add_argument("--node-worker", nargs=2, metavar=("ARGS_JSON", "OUT_DIR"), help="(internal)")
    args = parser.parse_args()
    if args.node_worker:
        _node_worker(*args.node_worker)
        return
    results: dict[str, Any] = {}
    lines = list(HEADER)
    if args.smoke:  # 4 processes on loopback as 2 "nodes" of 2 (no shaping): it runs, the layouts agree
        ranks = run_distributed(_worker, 4, SMOKE, 2, timeout_s=240)
        results["loopback"], rows = _rows(ranks, SMOKE, "loopback")
        results["loopback"]["tiny"]["tables"] = {layout: ranks[0]["tiny"][layout]["table"] for layout in LAYOUTS}
        lines += rows
    else:
        from lightning_hybrid.testing.netns import SimulatedCluster, unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            sys.exit(f"--link-rates: {reason}")
        for rate in [float(r) for r in args.link_rates.split(",")]:
            with SimulatedCluster(nodes=2, rate_mbit=rate) as cluster:
                ranks = cluster.run_workers(__file__, [REGIMES], 4, timeout_s=900)
            results[f"{rate:g}Mbit"], rows = _rows(ranks, REGIMES, f"{rate:g} Mbit/s")
            lines += rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "table_groups", "regimes": SMOKE if args.smoke else REGIMES, "steps": STEPS,
                                          "warmup": WARMUP, "results": results}, indent=2))
    print("\n".join(lines))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
