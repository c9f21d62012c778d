"""Tier 1: the checkpoint directory format without processes: atomic saves, conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_hybrid import checkpoint as ckpt


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4, 3), value), "b": torch.full((3,), value)}}


def test_a_save_that_crashes_half_way_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    ckpt.save(_state(1.0), {"global_step": 10}, path)

    real_save = torch.save

    def disk_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if str(f).endswith(ckpt.META_FILENAME):  # the tensor shards are written, then the disk fills up
            raise OSError("No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(_state(2.0), {"global_step": 20}, path)
    monkeypatch.setattr(torch, "save", real_save)

    # the previous checkpoint is intact and still the one under the real name
    assert ckpt.is_distributed_checkpoint(path)
    assert ckpt.load_meta(path)["global_step"] == 10
    state = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}}
    ckpt.load(state, path)
    assert torch.equal(state["model"]["w"], torch.full((4, 3), 1.0))
    # the half-written one is hidden and does not look like a checkpoint
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.partial-")]
    assert len(partial) == 1 and not ckpt.is_distributed_checkpoint(partial[0])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["last.ckpt"]

    # the next good save replaces the checkpoint and clears the leftover
    ckpt.save(_state(3.0), {"global_step": 30}, path)
    assert ckpt.load_meta(path)["global_step"] == 30
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_convert_round_trip_keeps_every_tensor_and_meta(tmp_path: Path) -> None:
    from lightning_hybrid.cli import main

    ckpt.save({**_state(1.5), "optimizers": {"0": {"state": {"w": {"exp_avg": torch.ones(4, 3)}}}}}, {"global_step": 7, "epoch": 1}, tmp_path / "a.ckpt")
    main(["convert", str(tmp_path / "a.ckpt"), str(tmp_path / "a.pt")])
    single = torch.load(tmp_path / "a.pt", weights_only=True)  # a plain Lightning checkpoint file
    assert single["global_step"] == 7 and single["epoch"] == 1
    assert torch.equal(single["state_dict"]["w"], torch.full((4, 3), 1.5))
    main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.ckpt")])
    assert ckpt.is_distributed_checkpoint(tmp_path / "b.ckpt")
    state = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}, "optimizers": {"0": {"state": {"w": {"exp_avg": torch.zeros(4, 3)}}}}}
    ckpt.load(state, tmp_path / "b.ckpt")
    assert torch.equal(state["model"]["b"], torch.full((3,), 1.5))
    assert torch.equal(state["optimizers"]["0"]["state"]["w"]["exp_avg"], torch.ones(4, 3))
    with pytest.raises(SystemExit, match="neither a checkpoint directory"):
        main(["convert", str(tmp_path / "missing"), str(tmp_path / "c.pt")])


def test_async_save_keeps_the_values_of_the_moment_it_was_called(tmp_path: Path) -> None:
    state = _state(1.0)
    saver = ckpt.AsyncSaver()
    saver.save(state, {"global_step": 1}, tmp_path / "a.ckpt")
    state["model"]["w"].add_(100.0)  # training goes on while the write is in flight
    saver.wait()
    assert ckpt.load_meta(tmp_path / "a.ckpt")["global_step"] == 1
    loaded = {"model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}}
    ckpt.load(loaded, tmp_path / "a.ckpt")
    assert torch.equal(loaded["model"]["w"], torch.full((4, 3), 1.0))
    saver.save(_state(2.0), {"global_step": 2}, tmp_path / "a.ckpt")  # replaces it, atomically
    saver.wait()
    assert ckpt.load_meta(tmp_path / "a.ckpt")["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def _host_copy_of_gpu_placed_shards() -> dict:
    import torch
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    from lightning_hybrid.checkpoint import _host_copy

    local = torch.arange(12.0).view(4, 3)
    st = init_from_local_shards([Shard.from_tensor_and_offsets(local, [0, 0], rank=0)], 4, 3)
    # what a GPU table looks like to the copy: metadata placed on cuda:0 (the tensor stays on the
    # CPU here, which no GPU is needed for; torch checks tensor device against placement)
    for meta in [st.local_shards()[0].metadata, *st.metadata().shards_metadata]:
        meta.placement._device = torch.device("cuda:0")
    copy = _host_copy({"t": st})["t"]
    placements = [str(m.placement.device()) for m in copy.metadata().shards_metadata]
    placements += [str(s.metadata.placement.device()) for s in copy.local_shards()]
    local[0, 0] = -1.0  # training goes on: the copy must not change
    return {"placements": placements, "value": copy.local_shards()[0].tensor.clone(), "device": str(copy.local_shards()[0].tensor.device)}


def test_host_copy_of_a_sharded_table_places_its_metadata_on_the_cpu() -> None:
    """async_checkpoint with GPU tables: the host copy's shard metadata must say cpu (a copy that
    kept cuda placements around CPU shards is refused by ShardedTensor on the first GPU save)."""
    from lightning_hybrid.testing import run_distributed

    (result,) = run_distributed(_host_copy_of_gpu_placed_shards, 1)
    assert result["device"] == "cpu"
    assert result["placements"] == ["cpu", "cpu"]
    assert float(result["value"][0, 0]) == 0.0


def test_meta_is_read_onto_the_cpu(tmp_path: Path, monkeypatch: Any) -> None:
    """meta.pt written on a GPU host may hold CUDA tensors: reading it (convert, serving on a
    CPU-only host) maps them to the CPU."""
    import torch

    from lightning_hybrid import checkpoint as ckpt

    (tmp_path / ckpt.META_FILENAME).write_bytes(b"")
    (tmp_path / ".metadata").write_bytes(b"")
    seen = {}

    def fake_load(path: Any, **kwargs: Any) -> dict:
        seen.update(kwargs)
        return {"ok": True}

    monkeypatch.setattr(torch, "load", fake_load)
    assert ckpt.load_meta(tmp_path) == {"ok": True}
    assert seen.get("map_location") == "cpu"
