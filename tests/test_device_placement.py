"""Whole tables stay off the accelerator until they are sharded (issue 20, item 3), checked on CPU
with the "meta" device standing in for a GPU: the dense layers move, the torchrec tables do not,
and modules built in ``configure_model`` land on the host."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from lightning_hybrid.strategies.tables import TablePlacement, move_except_tables


def _model() -> nn.Module:
    from torchrec import EmbeddingCollection, EmbeddingConfig

    model = nn.Module()
    model.tables = EmbeddingCollection(tables=[EmbeddingConfig(name="item_id", embedding_dim=4, num_embeddings=10, feature_names=["item"])])
    model.tower = nn.Sequential(nn.Linear(4, 4))
    model.tower.inner = nn.Module()
    model.tower.inner.tables = EmbeddingCollection(tables=[EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=6, feature_names=["t"])])
    return model


def test_dense_layers_move_and_tables_stay_on_the_host() -> None:
    model = _model()
    moved_back = move_except_tables(model, torch.device("meta"))
    assert sorted(moved_back) == ["tables", "tower.inner.tables"]
    assert model.tower[0].weight.device.type == "meta"
    assert model.tables.embeddings["item_id"].weight.device.type == "cpu"
    assert model.tower.inner.tables.embeddings["t"].weight.device.type == "cpu"
    assert isinstance(model.tables, type(_model().tables))  # put back, not replaced


class _Base:
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        with torch.device("meta"):  # what Lightning's does on a GPU: the root device
            yield


class _Strategy(TablePlacement, _Base):
    def __init__(self, device: str, shard: bool, sharded: dict[str, nn.Module] | None = None) -> None:
        self.root_device = torch.device(device)
        self.options = SimpleNamespace(embedding=SimpleNamespace(shard_embeddings=shard))
        self.sharded_modules = sharded or {}
        self.model = _model()


def test_configure_model_builds_on_the_host_and_setup_keeps_tables_back() -> None:
    strategy = _Strategy("meta", shard=True)
    with strategy.tensor_init_context():
        assert nn.Linear(2, 2).weight.device.type == "cpu"
    strategy.model_to_device()
    assert strategy.model.tower[0].weight.device.type == "meta"
    assert strategy.model.tables.embeddings["item_id"].weight.device.type == "cpu"
    # tables that will not be sharded go with the rest
    unsharded = _Strategy("meta", shard=False)
    unsharded.model_to_device()
    assert unsharded.model.tables.embeddings["item_id"].weight.device.type == "meta"


def test_ddp_broadcasts_buffers_only_when_forward_can_change_them() -> None:
    from lightning_hybrid.models.sasrec import SASRec
    from lightning_hybrid.parallel.data import needs_buffer_broadcast

    sasrec = SASRec(num_items=20, max_len=8, d_model=16, tables="torch")  # non-persistent constant buffers only
    assert list(sasrec.buffers()) and not needs_buffer_broadcast(sasrec, set())
    with_norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # running statistics change in forward
    assert needs_buffer_broadcast(with_norm, set())
    assert not needs_buffer_broadcast(with_norm, {"1.running_mean", "1.running_var", "1.num_batches_tracked"})
