"""Modules and data used by the tests, written as ordinary Lightning code (no strategy knowledge).

Everything here must be importable by spawned rank processes, so it lives at module level.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_hybrid.data.clicks import collate_clicks

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

TABLE_SIZES = [24, 40, 16]
FEATURES = ["user", "item", "category"]
NUM_DENSE = 5


class TinyClicks(Dataset):
    """Deterministic samples: dense features, 1-3 ids per sparse feature, a 0/1 label."""

    def __init__(self, n: int = 64, seed: int = 1, table_sizes: list[int] | None = None, bad_id_at: int | None = None) -> None:
        sizes = table_sizes or TABLE_SIZES
        gen = torch.Generator().manual_seed(seed)
        self.dense = torch.randn(n, NUM_DENSE, generator=gen)
        self.ids = [
            [torch.randint(0, size, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen) for size in sizes]
            for _ in range(n)
        ]
        self.labels = torch.randint(0, 2, (n,), generator=gen).float()
        if bad_id_at is not None:  # one sample whose item id is past the end of its table
            self.ids[bad_id_at][1] = torch.tensor([sizes[1] + 7])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        return self.dense[i], self.ids[i], self.labels[i]


#: (dense, ids per feature, label) samples -> {"dense", "sparse" KJT, "labels"}: the library's collate
collate = collate_clicks(FEATURES)


def loader(
    batch_size: int, n: int = 64, seed: int = 1, shuffle: bool = False, ranks: int | None = None, bad_id_at: int | None = None
) -> DataLoader:
    """With ``ranks``, rank r gets samples r, r+ranks, ... in order (Lightning would shuffle them)."""
    dataset = TinyClicks(n, seed, bad_id_at=bad_id_at)
    if ranks is None:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=shuffle)
    import os

    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=ranks, rank=int(os.environ["RANK"]), shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, sampler=sampler)


class TinyRec(pl.LightningModule):
    """A DLRM-like model: EmbeddingBagCollection (pooled) or EmbeddingCollection (sequence) tables,
    an MLP, BCE loss. ``optimizer`` picks the torch optimizer; ``scheduler`` adds a StepLR."""

    def __init__(
        self,
        kind: str = "ebc",
        optimizer: str = "sgd",
        lr: float = 0.1,
        dim: int = 8,
        scheduler: bool = False,
        use_values: bool = False,
    ) -> None:
        super().__init__()
        self.use_values = use_values  # read pooled embeddings through KeyedTensor.values() (key order matters)
        self.kind, self.optimizer_name, self.lr, self.scheduler = kind, optimizer, lr, scheduler
        if kind == "ebc":
            self.tables = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
                    for f, n in zip(FEATURES, TABLE_SIZES, strict=True)
                ]
            )
        else:
            self.tables = EmbeddingCollection(
                tables=[
                    EmbeddingConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
                    for f, n in zip(FEATURES, TABLE_SIZES, strict=True)
                ]
            )
        self.mlp = nn.Sequential(nn.Linear(NUM_DENSE + dim * len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 1))
        self.outputs: list[torch.Tensor] = []
        self.losses: list[float] = []

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if self.kind == "ebc" and self.use_values:
            parts = [self.tables(sparse).values()]
        elif self.kind == "ebc":
            pooled = self.tables(sparse).to_dict()
            parts = [pooled[f] for f in FEATURES]
        else:
            seqs = self.tables(sparse)
            parts = [seqs[f].to_padded_dense(desired_length=3).sum(dim=1) for f in FEATURES]
        return self.mlp(torch.cat([dense, *parts], dim=1)).squeeze(-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["dense"], batch["sparse"])
        self.outputs.append(logits.detach().clone())
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch["dense"], batch["sparse"])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
        self.log("val_loss", loss, batch_size=len(batch["labels"]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "grouped":  # Adam for the MLP, Adagrad (fused) for the tables
            from lightning_hybrid.optim import GroupedOptimizer

            opt: Any = GroupedOptimizer(
                [torch.optim.Adam(self.mlp.parameters(), lr=self.lr), torch.optim.Adagrad(self.tables.parameters(), lr=self.lr * 5)]
            )
        else:
            cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}[self.optimizer_name]
            opt = cls(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class GradRecorder(pl.Callback):
    """Keeps the dense gradients seen by the optimizer at the first step (after DDP averaging)."""

    def __init__(self) -> None:
        self.first_grads: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.first_grads is None:
            self.first_grads = {
                n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if n.startswith("mlp.") and p.grad is not None
            }


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def sgd_sasrec_class(momentum: float = 0.0, slow_pp_rank: int | None = None) -> type:
    """The reference SASRec with SGD everywhere and a reference-side clipping that skips the
    tables, for parity tests against HybridStrategy.

    SGD, not Adam: the key bias has an exactly-zero gradient (softmax is shift-invariant), and
    Adam (or Adagrad's first step, lr * sign(grad)) would turn its rounding noise into full-size
    steps that differ run to run. Clipping: HybridStrategy's fused tables update inside backward,
    unclipped, so the single-process reference clips the same set of gradients.

    ``slow_pp_rank``: see `with_slow_pp_rank`.
    """
    from lightning_hybrid.models.sasrec import SASRec
    from lightning_hybrid.optim import GroupedOptimizer

    class SGDSASRec(SASRec):
        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
            if not gradient_clip_val:
                return
            if self.trainer.world_size == 1:
                # (clip_tables: the reference of a run whose tables are plain replicated weights, which are clipped)
                tables = set() if getattr(self, "clip_tables", False) else {id(p) for p in self.item_tables.parameters()}
                torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if id(p) not in tables], gradient_clip_val)
            else:
                self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

        def configure_optimizers(self) -> Any:
            tables = list(self.item_tables.parameters())
            ids = {id(p) for p in tables}
            dense = [p for p in self.parameters() if id(p) not in ids]
            return GroupedOptimizer([torch.optim.SGD(dense, lr=0.5, momentum=momentum), torch.optim.SGD(tables, lr=0.1)])

    return SGDSASRec if slow_pp_rank is None else with_slow_pp_rank(SGDSASRec, slow_pp_rank)


def with_slow_pp_rank(cls: type, rank: int) -> type:
    """``cls`` (a SASRec) whose blocks sleep 5 ms per call on pipeline rank ``rank``: a slow
    device, for the adaptive balancer (`lightning_hybrid.balance.adaptive`); numerics unchanged."""
    import time

    from lightning_hybrid.specs import pipeline_runner

    class SlowRank(cls):  # type: ignore[misc, valid-type]
        def _block(self, block: Any, x: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            runner = pipeline_runner(self)
            if runner is not None and runner.pp_rank == rank:
                time.sleep(0.005)
            return super()._block(block, x, items)

    return SlowRank


class LossRecorder(pl.Callback):
    """Keeps the loss of every training step (what ``training_step`` returned, as Lightning saw it)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


class EncoderRec(pl.LightningModule):
    """EBC user/item/category features -> 2 ``nn.TransformerEncoderLayer`` -> click logit; SGD
    (``momentum`` > 0 gives the blocks and dense-kernel tables optimizer state to checkpoint).
    ``seed`` fixes the initial weights (None: the caller's RNG state)."""

    def __init__(self, momentum: float = 0.0, seed: int | None = 0) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.momentum = momentum
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="users", embedding_dim=16, num_embeddings=24, feature_names=["user"]),
                EmbeddingBagConfig(name="movies", embedding_dim=16, num_embeddings=40, feature_names=["item"]),
                EmbeddingBagConfig(name="cats", embedding_dim=16, num_embeddings=16, feature_names=["category"]),
            ]
        )
        self.dense_in = nn.Linear(5, 16)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True) for _ in range(2))
        self.head = nn.Linear(16, 1)
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        pooled = self.ebc(batch["sparse"]).to_dict()
        tokens = torch.stack([self.dense_in(batch["dense"]), pooled["user"], pooled["item"], pooled["category"]], dim=1)
        for layer in self.layers:
            tokens = layer(tokens)
        logits = self.head(tokens.mean(1)).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=self.momentum)
