"""A small DLRM-style click model written as an ordinary LightningModule.

Nothing in it knows about HybridStrategy: its EmbeddingBagCollection is found and sharded by the
strategy, and its MLPs are data-parallel. It is the example of the getting-started guide.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(pl.LightningModule):
    """Bottom MLP over dense features, pooled embeddings per sparse feature, dot interactions, top MLP."""

    def __init__(
        self,
        *,
        num_dense: int = 13,
        table_sizes: list[int] | None = None,
        embedding_dim: int = 16,
        bottom_mlp: list[int] | None = None,
        top_mlp: list[int] | None = None,
        lr: float = 0.01,
        embedding_lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        table_sizes = table_sizes or [1000, 1000, 500, 100]
        self.feature_names = [f"f{i}" for i in range(len(table_sizes))]
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=f"t{i}", embedding_dim=embedding_dim, num_embeddings=n, feature_names=[f])
                for i, (n, f) in enumerate(zip(table_sizes, self.feature_names, strict=True))
            ]
        )
        self.bottom = _mlp([num_dense, *(bottom_mlp or [64]), embedding_dim])
        num_vectors = len(table_sizes) + 1
        num_pairs = num_vectors * (num_vectors - 1) // 2
        self.top = _mlp([embedding_dim + num_pairs, *(top_mlp or [64, 32]), 1])
        self.train_auc = torchmetrics.AUROC(task="binary")
        self.val_auc = torchmetrics.AUROC(task="binary")

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:  # noqa: ANN001 - KeyedJaggedTensor
        bottom = self.bottom(dense)
        pooled = self.ebc(sparse).to_dict()
        vectors = torch.stack([bottom] + [pooled[f] for f in self.feature_names], dim=1)
        inter = torch.bmm(vectors, vectors.transpose(1, 2))
        rows, cols = torch.triu_indices(vectors.shape[1], vectors.shape[1], offset=1)
        return self.top(torch.cat([bottom, inter[:, rows, cols]], dim=1)).squeeze(-1)

    def _step(self, batch: dict, metric: torchmetrics.Metric, stage: str) -> torch.Tensor:
        logits = self(batch["dense"], batch["sparse"])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
        metric.update(torch.sigmoid(logits), batch["labels"].long())
        size = batch["labels"].shape[0]
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=size, sync_dist=stage != "train")
        self.log(f"{stage}_auc", metric, prog_bar=True, batch_size=size, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_auc, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, self.val_auc, "val")

    def configure_optimizers(self):  # noqa: ANN201
        # One Adagrad with two groups: fbgemm runs Adagrad fused for the tables (fast path), and
        # Lightning's automatic optimization wants a single optimizer.
        table_ids = {id(p) for p in self.ebc.parameters()}
        dense_params = [p for p in self.parameters() if id(p) not in table_ids]
        return torch.optim.Adagrad(
            [
                {"params": dense_params, "lr": self.hparams.lr},
                {"params": list(self.ebc.parameters()), "lr": self.hparams.embedding_lr},
            ]
        )
