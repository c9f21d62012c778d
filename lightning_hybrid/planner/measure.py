"""Measure a cluster's links, for the planner: ``torchrun ... -m lightning_hybrid.planner.measure``.

The planner's cost model (`lightning_hybrid.planner.cost`) prices every collective with a link's
per-device bandwidth and per-message latency, inside a node (``intra_node``) and between nodes
(``inter_node``). Presets give typical figures; this measures the ones of the cluster at hand.
Launched like training, one process per device on every node (torchrun, SLURM), it times gloo (or
NCCL with ``--backend nccl``) all-reduces of a small and a large message

- among the ranks of each node (intra-node; needs 2+ processes per node), and
- among the first rank of every node (inter-node; needs 2+ nodes),

fits ``time = latency * steps + volume / bandwidth`` (ring all-reduce: ``2 (n - 1)`` steps and
``2 (n - 1) / n`` x the message per device) to the two sizes, and rank 0 writes a cluster YAML:
the base preset's device, the measured links (a link that could not be measured keeps the
preset's figure, and a comment in the file says so), and the nodes and devices per node of the launch.

    torchrun --nnodes 2 --nproc-per-node 2 ... -m lightning_hybrid.planner.measure --out cluster.yaml --base cpu-2core
    lightning-hybrid plan -c recipes/quickstart.yaml --cluster cluster.yaml
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

SMALL, LARGE = 4 * 2**10, 16 * 2**20  # bytes of the two messages


def time_all_reduce(nbytes: int, group: Any, repeats: int) -> float:
    """Median seconds of an all-reduce of ``nbytes`` over ``group`` (after one warm-up)."""
    import torch
    import torch.distributed as dist

    tensor = torch.ones(max(1, nbytes // 4), device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(tensor, group=group)
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        if tensor.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        dist.all_reduce(tensor, group=group)
        if tensor.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fit_link(small_s: float, large_s: float, ranks: int) -> dict[str, float]:
    """Bandwidth (bytes/s per device, one direction) and latency (s per step) from the two timings
    of a ring all-reduce over ``ranks`` ranks."""
    steps = 2 * (ranks - 1)
    share = 2 * (ranks - 1) / ranks
    bandwidth = share * (LARGE - SMALL) / max(large_s - small_s, 1e-9)
    latency = max(small_s - share * SMALL / bandwidth, 0.0) / steps
    return {"bandwidth": float(bandwidth), "latency": float(latency)}


def measure(repeats: int = 5) -> dict[str, Any]:
    """In a process group started by torchrun: the measured links (None where not measurable)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // per_node
    out: dict[str, Any] = {"nodes": nodes, "devices_per_node": per_node, "intra_node": None, "inter_node": None}
    # every rank creates every group, in the same order (new_group is collective)
    node_groups = [dist.new_group(list(range(n * per_node, (n + 1) * per_node))) for n in range(nodes)]
    leaders = dist.new_group([n * per_node for n in range(nodes)])
    if per_node > 1:
        mine = node_groups[rank // per_node]
        small, large = time_all_reduce(SMALL, mine, repeats), time_all_reduce(LARGE, mine, repeats)
        out["intra_node"] = fit_link(small, large, per_node)
    dist.barrier()
    if nodes > 1 and rank % per_node == 0:
        small, large = time_all_reduce(SMALL, leaders, repeats), time_all_reduce(LARGE, leaders, repeats)
        out["inter_node"] = fit_link(small, large, nodes)
    dist.barrier()
    return out


def cluster_yaml(measured: dict[str, Any], base: str) -> dict[str, Any]:
    """The cluster description the planner reads: ``base``'s device, the measured links."""
    import dataclasses

    from lightning_hybrid.planner.cluster import preset

    data = dataclasses.asdict(preset(base))
    data.update(name=f"measured links, {base} device", nodes=measured["nodes"], devices_per_node=measured["devices_per_node"])
    for name in ("intra_node", "inter_node"):
        if measured.get(name) is not None:
            data[name] = measured[name]
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where rank 0 writes the cluster YAML")
    parser.add_argument("--base", default="cpu-2core", help="the preset whose device the file describes")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import torch.distributed as dist
    import yaml

    if "RANK" not in os.environ:
        parser.error("run it under torchrun (or srun), one process per device on every node: it measures the links between them")
    dist.init_process_group(args.backend)
    if args.backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        measured_links = measure(args.repeats)
        data = cluster_yaml(measured_links, args.base)
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                f.write(f"# lightning_hybrid.planner.measure: {data['nodes']} nodes x {data['devices_per_node']} processes\n")
                for name in ("intra_node", "inter_node"):
                    if measured_links.get(name) is None:
                        f.write(f"# {name}: not measurable with this launch (needs 2+ {'processes per node' if name == 'intra_node' else 'nodes'}): {args.base}'s figure\n")
                yaml.safe_dump(data, f, sort_keys=False)
            print(f"measured links -> {args.out}: intra_node {data['intra_node']}, inter_node {data['inter_node']}", flush=True)
    finally:
        dist.destroy_process_group()
    return data


if __name__ == "__main__":
    main()
