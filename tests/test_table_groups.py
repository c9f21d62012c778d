"""Tables sharded inside groups of ranks, one copy per group (`lightning_hybrid.parallel.table_groups`,
``HybridStrategy(embedding_shard_group_size=...)``): on 4 processes in 2 groups of 2, training
(clipped; DDP, FSDP2, the compressor's exchange, the layout around the groups planned by
``plan="auto"``), test, checkpoints and resuming equal one process;
the copies' averaging equals the mean on its sparse and dense paths, and pooled tables trained with
the plain functions per pair equal the same tables sharded over all ranks; what cannot compose is
refused at construction."""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

DATA = dict(format="synthetic", max_len=8, synthetic_users=48, synthetic_items=30, synthetic_min_len=4, synthetic_max_len=12, seed=3)
CLIP = 0.05  # (small: every step clips, so a norm summed over the wrong ranks changes the run)
WORLD = 4

#: layout -> HybridStrategy options on WORLD processes
LAYOUTS: dict[str, dict[str, Any]] = {
    "row_wise": {"embedding_sharding": {"item_id": "row_wise"}, "embedding_shard_group_size": 2},
    "table_wise": {"embedding_sharding": {"item_id": "table_wise"}, "embedding_shard_group_size": 2},
    "row_wise_fsdp": {"embedding_sharding": {"item_id": "row_wise"}, "embedding_shard_group_size": 2, "dense_parallel": "fsdp"},
    "row_wise_powersgd": {"embedding_sharding": {"item_id": "row_wise"}, "embedding_shard_group_size": 2,
                          "gradient_compression": {"method": "powersgd", "rank": 2, "min_numel": 10**9}},
    # the planner chooses the rest of the layout (dp 4, the item table row-wise, exact exchange:
    # with memory passes and compression's kernels priced dear, compressing does not pay; see _trainer)
    "planned": {"plan": "auto", "cluster": "cpu-2core", "embedding_shard_group_size": 2},
}
PLANNER_SCALE = {"compute": 1.0, "memory": 1000.0, "bandwidth": 1.0, "latency": 1.0, "tp_dispatch": 1.0, "overhead": 0.0, "compression": 1000.0}


#: layouts (and the one-process reference) also resumed from last.ckpt; the others fit and test once (test time)
RESUMED = (None, "row_wise", "row_wise_fsdp")


def _model() -> Any:
    from tests.helpers import sgd_sasrec_class

    torch.manual_seed(0)
    model = sgd_sasrec_class(momentum=0.9)(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, output="tied", top_k=5)
    model.clip_tables = True  # (the tables use the dense kernel here: they are clipped with the rest)
    return model


def _trainer(layout: str | None, epochs: int, root: Path) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.comm.compress import GradientCompression
    from tests.helpers import LossRecorder, quiet_trainer

    options = dict(LAYOUTS[layout]) if layout else {}
    if "gradient_compression" in options:
        options["gradient_compression"] = GradientCompression(**options["gradient_compression"])
    if options.get("plan") == "auto":
        # written once by the launching process (`_four_processes`): four ranks writing one file
        # while others read it raced (a rank read it empty)
        options["planner_calibration"] = os.environ["LH_TEST_PLANNER_CALIBRATION"]
    strategy = HybridStrategy(**options) if layout else "auto"
    return quiet_trainer(
        strategy=strategy, devices=WORLD if layout else 1, max_epochs=epochs, gradient_clip_val=CLIP, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True), LossRecorder()], enable_checkpointing=True, default_root_dir=str(root),
    )


def _run(layout: str | None, root: str) -> dict[str, Any]:
    """Fit 3 epochs and test the model and last.ckpt; fit 1 epoch and resume to 3 from its last.ckpt."""
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.data.sequences import SequenceDataModule

    devices = WORLD if layout else 1
    data = SequenceDataModule(**DATA, batch_size=12 // devices)
    out: dict[str, Any] = {}
    runs = (("whole", 3, False), ("first", 1, False), ("resumed", 3, True))
    for name, epochs, resume in runs if layout in RESUMED else runs[:1]:
        folder = Path(root) / ("split" if name != "whole" else name)
        model = _model()
        trainer = _trainer(layout, epochs, folder)
        trainer.fit(model, datamodule=data, ckpt_path=str(folder / "last.ckpt") if resume else None)
        weights = full_state_dict(model) if devices > 1 else {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[name] = {"losses": _losses(trainer), "after_fit": weights}
        if name == "whole":
            out[name]["test"] = trainer.test(model, datamodule=data, verbose=False)[0]
            out[name]["test_last_ckpt"] = _trainer(layout, 1, folder / "test").test(
                _model(), datamodule=data, ckpt_path=str(folder / "last.ckpt"), verbose=False
            )[0]
            out[name]["groups"] = None if layout is None else _group_ranks(trainer)
            out[name]["planned"] = getattr(getattr(trainer.strategy, "planned", None), "layout", None)
    return out


def _losses(trainer: Any) -> list[float]:
    from tests.helpers import LossRecorder

    return next(c for c in trainer.callbacks if isinstance(c, LossRecorder)).losses


def _group_ranks(trainer: Any) -> list[int]:
    """The global ranks holding this rank's copy of the item table (from its sharded module)."""
    import torch.distributed as dist

    module = next(iter(trainer.strategy.sharded_modules.values()))
    return dist.get_process_group_ranks(module.hybrid_shard_group)


def _layouts(root: str) -> dict[str, Any]:
    return {layout: _run(layout, str(Path(root) / layout)) for layout in LAYOUTS}


@functools.cache
def _one_process() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        return _run(None, root)


@functools.cache
def _four_processes() -> list[dict[str, Any]]:
    import json

    with tempfile.TemporaryDirectory() as root:
        calibration = Path(root) / "scale.json"
        calibration.write_text(json.dumps({"scale": PLANNER_SCALE}))
        return run_distributed(_layouts, WORLD, root, init_process_group=False, timeout_s=500,
                               env={"LH_TEST_PLANNER_CALIBRATION": str(calibration)})


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tables_in_groups_of_two_train_test_and_resume_as_one_process(layout: str) -> None:
    reference = _one_process()
    results = [r[layout] for r in _four_processes()]
    assert [r["whole"]["groups"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    if layout == "planned":
        from lightning_hybrid.planner import Layout

        assert results[0]["whole"]["planned"] == Layout(dp=4, table_group=2)
    for name in ("whole", "resumed") if layout in RESUMED else ("whole",):
        mean = [sum(r[name]["losses"][i] for r in results) / WORLD for i in range(len(reference[name]["losses"]))]
        assert_close(torch.tensor(mean), torch.tensor(reference[name]["losses"]), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{layout} {n}: {m}")
        for key, value in reference[name]["after_fit"].items():
            assert_close(results[0][name]["after_fit"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key, n=name: f"{layout} {n} {k}: {m}")
    for result in results:
        assert result["whole"]["test"] == pytest.approx(reference["whole"]["test"], abs=1e-6)
        assert result["whole"]["test_last_ckpt"] == pytest.approx(reference["whole"]["test_last_ckpt"], abs=1e-6)


def _grads(rank: int) -> dict[str, torch.Tensor | None]:
    """Each rank's gradients for the averaging test: sparse rows, all rows, none, one copy only, 1-D."""
    g = torch.Generator().manual_seed(rank)
    sparse = torch.zeros(40, 3)
    rows = torch.randperm(40, generator=g)[: 2 + rank]  # (a different count per copy: padded gathers)
    sparse[rows] = torch.randn(len(rows), 3, generator=g)
    if rank == 1:
        sparse[39, 0] = float("nan")  # a non-finite gradient must reach every copy
    return {"sparse": sparse, "dense": torch.randn(10, 3, generator=g), "none": None,
            "half": torch.randn(6, 2, generator=g) if rank >= 2 else None, "flat": torch.randn(5, generator=g)}


def _average_on_ranks() -> dict[str, Any]:
    import torch.distributed as dist

    from lightning_hybrid.parallel.table_groups import average_table_gradients, make_table_groups

    groups = make_table_groups(2)
    params = {}
    for name, grad in _grads(dist.get_rank()).items():
        shape = {"none": (4, 2), "half": (6, 2)}.get(name, grad.shape if grad is not None else None)
        params[name] = torch.nn.Parameter(torch.zeros(shape))
        params[name].grad = grad
    sent = average_table_gradients(list(params.values()), groups)
    dense_only = {n: torch.nn.Parameter(torch.zeros(p.shape)) for n, p in params.items() if n == "sparse"}
    dense_only["sparse"].grad = _grads(dist.get_rank())["sparse"]
    sent_dense = average_table_gradients(list(dense_only.values()), groups, sparse_below=0.0)
    return {"grads": {n: p.grad for n, p in params.items()}, "sent": sent, "sparse_dense_path": dense_only["sparse"].grad,
            "sent_dense": sent_dense, "pooled": {kind: (_pooled_steps("all", kind), _pooled_steps("pairs", kind)) for kind in ("row_wise", "table_wise", "column_wise")}}


def _pooled_steps(layout: str, kind: str) -> dict[str, torch.Tensor]:
    """Two pooled tables (an EmbeddingBagCollection, fbgemm's dense kernel) sharded ``kind`` over all
    4 ranks or per pair with the plain functions, 3 Adagrad steps; the whole tables after them."""
    import torch.distributed as dist
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from lightning_hybrid.checkpoint import full_state_dict
    from lightning_hybrid.parallel import embedding as emb
    from lightning_hybrid.parallel import table_groups as tg

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=40, feature_names=["f"]),
                                               EmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=30, feature_names=["g"])])
    spec = emb.EmbeddingShardingSpec(sharding_types={"t": kind, "u": kind}, compute_kernels={"t": "dense", "u": "dense"})
    constraints = emb.build_constraints(emb.table_infos(emb.find_embedding_modules(model)), spec, {"t": "dense", "u": "dense"})
    groups = tg.make_table_groups(2) if layout == "pairs" else None
    env = groups.sharding_env() if groups else ShardingEnv.from_process_group(dist.group.WORLD)
    plan = emb.plan_sharding_on_rank0(model, env=groups.planning_env() if groups else env, device=torch.device("cpu"),
                                      constraints=constraints, local_world_size=2)
    if groups:
        tg.move_plan_to_group(plan, groups)
    params = tg.table_parameters(emb.shard_embeddings_in_place(model, plan=plan, env=env, device=torch.device("cpu")).values())
    optimizer = torch.optim.Adagrad(params, lr=0.1)
    for step in range(3):
        g = torch.Generator().manual_seed(10 * step + dist.get_rank())
        ids = torch.cat([torch.randint(0, 40, (6,), generator=g), torch.randint(0, 30, (6,), generator=g)])
        batch = KeyedJaggedTensor.from_lengths_sync(keys=["f", "g"], values=ids, lengths=torch.tensor([2, 1, 3, 3, 2, 1]))
        model.ebc(batch).values().square().sum().backward()
        if groups:
            tg.average_table_gradients(params, groups)
        optimizer.step()
        optimizer.zero_grad()
    return full_state_dict(model.ebc)


def test_averaging_across_copies_is_the_mean_and_pooled_tables_train_as_over_all_ranks() -> None:
    ranks = run_distributed(_average_on_ranks, WORLD, timeout_s=120)
    for rank, got in enumerate(ranks):
        mine, other = _grads(rank), _grads((rank + 2) % WORLD)  # copies: ranks r and r + 2 hold the same shards
        for name in ("sparse", "dense", "flat"):
            assert_close(got["grads"][name], (mine[name] + other[name]) / 2, equal_nan=True, msg=name)
        assert got["grads"]["none"] is None
        assert_close(got["grads"]["half"], _grads(2 + rank % 2)["half"] / 2)  # (a missing gradient counts as zero)
        assert_close(got["sparse_dense_path"], got["grads"]["sparse"], equal_nan=True)
        assert bool(torch.isnan(got["grads"]["sparse"][39, 0])) == (rank % 2 == 1)  # (rank 1 and its copy, rank 3)
        assert got["grads"]["sparse"].ne(0).any(1).sum() < 40
    # the sparse path sends the touched rows (at most 5 of 40 here), not the whole shard
    assert ranks[0]["sent_dense"] > 2 * ranks[0]["sent"] / 5
    # pooled tables (fbgemm's dense kernel), Adagrad: per pair equals over all ranks, each sharding type
    for kind, (everywhere, pairs) in ranks[0]["pooled"].items():
        assert set(pairs) == set(everywhere) == {"embedding_bags.t.weight", "embedding_bags.u.weight"}
        for key, value in everywhere.items():
            assert_close(pairs[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key, t=kind: f"{t} {k}: {m}")


def test_group_sizes_and_combinations_that_cannot_work_are_refused_naming_the_fix() -> None:
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.parallel.table_groups import resolve_group_size

    assert resolve_group_size(None, world=8, local_world_size=4) is None
    assert resolve_group_size("node", world=8, local_world_size=4) == 4
    assert resolve_group_size(2, world=8, local_world_size=4) == 2
    assert resolve_group_size("node", world=4, local_world_size=4) is None  # one node: the ordinary layout
    with pytest.raises(ValueError, match=r"groups of 4 ranks.*6 ranks.*divisor of 6"):
        resolve_group_size(4, world=6, local_world_size=2)
    for bad in (1, 0, "rack", True):
        with pytest.raises(ValueError, match=r"embedding_shard_group_size=.*integer >= 2.*'node'"):
            HybridStrategy(embedding_shard_group_size=bad)
    with pytest.raises(ValueError, match=r"embedding_kernels=\{'item_id': 'fused'\}.*'dense'"):
        HybridStrategy(embedding_shard_group_size=2, embedding_kernels={"item_id": "fused"})
    with pytest.raises(ValueError, match=r"tensor_parallel=2.*tensor_parallel=1 and pipeline_parallel=1"):
        HybridStrategy(embedding_shard_group_size=2, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"pipeline_parallel=2.*tensor_parallel=1 and pipeline_parallel=1"):
        HybridStrategy(embedding_shard_group_size="node", pipeline_parallel=2)
    with pytest.raises(ValueError, match=r"shard_embeddings=False.*Drop one"):
        HybridStrategy(embedding_shard_group_size=2, shard_embeddings=False)
    for mode in ("local_sgd", "async"):
        with pytest.raises(ValueError, match=rf"data_parallel_mode='{mode}'.*data_parallel_mode='sync'"):
            HybridStrategy(embedding_shard_group_size=2, data_parallel_mode=mode)
    with pytest.raises(ValueError, match=r"data_parallel_mode='local_sgd'.*data_parallel_mode='sync'"):
        HybridStrategy(embedding_shard_group_size=2, plan="auto", data_parallel_mode="local_sgd")
