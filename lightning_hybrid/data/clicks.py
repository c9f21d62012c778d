"""Synthetic click-through data with sparse id features: the embedded default data set.

Each sample has dense float features, a few categorical features with 1..max_ids ids each, and a
click label drawn from a fixed hidden logistic model over both (so a model can actually learn it).
Everything is generated from a seed, needs no files, and is identical on every rank.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_hybrid.data.resumable import ResumableDataLoader, pin_memory_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class ClickDataset(Dataset):
    def __init__(
        self,
        *,
        num_samples: int,
        num_dense: int,
        table_sizes: Sequence[int],
        max_ids_per_feature: int = 3,
        zipf_exponent: float = 1.1,
        seed: int = 0,
        sample_seed: int | None = None,
    ) -> None:
        """``seed`` fixes the hidden click model; ``sample_seed`` (default: ``seed``) the samples, so
        train and validation sets share the model and differ in samples."""
        if num_samples < 1 or num_dense < 0 or not table_sizes or min(table_sizes) < 1:
            raise ValueError(
                f"ClickDataset: num_samples={num_samples}, num_dense={num_dense}, table_sizes={list(table_sizes)} "
                "must be positive (at least one table)."
            )
        model_gen = torch.Generator().manual_seed(seed)
        hidden_id_weight = [torch.randn(n, generator=model_gen) for n in table_sizes]
        hidden_dense_weight = torch.randn(num_dense, generator=model_gen)
        gen = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
        self.dense = torch.randn(num_samples, num_dense, generator=gen)
        self.ids: list[list[torch.Tensor]] = []
        self.feature_names = [f"f{i}" for i in range(len(table_sizes))]
        # Zipf-like popularity: a few ids are hot, as in real recommender traffic.
        probs = [1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** zipf_exponent for n in table_sizes]
        lengths = torch.randint(1, max_ids_per_feature + 1, (num_samples, len(table_sizes)), generator=gen)
        id_tables = [torch.multinomial(p, num_samples * max_ids_per_feature, replacement=True, generator=gen)
                     .view(num_samples, max_ids_per_feature) for p in probs]
        logits = self.dense @ hidden_dense_weight * 0.5
        for s in range(num_samples):
            row = []
            for f in range(len(table_sizes)):
                ids = id_tables[f][s, : lengths[s, f]]
                row.append(ids)
                logits[s] += hidden_id_weight[f][ids].mean()
            self.ids.append(row)
        self.labels = torch.bernoulli(torch.sigmoid(logits), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        return self.dense[index], self.ids[index], self.labels[index]


def _collate(feature_names: Sequence[str], samples: Sequence[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]) -> dict[str, Any]:
    dense = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[2] for s in samples])
    values, lengths = [], []
    for f in range(len(feature_names)):
        for s in samples:
            values.append(s[1][f])
            lengths.append(len(s[1][f]))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(feature_names),
        values=torch.cat(values).long(),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )
    return {"dense": dense, "sparse": kjt, "labels": labels}


def collate_clicks(feature_names: Sequence[str]):  # noqa: ANN201 - returns a collate function
    """Build (dense, KeyedJaggedTensor, labels) batches; default_collate cannot make a KJT. A
    ``functools.partial`` of a module-level function, so loader workers can pickle it."""
    return functools.partial(_collate, list(feature_names))


class ClickDataModule(pl.LightningDataModule):
    """Synthetic click data (see module docstring); batch_size is per data-parallel rank,
    ``num_workers`` loader processes build the batches (0: in the training process)."""

    def __init__(
        self,
        *,
        num_samples: int = 8192,
        num_val_samples: int = 1024,
        num_dense: int = 13,
        table_sizes: list[int] | None = None,
        max_ids_per_feature: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.table_sizes = table_sizes or [1000, 1000, 500, 100]
        self.feature_names = [f"f{i}" for i in range(len(self.table_sizes))]

    def setup(self, stage: str) -> None:
        hp = self.hparams
        common = dict(num_dense=hp.num_dense, table_sizes=self.table_sizes, max_ids_per_feature=hp.max_ids_per_feature)
        self.train_set = ClickDataset(num_samples=hp.num_samples, seed=hp.seed, **common)
        self.val_set = ClickDataset(num_samples=hp.num_val_samples, seed=hp.seed, sample_seed=hp.seed + 1, **common)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # resumable: a checkpoint written mid-epoch continues with the next batch, not the first
        # page-locked batches on CUDA (the host-to-device copy can overlap); workers build them
        return ResumableDataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                                   collate_fn=collate_clicks(self.feature_names), drop_last=True,
                                   num_workers=self.hparams.num_workers, pin_memory=pin_memory_for(self.trainer))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
