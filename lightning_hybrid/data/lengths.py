"""Batches that carry the work the data holds: per-batch padding and (optional) length-grouped sampling.

Recommendation sequences are short and long-tailed (Amazon Beauty: median 6 items, p99 43, max
204). Left-padding every sequence to ``max_len`` makes most of a step padding: at ``max_len`` 200
about 3% of the positions computed are real items. Two pieces cut that: trimming changes no
result, grouping by length changes which samples share a step:

- `trim_batch`: a batch of left-padded rows keeps only its last ``L`` columns, ``L`` the longest
  real sequence in the batch rounded up to ``multiple`` (8 by default: a few distinct shapes, so a
  pipeline builds a few schedules and tp / sequence parallelism can split ``L``). Left padding
  means the dropped columns are padding in every row; positions are counted from the right (the
  reference models add position ``max_len - L + j``), so outputs and gradients on the real
  positions equal the padded computation (`tests/test_jagged.py`).
- `LengthGroupedSampler`: the training batches. Each epoch a seeded permutation (seed + epoch, as
  ``DistributedSampler``) is cut into chunks of ``group`` global batches, each chunk sorted by
  length and cut into global batches, and the global batches shuffled. ``group=1`` (the data
  module's default) keeps the batches uniformly random; a larger ``group`` gives batches of
  similar lengths, so trimming leaves little padding, but it changes training: short and long
  histories take separate steps (on Amazon Beauty, ``group=32`` cost ~10% of validation HR@10 at
  equal epochs against random batches, docs/recommender.md). Each global batch is then split over
  the dp ranks by `token_balanced_split` (equal sample counts, about equal real tokens: each
  sample, longest first, goes to the rank with the fewest tokens so far), so the ranks see the
  same mix of lengths and about the same number of tokens whatever the lengths of that batch (the
  split is made per step, so it follows lengths that drift over an epoch or between data sets;
  nothing to re-measure). So every sample is seen once per epoch across the ranks (the global
  batch count is padded to a multiple of the ranks by repeating samples, as
  ``DistributedSampler`` does), the order is random and reproducible, and a resumed epoch
  (`lightning_hybrid.data.resumable`) continues exactly.

`long_tail_lengths` draws Beauty-like sequence lengths for the synthetic generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

#: columns that run along the sequence in a training / evaluation batch
SEQUENCE_KEYS = ("input", "target", "time")


def trim_batch(batch: dict[str, Any], *, multiple: int = 8, key: str = "input") -> dict[str, Any]:
    """``batch`` with the all-padding leading columns of its sequence tensors dropped (see the
    module docstring); tensors whose second dimension is not the sequence's are left alone."""
    items = batch[key]
    if items.dim() != 2 or items.shape[1] == 0:
        return batch
    full = items.shape[1]
    used = (items != 0).any(dim=0)  # columns with a real item in some row (left padding: a suffix)
    longest = full - int(used.int().argmax()) if bool(used.any()) else 0
    keep = min(full, max(multiple, math.ceil(max(longest, 1) / multiple) * multiple))
    if keep == full:
        return batch
    out = dict(batch)
    for name in SEQUENCE_KEYS:
        value = out.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == full:
            out[name] = value[:, full - keep :]
    return out


def long_tail_lengths(count: int, *, min_len: int, max_len: int, generator: torch.Generator, median: float = 6.0, p99: float = 43.0) -> torch.Tensor:
    """``count`` lengths from a log-normal with the given median and 99th percentile (Amazon
    Beauty's: 6 and 43; mean about 8.7), clipped to ``[min_len, max_len]``."""
    sigma = math.log(p99 / median) / 2.3263  # (the 99% quantile of the standard normal)
    normal = torch.randn(count, generator=generator, dtype=torch.float64)
    return (math.log(median) + sigma * normal).exp().round().clamp(min_len, max_len).long()


def token_balanced_split(indices: Sequence[int], lengths: Sequence[int] | torch.Tensor, parts: int) -> list[list[int]]:
    """Split ``indices`` into ``parts`` lists of equal size (``len(indices) / parts``; the first
    ones one longer when it does not divide) with about equal sums of ``lengths[i]``: longest first,
    each to the list with the smallest sum that still has room (ties: the lower rank; equal lengths
    keep their order in ``indices``, so equal-length samples are dealt out in turn, as an interleaved
    split would). Deterministic."""
    n = len(indices)
    room = [n // parts + (1 if r < n % parts else 0) for r in range(parts)]
    order = sorted(indices, key=lambda i: -int(lengths[i]))  # (stable)
    out: list[list[int]] = [[] for _ in range(parts)]
    sums = [0] * parts
    for i in order:
        r = min((r for r in range(parts) if len(out[r]) < room[r]), key=lambda r: (sums[r], r))
        out[r].append(i)
        sums[r] += int(lengths[i])
    return out


class LengthGroupedSampler(DistributedSampler):
    """Indices of random global batches, length-grouped in runs of ``group`` (module docstring);
    this dp rank's slice of each.

    A ``DistributedSampler``, so Lightning keeps it (and calls ``set_epoch``) instead of putting
    its own in; the data loader must use the same ``batch_size`` (per rank).
    """

    def __init__(
        self,
        dataset: Dataset,
        lengths: Sequence[int],
        *,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group: int = 32,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        if len(lengths) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"LengthGroupedSampler: {len(lengths)} lengths for a data set of {len(dataset)} samples.")  # type: ignore[arg-type]
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size, self.group = batch_size, group

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (every rank's samples), in the order they are trained."""
        n = len(self.lengths)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=gen).tolist()
        per_rank = self.num_samples  # (DistributedSampler: ceil or floor of n / replicas)
        total = per_rank * self.num_replicas
        order = (order * (total // max(n, 1) + 1))[:total]  # pad by repeating, or drop the tail
        width = self.batch_size * self.num_replicas
        batches: list[list[int]] = []
        for start in range(0, total, width * self.group):
            chunk = order[start : start + width * self.group]
            chunk.sort(key=lambda i: -int(self.lengths[i]))
            batches.extend(chunk[k : k + width] for k in range(0, len(chunk), width))
        full = [b for b in batches if len(b) == width]
        partial = [b for b in batches if len(b) != width]  # at most one, kept last: ranks stay aligned
        shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
        return shuffled + partial

    def __iter__(self) -> Iterator[int]:
        for batch in self.global_batches():
            # this rank's share of the global batch: equal samples, about equal tokens
            yield from token_balanced_split(batch, self.lengths, self.num_replicas)[self.rank]

    def __len__(self) -> int:
        return self.num_samples


def rows_balanced_over_shards(sequences: Sequence[Sequence[int]], num_items: int, shards: int) -> list[int]:
    """A new row for every item (``order[k]`` is the old id of row ``k + 1``) such that, with the
    table's ``num_items + 1`` rows cut into ``shards`` equal row-wise blocks (torchrec's row-wise
    sharding; row 0, padding, in the first), each block serves about the same number of lookups:
    items by frequency in ``sequences``, each to the block with the fewest lookups that has room
    (longest-processing-time first). Popular items otherwise cluster in a few blocks: ids are
    often numbered by first appearance or popularity."""
    counts = torch.zeros(num_items + 1, dtype=torch.float64)
    for seq in sequences:
        if seq:
            counts += torch.bincount(torch.as_tensor(list(seq)), minlength=num_items + 1).double()[: num_items + 1]
    block = math.ceil((num_items + 1) / shards)
    room = [min(block, num_items + 1 - s * block) - (1 if s == 0 else 0) for s in range(shards)]
    load = [0.0] * shards
    members: list[list[int]] = [[] for _ in range(shards)]
    for item in sorted(range(1, num_items + 1), key=lambda i: (-float(counts[i]), i)):
        shard = min((s for s in range(shards) if room[s] > 0), key=lambda s: (load[s], s))
        members[shard].append(item)
        room[shard] -= 1
        load[shard] += float(counts[item])
    return [item for shard in members for item in shard]
