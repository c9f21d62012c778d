"""Tier 1: the planner's cost model against hand-computed cases, the search's memory limit,
calibration recovering known multipliers, and clear errors for bad cluster descriptions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lightning_hybrid.planner import (
    Cluster,
    CostModel,
    DeviceSpec,
    Layout,
    Link,
    Measurement,
    ModelSpec,
    all_gather_time,
    all_reduce_time,
    all_to_all_time,
    calibrate,
    candidate_layouts,
    preset,
    relative_errors,
    search,
    send_time,
    single_mode_layouts,
)
from lightning_hybrid.planner.cost import FEATURES

LINK = Link(bandwidth=1e10, latency=1e-5)
MODEL = ModelSpec(num_items=100_000, d_model=64, num_blocks=4, num_heads=4, seq_len=50, global_batch=64, negatives=256)


def _gpu_cluster(nodes: int = 1, memory: float = 80e9) -> Cluster:
    return dataclasses.replace(preset("h100x8-ib400"), nodes=nodes, device=dataclasses.replace(preset("h100x8-ib400").device, memory_bytes=memory))


def test_collective_times_match_the_ring_formulas() -> None:
    # 100 MB over 4 ranks at 10 GB/s, 10 us per message: 2*3/4 * 1e8/1e10 + 2*3*1e-5
    assert all_reduce_time(1e8, 4, LINK) == pytest.approx(0.015 + 6e-5)
    assert all_gather_time(1e6, 4, LINK) == pytest.approx(3 * 1e6 / 1e10 + 3e-5)
    assert all_to_all_time(1e6, 4, LINK) == pytest.approx(0.75 * 1e6 / 1e10 + 3e-5)
    assert send_time(1e6, LINK) == pytest.approx(1e-4 + 1e-5)
    assert all_reduce_time(1e8, 1, LINK) == 0.0


def test_data_parallel_step_prices_the_gradient_all_reduce_beyond_what_backward_hides() -> None:
    cost = CostModel(_gpu_cluster())
    est = cost.estimate(MODEL, Layout(dp=8, table="replicated"))
    grad_bytes = (MODEL.block_params + MODEL.output_params + MODEL.table_params) * 4
    # the all-reduce runs under backward (2/3 of the compute): only what outlasts it is on the step's path
    ring = all_reduce_time(grad_bytes, 8, cost.cluster.intra_node)
    assert ring > 2 / 3 * est.parts["compute"] > 0
    assert est.parts["dp_comm"] == pytest.approx(ring - 2 / 3 * est.parts["compute"])
    assert est.features["bandwidth"] + est.features["latency"] == pytest.approx(est.parts["dp_comm"])
    assert est.parts["tp_comm"] == est.parts["pp_comm"] == est.parts["emb_comm"] == est.parts["bubble"] == 0.0
    # 16 GPUs on 2 nodes: the dp ring crosses InfiniBand, 9x slower than NVLink here
    two = CostModel(_gpu_cluster(nodes=2)).estimate(MODEL, Layout(dp=16, table="replicated"))
    assert two.parts["dp_comm"] == pytest.approx(all_reduce_time(grad_bytes, 16, cost.cluster.inter_node) - 2 / 3 * two.parts["compute"])
    # a big batch's backward hides the whole exchange
    big_batch = cost.estimate(dataclasses.replace(MODEL, global_batch=8 * 4096), Layout(dp=8, table="replicated"))
    assert 0 < ring < 2 / 3 * big_batch.parts["compute"] and big_batch.parts["dp_comm"] == 0.0


def test_tensor_and_pipeline_parts() -> None:
    cost = CostModel(_gpu_cluster())
    tp = cost.estimate(MODEL, Layout(dp=4, tp=2))
    activation = (64 / 4) * 50 * 64 * 4  # replica batch x seq x d x fp32
    assert tp.parts["tp_comm"] == pytest.approx(4 * 4 * all_reduce_time(activation, 2, cost.cluster.intra_node))
    pp = cost.estimate(MODEL, Layout(dp=2, pp=4, microbatches=8, table="replicated"))
    assert pp.parts["bubble"] == pytest.approx(pp.parts["compute"] * 3 / 8)  # (pp - 1) / microbatches
    interleaved = cost.estimate(MODEL, Layout(dp=4, pp=2, microbatches=8, virtual_stages=2, table="replicated"))
    assert interleaved.parts["bubble"] == pytest.approx(interleaved.parts["compute"] * 1 / 16)


def test_a_balanced_split_moves_a_block_off_the_output_stage() -> None:
    # full softmax over 100k items: the output layer costs ~130 blocks, so the balancer's cut for
    # pp=2 is [3, 1] and the busiest stage (the last) sheds exactly one block's compute and update
    cost = CostModel(_gpu_cluster())
    full = dataclasses.replace(MODEL, negatives=None)
    even = cost.estimate(full, Layout(dp=4, pp=2, microbatches=4))
    balanced = cost.estimate(full, Layout(dp=4, pp=2, microbatches=4, split="balanced"))
    dev = cost.cluster.device
    block_s = 3 * full.block_forward_flops(64 / 4) / full.num_blocks / (dev.peak_flops * dev.efficiency * cost.cluster.compute_share)
    block_update_s = 32 * full.block_params / full.num_blocks / (dev.memory_bandwidth * cost.cluster.compute_share)
    assert balanced.parts["compute"] == pytest.approx(even.parts["compute"] - block_s)
    assert balanced.parts["memory"] == pytest.approx(even.parts["memory"] - block_update_s)
    assert balanced.parts["bubble"] == pytest.approx(balanced.parts["compute"] * 1 / 4)
    assert balanced.step_s < even.step_s
    # the same split given stage by stage (what a measured run used) prices the same; its inverse
    # puts 3 blocks next to the output layer, one block's compute and update dearer than even
    given = cost.estimate(full, Layout(dp=4, pp=2, microbatches=4, split=(3, 1)))
    assert given.step_s == pytest.approx(balanced.step_s)
    inverse = cost.estimate(full, Layout(dp=4, pp=2, microbatches=4, split=(1, 3)))
    assert inverse.parts["compute"] == pytest.approx(even.parts["compute"] + block_s)
    assert Layout(dp=4, pp=2, microbatches=4, split=(3, 1)).strategy_kwargs()["pipeline_split"] == [3, 1]
    assert "stages of at least one block each" in cost.validate(full, Layout(dp=4, pp=2, microbatches=4, split=(4, 1)))
    # one block per stage (pp=2 x 2 virtual stages of 4 blocks): nothing to move
    v2 = {split: cost.estimate(full, Layout(dp=4, pp=2, microbatches=4, schedule="interleaved_1f1b", virtual_stages=2, split=split)).step_s
          for split in ("even", "balanced")}
    assert v2["balanced"] == pytest.approx(v2["even"])
    # what the planner hands the strategy, and what it refuses to price
    assert Layout(dp=4, pp=2, microbatches=4, split="balanced").strategy_kwargs()["pipeline_split"] == "balanced"
    assert "balanced" in Layout(dp=4, pp=2, microbatches=4, split="balanced").describe()
    assert "'balanced' with pp > 1" in cost.validate(full, Layout(dp=8, split="balanced"))
    assert {layout.split for layout in candidate_layouts(full, 8) if layout.pp > 1} == {"even", "balanced"}
    assert {layout.split for layout in candidate_layouts(full, 8) if layout.pp == 1} == {"even"}
    # the search keeps a balanced layout only where it cuts differently from the even one
    assert any(e.layout.split == "balanced" for e in search(cost, full))
    # four stages of four blocks cut only one way: no balanced twin of those is kept
    ranked = search(cost, MODEL)
    assert any(e.layout.pp == 4 for e in ranked)
    assert not any(e.layout.pp == 4 and e.layout.split == "balanced" for e in ranked)
    priced = {e.layout: e.step_s for e in ranked}
    for e in ranked:
        if e.layout.split == "balanced" and dataclasses.replace(e.layout, split="even") in priced:
            assert priced[dataclasses.replace(e.layout, split="even")] != pytest.approx(e.step_s)


def test_tables_sharded_per_node_price_their_all_to_alls_inside_the_node_and_the_averaging_across() -> None:
    cost = CostModel(_gpu_cluster(nodes=2))  # 2 nodes x 8 GPUs, NVLink inside, InfiniBand across
    intra, inter = cost.cluster.intra_node, cost.cluster.inter_node
    lookups = (64 / 16) * 50  # positions per rank (replica batch 4 x 50)
    volume = lookups * (64 * 4 + 8)  # fp32 rows and int64 ids
    everywhere = cost.estimate(MODEL, Layout(dp=16))
    assert everywhere.parts["emb_comm"] == pytest.approx(2 * all_to_all_time(volume, 16, inter))
    per_node = cost.estimate(MODEL, Layout(dp=16, table_group=8))
    # the two all-to-alls over the node's 8 ranks on NVLink; each shard's touched rows (a node looks
    # up 8 x 200 rows, 200 per shard, under 1/4 of its 12,500) all-gathered with its copy on the other node
    assert per_node.parts["emb_comm"] == pytest.approx(2 * all_to_all_time(volume, 8, intra) + all_gather_time(volume, 2, inter))
    assert per_node.parts["emb_comm"] < everywhere.parts["emb_comm"]
    # a shard the copies touch densely is all-reduced whole: 16 x 4 x 50 lookups on 2-rank groups of a 1,000-row table
    small = dataclasses.replace(MODEL, num_items=999)
    dense = cost.estimate(small, Layout(dp=16, table_group=2))
    assert dense.parts["emb_comm"] == pytest.approx(2 * all_to_all_time(volume, 2, intra) + all_reduce_time(500 * 64 * 4, 8, inter))
    # memory: the node's shard of the table on the dense kernel (weights, gradient, Adagrad state)
    gap = per_node.memory_bytes - everywhere.memory_bytes
    assert gap == pytest.approx(MODEL.table_params / 8 * 12 - MODEL.table_params / 16 * 8)
    assert Layout(dp=16, table_group=8).strategy_kwargs()["embedding_shard_group_size"] == 8
    assert Layout(dp=16, table_group=8).describe() == "dp16 x tp1 x pp1, table row_wise per 8 ranks"
    # what the strategy refuses, the planner does not price; and it searches every proper group size
    assert "needs a row-wise table, tp=1 and pp=1" in cost.validate(MODEL, Layout(dp=8, tp=2, table_group=8))
    assert "needs a row-wise table" in cost.validate(MODEL, Layout(dp=16, table="replicated", table_group=8))
    assert "must divide the 16 devices" in cost.validate(MODEL, Layout(dp=16, table_group=16))
    assert "must divide the 16 devices" in cost.validate(MODEL, Layout(dp=16, table_group=3))
    groups = {layout.table_group for layout in candidate_layouts(MODEL, 16) if layout.tp == layout.pp == 1}
    assert groups == {None, 2, 4, 8}
    assert all(layout.table_group is None for layout in candidate_layouts(MODEL, 16) if layout.tp * layout.pp > 1)


def test_compression_cuts_the_bytes_it_should() -> None:
    cost = CostModel(_gpu_cluster(nodes=4))
    big = dataclasses.replace(MODEL, num_items=5_000_000, d_model=256)  # a 1.3B-value output layer: bytes dominate
    exact = cost.estimate(big, Layout(dp=32, compression="none"))
    fp16 = cost.estimate(big, Layout(dp=32, compression="fp16"))
    powersgd = cost.estimate(big, Layout(dp=32, compression="powersgd"))
    assert powersgd.parts["dp_comm"] < 0.05 * exact.parts["dp_comm"]
    assert fp16.parts["dp_comm"] == pytest.approx(exact.parts["dp_comm"] / 2, rel=1e-2)  # half the bytes, same latencies
    # on a small model PowerSGD's three latency-bound all-reduces cost more than the bytes it saves
    assert cost.estimate(MODEL, Layout(dp=32, compression="powersgd")).parts["dp_comm"] > cost.estimate(MODEL, Layout(dp=32)).parts["dp_comm"]
    # gloo cannot sum fp16: on a CPU cluster the halves are all-gathered, which beyond 4 ranks costs more than it saves
    cpu = CostModel(dataclasses.replace(preset("cpu-2core"), devices_per_node=8))
    assert cpu.estimate(MODEL, Layout(dp=8, compression="fp16")).parts["dp_comm"] > cpu.estimate(MODEL, Layout(dp=8)).parts["dp_comm"]


def test_search_respects_the_memory_limit() -> None:
    small = CostModel(_gpu_cluster(memory=0.2e9))  # 200 MB: a replicated 25 MB table + Adam still fits, big batches not
    estimates = search(small, MODEL)
    assert estimates, "something must fit"
    assert all(e.memory_bytes <= 0.9 * 0.2e9 for e in estimates)
    every = [small.estimate(MODEL, layout) for layout in candidate_layouts(MODEL, 8) if small.validate(MODEL, layout) is None]
    assert any(not e.fits for e in every)  # some layouts were excluded for memory
    assert [e.step_s for e in estimates] == sorted(e.step_s for e in estimates)
    assert search(CostModel(_gpu_cluster(memory=1e6)), MODEL) == []  # 1 MB: nothing fits


def test_invalid_layouts_are_explained() -> None:
    cost = CostModel(_gpu_cluster())
    assert "does not divide num_heads" in cost.validate(MODEL, Layout(dp=1, tp=8))
    assert "exceeds num_blocks" in cost.validate(MODEL, Layout(dp=1, pp=8, microbatches=8))
    assert "but the cluster has 8 devices" in cost.validate(MODEL, Layout(dp=4))
    with pytest.raises(ValueError, match=r"Layout dp1 x tp8 x pp1.*does not divide num_heads=4"):
        cost.estimate(MODEL, Layout(dp=1, tp=8))
    assert [layout.kind for layout in single_mode_layouts(MODEL, 8)] == ["dp", "mp", "tp", "pp"]
    assert Layout(dp=4, tp=2, compression="powersgd").kind == "hybrid"


def test_calibration_recovers_known_multipliers() -> None:
    truth = {"compute": 1.7, "memory": 0.6, "bandwidth": 2.5, "latency": 3.0, "tp_dispatch": 1.2, "overhead": 0.004, "compression": 2.2}
    cluster = dataclasses.replace(preset("cpu-2core"), devices_per_node=4)
    known = CostModel(cluster, scale=truth)
    layouts = [layout for layout in candidate_layouts(MODEL, 4) if known.validate(MODEL, layout) is None]
    measurements = [Measurement(MODEL, layout, known.estimate(MODEL, layout).step_s) for layout in layouts]
    fitted = calibrate(CostModel(cluster), measurements)
    for name in FEATURES:
        assert fitted.scale[name] == pytest.approx(truth[name], rel=1e-6), name
    assert max(relative_errors(fitted, measurements)) < 1e-9
    with pytest.raises(ValueError, match="measurements cannot fit 7 multipliers"):
        calibrate(CostModel(cluster), measurements[:3])


def test_cluster_descriptions_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Link: bandwidth=-1.0 must be a positive number"):
        Link(bandwidth=-1.0, latency=0.0)
    with pytest.raises(ValueError, match=r"efficiency=1.5 must be a positive number and at most 1.0"):
        DeviceSpec(name="x", peak_flops=1e12, memory_bytes=1e9, efficiency=1.5)
    with pytest.raises(ValueError, match=r"unknown keys \['gpus'\]"):
        Cluster.from_dict({"preset": "h100x8-ib400", "gpus": 8})
    with pytest.raises(ValueError, match=r"missing \['device', 'intra_node', 'inter_node'\]"):
        Cluster.from_dict({"nodes": 1, "devices_per_node": 8})
    with pytest.raises(ValueError, match=r"Unknown cluster preset 'dgx'"):
        Cluster.from_dict({"preset": "dgx"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 0\ndevices_per_node: 8\ndevice: {name: g, peak_flops: 1.0e14, memory_bytes: 8.0e10}\n"
                   "intra_node: {bandwidth: 1.0e11, latency: 0}\ninter_node: {bandwidth: 1.0e10, latency: 0}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: Cluster\('cluster'\): nodes=0 must be a positive integer"):
        Cluster.from_yaml(bad)
    good = tmp_path / "good.yaml"
    good.write_text("preset: h100x8-ib400\nnodes: 16\n")
    cluster = Cluster.from_yaml(good)
    assert cluster.world_size == 128 and cluster.device.name == "H100-SXM-80GB"
    assert cluster.link_for(8) == cluster.intra_node and cluster.link_for(16) == cluster.inter_node
    assert cluster.link_for(2, stride=8) == cluster.inter_node  # dp peers of a tp=8 layout sit on other nodes


def test_plan_command_writes_a_plan_that_fit_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from lightning_hybrid.cli import main

    root = Path(__file__).resolve().parents[1]
    recipe = root / "recipes" / "pipeline.yaml"  # pp=2 x dp=2 with balanced split, 4 processes
    plan = tmp_path / "plan.yaml"
    main(["plan", "-c", str(recipe), "--cluster", "cpu-2core", "--top", "3", "--out", str(plan)])
    printed = capsys.readouterr().out
    assert "| 1 |" in printed and "| 3 |" in printed and "wrote" in printed
    chosen = yaml.safe_load(plan.read_text())
    options = chosen["trainer"]["strategy"]["init_args"]
    assert options["data_parallel"] * options["tensor_parallel"] * options["pipeline_parallel"] == 4
    assert chosen["data"]["init_args"]["batch_size"] * options["data_parallel"] == 64 * 2  # the recipe's global batch kept
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(recipe), "-c", str(plan), "--print_config"])
    assert exit_info.value.code in (0, None)
    merged = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]["init_args"]
    for key in ("data_parallel", "tensor_parallel", "pipeline_parallel", "shard_embeddings", "pipeline_microbatches"):
        assert merged[key] == options[key], key
    with pytest.raises(ValueError, match=r"the recipe's model is lightning_hybrid.models.dlrm.DLRM"):
        main(["plan", "-c", str(root / "recipes" / "dlrm_quickstart.yaml")])


def test_simulator_smoke(tmp_path: Path) -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("planner_simulation", root / "benchmarks" / "planner_simulation.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rows = module.main(["--smoke", "--json", str(tmp_path / "sim.json"), "--plot", str(tmp_path / "sim.png")])
    assert [r["gpus"] for r in rows] == [8, 16]
    for row in rows:  # the search includes every single-mode layout, so the best hybrid is never slower
        assert row["hybrid_samples_per_s"] >= row["single_samples_per_s"] > 0
    assert (tmp_path / "sim.png").stat().st_size > 10_000


def _fit_auto(calibration: str) -> dict:
    import os
    import warnings

    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import torch

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec
    from tests.helpers import quiet_trainer

    torch.manual_seed(0)
    model = SASRec(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0)
    data = SequenceDataModule(format="synthetic", max_len=8, batch_size=8, synthetic_users=64, synthetic_items=30,
                              synthetic_min_len=10, synthetic_max_len=10, drop_last=True)
    strategy = HybridStrategy(plan="auto", cluster="cpu-2core", planner_calibration=calibration)
    trainer = quiet_trainer(strategy=strategy, devices=2, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    plan = strategy.plan
    return {"planned": strategy.planned.layout, "plan": (plan.data_parallel, plan.tensor_parallel, plan.pipeline_parallel),
            "batch_size": data.batch_size, "steps": trainer.global_step}


def test_auto_plan_applies_the_planners_first_choice(tmp_path: Path) -> None:
    import json

    from lightning_hybrid.testing import run_distributed

    # multipliers that make communication dear: the planner must avoid what exchanges most
    calibration = tmp_path / "scale.json"
    calibration.write_text(json.dumps({"scale": {"compute": 1.0, "memory": 1.0, "bandwidth": 50.0, "latency": 50.0, "tp_dispatch": 1.0, "overhead": 0.0}}))
    model = ModelSpec(num_items=30, d_model=16, num_blocks=2, num_heads=2, seq_len=8, global_batch=16, negatives=None)
    cluster = dataclasses.replace(preset("cpu-2core"), devices_per_node=2)
    expected = search(CostModel(cluster, scale=json.loads(calibration.read_text())["scale"]), model)[0].layout
    for result in run_distributed(_fit_auto, 2, str(calibration), init_process_group=False, timeout_s=120):
        assert result["planned"] == expected
        assert result["plan"] == (expected.dp, expected.tp, expected.pp)
        assert result["batch_size"] * expected.dp == 16  # the global batch (8 per replica x dp 2) is kept
        assert result["steps"] == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"cannot be read"),
        ("", r"is not a calibration file \(JSONDecodeError"),
        ('{"compute": 1.0}', r"is not a calibration file \(KeyError"),
        ('{"scale": {"compute": 1.0, "bandwith": 2.0}}', r"unknown: \['bandwith'\]"),
        ('{"scale": {"compute": -1.0}}', r"multipliers >= 0"),
    ],
)
def test_a_bad_calibration_file_is_refused_naming_the_file_and_the_fix(tmp_path: Path, content: str | None, message: str) -> None:
    from lightning_hybrid.planner import load_calibration

    path = tmp_path / "scale.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as caught:
        load_calibration(path)
    assert str(path) in str(caught.value) and "planner_accuracy.py --json" in str(caught.value)


def test_a_calibration_file_loads_as_the_benchmark_wrote_it(tmp_path: Path) -> None:
    import json

    from lightning_hybrid.planner import load_calibration

    scale = {"compute": 1.5, "memory": 2, "bandwidth": 0.5, "latency": 1.0, "tp_dispatch": 1.0, "overhead": 0.001, "compression": 3.0}
    (tmp_path / "scale.json").write_text(json.dumps({"scale": scale, "median_error": 0.07}))
    assert load_calibration(tmp_path / "scale.json") == {k: float(v) for k, v in scale.items()}
    # written before compression was a feature of its own: it keeps the uncalibrated multiplier
    del scale["compression"]
    (tmp_path / "old.json").write_text(json.dumps({"scale": scale}))
    assert load_calibration(tmp_path / "old.json") == {**{k: float(v) for k, v in scale.items()}, "compression": 1.0}


@pytest.mark.parametrize("block", ["pre_norm", "sasrec", "ligr"])
def test_model_spec_counts_the_parameters_of_each_block_layout(block: str) -> None:
    """ModelSpec.from_sasrec's block parameters equal the real SASRec's transformer blocks (LiGR
    has a SwiGLU's third matrix, no MLP biases and two residual gates)."""
    from lightning_hybrid.models.sasrec import SASRec

    model = SASRec(num_items=50, max_len=10, d_model=16, num_blocks=3, num_heads=2, mlp_ratio=2, block=block, tables="torch")  # type: ignore[arg-type]
    spec = ModelSpec.from_sasrec(model, global_batch=8)
    assert spec.block_params == sum(p.numel() for p in model.blocks.parameters())
    assert spec.gated == (block == "ligr")
