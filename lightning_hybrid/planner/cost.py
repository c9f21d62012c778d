"""Cost model of one training step of an LLM-style sequential recommender under a hybrid layout.

The model (`ModelSpec`) is the reference recommender's shape: an item table (torchrec), causal
transformer blocks, an output (scoring) layer with sampled or full softmax. A `Layout` says how it
is parallelised: dp x tp x pp, microbatches and schedule, the table replicated or row-wise
sharded, and the gradient compression on the dp axis. `CostModel.estimate` prices a step on a
`Cluster` as the sum of what the slowest rank does:

- compute: FLOPs of its blocks (split by tp and pp) and of the output layer (last stage), x3 for
  forward + backward, at the device's peak x efficiency; plus the pipeline bubble, ``(pp - 1) /
  (microbatches x virtual stages)`` of the stage's compute. With ``split="balanced"`` the blocks
  are cut where the strategy's balancer would cut them (`lightning_hybrid.balance.partition_blocks`
  on the priced block, input and output costs), whole blocks per stage;
- compression's own work: PowerSGD's matmuls, the passes of error feedback and top-k selection
  (a feature of its own: these kernels run at their own speed, on CPU on backward's cores);
- memory-bound work: embedding gathers and scatters, optimizer updates (Adam on dense weights,
  Adagrad on the table: the whole table when replicated, only the touched rows when sharded);
- communication (alpha-beta model on the slowest link the group crosses; processes that share a
  core share its copying inside a node, not a link between nodes, which is slower): the dp gradient
  all-reduce (or its compressed form; only what outlasts backward, 2/3 of the compute, since the
  buckets are exchanged while backward runs), tp all-reduces of block activations (2 forward and 2
  backward per block), pp sends of activations and their gradients, the embedding all-to-all
  (over the table group when the table is sharded per group of ranks, plus the averaging of each
  shard's gradient over its copies);
- host-side dispatch of tensor-parallel (DTensor) blocks and a fixed per-step overhead
  (framework, Python), both zero unless calibrated.

`calibrate` fits seven multipliers (compute, memory, bandwidth, latency, DTensor dispatch of
tensor-parallel blocks, overhead, compression) to measured step
times by least squares on relative error, which absorbs what a first-principles model gets wrong
on a given machine (kernel efficiency, gloo's CPU cost, cores shared by processes).
Memory per device: weights, gradients and optimizer states of its share, its table shard, and
the activations of the microbatches in flight.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_hybrid.balance.partition import partition_blocks
from lightning_hybrid.planner.cluster import Cluster, Link

TableLayout = Literal["replicated", "row_wise"]
CompressionName = Literal["none", "fp16", "powersgd", "topk"]
ScheduleName = Literal["gpipe", "1f1b", "interleaved_1f1b"]
#: blocks per pipeline stage: equal shares, HybridStrategy(pipeline_split="balanced"), or a split
#: given stage by stage (as ``pipeline_split=[3, 1]``; what a measured run used)
SplitName = Literal["even", "balanced"]
FEATURES = ("compute", "memory", "bandwidth", "latency", "tp_dispatch", "overhead", "compression")
#: the multipliers before calibration (and of a feature a calibration file predates)
DEFAULT_SCALE = {"compute": 1.0, "memory": 1.0, "bandwidth": 1.0, "latency": 1.0, "tp_dispatch": 0.0, "overhead": 0.0, "compression": 1.0}


# ----------------------------------------------------------------------------------------------
# Collectives (ring algorithms, alpha-beta model); bytes are per rank
# ----------------------------------------------------------------------------------------------


CollectiveName = Literal["all_reduce", "all_gather", "all_to_all", "send"]


def ring_cost(kind: CollectiveName, nbytes: float, ranks: int) -> tuple[float, int]:
    """(bytes each rank moves, sequential message steps) of one ring collective; ``nbytes`` is the
    rank's buffer (all-gather: its own piece; send: the message)."""
    if nbytes <= 0 or (ranks <= 1 and kind != "send"):
        return 0.0, 0
    if kind == "all_reduce":
        return 2 * (ranks - 1) / ranks * nbytes, 2 * (ranks - 1)
    if kind == "all_gather":
        return (ranks - 1) * nbytes, ranks - 1
    if kind == "all_to_all":
        return (ranks - 1) / ranks * nbytes, ranks - 1
    return nbytes, 1


def collective_time(kind: CollectiveName, nbytes: float, ranks: int, link: Link) -> float:
    volume, steps = ring_cost(kind, nbytes, ranks)
    return volume / link.bandwidth + steps * link.latency


def all_reduce_time(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce: 2 (n-1)/n of the data over the link, 2 (n-1) latencies."""
    return collective_time("all_reduce", nbytes, ranks, link)


def all_gather_time(nbytes_per_rank: float, ranks: int, link: Link) -> float:
    """Ring all-gather (and reduce-scatter): (n-1) pieces of ``nbytes_per_rank`` in, n-1 latencies."""
    return collective_time("all_gather", nbytes_per_rank, ranks, link)


def all_to_all_time(nbytes: float, ranks: int, link: Link) -> float:
    """Each rank sends (n-1)/n of ``nbytes`` to the others."""
    return collective_time("all_to_all", nbytes, ranks, link)


def send_time(nbytes: float, link: Link) -> float:
    return collective_time("send", nbytes, 2, link)


# ----------------------------------------------------------------------------------------------
# What is trained, and how it is laid out
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """The reference recommender's shape and the global batch of a step.

    Attributes:
        num_items: rows of the item table (and of the output layer).
        d_model: embedding and hidden width.
        num_blocks: transformer blocks.
        num_heads: attention heads (tp must divide it).
        seq_len: positions per sequence.
        global_batch: sequences per optimizer step, over all replicas.
        mlp_ratio: MLP hidden width / d_model.
        negatives: sampled-softmax negatives per position; ``None`` for the full softmax.
        bytes_per_value: 4 (fp32) or 2 (bf16/fp16 training).
        tied_output: score against the item table itself (no separate output layer; the sampled
            negatives are looked up in the table), as large catalogues require.
        gated: LiGR blocks (``SASRec(block="ligr")``): a bias-free SwiGLU MLP (three matrices)
            and two d x d residual gates per block.
    """

    num_items: int
    d_model: int
    num_blocks: int
    num_heads: int
    seq_len: int
    global_batch: int
    mlp_ratio: int = 1
    negatives: int | None = 256
    bytes_per_value: int = 4
    tied_output: bool = False
    gated: bool = False

    def __post_init__(self) -> None:
        for name in ("num_items", "d_model", "num_blocks", "num_heads", "seq_len", "global_batch", "mlp_ratio", "bytes_per_value"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec: {name}={value!r} must be a positive integer.")
        if self.negatives is not None and (isinstance(self.negatives, bool) or self.negatives < 1):
            raise ValueError(f"ModelSpec: negatives={self.negatives!r} must be a positive integer or None (full softmax).")
        if self.tied_output and self.negatives is None:
            raise ValueError("ModelSpec: tied_output=True scores sampled negatives from the table; give negatives.")

    @property
    def block_params(self) -> int:
        d, r = self.d_model, self.mlp_ratio
        per_block = 4 * d * d + 4 * d + 2 * r * d * d + r * d + d + 4 * d  # attention, MLP, two norms
        if self.gated:  # SwiGLU's third matrix, no MLP biases; the two residual gates
            per_block += r * d * d - r * d - d + 2 * (d * d + d)
        return self.num_blocks * per_block

    @property
    def output_params(self) -> int:
        return 0 if self.tied_output else self.num_items * self.d_model

    @property
    def table_params(self) -> int:
        return (self.num_items + 1) * self.d_model

    @property
    def dense_params(self) -> int:
        return self.block_params + self.output_params

    def block_forward_flops(self, sequences: float) -> float:
        """Forward FLOPs of all blocks on ``sequences`` sequences (matmuls + attention scores)."""
        tokens = sequences * self.seq_len
        per_token = 4 + 2 * self.mlp_ratio + (self.mlp_ratio + 2 if self.gated else 0)  # d x d matmuls per token and block
        matmul = 2 * tokens * per_token * self.d_model**2 * self.num_blocks
        attention = 4 * sequences * self.seq_len**2 * self.d_model * self.num_blocks
        return matmul + attention

    def output_forward_flops(self, sequences: float) -> float:
        candidates = self.num_items if self.negatives is None else self.negatives + 1
        return 2 * sequences * self.seq_len * self.d_model * candidates

    @classmethod
    def from_sasrec(cls, model: Any, global_batch: int) -> ModelSpec:
        """The spec of a `lightning_hybrid.models.sasrec.SASRec` (its hyper-parameters)."""
        hp = model.hparams
        return cls(
            num_items=int(model.num_items), d_model=int(hp.d_model), num_blocks=int(hp.num_blocks), num_heads=int(hp.num_heads),
            seq_len=int(hp.max_len), global_batch=global_batch, mlp_ratio=int(hp.get("mlp_ratio", 1)),
            negatives=int(hp.num_negatives) if hp.get("loss", "full") == "sampled" else None, gated=hp.get("block") == "ligr",
        )


@dataclass(frozen=True)
class Layout:
    """A hybrid layout. ``kind`` names the single-mode layouts (dp, mp, tp, pp); others are hybrids."""

    dp: int
    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    schedule: ScheduleName = "1f1b"
    virtual_stages: int = 1
    table: TableLayout = "row_wise"
    compression: CompressionName = "none"
    powersgd_rank: int = 4
    topk_density: float = 0.01
    #: row-wise table sharded inside consecutive groups of this many ranks, one copy per group
    #: (``HybridStrategy(embedding_shard_group_size=...)``, torchrec's 2D layout); None: one group of all ranks
    table_group: int | None = None
    #: (pp > 1) blocks per stage: "balanced" moves blocks off the stages that also run the input
    #: part (table lookups) or the output layer, as ``pipeline_split="balanced"`` does; a tuple gives
    #: the blocks of each of the pp x virtual_stages stages
    split: SplitName | tuple[int, ...] = "even"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def kind(self) -> str:
        if self.compression == "none" and self.table == "replicated" and self.tp == 1 and self.pp == 1:
            return "dp"
        if self.dp == 1 and self.pp == 1 and self.compression == "none":
            return "mp" if self.table == "row_wise" else "tp"
        if self.dp == 1 and self.tp == 1 and self.table == "replicated" and self.compression == "none":
            return "pp"
        return "hybrid"

    def describe(self) -> str:
        parts = [f"dp{self.dp} x tp{self.tp} x pp{self.pp}",
                 f"table {self.table}" + (f" per {self.table_group} ranks" if self.table_group else "")]
        if self.pp > 1:
            parts.append(f"{self.schedule} x{self.microbatches}" + (f" v{self.virtual_stages}" if self.virtual_stages > 1 else "")
                         + ("" if self.split == "even" else " balanced" if self.split == "balanced" else
                            " split " + "+".join(map(str, self.split))))
        if self.compression != "none":
            parts.append(self.compression + (f" r{self.powersgd_rank}" if self.compression == "powersgd" else ""))
        return ", ".join(parts)

    def strategy_kwargs(self) -> dict[str, Any]:
        """The HybridStrategy options of this layout."""
        out: dict[str, Any] = {"data_parallel": self.dp, "tensor_parallel": self.tp, "pipeline_parallel": self.pp}
        if self.pp > 1:
            out.update(pipeline_schedule=self.schedule, pipeline_microbatches=self.microbatches, pipeline_virtual_stages=self.virtual_stages,
                       pipeline_split=self.split if isinstance(self.split, str) else list(self.split))
        if self.table == "replicated":
            out["shard_embeddings"] = False
        if self.table_group:
            out["embedding_shard_group_size"] = self.table_group
        if self.compression == "powersgd":
            out["gradient_compression"] = {"method": "powersgd", "rank": self.powersgd_rank}
        elif self.compression == "topk":
            out["gradient_compression"] = {"method": "topk", "density": self.topk_density}
        elif self.compression == "fp16":
            out["gradient_compression"] = {"method": "fp16"}
        return out


@dataclass
class Estimate:
    """Predicted seconds per step (by part), memory per device, and derived figures."""

    layout: Layout
    parts: dict[str, float]
    features: dict[str, float]
    step_s: float
    memory_bytes: float
    fits: bool
    samples_per_s: float = 0.0
    utilization: float = 0.0
    notes: list[str] = field(default_factory=list)



# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Prices layouts on a cluster; ``scale`` holds the calibrated multipliers of `FEATURES`."""

    cluster: Cluster
    scale: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_SCALE)
    )
    memory_headroom: float = 0.9  # plan at most this fraction of device memory

    def validate(self, model: ModelSpec, layout: Layout) -> str | None:
        """Why ``layout`` cannot run ``model`` on this cluster (None when it can)."""
        c = self.cluster
        if layout.world_size != c.world_size:
            return f"dp x tp x pp = {layout.world_size} but the cluster has {c.world_size} devices"
        if model.num_heads % layout.tp or model.d_model % layout.tp:
            return f"tp={layout.tp} does not divide num_heads={model.num_heads} / d_model={model.d_model}"
        if layout.pp * layout.virtual_stages > model.num_blocks:
            return f"pp={layout.pp} x virtual_stages={layout.virtual_stages} exceeds num_blocks={model.num_blocks}"
        per_replica = model.global_batch / layout.dp
        if per_replica != int(per_replica) or per_replica < 1:
            return f"global_batch={model.global_batch} does not split over dp={layout.dp}"
        if layout.pp > 1 and (int(per_replica) % layout.microbatches or layout.microbatches < layout.pp):
            return f"microbatches={layout.microbatches} must divide the replica batch {int(per_replica)} and be >= pp={layout.pp}"
        if layout.compression != "none" and layout.dp == 1:
            return "gradient compression needs dp > 1"
        if isinstance(layout.split, tuple):
            stages = layout.pp * layout.virtual_stages
            if layout.pp == 1 or len(layout.split) != stages or min(layout.split) < 1 or sum(layout.split) != model.num_blocks:
                return f"split={layout.split}: {stages} stages of at least one block each, {model.num_blocks} blocks in all"
        elif layout.split not in ("even", "balanced") or (layout.split == "balanced" and layout.pp == 1):
            return f"split={layout.split!r}: 'even', or 'balanced' with pp > 1"
        k = layout.table_group
        if k is not None:
            if layout.table != "row_wise" or layout.tp > 1 or layout.pp > 1:
                return f"table_group={k} needs a row-wise table, tp=1 and pp=1"
            if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k < c.world_size or c.world_size % k:
                return f"table_group={k!r} must divide the {c.world_size} devices and lie in [2, {c.world_size})"
        return None

    @staticmethod
    def _stage_by_split(
        split: str | tuple[int, ...], num_blocks: int, pp: int, virtual: int, blocks: tuple[float, float], inputs: tuple[float, float],
        output: tuple[float, float],
    ) -> tuple[float, float]:
        """(compute, memory) seconds of the busiest pipeline rank when whole blocks are cut where
        the strategy's balancer cuts them: the same exact partition, of the same quantity (forward +
        backward of each block, of the input part and of the loss head; not the optimizer step,
        which runs after the schedule). ``blocks``: all blocks together; ``inputs`` / ``output``:
        what the first / last stage adds. Rank r runs stages r, r + pp, ...; its sums follow."""
        per_block = (blocks[0] / num_blocks, blocks[1] / num_blocks)
        stages = pp * virtual
        if isinstance(split, tuple):
            blocks_per_stage = list(split)
        else:
            blocks_per_stage = partition_blocks([per_block[0]] * num_blocks, stages, first_cost=inputs[0], last_cost=output[0]).blocks_per_stage
        ranks = [[0.0, 0.0] for _ in range(pp)]
        for s, count in enumerate(blocks_per_stage):
            for k, extra in enumerate((count * per_block[0], count * per_block[1])):
                ranks[s % pp][k] += extra + (inputs[k] if s == 0 else 0.0) + (output[k] if s == stages - 1 else 0.0)
        compute_s, memory_s = max(ranks, key=sum)
        return compute_s, memory_s

    def estimate(self, model: ModelSpec, layout: Layout) -> Estimate:
        problem = self.validate(model, layout)
        if problem is not None:
            raise ValueError(f"Layout {layout.describe()}: {problem}.")
        c, dev = self.cluster, self.cluster.device
        dp, tp, pp, m = layout.dp, layout.tp, layout.pp, max(1, layout.microbatches)
        bpv = model.bytes_per_value
        replica = model.global_batch / dp
        tokens = replica * model.seq_len
        flops_per_s = dev.peak_flops * dev.efficiency * c.compute_share
        mem_per_s = dev.memory_bandwidth * c.compute_share
        parts: dict[str, float] = {}

        # compute and memory-bound work of the slowest stage: the first stage holds the table's
        # lookups and updates, the last the output layer (with pp = 1 one rank holds both)
        block_flops = 3 * model.block_forward_flops(replica) / (tp * pp)
        output_flops = 3 * model.output_forward_flops(replica)
        looked_up = tokens + (replica * model.negatives if model.tied_output and model.negatives else 0)
        lookup_bytes = 3 * looked_up * model.d_model * bpv  # gather, scatter-add of gradients, update
        group = layout.table_group or c.world_size  # ranks that shard one copy of the table
        if layout.table == "replicated":
            table_bytes = 16 * model.table_params  # the whole table's dense gradient: zero, Adagrad read/write
        elif layout.table_group:
            # table groups train the shard on the dense kernel: its whole gradient is zeroed, scanned
            # for touched rows, averaged and stepped (Adagrad read/write) every step
            table_bytes = 20 * model.table_params / group
        else:
            table_bytes = 16 * looked_up * dp * model.d_model / c.world_size
        block_update = 32 * model.block_params / (tp * pp)  # Adam: read/write weight, grad, two moments
        output_update = 32 * model.output_params
        # a replicated table lives, and is updated, on every rank (HybridStrategy looks it up on
        # each rank of a pipeline replica); a sharded one only where its rows are
        replicated_table = table_bytes if layout.table == "replicated" else 0.0
        first = (block_flops / flops_per_s, (lookup_bytes + table_bytes + block_update) / mem_per_s)
        last = ((block_flops + output_flops) / flops_per_s, (replicated_table + block_update + output_update) / mem_per_s)
        if pp == 1:
            compute_s, memory_s = last[0], first[1] + output_update / mem_per_s
        elif layout.split != "even":
            compute_s, memory_s = self._stage_by_split(
                layout.split, model.num_blocks, pp, layout.virtual_stages, (block_flops * pp / flops_per_s, block_update * pp / mem_per_s),
                (0.0, (lookup_bytes + table_bytes) / mem_per_s), (output_flops / flops_per_s, (replicated_table + output_update) / mem_per_s),
            )
        else:
            compute_s, memory_s = max((first, last), key=lambda stage: stage[0] + stage[1])
        parts["compute"] = compute_s
        parts["bubble"] = compute_s * (pp - 1) / (m * layout.virtual_stages) if pp > 1 else 0.0
        parts["memory"] = memory_s
        # gradients the slowest (last-stage) rank exchanges on the dp axis: its blocks, the output
        # layer, and a replicated table's
        blocks_local = model.block_params / (tp * pp)
        table_grads = model.table_params if layout.table == "replicated" else 0
        first_big = [(model.num_items + 1, model.d_model)] if table_grads else []
        last_big = [(model.num_items, model.d_model)] if model.output_params else []
        # (a replicated table has a gradient, zero or not, on every rank of a pipeline too)
        exchanged, big = blocks_local + model.output_params + table_grads, first_big + last_big

        # communication: bandwidth and latency terms kept apart (calibrated separately); CPU
        # processes sharing cores also share the cores gloo moves bytes with
        comm = {"bandwidth": 0.0, "latency": 0.0}

        def collective(kind: CollectiveName, nbytes: float, ranks: int, link: Link, times: float = 1.0) -> float:
            volume, steps = ring_cost(kind, nbytes, ranks)
            # processes sharing a core share the core's copying (loopback, i.e. inside a node); a
            # link between nodes is slower than the core, so sharing the core does not slow it
            share = c.compute_share if link is c.intra_node else 1.0
            bandwidth_s = times * volume / link.bandwidth / share
            latency_s = times * steps * link.latency / share
            comm["bandwidth"] += bandwidth_s
            comm["latency"] += latency_s
            return bandwidth_s + latency_s

        before_dp = dict(comm)
        dp_link = c.link_for(dp, stride=tp)
        grad_bytes = exchanged * bpv
        compress_flops = compress_bytes = 0.0
        if dp == 1:
            parts["dp_comm"] = 0.0
        elif layout.compression == "none":
            parts["dp_comm"] = collective("all_reduce", grad_bytes, dp, dp_link)
        elif layout.compression == "fp16":
            # NCCL sums fp16 in place; gloo cannot, so on CPU the halves are all-gathered and summed locally
            kind = "all_gather" if c.cores_per_node is not None else "all_reduce"
            parts["dp_comm"] = collective(kind, grad_bytes / 2, dp, dp_link)
            compress_bytes = 3 * grad_bytes + (dp * grad_bytes / 2 if kind == "all_gather" else 0)  # flatten, cast, unflatten; local sum
        elif layout.compression == "powersgd":
            r = layout.powersgd_rank
            small_bytes = grad_bytes - sum(n * k for n, k in big) * bpv
            parts["dp_comm"] = (
                collective("all_reduce", small_bytes, dp, dp_link)
                + collective("all_reduce", sum(r * n for n, _ in big) * 4, dp, dp_link)  # P
                + collective("all_reduce", sum(r * k for _, k in big) * 4, dp, dp_link)  # Q
            )
            compress_flops = sum(4 * n * k * r for n, k in big)
            compress_bytes = sum(6 * n * k * 4 for n, k in big)  # error feedback: add, approximate, subtract
        else:  # top-k: values and int32 indices all-gathered
            kept = layout.topk_density * grad_bytes / bpv
            parts["dp_comm"] = collective("all_gather", kept * 8, dp, dp_link)
            compress_bytes = 4 * grad_bytes  # residual update and selection passes
        dp_part = {k: comm[k] - before_dp[k] for k in comm}
        # compression's own kernels (PowerSGD's matmuls and orthogonalization, top-k's selection, error
        # feedback) run at their own speed, apart from the model's GEMMs, and on CPU on the cores
        # backward uses: a part (and a calibrated feature) of their own
        compress_compute_s = compress_flops / flops_per_s
        parts["compression"] = compress_compute_s + compress_bytes / mem_per_s
        # the dp exchange runs while backward still computes (DDP buckets, overlapped compressed
        # buckets): only what outlasts backward (2/3 of the step's compute, the compressor's matmuls
        # included) is on the step's path
        dp_total = parts["dp_comm"]
        if dp_total > 0:
            exposed = max(0.0, dp_total - 2 / 3 * (parts["compute"] + compress_compute_s)) / dp_total
            for key in ("bandwidth", "latency"):
                comm[key] -= (1 - exposed) * dp_part[key]
            parts["dp_comm"] *= exposed
        tp_link = c.link_for(tp)
        activation = tokens * model.d_model * bpv
        parts["tp_comm"] = collective("all_reduce", activation, tp, tp_link, times=4 * model.num_blocks / pp)
        pp_link = c.link_for(pp, stride=dp * tp)
        parts["pp_comm"] = collective("send", activation / (m * tp), 2, pp_link, times=2 * m) if pp > 1 else 0.0
        if pp > 1 and layout.table == "replicated":
            # the pipeline ranks' copies of a replicated table (read by every rank's lookup) are kept
            # equal by summing their gradients over the pp group every step (parallel.pipeline)
            parts["pp_comm"] += collective("all_reduce", model.table_params * bpv / tp, pp, pp_link)
        if layout.table == "row_wise" and c.world_size > 1:
            lookup_volume = looked_up * (model.d_model * bpv + 8)  # embeddings and int64 ids
            parts["emb_comm"] = collective("all_to_all", lookup_volume, group, c.link_for(group), times=2)
            if layout.table_group:
                # each shard's gradient averaged over the copies (parallel.table_groups): the rows its
                # group touched (indices + rows, all-gathered) while they are under 1/4 of the shard,
                # else the whole shard all-reduced
                copies, shard_rows = c.world_size // group, (model.num_items + 1) / group
                touched = min(looked_up * group, model.num_items + 1) / group
                copies_link = c.link_for(copies, stride=group)
                if touched < shard_rows / 4:
                    parts["emb_comm"] += collective("all_gather", touched * (model.d_model * bpv + 8), copies, copies_link)
                else:
                    parts["emb_comm"] += collective("all_reduce", shard_rows * model.d_model * bpv, copies, copies_link)
            if tp * pp > 1:  # each rank of a tp/pp replica looks up 1/(tp pp) of its batch, then they gather (parallel.replica_lookup)
                replica_link = c.link_for(tp * pp, stride=1 if pp == 1 else dp * tp)
                parts["emb_comm"] += collective("all_gather", looked_up * model.d_model * bpv / (tp * pp), tp * pp, replica_link, times=2)
        else:
            parts["emb_comm"] = 0.0

        features = {
            "compute": parts["compute"] + parts["bubble"],
            "memory": parts["memory"],
            "compression": parts["compression"],
            "bandwidth": comm["bandwidth"],
            "latency": comm["latency"],
            # tensor-parallel blocks run as DTensor ops: a fixed host-side cost per block and pass
            # (1 ms units; zero unless calibrated: hidden behind GPU kernels, not on CPU)
            "tp_dispatch": 3e-3 * model.num_blocks / pp / c.compute_share if tp > 1 else 0.0,
            "overhead": 1.0,
        }
        step = sum(self.scale.get(name, 0.0) * value for name, value in features.items())
        memory = self.memory_per_device(model, layout)
        est = Estimate(layout=layout, parts=parts, features=features, step_s=step, memory_bytes=memory,
                       fits=memory <= self.memory_headroom * dev.memory_bytes)
        est.samples_per_s = model.global_batch / step if step > 0 else math.inf
        busy = self.scale.get("compute", 1.0) * parts["compute"]
        est.utilization = min(1.0, busy / step) if step > 0 else 0.0
        return est

    def memory_per_device(self, model: ModelSpec, layout: Layout) -> float:
        """Weights + gradients + Adam states of the dense share, the table (shard), activations."""
        dp, tp, pp = layout.dp, layout.tp, layout.pp
        bpv = model.bytes_per_value
        dense = (model.block_params / (tp * pp) + model.output_params) * (bpv + bpv + 8)
        if layout.table == "replicated":
            table = model.table_params * (bpv + bpv + 4)  # weights, dense gradient, Adagrad state
        elif layout.table_group:
            table = model.table_params / layout.table_group * (bpv + bpv + 4)  # the group's shard, dense kernel
        else:
            table = model.table_params / self.cluster.world_size * (bpv + 4)  # fused: no gradient kept
        replica = model.global_batch / dp
        in_flight = min(layout.microbatches, pp) if pp > 1 else 1
        micro = replica / max(1, layout.microbatches) if pp > 1 else replica
        s, h, a = model.seq_len, model.d_model, model.num_heads
        per_layer = micro * s * h * (34 + 5 * a * s / h) * (bpv / 2) / tp  # Megatron's activation estimate
        activations = per_layer * (model.num_blocks / pp) * in_flight
        candidates = model.num_items if model.negatives is None else model.negatives + 1
        logits = 2 * micro * s * candidates * 4
        return dense + table + activations + logits

    def with_scale(self, scale: dict[str, float]) -> CostModel:
        return dataclasses.replace(self, scale=dict(scale))
