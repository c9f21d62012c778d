"""Losses of the reference recommenders that do not depend on how the model is laid out.

`sampled_softmax_loss`: cross-entropy against sampled items, with or without the logQ correction
(the output rows come from a weight, or from a lookup: a tied output reads them from the item
table). `token_share`: the factor that turns a rank's mean loss into its share of the global
batch's mean (``loss_normalization="global_tokens"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812


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
    """
    if negatives is None:
        negatives = torch.multinomial(sampling_probs, num_negatives, replacement=True, generator=generator)
    negatives = negatives.to(hidden.device)
    log_expected = torch.log(sampling_probs.to(hidden.device) * len(negatives))
    rows = lookup if lookup is not None else output_weight.__getitem__
    pos_logits = (hidden * rows(positives)).sum(-1)
    neg_logits = hidden @ rows(negatives).T
    if logq_correction:
        neg_logits = neg_logits - log_expected[negatives]
    neg_logits = neg_logits.masked_fill(negatives.unsqueeze(0) == positives.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(positives), dtype=torch.long, device=hidden.device))


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
