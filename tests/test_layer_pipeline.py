"""Tier 2: pipeline_parallel for a module without a pipeline_spec() (`parallel.layer_pipeline`).

The module is plain Lightning: a table, a ``ModuleList`` of blocks called with a keyword argument,
a head, ``validation_step`` calling ``self(batch)``. With ``pipeline_layers="blocks"`` the blocks are
split over the pp ranks and the module's own forward is routed through them; losses, validation
losses and every parameter after training must equal one process - with a torchrec-sharded table
(its lookup split over the pp ranks), with an output tied to the input table (one parameter used
before and after the layers), with an uneven split, and with dp x pp on 4 processes.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

DATA = dict(format="synthetic", max_len=6, synthetic_users=16, synthetic_items=20, synthetic_min_len=8, synthetic_max_len=8, seed=4)
ITEMS, WIDTH = 21, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return hidden + scale * torch.tanh(self.linear(hidden))


class Stack(pl.LightningModule):
    def __init__(self, table: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = table
        if table == "torchrec":
            from torchrec import EmbeddingCollection, EmbeddingConfig

            self.items = EmbeddingCollection(
                tables=[EmbeddingConfig(name="item_table", embedding_dim=WIDTH, num_embeddings=ITEMS, feature_names=["item"])]
            )
        else:
            self.items = nn.Embedding(ITEMS, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(WIDTH, ITEMS, bias=table != "tied")
        if table == "tied":
            self.head.weight = self.items.weight  # used before and after the layers
        self.val_losses: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table == "torchrec":
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=["item"], values=ids.reshape(-1), lengths=torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int32)
            )
            hidden = self.items(kjt)["item"].values().view(*ids.shape, WIDTH)
        else:
            hidden = self.items(ids)
        for block in self.blocks:
            hidden = block(hidden, scale=0.5)
        return self.head(hidden)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input"])
        return nn.functional.cross_entropy(logits.reshape(-1, ITEMS), batch["target"].reshape(-1), ignore_index=0)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        valid = batch["valid"]
        loss = nn.functional.cross_entropy(self(batch["input"])[:, -1][valid], batch["target"][valid])
        self.val_losses.append(float(loss))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(table: str, strategy_kwargs: dict[str, Any] | None, devices: int = 1, dp: int = 1) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule
    from tests.helpers import LossRecorder, quiet_trainer

    model = Stack(table)
    recorder = LossRecorder()
    strategy = "auto" if strategy_kwargs is None else HybridStrategy(**strategy_kwargs)
    # one global batch per epoch: the loss of a step does not depend on the sampler's order
    trainer = quiet_trainer(strategy=strategy, devices=devices, max_epochs=3, callbacks=[recorder], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=SequenceDataModule(**DATA, batch_size=16 // dp))
    state = full_state_dict(model) if strategy_kwargs is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    held = sorted({n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("blocks.")})
    return {"losses": recorder.losses, "state": state, "val_losses": model.val_losses, "blocks_held": held}


def _pp2() -> dict[str, Any]:
    return {
        "torchrec": _fit("torchrec", {"pipeline_parallel": 2, "pipeline_layers": "blocks"}, 2),
        "tied": _fit("tied", {"pipeline_parallel": 2, "pipeline_layers": "blocks", "pipeline_split": [3, 1]}, 2),
    }


def _dp2_pp2() -> dict[str, Any]:
    return {"tied": _fit("tied", {"pipeline_parallel": 2, "pipeline_layers": "blocks", "data_parallel": 2}, 4, dp=2)}


def _check(result: dict[str, Any], reference: dict[str, Any]) -> None:
    state = result["state"]
    assert set(state) == set(reference["state"])
    for key, value in reference["state"].items():
        assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_layers_split_without_a_spec_train_and_validate_like_one_process() -> None:
    references = {table: _fit(table, None) for table in ("torchrec", "tied")}
    ranks = run_distributed(_pp2, 2, init_process_group=False, timeout_s=300)
    for table, reference in references.items():
        for rank in ranks:  # every pp rank: the same losses and the one-process validation losses
            assert_close(torch.tensor(rank[table]["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5)
            assert_close(torch.tensor(rank[table]["val_losses"]), torch.tensor(reference["val_losses"]), rtol=1e-4, atol=1e-5)
        _check(ranks[0][table], reference)
    # each rank held only its stage's blocks (pipeline_split=[3, 1] for "tied")
    assert [r["tied"]["blocks_held"] for r in ranks] == [["0", "1", "2"], ["3"]]
    assert [r["torchrec"]["blocks_held"] for r in ranks] == [["0", "1"], ["2", "3"]]


def test_layers_split_without_a_spec_with_data_parallel_like_one_process() -> None:
    reference = _fit("tied", None)
    ranks = run_distributed(_dp2_pp2, 4, init_process_group=False, timeout_s=300)
    # dp2: each replica saw half of each global batch; the parameters are the one-process ones
    _check(ranks[0]["tied"], reference)
