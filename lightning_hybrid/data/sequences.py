"""Per-user item sequences for next-item recommendation: splits, batches and a DataModule.

The files are read by `lightning_hybrid.data.readers` (re-exported here): SASRec / ICLRec lines,
MovieLens ``u.data`` / ``ratings.dat`` / ``ratings.csv``, and a seeded synthetic generator (Zipf
popularity + learnable item-to-item transitions), the embedded default that needs no files.

Item ids are remapped to ``1..num_items`` (0 is padding) in ascending order of the raw id; the
mapping is kept for writing predictions. Split: leave-one-out (last item test, second-to-last
validation, the rest training); users with fewer than 3 items only train. Evaluation ranks every
item; padding never counts; ``exclude_seen`` removes the user's history from the ranking.

Distributed evaluation gives each data-parallel rank its share of the users exactly once: ranks
with fewer users get placeholder rows marked invalid (so all ranks run the same number of steps,
which sharded lookups require), and the metrics skip them.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_hybrid.data.item_ids import follow_item_ids, saved_item_ids
from lightning_hybrid.data.item_text import encode_item_texts, load_item_text
from lightning_hybrid.data.lengths import LengthGroupedSampler, rows_balanced_over_shards, trim_batch
from lightning_hybrid.data.readers import (  # noqa: F401  (the readers are part of this module's API)
    SequenceData,
    load_item_genres,
    load_movielens,
    load_sasrec_lines,
    synthetic_sequences,
)
from lightning_hybrid.data.resumable import ResumableDataLoader, pin_memory_for

FormatName = Literal["auto", "sasrec", "movielens", "synthetic"]


def _left_pad(items: Sequence[int], length: int) -> list[int]:
    items = list(items)[-length:]
    return [0] * (length - len(items)) + items


class TrainSequences(Dataset):
    """One row per user: input = seq[:-1], target = seq[1:] over the training part, left padded;
    plus the user's index (1-based) and the time bucket of each input position (0 = padding)."""

    def __init__(
        self, sequences: Sequence[Sequence[int]], max_len: int, buckets: Sequence[Sequence[int]] | None = None
    ) -> None:
        # time buckets cut to the training part, aligned item by item
        self.rows = [
            (u, list(s), list(buckets[u][: len(s)]) if buckets is not None else None) for u, s in enumerate(sequences) if len(s) >= 2
        ]
        self.max_len = max_len

    def lengths(self) -> list[int]:
        """Real (unpadded) input positions of each row."""
        return [min(len(seq), self.max_len + 1) - 1 for _u, seq, _b in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        user, seq, buckets = self.rows[index]
        seq = seq[-(self.max_len + 1) :]
        row = {
            "input": torch.tensor(_left_pad(seq[:-1], self.max_len)),
            "target": torch.tensor(_left_pad(seq[1:], self.max_len)),
            "user": torch.tensor(user),
        }
        if buckets is not None:
            row["time"] = torch.tensor(_left_pad(buckets[-(self.max_len + 1) :][:-1], self.max_len))
        return row


class EvalSequences(Dataset):
    """One row per evaluated user: the history before the held-out item, the item, and what was seen.

    Index -1 is a placeholder row (``valid`` False) used to even out ranks.
    """

    def __init__(
        self,
        histories: Sequence[Sequence[int]],
        targets: Sequence[int],
        users: Sequence[int],
        max_len: int,
        history_buckets: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.histories, self.targets, self.users, self.max_len = list(histories), list(targets), list(users), max_len
        self.history_buckets = list(history_buckets) if history_buckets is not None else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            row = {"input": torch.zeros(self.max_len, dtype=torch.long), "target": torch.tensor(0), "seen": torch.zeros(0, dtype=torch.long), "valid": torch.tensor(False), "user": torch.tensor(-1)}
            if self.history_buckets is not None:
                row["time"] = torch.zeros(self.max_len, dtype=torch.long)
            return row
        history = self.histories[index]
        row = {
            "input": torch.tensor(_left_pad(history, self.max_len)),
            "target": torch.tensor(self.targets[index]),
            "seen": torch.tensor(sorted(set(history)), dtype=torch.long),
            "valid": torch.tensor(True),
            "user": torch.tensor(self.users[index]),
        }
        if self.history_buckets is not None:
            row["time"] = torch.tensor(_left_pad(self.history_buckets[index], self.max_len))
        return row


class EvenShardSampler(DistributedSampler):
    """Rank r gets users r, r+n, ...; shorter ranks are topped up with placeholders (-1), never
    with duplicates, so every user is evaluated exactly once and all ranks take equal steps."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        total = len(self.dataset)  # type: ignore[arg-type]
        per_rank = math.ceil(total / self.num_replicas)
        mine = list(range(self.rank, total, self.num_replicas))
        return iter(mine + [-1] * (per_rank - len(mine)))

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.num_replicas)  # type: ignore[arg-type]


def collate_train(rows: list[dict[str, Any]], multiple: int = 8) -> dict[str, Any]:
    """Stacked training rows, cut to the batch's longest sequence (`lightning_hybrid.data.lengths`)."""
    from torch.utils.data import default_collate

    return trim_batch(default_collate(rows), multiple=multiple)


def collate_eval(rows: list[dict[str, Any]], multiple: int | None = None) -> dict[str, Any]:
    """Stacked evaluation rows; with ``multiple``, cut to the batch's longest history."""
    seen_lengths = torch.tensor([len(r["seen"]) for r in rows])
    batch = {
        "input": torch.stack([r["input"] for r in rows]),
        "target": torch.stack([r["target"] for r in rows]),
        "seen_values": torch.cat([r["seen"] for r in rows]) if rows else torch.zeros(0, dtype=torch.long),
        "seen_lengths": seen_lengths,
        "valid": torch.stack([r["valid"] for r in rows]),
        "user": torch.stack([r["user"] for r in rows]),
        **({"time": torch.stack([r["time"] for r in rows])} if rows and "time" in rows[0] else {}),
    }
    return trim_batch(batch, multiple=multiple) if multiple is not None and rows else batch


class SequenceDataModule(pl.LightningDataModule):
    """Leave-one-out next-item data from files or the synthetic generator.

    Args:
        path: data file or directory (not needed for ``format="synthetic"``).
        format: ``auto`` (from the file name: ``ratings.*``/``u.data`` -> MovieLens, else SASRec lines;
            no path -> synthetic), ``sasrec``, ``movielens`` or ``synthetic``.
        max_len: items of history the model sees (the most recent ones).
        batch_size: training users per data-parallel rank and step.
        eval_batch_size: users per rank and step in validation/test/predict.
        drop_last: drop each epoch's last, smaller training batch (pipeline parallelism needs every
            batch to split into its microbatches).
        num_items: vocabulary size the model is built for; ``None`` takes the data's. Ids beyond it are an error.
        synthetic_users, synthetic_items, synthetic_min_len, synthetic_max_len, seed: the generator.
        synthetic_lengths: ``"uniform"`` in [min, max], or ``"long_tail"`` (Amazon Beauty-like).
        batching: ``"jagged"``: each batch is cut to its longest sequence (rounded up to
            ``pad_multiple``), so ``max_len`` is a cap, not a shape; ``"padded"``: every batch is
            ``max_len`` wide (the behaviour before 0.2). Results on real positions are the same
            (`lightning_hybrid.data.lengths`).
        length_group: training batches are drawn at random, and with ``length_group`` > 1 each
            run of that many global batches is sorted by length first, so a batch holds similar
            lengths and trimming leaves little padding (``"jagged"`` only). That is faster on
            long-tailed data but changes what is learnt: batches of short histories and batches
            of long ones take alternate steps, and on Amazon Beauty it cost about 10% of
            validation HR@10 at equal epochs (docs/recommender.md). 1 (default): uniformly random
            batches, as the published SASRec code trains; 32: the grouping jagged batches had before.
        item_text: also provide item text tokens (MovieLens: movies.csv / movies.dat / u.item beside
            the ratings; synthetic: generated genre words) for a model's text tower.
        text_len, text_vocab_size: tokens per item and the word vocabulary cap.
        text_tokenizer: a local directory holding a Hugging Face tokenizer (e.g. the backbone's model
            directory): item text is tokenized with it instead of the data's own words.
        time_bucket_days, max_time_buckets: time side feature: interactions are bucketed by age in
            units of ``time_bucket_days`` since the data's first interaction (formats with timestamps).
        item_ids_from: a checkpoint (directory or file) whose raw-id -> row mapping the items follow:
            known items keep their rows, new items get the rows after them (an error when the model
            has no rows for them). Checkpoints store the mapping; resuming or predicting on a
            refreshed data file without this option is refused when the mapping would differ
            (``lightning-hybrid fit/test/predict --ckpt_path`` sets it for you).
        row_balance_shards: renumber the items so that, with the item table row-wise sharded over
            this many ranks (usually the world size), each shard serves about the same number of
            lookups (items by training frequency, `lightning_hybrid.data.lengths.rows_balanced_over_shards`).
            The mapping is the checkpoint's like any other (training, evaluation, predictions and
            exports use raw ids); a checkpoint's mapping (``item_ids_from``) takes precedence.
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        format: FormatName = "auto",
        max_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_items: int | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
        synthetic_users: int = 2000,
        synthetic_items: int = 500,
        synthetic_min_len: int = 5,
        synthetic_max_len: int = 50,
        seed: int = 0,
        synthetic_lengths: Literal["uniform", "long_tail"] = "uniform",
        batching: Literal["jagged", "padded"] = "jagged",
        length_group: int = 1,
        pad_multiple: int = 8,
        item_text: bool = False,
        text_len: int = 16,
        text_vocab_size: int = 20000,
        text_tokenizer: str | None = None,
        time_bucket_days: int = 30,
        max_time_buckets: int = 512,
        item_ids_from: str | None = None,
        row_balance_shards: int | None = None,
    ) -> None:
        super().__init__()
        if max_len < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"SequenceDataModule: max_len={max_len}, batch_size={batch_size}, eval_batch_size={eval_batch_size} must be >= 1.")
        if format not in ("auto", "sasrec", "movielens", "synthetic"):
            raise ValueError(f"SequenceDataModule(format={format!r}): use auto, sasrec, movielens or synthetic.")
        self.path, self.format, self.max_len = path, format, max_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.drop_last = drop_last
        self.expected_items = num_items
        if batching not in ("jagged", "padded") or pad_multiple < 1:
            raise ValueError(f"SequenceDataModule(batching={batching!r}, pad_multiple={pad_multiple}): use 'jagged' or 'padded', pad_multiple >= 1.")
        if length_group < 1 or (length_group > 1 and batching != "jagged"):
            raise ValueError(
                f"SequenceDataModule(length_group={length_group}, batching={batching!r}): length_group is >= 1, and "
                "grouping lengths (> 1) only pays with batching='jagged'; use length_group=1 with padded batches."
            )
        self.batching, self.pad_multiple, self.length_group = batching, pad_multiple, length_group
        self.synthetic = dict(num_users=synthetic_users, num_items=synthetic_items, min_len=synthetic_min_len, max_len=synthetic_max_len, seed=seed,
                              lengths=synthetic_lengths)
        self.data: SequenceData | None = None
        self.item_text, self.text_len, self.max_text_vocab, self.text_tokenizer = item_text, text_len, text_vocab_size, text_tokenizer
        self.time_bucket_days, self.max_time_buckets = time_bucket_days, max_time_buckets
        self._text_tokens: torch.Tensor | None = None
        self._text_vocab_size = 0
        self.item_ids_from = item_ids_from
        self.row_balance_shards = row_balance_shards

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> SequenceData:
        if self.data is not None:
            return self.data
        fmt = self.format
        if fmt == "auto":
            if self.path is None:
                fmt = "synthetic"
            else:
                name = Path(self.path).name
                fmt = "movielens" if Path(self.path).is_dir() or name.startswith("ratings.") or name == "u.data" else "sasrec"
        if fmt == "synthetic":
            data = synthetic_sequences(**self.synthetic)
        elif self.path is None:
            raise ValueError(f"SequenceDataModule(format={fmt!r}) needs data.path.")
        elif fmt == "movielens":
            data = load_movielens(self.path)
        else:
            data = load_sasrec_lines(self.path)
        if self.item_ids_from is not None:
            known = saved_item_ids(self.item_ids_from)
            if known is None:
                raise ValueError(
                    f"SequenceDataModule(item_ids_from={self.item_ids_from!r}): that checkpoint holds no item id mapping "
                    "(written before mappings were saved, or not by a SequenceDataModule run). Drop item_ids_from."
                )
            # (rows for the model's items: num_items if given, else the checkpoint's table)
            data = follow_item_ids(data, known, capacity=self.expected_items or len(known))
        elif self.row_balance_shards:
            # (the training part: the last two items of each user are validation and test)
            order = rows_balanced_over_shards([s[:-2] for s in data.sequences], data.num_items, self.row_balance_shards)
            data = follow_item_ids(data, [data.item_ids[i - 1] for i in order])
        if self.expected_items is not None and data.num_items > self.expected_items:
            raise ValueError(
                f"The data has {data.num_items} distinct items but the model is configured for num_items="
                f"{self.expected_items}. Set model num_items (and data.num_items) to at least {data.num_items}."
            )
        self.data = data
        return data

    @property
    def num_items(self) -> int:
        return self.load().num_items

    # -- the id mapping in checkpoints -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning stores it under the class name): the raw item id of
        each table row, so a resume, ``predict`` or a served export maps ids to the same rows."""
        return {"item_ids": list(self.load().item_ids)} if self.data is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("item_ids")
        if saved is None or self.data is None or list(self.data.item_ids[: len(saved)]) == list(saved):
            return  # every saved row holds the same item (rows after them: items new since)
        moved = sum(1 for a, b in zip(saved, self.data.item_ids, strict=False) if a != b) + abs(len(saved) - len(self.data.item_ids))
        raise ValueError(
            f"SequenceDataModule: the checkpoint's items map to other table rows than this data's ({moved} of "
            f"{max(len(saved), len(self.data.item_ids))} rows differ: a refreshed data file, or another file). Loading "
            "would silently give every such item another item's embedding. Pass "
            "SequenceDataModule(item_ids_from=<the checkpoint>) (data.init_args.item_ids_from) so the items follow the "
            "checkpoint's rows and new items get new ones."
        )

    def _load_text_tokens(self) -> None:
        data = self.load()
        if self.path is None or self.format == "synthetic":
            # synthetic items get two "genre" words, shared by related items
            raw = {item: f"genre{int(item) % 20} style{(int(item) // 7) % 13}" for item in data.item_ids}
        else:
            base = Path(self.path)
            raw = load_item_text(base if base.is_dir() else base.parent)
        texts = [raw.get(item, "") for item in data.item_ids]
        self._text_tokens, self._text_vocab_size = encode_item_texts(
            texts, text_len=self.text_len, max_vocab=self.max_text_vocab, tokenizer_path=self.text_tokenizer
        )

    @property
    def item_text_tokens(self) -> torch.Tensor | None:
        """[num_items + 1, text_len] token ids per item (row 0: padding), or None without item_text."""
        if not self.item_text:
            return None
        if self._text_tokens is None:
            self._load_text_tokens()
        return self._text_tokens

    @property
    def text_vocab_size(self) -> int:
        if self.item_text_tokens is None:
            return 0
        return self._text_vocab_size

    def train_targets_per_sequence(self) -> float:
        """The mean number of target positions of a training sequence (the epoch's targets over
        its sequences), read by ``SASRec(loss_normalization="epoch_tokens")``."""
        train_set = getattr(self, "train_set", None)
        if train_set is None:
            seqs = self.load().sequences
            train_set = TrainSequences([s[:-2] if len(s) >= 3 else s for s in seqs], self.max_len)
        lengths = train_set.lengths()
        return sum(lengths) / max(len(lengths), 1)

    def item_counts(self) -> torch.Tensor:
        """How often each item id occurs in the training part (index 0, padding, stays 0)."""
        counts = torch.zeros(self.num_items + 1)
        for seq in self.load().sequences:
            part = seq[:-2] if len(seq) >= 3 else seq
            counts += torch.bincount(torch.tensor(part, dtype=torch.long), minlength=self.num_items + 1)[: self.num_items + 1].float()
        return counts

    def time_buckets(self) -> list[list[int]] | None:
        """Per interaction: 1 + months since the data's first interaction (capped), or None without times."""
        data = self.load()
        if data.times is None:
            return None
        start = min(t for times in data.times for t in times if times) if any(data.times) else 0
        width = self.time_bucket_days * 86400
        return [[min((t - start) // width, self.max_time_buckets - 1) + 1 for t in times] for times in data.times]

    @property
    def num_users(self) -> int:
        return len(self.load().sequences)

    def item_categories(self) -> torch.Tensor:
        """[num_items + 1] category id per item (0: padding/unknown): the first genre of MovieLens
        items (movies.csv/movies.dat/u.item beside the ratings), ``item % 20`` for synthetic data."""
        data = self.load()
        if self.path is None or self.format == "synthetic":
            return torch.tensor([0] + [int(i) % 20 + 1 for i in data.item_ids])
        base = Path(self.path)
        genres = load_item_genres(base if base.is_dir() else base.parent)
        names = sorted({g for g in genres.values() if g})
        index = {g: k + 1 for k, g in enumerate(names)}
        return torch.tensor([0] + [index.get(genres.get(i, ""), 0) for i in data.item_ids])

    def setup(self, stage: str) -> None:
        data = self.load()
        seqs = data.sequences
        buckets = self.time_buckets()
        self.train_set = TrainSequences([s[:-2] if len(s) >= 3 else s for s in seqs], self.max_len, buckets)
        evaluated = [u for u, s in enumerate(seqs) if len(s) >= 3]
        hb = (lambda cut: [buckets[u][:cut(len(seqs[u]))] for u in evaluated]) if buckets is not None else (lambda cut: None)
        self.val_set = EvalSequences([seqs[u][:-2] for u in evaluated], [seqs[u][-2] for u in evaluated], evaluated, self.max_len, hb(lambda n: n - 2))
        self.test_set = EvalSequences([seqs[u][:-1] for u in evaluated], [seqs[u][-1] for u in evaluated], evaluated, self.max_len, hb(lambda n: n - 1))
        # prediction: next item after the whole history, for every user
        self.predict_set = EvalSequences(
            [s for s in seqs], [0 for _ in seqs], list(range(len(seqs))), self.max_len, buckets if buckets is not None else None
        )

    # -- loaders -------------------------------------------------------------------------------

    def _dp(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        kwargs = trainer.distributed_sampler_kwargs or {}
        return int(kwargs.get("rank", trainer.global_rank)), int(kwargs.get("num_replicas", trainer.world_size))

    def train_dataloader(self) -> DataLoader:
        # resumable: a checkpoint written mid-epoch continues with the next batch, not the first
        common = dict(batch_size=self.batch_size, drop_last=self.drop_last, num_workers=self.num_workers, pin_memory=pin_memory_for(self.trainer))
        if self.batching == "padded":
            return ResumableDataLoader(self.train_set, shuffle=True, **common)
        rank, size = self._dp()
        sampler = LengthGroupedSampler(self.train_set, self.train_set.lengths(), batch_size=self.batch_size, num_replicas=size, rank=rank,
                                       seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), drop_last=self.drop_last,
                                       group=self.length_group)
        return ResumableDataLoader(self.train_set, sampler=sampler, collate_fn=functools.partial(collate_train, multiple=self.pad_multiple), **common)

    def _eval_loader(self, dataset: EvalSequences) -> DataLoader:
        rank, size = self._dp()
        sampler = EvenShardSampler(dataset, num_replicas=size, rank=rank)
        collate = collate_eval if self.batching == "padded" else functools.partial(collate_eval, multiple=self.pad_multiple)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, pin_memory=pin_memory_for(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set)
