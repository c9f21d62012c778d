"""Losses of the reference recommenders that do not depend on how the model is laid out.

`sampled_softmax_loss`: cross-entropy against sampled items, with or without the logQ correction
(the output rows come from a weight, or from a lookup: a tied output reads them from the item
table). `full_softmax_loss`: the exact cross-entropy over every item but the padding row, chunked over
rows (recomputed in backward) once the logits would be large, optionally label-smoothed over the
items (`item_cross_entropy`). `token_share`: the factor that turns a rank's mean loss into its share of the global
batch's mean (``loss_normalization="global_tokens"``); `epoch_targets_per_sequence`: what
``loss_normalization="epoch_tokens"`` divides by, read from the data module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities import rank_zero_warn


def sampled_softmax_loss(
    hidden: torch.Tensor,
    positives: torch.Tensor,
    output_weight: torch.Tensor,
    *,
    num_negatives: int,
    sampling_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    negatives: torch.Tensor | None = None,
    lookup: Any = None,
    logq_correction: bool = True,
    per_position: bool = False,
) -> torch.Tensor:
    """Cross-entropy of each positive against sampled items, with the logQ correction.

    ``num_negatives`` items are drawn with replacement from ``sampling_probs`` (over the rows of
    ``output_weight``), or given as ``negatives``. Each sampled logit is corrected by subtracting
    log(expected count of that item in the sample) = log(num_negatives * q(item)), so that
    ``exp`` of the corrected negatives estimates, without bias, the sum of ``exp(logit)`` over the
    items that are not the positive: the loss converges to the full-softmax cross-entropy as the
    sample grows. Sampled copies of the positive itself ("accidental hits") are removed.
    ``lookup(ids)``: the output rows of ``ids`` (a tied output reads them from the item table).
    ``logq_correction=False``: the plain sampled softmax of gSASRec/eSASRec ("SS"): the positive
    against the raw logits of the sample, which no longer estimates the full softmax but weighs
    the negatives less (with uniform sampling the correction is one constant, log(num_negatives / V),
    so switching it off is the same as scaling the negatives' total weight by num_negatives / V).
    ``per_position=True``: each position draws its own ``num_negatives`` (gSASRec/eSASRec, RecTools;
    ``negatives`` then [N, num_negatives]) instead of one sample shared by the batch: the rows are
    looked up once per distinct item, and scored by one matmul or by a gather, whichever holds
    less (memory N x min(distinct items, num_negatives x d)).
    """
    if negatives is None:
        shape = (len(positives) * num_negatives,) if per_position else (num_negatives,)
        negatives = torch.multinomial(sampling_probs, shape[0], replacement=True, generator=generator)
        negatives = negatives.view(len(positives), num_negatives) if per_position else negatives
    negatives = negatives.to(hidden.device)
    log_expected = torch.log(sampling_probs.to(hidden.device) * negatives.shape[-1])
    rows = lookup if lookup is not None else output_weight.__getitem__
    pos_logits = (hidden * rows(positives)).sum(-1)
    if per_position:
        distinct, inverse = torch.unique(negatives, return_inverse=True)
        table = rows(distinct)  # (a sharded table: one lookup of each distinct item)
        if len(distinct) <= negatives.shape[1] * hidden.shape[1]:
            neg_logits = (hidden @ table.T).gather(1, inverse)
        else:
            neg_logits = (hidden.unsqueeze(1) * table[inverse]).sum(-1)
    else:
        neg_logits = hidden @ rows(negatives).T
    if logq_correction:
        neg_logits = neg_logits - log_expected[negatives]
    hits = (negatives if per_position else negatives.unsqueeze(0)) == positives.unsqueeze(1)
    neg_logits = neg_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(positives), dtype=torch.long, device=hidden.device))


#: logits bytes above which `full_softmax_loss` scores rows in chunks (each chunk about this size)
CHUNK_BYTES = 256 * 2**20


def item_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row cross-entropy [N] of item logits [N, V + 1] whose column 0 (padding) is -inf.
    ``label_smoothing`` eps: the target gets 1 - eps and the eps is spread evenly over the V
    items, padding excluded (``F.cross_entropy(label_smoothing=)`` would spread it over the
    padding column too, whose -inf logit makes the loss infinite)."""
    if not label_smoothing:
        return F.cross_entropy(logits, targets, reduction="none")
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (1.0 - label_smoothing) * nll - label_smoothing * logp[:, 1:].mean(dim=-1)


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    logits[:, 0] = float("-inf")  # padding is never a candidate (in place: the matmul keeps no output)
    return item_cross_entropy(logits, targets, label_smoothing).sum()


def full_softmax_loss(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    chunk_bytes: int = CHUNK_BYTES, label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden`` [N, d] scored by ``weight`` [V + 1, d] (+ ``bias``) against
    ``targets`` [N], row 0 (padding) excluded; equal to ``F.cross_entropy`` on the masked logits
    (``label_smoothing``: see `item_cross_entropy`).

    The plain path holds the fp32 logits, their saved log-softmax and their gradient: three
    [N, V + 1] copies (at N = 25,600, V = 500k, 51 GB each). Once the logits would exceed
    ``chunk_bytes``, rows are scored in chunks of about that size under activation checkpointing:
    each chunk's logits exist only while it is computed (forward, then again in backward), so the
    peak is about three chunks, for one more pass of the output matmul.
    """
    rows = hidden.shape[0]
    per_row = weight.shape[0] * 4
    if rows * per_row <= chunk_bytes:
        return _chunk_loss_sum(hidden, weight, bias, targets, label_smoothing) / max(rows, 1)
    from torch.utils.checkpoint import checkpoint

    step = max(1, chunk_bytes // per_row)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, step):
        h, t = hidden[start : start + step], targets[start : start + step]
        total = total + checkpoint(_chunk_loss_sum, h, weight, bias, t, label_smoothing, use_reentrant=False)
    return total / rows


def epoch_targets_per_sequence(datamodule: Any) -> float:
    """The mean targets per training sequence that ``loss_normalization="epoch_tokens"`` divides by,
    from the data module's ``train_targets_per_sequence()``; 0.0 (the step's global mean is used
    instead) with a warning when the data module does not offer it."""
    per_sequence = getattr(datamodule, "train_targets_per_sequence", None)
    if per_sequence is None:
        rank_zero_warn(
            f"loss_normalization='epoch_tokens': the data module ({type(datamodule).__name__}) has no "
            "train_targets_per_sequence(), so each step's loss is its global batch's mean ('global_tokens'). "
            "Add the method (the mean number of target positions per training sequence) to weigh every target alike."
        )
        return 0.0
    value = float(per_sequence())
    if not value > 0:
        raise ValueError(
            f"loss_normalization='epoch_tokens': {type(datamodule).__name__}.train_targets_per_sequence() returned "
            f"{value}; it must be the (positive) mean number of target positions per training sequence."
        )
    return value


def token_share(module: Any, tokens: int) -> float:
    """``tokens * dp / global tokens`` for a LightningModule ``module`` whose rank holds ``tokens``
    targets: with it, each rank's mean loss becomes its share of the mean over every target of
    the global batch, so the gradient data parallelism averages is the one-process gradient of
    that batch however its targets fall on the ranks (one small all-reduce over dp)."""
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    if strategy is None or not dist.is_available() or not dist.is_initialized() or strategy.world_size == 1:
        return 1.0
    mesh = getattr(strategy, "device_mesh", None)
    group = mesh["dp"].get_group() if mesh is not None and "dp" in (mesh.mesh_dim_names or ()) else None
    size = dist.get_world_size(group)
    if size == 1:
        return 1.0
    count = torch.tensor([float(tokens)], dtype=torch.float64, device=module.device)
    dist.all_reduce(count, group=group)
    return tokens * size / float(count)
