"""Losses of the reference recommenders that do not depend on how the model is laid out.

`sampled_softmax_loss`: cross-entropy against sampled items with the logQ correction (the
output rows come from a weight, or from a lookup: a tied output reads them from the item table).
"""

from __future__ import annotations

from typing import Any

import torch
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
) -> torch.Tensor:
    """Cross-entropy of each positive against sampled items, with the logQ correction.

    ``num_negatives`` items are drawn with replacement from ``sampling_probs`` (over the rows of
    ``output_weight``), or given as ``negatives``. Each sampled logit is corrected by subtracting
    log(expected count of that item in the sample) = log(num_negatives * q(item)), so that
    ``exp`` of the corrected negatives estimates, without bias, the sum of ``exp(logit)`` over the
    items that are not the positive: the loss converges to the full-softmax cross-entropy as the
    sample grows. Sampled copies of the positive itself ("accidental hits") are removed.
    ``lookup(ids)``: the output rows of ``ids`` (a tied output reads them from the item table).
    """
    if negatives is None:
        negatives = torch.multinomial(sampling_probs, num_negatives, replacement=True, generator=generator)
    negatives = negatives.to(hidden.device)
    log_expected = torch.log(sampling_probs.to(hidden.device) * len(negatives))
    rows = lookup if lookup is not None else output_weight.__getitem__
    pos_logits = (hidden * rows(positives)).sum(-1)
    neg_logits = hidden @ rows(negatives).T - log_expected[negatives]
    neg_logits = neg_logits.masked_fill(negatives.unsqueeze(0) == positives.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(positives), dtype=torch.long, device=hidden.device))
