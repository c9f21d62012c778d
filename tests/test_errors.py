"""Bad input fails fast with a clear message on every rank (never a hang until the PG timeout)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch

from lightning_hybrid import HybridStrategy
from lightning_hybrid.testing import run_distributed
from tests.helpers import TinyRec, loader, quiet_trainer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchrec import EmbeddingBagCollection


def test_unknown_sharding_type_is_refused_before_launch() -> None:
    with pytest.raises(ValueError, match=r"Unknown sharding type 'row_wize' for table 't_user'.*row_wise"):
        HybridStrategy(embedding_sharding={"t_user": "row_wize"})


def test_unknown_kernel_and_launcher_are_refused() -> None:
    with pytest.raises(ValueError, match="'fast'.*'fused' or 'dense'"):
        HybridStrategy(embedding_kernels={"t_user": "fast"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="launcher='fork'"):
        HybridStrategy(launcher="fork")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_parallel=0"):
        HybridStrategy(data_parallel=0)


class CustomEBC(EmbeddingBagCollection):
    """A subclass with its own forward: torchrec's sharder would silently drop the override."""

    def forward(self, features: Any) -> Any:
        return super().forward(features)


def _fit_and_capture(case: str) -> dict[str, Any]:
    """Run a 2-rank fit that must fail; report the error this rank saw and how long it took."""
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = TinyRec()
    strategy_kwargs: dict[str, Any] = {"failure_grace_s": 5.0}
    data = loader(8, n=32, ranks=2)
    if case == "plan":
        strategy_kwargs["data_parallel"] = 3
    elif case == "unknown_table":
        strategy_kwargs["embedding_sharding"] = {"t_nope": "row_wise"}
    elif case == "no_room":
        strategy_kwargs["embedding_memory_per_rank"] = 512
    elif case == "unshardable":
        tables = model.tables
        model.tables = CustomEBC(tables=tables.embedding_bag_configs())
    elif case == "tp_no_plan":
        strategy_kwargs["tensor_parallel"] = 2
    elif case == "tp_bad_pattern":
        strategy_kwargs["tensor_parallel"] = 2
        strategy_kwargs["tensor_parallel_plan"] = {"mlp.9": "colwise"}
    elif case == "tp_too_big":
        strategy_kwargs["tensor_parallel"] = 4
    elif case == "tp_mixed_batches":  # the sampler splits over all ranks, not over the dp axis
        strategy_kwargs.update(tensor_parallel=2, tensor_parallel_plan={"mlp.0": "colwise", "mlp.2": "rowwise"})
    elif case == "pp_no_spec":
        strategy_kwargs["pipeline_parallel"] = 2
    elif case == "pp_layers_balanced":
        strategy_kwargs.update(pipeline_parallel=2, pipeline_layers="mlp", pipeline_split="balanced", pipeline_rebalance_every=8)
    elif case == "bad_id":
        data = loader(8, n=32, ranks=2, bad_id_at=3)  # sample 3 is rank 1's second sample
    start = time.monotonic()
    try:
        quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=2, max_steps=2).fit(model, train_dataloaders=data)
    except BaseException as err:  # noqa: BLE001
        return {"type": type(err).__name__, "message": str(err), "seconds": time.monotonic() - start}
    return {"type": None, "message": "", "seconds": time.monotonic() - start}


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("plan", r"data_parallel=3.*world size 2"),
        ("unknown_table", r"names tables \['t_nope'\].*Known tables"),
        ("no_room", r"could not place the embedding tables on 2 ranks"),
        ("unshardable", r"cannot shard the embedding module 'tables' of type CustomEBC"),
        ("tp_no_plan", r"tensor_parallel=2\) needs a plan.*TinyRec.tensor_parallel_plan"),
        ("tp_bad_pattern", r"pattern 'mlp.9' matches no module of TinyRec"),
        ("tp_too_big", r"world size 2 is not divisible by tensor_parallel=4"),
        ("pp_no_spec", r"pipeline_parallel=2\) needs to know what to cut.*TinyRec.pipeline_spec\(\).*pipeline_layers="),
        ("pp_layers_balanced", r"pipeline_split='balanced', pipeline_rebalance_every\): TinyRec has no pipeline_spec\(\).*Drop these options"),
        ("tp_mixed_batches", r"ranks \[0, 1\] of one tensor/pipeline-parallel replica got different training batches"),
    ],
)
def test_setup_errors_reach_every_rank(case: str, pattern: str) -> None:
    ranks = run_distributed(_fit_and_capture, 2, case, init_process_group=False, timeout_s=90)
    for rank, result in enumerate(ranks):
        assert result["type"] == "ValueError", (rank, result)
        assert __import__("re").search(pattern, result["message"], flags=__import__("re").S), (rank, result["message"])
        assert result["seconds"] < 30


def test_out_of_range_id_fails_every_rank_quickly() -> None:
    ranks = run_distributed(_fit_and_capture, 2, "bad_id", init_process_group=False, timeout_s=120)
    bad = ranks[1]
    assert bad["type"] == "ValueError"
    assert "Feature 'item' has id 47, outside table 't_item' of 40 rows" in bad["message"]
    # the other rank was blocked in the embedding all-to-all; it ends with the root cause attached
    other = ranks[0]
    assert other["type"] is not None
    assert "rank 1 failed first with: ValueError: Feature 'item' has id 47" in other["message"]
    assert max(r["seconds"] for r in ranks) < 30


class NaNOnRank1(TinyRec):
    """The loss of rank 1 turns NaN at global step 2 (bad batch / exploding update)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == 2 and self.trainer.global_rank == 1:
            loss = loss * float("nan")
        return loss


class BugOnRank1(TinyRec):
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.trainer.global_step == 1 and self.trainer.global_rank == 1:
            raise KeyError("user bug in training_step: no column 'clicks'")
        return super().training_step(batch, batch_idx)


def _nonfinite(policy: str, precision: str = "32-true", dense_tables: bool = False) -> dict[str, Any]:
    """4 steps, NaN loss on rank 1 at step 2: what each rank saw, and which steps changed the weights."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision

    warnings.simplefilter("ignore")
    changed: list[bool] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
            self.before = [p.detach().clone() for p in module.mlp.parameters()]

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, module.mlp.parameters(), strict=True)))

    torch.manual_seed(0)
    model = BugOnRank1() if policy == "user_error" else NaNOnRank1()
    kwargs: dict[str, Any] = {} if policy == "user_error" else {"nonfinite_loss": policy}
    if dense_tables:
        kwargs["embedding_kernels"] = {t: "dense" for t in ("t_user", "t_item", "t_category")}
    strategy = HybridStrategy(failure_grace_s=5.0, embedding_sharding={"t_user": "row_wise", "t_item": "table_wise"}, **kwargs)
    start = time.monotonic()
    try:
        # (Lightning turns precision="16-mixed" into bf16 on CPU; the plugin itself runs fp16 with a GradScaler)
        amp: dict[str, Any] = {"plugins": [MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed" else {"precision": precision}
        trainer = quiet_trainer(strategy=strategy, devices=2, max_steps=4, callbacks=[Watch()], **amp)
        trainer.fit(model, train_dataloaders=loader(8, n=64, ranks=2))
    except BaseException as err:  # noqa: BLE001
        return {"type": type(err).__name__, "message": str(err), "seconds": time.monotonic() - start, "changed": changed}
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"type": None, "changed": changed, "finite": finite, "skipped": strategy.skipped_steps, "seconds": time.monotonic() - start}


def test_nonfinite_loss_stop_ends_every_rank_naming_the_rank_and_step() -> None:
    for result in run_distributed(_nonfinite, 2, "stop", init_process_group=False, timeout_s=120):
        assert result["type"] == "FloatingPointError", result
        assert "not finite" in result["message"] and "on rank(s) [1] at global step 2" in result["message"]
        assert result["changed"] == [True, True]  # stopped before the NaN reached any weight
        assert result["seconds"] < 30


def test_nonfinite_loss_skip_drops_the_step_on_every_rank() -> None:
    for result in run_distributed(_nonfinite, 2, "skip", init_process_group=False, timeout_s=120):
        assert result["type"] is None, result
        assert result["changed"] == [True, True, False, True]  # step 2 left the weights as they were
        assert result["finite"] and result["skipped"] == 1


def test_nonfinite_loss_skip_under_fp16_loss_scaling() -> None:
    """precision='16-mixed': the NaN step's backward runs and GradScaler skips it on every rank
    (without gradients it would raise 'No inf checks were recorded')."""
    for result in run_distributed(_nonfinite, 2, "skip", "16-mixed", True, init_process_group=False, timeout_s=120):
        assert result["type"] is None, result
        assert result["changed"] == [True, True, False, True]
        assert result["finite"] and result["skipped"] == 1


def test_fp16_loss_scaling_with_fused_tables_is_refused() -> None:
    """fbgemm would update them inside backward with the loss-scaled gradient."""
    for result in run_distributed(_nonfinite, 2, "skip", "16-mixed", False, init_process_group=False, timeout_s=120):
        assert result["type"] == "ValueError", result
        assert "precision='16-mixed' with fused embedding tables" in result["message"]
        assert result["changed"] == []  # refused before the first step


def test_nonfinite_loss_warn_carries_on() -> None:
    for result in run_distributed(_nonfinite, 2, "warn", init_process_group=False, timeout_s=120):
        assert result["type"] is None, result
        assert not result["finite"]  # the NaN reached the weights, as asked


def test_user_error_on_one_rank_ends_every_rank_with_that_error() -> None:
    ranks = run_distributed(_nonfinite, 2, "user_error", init_process_group=False, timeout_s=120)
    assert ranks[1]["type"] == "KeyError" and "user bug in training_step" in ranks[1]["message"]
    assert ranks[0]["type"] is not None and "rank 1 failed first with: KeyError" in ranks[0]["message"], ranks[0]
    assert max(r["seconds"] for r in ranks) < 30


def _column_wise_multi_shard_adam() -> dict[str, Any]:
    warnings.simplefilter("ignore")
    from torchrec.distributed.planner.types import ParameterConstraints

    from lightning_hybrid import HybridStrategy
    from tests.helpers import TinyRec, loader, quiet_trainer

    model = TinyRec(optimizer="adam", dim=64)
    # 64 columns in shards of 16: four shards on two ranks, two on each
    constraints = {"t_item": ParameterConstraints(sharding_types=["column_wise"], min_partition=16)}
    strategy = HybridStrategy(embedding_constraints=constraints, embedding_kernels={"t_item": "dense"})
    trainer = quiet_trainer(strategy=strategy, devices=2, max_steps=2)
    try:
        trainer.fit(model, train_dataloaders=loader(8, n=32, ranks=2))
    except ValueError as error:
        return {"error": str(error), "steps": len(model.losses)}
    return {"error": None, "steps": len(model.losses)}


def test_column_wise_table_with_several_shards_per_rank_and_adam_is_refused_at_setup() -> None:
    """Its optimizer state could not be checkpointed: refused before the first step, on every rank,
    instead of failing at the first save_checkpoint."""
    for result in run_distributed(_column_wise_multi_shard_adam, 2, init_process_group=False, timeout_s=120):
        assert result["steps"] == 0
        assert result["error"] is not None and "'t_item' is column_wise with several shards on one rank" in result["error"]
        assert "row_wise" in result["error"]  # the fix


_LOST_STORE_RANK = """
import os, sys, time
import torch.distributed as dist
from lightning_hybrid.failfast import FailFast
dist.init_process_group("gloo")
watcher = FailFast(rank=dist.get_rank(), namespace="lost-store", grace_s=2.0, poll_s=0.1)
watcher.start()
dist.barrier()
if dist.get_rank() == 0:
    os._exit(9)  # SIGKILL-like: no error published, and the store it hosts is gone
time.sleep(60)  # busy, or stuck in an NCCL collective: only the watcher can end it
sys.exit(0)
"""


def test_a_lost_store_ends_the_other_ranks() -> None:
    """Rank 0 hosts the store under env:// and dies without a word: rank 1 stops by itself
    within about grace_s, saying the store is gone, not at the 30-minute collective timeout."""
    import os
    import subprocess
    import sys
    import time

    from lightning_hybrid.testing import find_free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port()), "WORLD_SIZE": "2", "PYTHONWARNINGS": "ignore"}
    started = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOST_STORE_RANK], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        _out, err = procs[1].communicate(timeout=45)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[1].returncode == 1, err[-2000:]
    assert "the job's store has been unreachable" in err
    assert time.monotonic() - started < 40


_LATE_TEARDOWN_RANK = """
import sys, time
import torch.distributed as dist
from lightning_hybrid.failfast import FailFast
dist.init_process_group("gloo")
watcher = FailFast(rank=dist.get_rank(), namespace="late-teardown", grace_s=1.0, poll_s=0.1)
watcher.start()
dist.barrier()
if dist.get_rank() == 1:
    time.sleep(4.0)  # reaches teardown well after rank 0, which hosts the store under env://
watcher.stop()
sys.exit(0)
"""


def test_a_rank_that_tears_down_late_is_not_ended_by_rank_0_s_clean_exit() -> None:
    """Rank 0 finishes first; its exit must not take the store down under a rank still watching
    it (which would read the finished job as a lost store and exit 1, failing a good run)."""
    import os
    import subprocess
    import sys

    from lightning_hybrid.testing import find_free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port()), "WORLD_SIZE": "2", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _LATE_TEARDOWN_RANK], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        errs = [proc.communicate(timeout=60)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], errs[1][-2000:]
    assert "unreachable" not in errs[1]
