"""Smoke runs of the benchmarks (tiny sizes): they must run and write their JSON. Not timed."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]


def _smoke(script: str, out: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run ``benchmarks/<script> --smoke --out <out> *extra``; its JSON and what it printed.

    In this process (its ranks fork from the test session's warm fork server: each smoke saves the
    two interpreter starts, ~8 s of imports each, a subprocess costs); in a subprocess when ``env``
    must differ (e.g. torchrec hidden)."""
    argv = ["--smoke", "--out", str(out), *extra]
    if env is not None:
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(out.read_text()), run.stdout
    if str(ROOT / "benchmarks") not in sys.path:
        # imported by name, not from a file spec, so the spawned ranks can unpickle its worker functions
        sys.path.insert(0, str(ROOT / "benchmarks"))
    module = importlib.import_module(script.removesuffix(".py"))
    environ, threads, printed = dict(os.environ), torch.get_num_threads(), io.StringIO()
    try:
        with mock.patch.object(sys, "argv", [script, *argv]), contextlib.redirect_stdout(printed):
            returned = module.main()
    finally:  # (what a benchmark sets for itself must not reach the next test)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
    assert returned in (None, 0) or not isinstance(returned, int), f"{script} --smoke returned {returned}"
    return json.loads(out.read_text()), printed.getvalue()


def test_strategy_overhead_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("strategy_overhead.py", tmp_path / "overhead.json")
    assert result["size"] == "smoke" and result["processes"] == 2
    assert set(result["step_ms"]) == {"hand", "hand_bucket_view", "hybrid"}
    assert all(v > 0 for v in result["step_ms"].values())
    assert abs(result["overhead_ratio"] - result["step_ms"]["hybrid"] / result["step_ms"]["hand"]) < 1e-9
    assert "Trainer + HybridStrategy" in stdout


def test_tp_vs_dp_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("tp_vs_dp.py", tmp_path / "tp_vs_dp.json", "--variants", "tp2_sp_vocab")
    assert set(result["results"]) == {"small/dp2", "small/tp2_sp_vocab"}
    assert all(r["step_ms"] > 0 and r["steps"] == 4 for r in result["results"].values())
    ratio = result["ratios"]["small"]["tp2_sp_vocab"]["time_ratio_over_dp2"]
    assert abs(ratio - result["results"]["small/tp2_sp_vocab"]["step_ms"] / result["results"]["small/dp2"]["step_ms"]) < 1e-9
    assert "tp=2 + SP + vocab-parallel / dp=2 step time" in stdout


def test_gpu_block_tflops_script_runs_on_cpu(tmp_path: Path) -> None:
    result, _ = _smoke("gpu_block_tflops.py", tmp_path / "tflops.json", "--device", "cpu")
    row = result["rows"][0]
    assert row["ours_tflops"] > 0 and row["encoder_layer_tflops"] > 0


def test_pipeline_bubble_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("pipeline_bubble.py", tmp_path / "bubble.json")
    rows = result["results"]
    assert {r["schedule"] for r in rows.values()} == {"gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"}
    for row in rows.values():
        assert 0.0 <= row["bubble_measured"] < 1.0 and row["step_ms"] > 0
        assert abs(row["bubble_theory_gpipe_formula"] - 1 / (row["microbatches"] + 1)) < 1e-12
    assert abs(rows["interleaved_1f1b/m=2"]["bubble_theory"] - 1 / (2 * 2 + 1)) < 1e-12  # (p-1)/(v m + p-1)
    assert "| gpipe | 1 | 2 |" in stdout


def test_rebalance_benchmark_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("rebalance.py", tmp_path / "rebalance.json")
    rows = result["results"]
    assert set(rows) == {"even", "even+rebalance", "slow", "slow+rebalance"}
    assert [rows[v]["checks"] for v in rows] == [0, 3, 0, 3]  # 6 steps, a check every 2
    assert all(row["step_ms"] > 0 and sum(row["split"]) == 4 for row in rows.values())
    assert "rebalanced_speedup" in stdout


def test_compression_overhead_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("compression_overhead.py", tmp_path / "overhead.json", "--rates", "none")
    loopback = result["runs"]["loopback"]
    assert set(loopback) >= {"exact", "powersgd-r4", "topk-1%"} and loopback["tensors"] > 0
    for method in ("exact", "powersgd-r4", "topk-1%"):
        row = loopback[method]
        assert row["total_ms"] >= row["comm_ms"] >= 0 and row["compute_ms"] >= 0
        assert row["speedup"] == loopback["exact"]["total_ms"] / row["total_ms"]
    assert "| loopback | powersgd-r4 |" in stdout


def test_tied_output_memory_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("tied_output_memory.py", tmp_path / "memory.json")
    rows = result["results"]
    assert set(rows) == {"separate", "separate, chunked", "tied P=2", "tied P=4"}
    # weight + gradient per rank: the whole 2001 x 16 layer, then half / a quarter of the rows (ceil blocks)
    assert rows["separate"]["weight_and_grad_mb"] == 2 * 2001 * 16 * 4 / 2**20
    assert rows["separate, chunked"]["weight_and_grad_mb"] == rows["separate"]["weight_and_grad_mb"]
    assert rows["tied P=2"]["weight_and_grad_mb"] == 1001 * 16 * 4 / 2**20
    assert rows["tied P=4"]["weight_and_grad_mb"] == 501 * 16 * 4 / 2**20
    assert "| tied P=4 |" in stdout


def test_compression_benchmark_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("compression.py", tmp_path / "compression.json", "--variants", "topk-1%")
    rows = result["results"]
    assert set(rows) == {"exact", "topk-1%"}
    for row in rows.values():
        assert row["steps"] > 0 and row["bytes_per_step"] > 0 and 0 <= row["hr10"] <= 1
        assert abs(row["bytes_ratio"] - rows["exact"]["bytes_per_step"] / row["bytes_per_step"]) < 1e-9
    assert (tmp_path / "compression.png").is_file()  # quality vs bytes
    assert "| topk-1% |" in stdout


def test_compression_across_rates_says_where_each_variant_pays() -> None:
    """``--link-rate 1000,100,10000``: speedups over exact at each rate and where each variant pays
    (>= 5% faster), interpolated in log rate between the measured rates: hand-computed."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    compression = importlib.import_module("compression")
    exact = {"1000": 200.0, "100": 1000.0, "10000": 150.0}
    steps = {  # steady step ms at 1000, 100, 10000 Mbit/s set
        "exact": (200.0, 1000.0, 150.0),
        "powersgd-r4": (200.0 / 1.3, 1000.0 / 8.0, 150.0 / 0.85),  # 1.3x at 960, 0.85x at 10000: below ~R between them
        "topk-1%": (100.0, 125.0, 100.0),  # faster everywhere
        "sign-1bit": (250.0, 1010.0, 200.0),  # slower everywhere
        "async-s1": (200.0, 1000.0, 150.0 / 1.25),  # only on the fast link
        "odd": (250.0, 500.0, 100.0),  # fast, slow, fast
    }
    measured = {"1000": 1000.0, "100": 100.0}  # the probe's rates; 10000 falls back to the set rate
    by_rate = {
        k: {name: {"steady_step_ms": t[i], "losses": [1.0, 0.5 + (k == "100") * 1e-3]} for name, t in steps.items()}
        for i, k in enumerate(exact)
    }
    table, pays = compression._across_rates(by_rate, measured, list(steps))
    # powersgd: speedup 1.3 at 1000, 0.85 at 10000: 1.05 is reached 0.25 / 0.45 of the way in log rate
    below = 10 ** (3 + 0.25 / 0.45)
    assert pays["powersgd-r4"] == f"below ~{below:.0f}" and 3580 < below < 3600
    # async: 1.0 at 100 and 1000, 1.25 at 10000: 1.05 is 0.05 / 0.25 of the way from 1000
    assert pays["async-s1"] == f"above ~{10 ** 3.2:.0f}"
    assert pays["topk-1%"] == "at every measured rate" and pays["sign-1bit"] == "at no measured rate"
    assert pays["odd"] == "at 100, 10000"
    assert by_rate["1000"]["exact"]["speedup"] == 1.0 and by_rate["100"]["topk-1%"]["speedup"] == 8.0
    # the first rate's run against itself, then the timing runs' largest loss difference
    assert by_rate["1000"]["exact"]["max_loss_diff"] == 0.0 and abs(by_rate["100"]["exact"]["max_loss_diff"] - 1e-3) < 1e-12
    assert "| powersgd-r4 |" in "\n".join(table) and table[-1].endswith("| at 100, 10000 |")
    with pytest.raises(ValueError, match="at least 2 rates"):
        compression.where_it_pays({1000.0: 1.2})


def test_hybrid_vs_single_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("hybrid_vs_single.py", tmp_path / "hvs.json", "--layouts", "dp,pp,hybrid")
    rows = result["results"]
    assert set(rows) == {"P2/dp", "P2/pp", "P2/hybrid"}
    assert all(r["samples_per_s"] > 0 and 0 <= r["compute_fraction"] <= 1 for r in rows.values())
    # the default: Beauty-like lengths on jagged batches (fewer real tokens than 8 per sample)
    assert result["lengths"] == "long_tail" and all(0 < r["tokens_per_s"] < 8 * r["samples_per_s"] for r in rows.values())
    s = result["summary"]["P2"]
    assert s["best_hybrid"] == "hybrid" and s["best_single"] in {"dp", "pp"}
    assert abs(s["throughput_ratio"] - rows["P2/hybrid"]["samples_per_s"] / rows[f"P2/{s['best_single']}"]["samples_per_s"]) < 1e-9
    assert "best hybrid hybrid / best single-mode" in stdout
    assert rows["P2/hybrid"]["bytes_per_step"]["embedding"] > 0 and rows["P2/dp"]["bytes_per_step"]["embedding"] == 0
    for row in rows.values():
        assert row["bytes_per_step"]["total"] == sum(row["bytes_per_step"][a] for a in ("dp", "tp", "pp", "embedding"))


def test_dense_side_runs_without_torchrec(tmp_path: Path) -> None:
    """What a GPU box without torchrec/fbgemm can run: the package imports, SASRec(tables='torch')
    trains under HybridStrategy, the embedding options say what is missing."""
    blocker = tmp_path / "blocker" / "torchrec"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("No module named torchrec (blocked by the test)")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")]))}
    result, stdout = _smoke("hybrid_vs_single.py", tmp_path / "hvs.json", "--layouts", "dp,tp,hybrid", env=env)
    assert "torchrec cannot be imported" in stdout
    assert result["tables"] == "torch" and set(result["results"]) == {"P2/dp", "P2/tp"}  # 'hybrid' needs sharded tables
    assert all(r["samples_per_s"] > 0 and r["bytes_per_step"]["embedding"] == 0 for r in result["results"].values())
    check = subprocess.run(
        [sys.executable, "-c", "from lightning_hybrid import HybridStrategy; HybridStrategy(embedding_sharding={'t': 'row_wise'})"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert check.returncode != 0 and "needs torchrec, which cannot be imported here" in check.stderr, check.stderr[-2000:]


def test_sasrec_quality_smoke_runs_the_amazon_recipe_as_shipped(tmp_path: Path) -> None:
    """`recipes/sasrec_format.yaml` as shipped (tied output, full softmax shard by shard, seen items
    excluded): fit, then test on best.ckpt, through the CLI, on the smoke's tiny lines (the
    plumbing only: two epochs on 60 users say nothing about quality)."""
    result, stdout = _smoke("sasrec_quality.py", tmp_path / "quality.json", "--workdir", str(tmp_path / "runs"))
    (row,) = result["rows"]
    assert result["recipe"] == "recipes/sasrec_format.yaml" and row["epochs"] == 2 and row["best_epoch"] in (0, 1)
    assert 0 < row["test_ndcg@10"] <= row["test_hr@10"] <= row["test_hr@20"] <= 1, row
    assert row["test_ndcg@10"] <= row["test_ndcg@20"], row
    assert "recipe" in stdout


def test_sasrec_quality_tests_the_checkpoint_a_recipe_copy_names(tmp_path: Path) -> None:
    """A copy of the recipe under another name (e.g. validated every epoch) keeps the run
    directory and best.ckpt it names; the benchmark used to look under runs/<file stem>/."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sasrec_quality", ROOT / "benchmarks" / "sasrec_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy = tmp_path / "every_epoch.yaml"
    copy.write_text((ROOT / "recipes" / "sasrec_format.yaml").read_text().replace("check_val_every_n_epoch: 5", "check_val_every_n_epoch: 1"))
    run_dir, best = module._recipe_paths(copy, tmp_path / "w")
    assert (run_dir, best) == (tmp_path / "w" / "runs/sasrec_format", tmp_path / "w" / "runs/sasrec_format/checkpoints/best.ckpt")
    no_checkpoint = tmp_path / "bare.yaml"
    no_checkpoint.write_text("trainer:\n  max_epochs: 1\n")
    with pytest.raises(ValueError, match="no ModelCheckpoint callback with dirpath and filename"):
        module._recipe_paths(no_checkpoint, tmp_path)


def test_table_groups_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("table_groups.py", tmp_path / "groups.json")
    row = result["results"]["loopback"]["tiny"]
    # the same batches and steps give the same table whether it is sharded over all 4 ranks or per pair
    tables = row["tables"]
    assert len(tables["world"]) == 64
    assert_close(torch.tensor(tables["node"]), torch.tensor(tables["world"]), rtol=1e-5, atol=1e-6)
    assert row["node_speedup"] == row["world"]["step_ms"] / row["node"]["step_ms"]
    assert "| loopback | tiny |" in stdout


def test_optimizer_step_smoke(tmp_path: Path) -> None:
    result, stdout = _smoke("optimizer_step.py", tmp_path / "optimizer_step.json")
    assert result["size"] == "smoke" and set(result["step_ms"]) == {"loop", "foreach", "fused", "adagrad_loop", "adagrad_fused"}
    assert all(v > 0 for v in result["step_ms"].values())
    assert abs(result["speedup_vs_loop"]["fused"] - result["step_ms"]["loop"] / result["step_ms"]["fused"]) < 1e-9
    assert abs(result["speedup_vs_loop"]["adagrad_fused"] - result["step_ms"]["adagrad_loop"] / result["step_ms"]["adagrad_fused"]) < 1e-9
    assert "the loop)" in stdout


def test_hybrid_vs_single_runs_a_failed_layout_once_more_and_keeps_going_after_a_second_failure() -> None:
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    hvs = importlib.import_module("hybrid_vs_single")
    rank = {
        "samples_per_s": 100.0, "tokens_per_s": 600.0, "step_ms": 640.0, "compute_fraction": 0.5, "busy_fraction": 0.7, "mfu": None,
        "time_ms": {"dense_compute": 320.0}, "bytes_per_step": dict.fromkeys(hvs.AXES, 0.0), "layout": {"dp": 2, "tp": 1, "pp": 1},
        "link_mb": {"eth0": 0.0, "lo": 0.0},
    }
    calls: list[str] = []

    def run(layout: dict, processes: int) -> list[dict]:
        name = next(n for n, v in hvs.LAYOUTS.items() if v is layout)
        calls.append(name)
        if name == "hybrid" or (name == "dp" and calls.count("dp") == 1):  # hybrid always fails, dp once
            raise RuntimeError(f"SimulatedCluster.run_workers: a rank failed: {name} attempt {calls.count(name)}")
        return [dict(rank), dict(rank)]

    hvs.FAILED.clear()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        results, lines, summary = hvs._measure_all(run, ["dp", "hybrid", "hybrid_ddp"], [2])
    assert calls == ["dp", "dp", "hybrid_ddp", "hybrid", "hybrid"]  # (the script's layout order)
    assert results["P2/dp"]["first_attempt_failed"].endswith("dp attempt 1")
    assert "first_attempt_failed" not in results["P2/hybrid_ddp"] and "P2/hybrid" not in results
    assert hvs.FAILED["P2/hybrid"].endswith("hybrid attempt 2")
    assert any("| hybrid | failed twice" in line for line in lines)
    assert summary["P2"]["best_single"] == "dp" and summary["P2"]["best_hybrid"] == "hybrid_ddp"
    hvs.FAILED.clear()
