"""Item scoring through the sharded item table itself: an exact full softmax no rank holds whole.

A recommender that scores items with a separate ``Linear(d, num_items + 1)`` keeps a second copy of
the catalogue, neither sharded with the item table nor tied to it; for catalogues of millions of
items it is the largest thing in the model, and its fp32 logits the largest activation. Here the
output is *tied* to the item embeddings and computed where the rows live:

- **Rows.** `table_rows` finds this rank's rows of a torchrec-sharded table (row-wise or
  table-wise; the dense kernel, whose weights take gradients) as a differentiable view of the
  kernel's flat weight, with the global id of its first row. An unsharded table (one process, or
  ``shard_embeddings=False``) is its whole weight.
- **Loss.** `sharded_cross_entropy`: the hidden states of every rank of the group are gathered
  (the only activation that moves: ``N x d``, not ``N x V``), each rank scores them against its
  rows, a distributed log-sum-exp (max, then sum of exponentials, all-reduced) and the target's
  logit (from the rank that holds the target row, all-reduced) give each row's exact
  cross-entropy. Backward: each rank's gradient of its rows' logits (softmax minus one-hot, times
  the row's upstream gradient, gathered the same way) gives its rows' weight gradient and a
  partial hidden-state gradient, summed over the group and sliced back to each rank's rows. No
  rank ever holds ``N x V`` logits: memory per rank falls with the number of shards.
- **Ranking.** `sharded_target_ranks`: the 0-based rank of each target among all items (the items
  scored at least as high), counted on every shard and summed: exactly what
  `lightning_hybrid.metrics.target_ranks` computes on full scores, with a user's seen items masked
  on the shard that holds them. `sharded_top_k`: each shard's top-k, gathered and merged: the exact
  top-k of all items.

Gradient scale: the table's weight gradient is divided by the group size, the convention of
torchrec's sharded lookups (each rank's loss is its mean; data parallelism averages), so the tied
model's table takes the same step as one process on the global batch. Row 0 (padding) is never a
candidate. Every rank of the group must call these together (they are collectives): the loss of
every rank's batch, every evaluation batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class TableRows:
    """This rank's rows of an item table: ``weight`` [rows, d] (a differentiable view; 0 rows on a
    rank that holds none), the global id of its first row, the table's row count, and the group
    that holds the table (None: the whole table is here)."""

    weight: torch.Tensor
    offset: int
    num_rows: int
    group: Any = None

    @property
    def sharded(self) -> bool:
        return self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1


def table_rows(module: nn.Module, table: str) -> TableRows:
    """``table``'s rows in ``module``: a torchrec EmbeddingCollection (sharded or not) or a
    ``nn.ModuleDict`` of ``nn.Embedding``."""
    if isinstance(module, nn.ModuleDict) and isinstance(module[table], nn.Embedding):
        weight = module[table].weight
        return TableRows(weight, 0, weight.shape[0])
    from torchrec import EmbeddingCollection

    if isinstance(module, EmbeddingCollection):  # unsharded (one process, shard_embeddings=False)
        weight = module.embeddings[table].weight
        return TableRows(weight, 0, weight.shape[0])
    return _sharded_rows(module, table)


def _sharded_rows(module: nn.Module, table: str) -> TableRows:
    from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbedding, BatchedFusedEmbedding

    plan = getattr(module, "module_sharding_plan", None) or {}
    sharding = plan.get(table) if isinstance(plan, dict) else None
    kind = getattr(sharding, "sharding_type", None)
    if kind not in (None, "row_wise", "table_wise"):
        raise ValueError(
            f"Tied output over the sharded table {table!r}: sharding type {kind!r} is not supported (each shard must hold "
            f"whole rows). Use HybridStrategy(embedding_sharding={{{table!r}: 'row_wise'}}) or 'table_wise'."
        )
    for lookup in getattr(module, "_lookups", []):
        inner = getattr(lookup, "module", lookup)
        for kernel in getattr(inner, "_emb_modules", []):
            for t, config in enumerate(kernel._config.embedding_tables):
                if config.name != table:
                    continue
                if isinstance(kernel, BatchedFusedEmbedding) or not isinstance(kernel, BatchedDenseEmbedding):
                    raise ValueError(
                        f"Tied output over the sharded table {table!r} needs its dense kernel (fbgemm's fused kernel updates "
                        f"the rows inside the lookup's backward and takes no other gradient): "
                        f"HybridStrategy(embedding_kernels={{{table!r}: 'dense'}})."
                    )
                emb = kernel._emb_module
                rows, dim = emb.embedding_specs[t]
                start = int(emb.weights_physical_offsets[t])
                weight = emb.weights[start : start + rows * dim].view(rows, dim)
                metadata = config.local_metadata
                offset = int(metadata.shard_offsets[0]) if metadata is not None else 0
                return TableRows(weight, offset, int(config.num_embeddings), _shard_group(module))
    # a table-wise table placed on another rank: no rows here
    config = _table_config(module, table)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    rows = torch.zeros(0, int(config.embedding_dim), device=device, requires_grad=True)
    return TableRows(rows, 0, int(config.num_embeddings), _shard_group(module))


def _shard_group(module: nn.Module) -> Any:
    # all ranks, or the table group holding this copy of the table (`parallel.table_groups`)
    return getattr(module, "hybrid_shard_group", None) or dist.group.WORLD


def _table_config(module: nn.Module, table: str) -> Any:
    for config in getattr(module, "_embedding_configs", []) or []:
        if config.name == table:
            return config
    raise ValueError(f"Tied output: no table {table!r} in {type(module).__name__}.")


# -- gathering rows of every rank -----------------------------------------------------------------


def _gather_rows(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``x`` (first dimensions may differ), concatenated in rank order; and the sizes."""
    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    width = max(counts)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), counts


def _local_logits(hidden: torch.Tensor, rows: torch.Tensor, offset: int) -> torch.Tensor:
    logits = hidden @ rows.t()
    if offset == 0 and rows.shape[0] > 0:  # row 0 (padding) is never a candidate
        logits[:, 0] = float("-inf")
    return logits


#: rows of logits computed at once: chunk x (this rank's rows) fp32 stays under ~64 MB
CHUNK_ELEMENTS = 16 * 2**20


def _chunks(rows: int, columns: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, columns))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


class _ShardedCrossEntropy(torch.autograd.Function):
    """Forward: per-row log-sum-exp over every shard and the target's logit; backward recomputes
    the logits chunk by chunk (nothing of size rows x items is kept between the two)."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, offset: int, group: Any, items: int, eps: float
    ) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        h_all, counts = _gather_rows(hidden.detach().float(), group)
        t_all, _ = _gather_rows(targets, group)
        w = weight.detach().float()
        n = h_all.shape[0]
        top = torch.full((n,), float("-inf"), device=h_all.device)
        total = torch.zeros(n, device=h_all.device)
        target_logit = torch.zeros(n, device=h_all.device)
        local = t_all - offset
        mine = (local >= 0) & (local < w.shape[0])
        if w.shape[0]:
            for rows in _chunks(n, w.shape[0]):
                logits = _local_logits(h_all[rows], w, offset)
                top[rows] = logits.max(dim=1).values
                total[rows] = (logits - top[rows, None]).exp().sum(dim=1)
                hit = mine[rows]
                target_logit[rows][hit] = logits[hit, local[rows][hit]]
        # this shard's (max, sum of exp) per row -> the global ones
        global_top = top.clone()
        dist.all_reduce(global_top, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([total * (top - global_top).exp(), target_logit])  # (no rows here: exp(-inf) = 0)
        dist.all_reduce(both, group=group)
        loss_all = global_top + both[0].log() - both[1]
        # label smoothing: eps of the target spread over the `items` real items; their mean logit is
        # h . (sum of every shard's real rows) / items, so one d-wide all-reduce serves every row
        row_sum = None
        if eps:
            row_sum = (w[1:] if offset == 0 else w).sum(0)
            total_rows = row_sum.clone()
            dist.all_reduce(total_rows, group=group)
            loss_all = loss_all + eps * (both[1] - h_all @ total_rows / items)
        start = sum(counts[:rank])
        ctx.save_for_backward(h_all, global_top, both[0], t_all, w)
        ctx.offset, ctx.group, ctx.counts, ctx.start, ctx.world = offset, group, counts, start, world
        ctx.eps, ctx.items, ctx.row_sum = eps, items, row_sum
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss_all[start : start + hidden.shape[0]].to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        h_all, top, total, t_all, w = ctx.saved_tensors
        g_all, _ = _gather_rows(grad_loss.float().contiguous(), ctx.group)  # every row's upstream gradient
        grad_weight = torch.zeros_like(w)
        grad_hidden = torch.zeros_like(h_all)
        if w.shape[0]:
            local = t_all - ctx.offset
            mine = (local >= 0) & (local < w.shape[0])
            for rows in _chunks(h_all.shape[0], w.shape[0]):
                # softmax over every item, restricted to this shard's columns, minus the one-hot target
                d_logits = (_local_logits(h_all[rows], w, ctx.offset) - top[rows, None]).exp() / total[rows, None]
                hit = mine[rows].nonzero().squeeze(1)
                d_logits[hit, local[rows][hit]] -= 1.0 - ctx.eps
                d_logits *= g_all[rows, None]
                grad_weight += d_logits.t() @ h_all[rows]
                grad_hidden[rows] = d_logits @ w
            if ctx.eps:  # the smoothing term -eps/items * sum_j logit_j, through this shard's rows
                scale = ctx.eps / ctx.items
                grad_hidden -= scale * g_all[:, None] * ctx.row_sum[None, :]
                first = 1 if ctx.offset == 0 else 0
                grad_weight[first:] -= scale * (g_all[:, None] * h_all).sum(0)
        grad_weight /= ctx.world  # (torchrec's convention for sharded tables: the mean over the ranks' losses)
        dist.all_reduce(grad_hidden, group=ctx.group)  # every shard's part of each row's gradient
        mine_rows = grad_hidden[ctx.start : ctx.start + ctx.counts[dist.get_rank(ctx.group)]]
        return mine_rows.to(ctx.hidden_dtype), None, grad_weight.to(ctx.weight_dtype), None, None, None, None


def sharded_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, rows: TableRows, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row cross-entropy [N] of ``hidden`` [N, d] scored against every item of the table
    (``logits = hidden @ table.T``, row 0 excluded), for targets [N] (global item ids). On a sharded
    table a collective: every rank of ``rows.group`` calls it, with its own rows (N may differ).
    ``label_smoothing``: as `lightning_hybrid.models.losses.item_cross_entropy`."""
    if not rows.sharded:
        from lightning_hybrid.models.losses import item_cross_entropy

        return item_cross_entropy(_local_logits(hidden, rows.weight, 0).float(), targets, label_smoothing)
    return _ShardedCrossEntropy.apply(hidden, targets, rows.weight, rows.offset, rows.group, rows.num_rows - 1, float(label_smoothing))


def _scored_chunks(h_all: torch.Tensor, rows: TableRows, targets: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor] | None) -> Any:
    """(row slice, this shard's scores of those rows with the seen items masked), chunk by chunk."""
    w = rows.weight.float()
    for part in _chunks(h_all.shape[0], max(1, w.shape[0])):
        scores = _local_logits(h_all[part].float(), w, rows.offset)
        if seen is not None:
            inside = (seen[0] >= part.start) & (seen[0] < part.stop)
            _mask_seen(scores, targets[part], (seen[0][inside] - part.start, seen[1][inside]), rows.offset)
        yield part, scores


def _gather_eval(hidden: torch.Tensor, targets: torch.Tensor, rows: TableRows, seen: Any) -> tuple[Any, ...]:
    """Every rank's hidden states, targets and seen pairs (row indices into the gathered rows)."""
    group = rows.group
    h_all, counts = _gather_rows(hidden, group)
    t_all, _ = _gather_rows(targets, group)
    if seen is not None:
        r_all, _ = _gather_rows(seen[0] + sum(counts[: dist.get_rank(group)]), group)
        i_all, _ = _gather_rows(seen[1], group)
        seen = (r_all, i_all)
    start = sum(counts[: dist.get_rank(group)])
    return h_all, t_all, seen, slice(start, start + hidden.shape[0])


@torch.no_grad()
def sharded_target_ranks(
    hidden: torch.Tensor, targets: torch.Tensor, rows: TableRows, seen: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """0-based rank of each target among all items (how many other items score at least as high;
    `lightning_hybrid.metrics.target_ranks` on full scores), counted shard by shard. ``seen``:
    (row index, item id) pairs masked out (-inf), except each row's target. A collective when sharded."""
    if not rows.sharded:
        from lightning_hybrid.metrics import target_ranks

        scores = _local_logits(hidden.float(), rows.weight.float(), 0)
        _mask_seen(scores, targets, seen, 0)
        return target_ranks(scores, targets)
    h_all, t_all, seen, mine_rows = _gather_eval(hidden, targets, rows, seen)
    local = t_all - rows.offset
    mine = (local >= 0) & (local < rows.weight.shape[0])
    target_score = torch.zeros(h_all.shape[0], device=h_all.device)
    for part, scores in _scored_chunks(h_all, rows, t_all, seen):
        hit = mine[part].nonzero().squeeze(1)
        target_score[part.start + hit] = scores[hit, local[part][hit]]
    dist.all_reduce(target_score, group=rows.group)
    at_least = torch.zeros(h_all.shape[0], dtype=torch.long, device=h_all.device)
    for part, scores in _scored_chunks(h_all, rows, t_all, seen):
        if torch.isnan(scores).any():
            raise ValueError("sharded_target_ranks: NaN scores; the model diverged or its input was bad (see metrics.target_ranks).")
        at_least[part] = (scores >= target_score[part, None]).sum(dim=1)
    dist.all_reduce(at_least, group=rows.group)
    return (at_least - 1)[mine_rows]


def _mask_seen(scores: torch.Tensor, targets: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor] | None, offset: int) -> None:
    if seen is None or seen[0].numel() == 0:
        return
    rows, items = seen
    local = items - offset
    inside = (local >= 0) & (local < scores.shape[1]) & (items != targets[rows])  # the target stays a candidate
    scores[rows[inside], local[inside]] = float("-inf")


@torch.no_grad()
def sharded_top_k(
    hidden: torch.Tensor, rows: TableRows, k: int, seen: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, item ids) [N, k] of the ``k`` best items for each row of ``hidden``, seen items
    masked: each shard's top-k, gathered and merged (exact). A collective when sharded."""
    no_target = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=hidden.device)
    if not rows.sharded:
        scores = _local_logits(hidden.float(), rows.weight.float(), 0)
        _mask_seen(scores, no_target, seen, 0)
        top = scores.topk(k, dim=1)
        return top.values, top.indices
    h_all, t_all, seen, mine_rows = _gather_eval(hidden, no_target, rows, seen)
    values = torch.full((h_all.shape[0], k), float("-inf"), device=h_all.device)
    ids = torch.zeros((h_all.shape[0], k), dtype=torch.long, device=h_all.device)
    kk = min(k, rows.weight.shape[0])
    if kk:
        for part, scores in _scored_chunks(h_all, rows, t_all, seen):
            best = scores.topk(kk, dim=1)
            values[part, :kk], ids[part, :kk] = best.values, best.indices + rows.offset
    world = dist.get_world_size(rows.group)
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_values, values, group=rows.group)
    dist.all_gather(all_ids, ids, group=rows.group)
    merged_values, merged_ids = torch.cat(all_values, dim=1), torch.cat(all_ids, dim=1)
    best = merged_values.topk(k, dim=1)
    return best.values[mine_rows], merged_ids.gather(1, best.indices)[mine_rows]
