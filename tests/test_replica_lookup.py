"""Tier 1/2: embedding lookups split over a tp group (`lightning_hybrid.parallel.replica_lookup`).

The split lookup must equal the plain lookup of the whole batch on every rank (values) and train
the tables exactly as the whole batch would (updated weights), while each rank looks up only its
slice of the batch.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.parallel.replica_lookup import slice_batch
from lightning_hybrid.testing import run_distributed

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def _features(batch: int = 5, seed: int = 3) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = ["f0", "f1", "f2"]
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    weights = torch.rand(int(lengths.sum()), generator=g)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def test_slice_batch_keeps_samples_and_pads_with_empty_ones() -> None:
    kjt = _features()
    part = slice_batch(kjt, 3, 5, 3)
    assert part.stride() == 3 and part.keys() == kjt.keys()
    full, piece = kjt.to_dict(), part.to_dict()
    for key in kjt.keys():
        expected = full[key].to_dense()[3:5] + [torch.tensor([], dtype=kjt.values().dtype)]
        got = piece[key].to_dense()
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert_close(piece[key].weights(), torch.cat([w for w in full[key].to_dense_weights()[3:5]]))


def _modules(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "ebc":
        return EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=20, feature_names=[f"f{i}"]) for i in range(3)]
        )
    return EmbeddingCollection(
        tables=[EmbeddingConfig(name=f"t{i}", embedding_dim=8, num_embeddings=20, feature_names=[f"f{i}"]) for i in range(3)]
    )


def _loss(out: Any, kind: str) -> torch.Tensor:
    if kind == "ebc":
        return (out.values() * torch.arange(out.values().numel()).view_as(out.values()).sin()).sum()
    return sum((out[k].values() * torch.arange(out[k].values().numel()).view_as(out[k].values()).cos()).sum() for k in sorted(out))


def _reference(kind: str, steps: int) -> dict[str, Any]:
    module = _modules(kind)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    outs = []
    for step in range(steps):
        kjt = _features(seed=step)
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())
        out = module(kjt)
        outs.append(out.values().detach().clone() if kind == "ebc" else torch.cat([out[k].values() for k in kjt.keys()]).detach().clone())
        opt.zero_grad()
        _loss(out, kind).backward()
        opt.step()
    return {"outs": outs, "state": {k: v.detach().clone() for k, v in module.state_dict().items()}}


def _split(kind: str, steps: int) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.types import ShardingEnv

    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.parallel import embedding as emb
    from lightning_hybrid.parallel.replica_lookup import split_lookup_over_group

    root = torch.nn.Module()
    root.tables = _modules(kind)
    infos = emb.table_infos(emb.find_embedding_modules(root))
    types = {"t0": "table_wise", "t1": "row_wise", "t2": "column_wise" if kind == "ebc" else "row_wise"}
    _apply_optimizer_in_backward(torch.optim.SGD, root.tables.parameters(), {"lr": 0.1})
    constraints = emb.build_constraints(infos, emb.EmbeddingShardingSpec(sharding_types=types), {i.table_name: "fused" for i in infos})
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    device = torch.device("cpu")
    plan = emb.plan_sharding_on_rank0(root, env=env, device=device, constraints=constraints)
    sharded = emb.shard_embeddings_in_place(root, plan=plan, env=env, device=device)["tables"]
    seen: list[int] = []
    inner = sharded.forward
    sharded.forward = lambda features, *a, **k: (seen.append(features.stride()), inner(features, *a, **k))[1]  # type: ignore[method-assign]
    split_lookup_over_group(sharded, dist.group.WORLD)
    outs = []
    for step in range(steps):
        kjt = _features(seed=step)
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())
        out = sharded(kjt)
        outs.append(out.values().detach().clone() if kind == "ebc" else torch.cat([out[k].values() for k in kjt.keys()]).detach().clone())
        _loss(out, kind).backward()
    return {"outs": outs, "state": full_state_dict(root), "seen": seen}


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_split_lookup_equals_whole_batch_lookup(kind: str) -> None:
    reference = _reference(kind, steps=2)
    ranks = run_distributed(_split, 2, kind, 2, timeout_s=120)
    for result in ranks:
        assert result["seen"] == [3, 3]  # batch 5 over 2 ranks: 3 samples each (one padded), not 5
        for got, expected in zip(result["outs"], reference["outs"], strict=True):
            assert_close(got, expected)
    for key, value in reference["state"].items():  # gathered on rank 0
        assert_close(ranks[0]["state"][f"tables.{key}"], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
