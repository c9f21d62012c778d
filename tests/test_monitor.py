"""Tier 2: the HybridMonitor callback (on by default with HybridStrategy).

Known timings: a module that sleeps a fixed time in its dense compute, in the embedding lookup and
in the optimizer step; the logged breakdown must recover them. Also: byte counts equal the
exchange's own count, the embedding all-to-all bytes equal a hand count (two table-wise tables)
and, through the strategy, an independent count of the collectives at torch's dispatcher; a wandb
offline run holds the expected keys and the plan, and the PNG charts are written (pipeline
timeline and stage/shard balance under pp=2).
"""

from __future__ import annotations

import functools
import glob
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_hybrid.testing import run_distributed

DENSE_S, EMBED_S, OPT_S = 0.06, 0.03, 0.02
PEAK = 1e9  # a made-up per-device peak FLOP/s, so MFU is logged on CPU


def _dispatcher_embedding_bytes() -> Any:
    """A TorchDispatchMode that adds up the bytes this rank sends in the c10d all-to-all,
    reduce-scatter and all-gather ops it sees (the embedding collectives; DDP and the loss checks
    use all-reduce, which it leaves out): the reference for the strategy's counter, taken at a
    different layer (torch's dispatcher, not torchrec's Python calls)."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    def nbytes(t: Any) -> int:
        return t.numel() * t.element_size()

    class Count(TorchDispatchMode):
        sent = 0
        ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = str(func)
            size, rank = dist.get_world_size(), dist.get_rank()
            if name.startswith("c10d.alltoall_base_"):
                inp, in_splits = args[1], args[4]
                kept = (in_splits[rank] * nbytes(inp) // max(inp.size(0), 1)) if in_splits else nbytes(inp) // size
                self.sent += nbytes(inp) - kept
            elif name.startswith("c10d._reduce_scatter_base_"):
                self.sent += nbytes(args[1]) * (size - 1) // size
            elif name.startswith("c10d.reduce_scatter_"):
                chunks = args[1][0]
                self.sent += sum(nbytes(t) for t in chunks) - nbytes(chunks[rank])
            elif name.startswith(("c10d._allgather_base_", "c10d.allgather_into_tensor")):
                self.sent += nbytes(args[1]) * (size - 1)
            elif name.startswith("c10d.allgather_"):
                self.sent += nbytes(args[1][0]) * (size - 1)
            if name.startswith("c10d.") and "allreduce" not in name and "barrier" not in name:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    return Count()


def _hand_counted_table_wise() -> dict[str, Any]:
    """Two table-wise tables over two ranks, one forward and backward, without Lightning."""
    warnings.simplefilter("ignore")
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed.types import ShardingEnv

    from lightning_hybrid.parallel import embedding as emb
    from lightning_hybrid.parallel.embedding_comm import count_embedding_bytes

    model = torch.nn.Module()
    model.ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0"]),
            EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=10, feature_names=["f1"]),
        ]
    )
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    infos = emb.table_infos({"ebc": model.ebc})
    spec = emb.EmbeddingShardingSpec(sharding_types={"t0": "table_wise", "t1": "table_wise"})
    constraints = emb.build_constraints(infos, spec, {"t0": "dense", "t1": "dense"})
    plan = emb.plan_sharding_on_rank0(model, env=env, device=torch.device("cpu"), constraints=constraints, local_world_size=2)
    emb.shard_embeddings_in_place(model, plan=plan, env=env, device=torch.device("cpu"))
    counter = count_embedding_bytes()
    kjt = KeyedJaggedTensor.from_lengths_sync(  # 3 samples per rank; f0 and f1 each have 2 + 1 + 3 ids
        keys=["f0", "f1"], values=torch.arange(12) % 10, lengths=torch.tensor([2, 1, 3, 2, 1, 3], dtype=torch.int32)
    )
    pooled = model.ebc(kjt)
    forward = counter.take_step()
    sum(v.sum() for v in pooled.to_dict().values()).backward()
    backward = counter.take_step()
    counter.close()
    import torchrec.distributed.comm_ops as comm_ops

    return {
        "forward": forward, "backward": backward, "owner": {t: s["ranks"][0] for t, s in emb.plan_summary(plan).items()},
        "restored": comm_ops.dist is dist,
    }


def test_embedding_bytes_match_a_hand_count() -> None:
    ranks = run_distributed(_hand_counted_table_wise, 2, timeout_s=120)
    dims = {"t0": 4, "t1": 8}
    for rank, result in enumerate(ranks):
        mine = next(t for t, owner in result["owner"].items() if owner == rank)
        other = next(t for t in dims if t != mine)
        # input all-to-all: the split sizes (lengths, ids, batch size: 2 ranks x 3 int64, half of it
        # leaves), then the other table's feature: 3 int32 lengths and 6 int64 ids
        kjt = 3 * 8 + 3 * 4 + 6 * 8
        # output all-to-all: the pooled rows of my table for the other rank's 3 samples (fp32)
        assert result["forward"] == kjt + 3 * dims[mine] * 4
        # backward: the gradient of my 3 samples' rows of the other rank's table goes back to it
        assert result["backward"] == 3 * dims[other] * 4
        assert result["restored"]  # closing the last counter puts torchrec's own dist back


def _fit_sleepy(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning.pytorch.loggers import WandbLogger

    from lightning_hybrid import HybridStrategy
    from tests.helpers import TinyRec, loader, quiet_trainer

    class SlowSGD(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            out = super().step(closure)
            time.sleep(OPT_S)
            return out

    class Sleepy(TinyRec):
        def on_train_start(self) -> None:  # the tables are sharded by now
            self.tables.register_forward_pre_hook(lambda *_: time.sleep(EMBED_S))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            time.sleep(DENSE_S)
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> Any:
            return SlowSGD(self.parameters(), lr=0.1)

    recorded: list[dict[str, float]] = []
    served: list[list[float]] = []
    embedding_bytes: list[tuple[int, int]] = []  # (strategy's count, dispatcher count) per step
    import lightning.pytorch as pl

    class Keep(pl.Callback):
        mode: Any = None

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step < 2:  # (the timing checks use the later steps)
                self.mode = _dispatcher_embedding_bytes()
                self.mode.__enter__()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            monitor = next(c for c in trainer.callbacks if type(c).__name__ == "HybridMonitor")
            recorded.append(dict(monitor.last))
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                assert any("alltoall" in op for op in self.mode.ops), self.mode.ops
                embedding_bytes.append((trainer.strategy.embedding_bytes_last_step, self.mode.sent))
                self.mode = None

    class Served(pl.Callback):  # (after the monitor: this step's counts)
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            last = next(c for c in trainer.callbacks if type(c).__name__ == "HybridMonitor").last
            served.append([last[f"embedding/lookups_served_rank{r}"] for r in range(2)] + [last["utilization/lookup_imbalance"]])

    from lightning_hybrid.callbacks import HybridMonitor

    logger = WandbLogger(save_dir=tmp, offline=True, project="lh-test") if os.environ["RANK"] == "0" else False
    trainer = quiet_trainer(
        strategy=HybridStrategy(embedding_sharding={"t_user": "row_wise", "t_item": "row_wise", "t_category": "table_wise"}),
        devices=2, max_steps=6, callbacks=[Keep(), HybridMonitor(peak_flops=PEAK), Served()], logger=logger, default_root_dir=tmp,
        log_every_n_steps=1,
    )
    trainer.fit(Sleepy(), train_dataloaders=loader(8, n=96, ranks=2))
    if logger:
        logger.experiment.finish()
    return {
        "steps": recorded[2:], "bytes": float(trainer.callback_metrics["comm/dp_bytes_per_step"]), "dp_bytes": trainer.strategy.comm_bytes_last_step,
        "embedding_bytes": embedding_bytes, "served": served,
        "category_rank": trainer.strategy.sharding_plan.plan["tables"]["t_category"].ranks[0],
    }


def test_breakdown_recovers_known_timings_and_wandb_gets_the_keys(tmp_path: Path) -> None:
    ranks = run_distributed(_fit_sleepy, 2, str(tmp_path), init_process_group=False, timeout_s=180)
    for result in ranks:
        for step in result["steps"]:
            # every phase holds its sleep (a phase's time never goes to another phase)
            assert step["time/embedding_s"] >= EMBED_S - 0.002
            assert step["time/optimizer_s"] >= OPT_S - 0.002
            assert step["time/dense_compute_s"] >= DENSE_S - 0.005
            assert step["time/step_s"] >= DENSE_S + EMBED_S + OPT_S
            # samples/s are the batch over the step time, times the two replicas
            assert step["throughput/samples_per_s"] == pytest.approx(2 * 8 / step["time/step_s"], rel=1e-6)
            assert step["utilization/compute_fraction"] == pytest.approx(step["time/dense_compute_s"] / step["time/step_s"], rel=1e-6)
        # and no more than its sleep plus the real lookup / step work and all-to-all waits: the median
        # over the steps, as one step on a loaded 2-core CI machine can be descheduled for tens of ms;
        # the dense sleep (60 ms) counted in either phase would still exceed these bounds
        assert statistics.median(s["time/embedding_s"] for s in result["steps"]) <= EMBED_S + 0.04
        assert statistics.median(s["time/optimizer_s"] for s in result["steps"]) <= OPT_S + 0.03
        mlp_floats = (5 + 8 * 3) * 16 + 16 + 16 + 1
        for step in result["steps"]:
            # 6 FLOPs per dense parameter and sample (the sharded tables are lookups), both replicas' samples
            # over the step time, against 2 devices x the given peak
            assert step["utilization/mfu"] == pytest.approx(6 * mlp_floats * 8 * 2 / step["time/step_s"] / (2 * PEAK), rel=1e-6)
        assert result["bytes"] == result["dp_bytes"] == 4.0 * mlp_floats  # the logged count is the exchange's own
        # row-wise and table-wise tables: torchrec's all-to-alls and reduce-scatters, forward and backward
        assert len(result["embedding_bytes"]) == 2
        for counted, reference in result["embedding_bytes"]:
            assert counted == reference > 0
    # lookups served per rank, against a count from the data: rank r trains samples r, r + 2, ...
    # in batches of 8; row-wise tables split their rows in two equal blocks, t_category is whole on one rank
    from tests.helpers import TinyClicks

    data = TinyClicks(96, 1)
    assert len(ranks[0]["served"]) == 6
    for step, (got0, got1, imbalance) in enumerate(ranks[0]["served"]):
        expected = [0.0, 0.0]
        for rank in range(2):
            for i in range(rank + 2 * 8 * step, rank + 2 * 8 * (step + 1), 2):
                users, items, categories = data.ids[i]
                for uid in users.tolist():
                    expected[uid // 12] += 1
                for iid in items.tolist():
                    expected[iid // 20] += 1
                expected[ranks[0]["category_rank"]] += len(categories)
        assert [got0, got1] == expected, step
        assert imbalance == pytest.approx(max(expected) / (sum(expected) / 2))
    assert ranks[1]["served"] == ranks[0]["served"]
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    data = Path(runs[0]).read_bytes()
    for key in ("throughput/samples_per_s", "time/embedding_s", "time/dense_compute_s", "utilization/compute_fraction",
                "comm/dp_bytes_per_step", "comm/embedding_bytes_per_step", "embedding/params_rank0", "lightning_hybrid", "embedding_sharding", "row_wise"):
        assert key.encode() in data, key
    assert (tmp_path / "charts" / "shard_balance.png").stat().st_size > 1000


def _fit_pipelined_charts(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec
    from tests.helpers import quiet_trainer

    data = SequenceDataModule(format="synthetic", max_len=8, batch_size=8, synthetic_users=32, synthetic_items=30, drop_last=True)
    trainer = quiet_trainer(strategy=HybridStrategy(pipeline_parallel=2, pipeline_microbatches=4), devices=2, max_epochs=1, limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(SASRec(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2), datamodule=data)
    charts = sorted(os.listdir(os.path.join(tmp, "charts"))) if os.environ["RANK"] == "0" else []  # rank 0 draws
    return {"charts": charts, "pp_bytes": float(trainer.callback_metrics["comm/pp_bytes_per_step"])}


def test_pipeline_charts_are_written(tmp_path: Path) -> None:
    ranks = run_distributed(_fit_pipelined_charts, 2, str(tmp_path), init_process_group=False, timeout_s=180)
    assert ranks[0]["charts"] == ["pipeline_timeline.png", "shard_balance.png"]
    # stage 0 sends each microbatch's activations [2, 8, 16] fp32 forward, stage 1 their gradients back
    for result in ranks:
        assert result["pp_bytes"] == 4 * (2 * 8 * 16 * 4)
    assert (tmp_path / "charts" / "pipeline_timeline.png").stat().st_size > 1000


def test_table_parameters_are_left_out_of_model_flops() -> None:
    from torch import nn

    from lightning_hybrid.callbacks.monitor import _table_parameter_names

    class Strategy:
        sharded_modules = {"sharded": None}

    model = nn.Module()
    model.item = nn.Embedding(10, 4)
    model.bag = nn.EmbeddingBag(10, 4)
    model.sharded = nn.Linear(2, 2)  # stands in for a sharded torchrec module
    model.mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert _table_parameter_names(Strategy(), model) == {"item.weight", "bag.weight", "sharded.weight", "sharded.bias"}


TP_DELAY_S = 0.05


def _fit_tp_with_a_late_rank() -> list[dict[str, float]]:
    """tp=2: rank 1 reaches block 0's output projection (a row-wise layer: its output is
    all-reduced) TP_DELAY_S late at every step, so rank 0 waits that long in the all-reduce."""
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.data.sequences import SequenceDataModule
    from lightning_hybrid.models.sasrec import SASRec
    from tests.helpers import quiet_trainer

    recorded: list[dict[str, float]] = []

    class Late(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            if trainer.global_rank == 1:
                module.blocks[0].out.register_forward_pre_hook(lambda *_: time.sleep(TP_DELAY_S))

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            monitor = next(c for c in trainer.callbacks if type(c).__name__ == "HybridMonitor")
            recorded.append(dict(monitor.last))

    torch.manual_seed(0)
    model = SASRec(num_items=30, max_len=8, d_model=16, num_blocks=2, num_heads=2, dropout=0.0, table_optimizer="adagrad")
    data = SequenceDataModule(format="synthetic", max_len=8, batch_size=8, synthetic_users=48, synthetic_items=30, drop_last=True)
    trainer = quiet_trainer(strategy=HybridStrategy(tensor_parallel=2), devices=2, max_steps=5, limit_val_batches=0, callbacks=[Late()])
    trainer.fit(model, datamodule=data)
    return recorded[1:]


DDP_DELAY_S = 0.08


def _fit_dense_mlp(strategy_kwargs: dict[str, Any], steps: int, *, backward_delay_s: float = 0.0, dense_s: float = 0.0,
                   averaging_delay_s: float = 0.0) -> list[dict[str, float]]:
    """dp=2 over a dense MLP (no tables), SGD; the monitor's record of every step after the first.
    Rank 1's backward starts ``backward_delay_s`` late; every step sleeps ``dense_s`` in its
    forward (compute of its own); rank 1 sleeps ``averaging_delay_s`` in the optimizer step of
    every second step (local SGD's averaging steps with period 2)."""
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from tests.helpers import quiet_trainer

    recorded: list[dict[str, float]] = []

    class Dense(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            time.sleep(dense_s)
            out = self.net(batch[0])
            if self.trainer.global_rank == 1 and backward_delay_s:  # (in backward: the per-step loss check must not absorb it)
                out.register_hook(lambda grad: (time.sleep(backward_delay_s), grad)[1])
            return out.pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            if self.trainer.global_rank == 1 and self.trainer.global_step % 2 == 1:
                time.sleep(averaging_delay_s)

        def on_train_batch_end(self, *args: Any) -> None:
            monitor = next(c for c in self.trainer.callbacks if type(c).__name__ == "HybridMonitor")
            recorded.append({**monitor.last, "step": float(self.trainer.global_step)})

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16))
    trainer = quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=2, max_steps=steps, use_distributed_sampler=True)
    trainer.fit(Dense(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    return recorded[1:]


def _fit_ddp_with_a_late_rank() -> list[dict[str, float]]:
    """dp=2 under DDP: rank 1's backward starts DDP_DELAY_S late, so rank 0's dense backward ends
    that much earlier and its reducer waits for rank 1's buckets."""
    return _fit_dense_mlp({}, 5, backward_delay_s=DDP_DELAY_S)


LOCAL_SGD_DELAY_S, LOCAL_SGD_DENSE_S = 0.08, 0.03


def _fit_local_sgd_with_a_late_rank() -> list[dict[str, float]]:
    """Local SGD, period 2: rank 1 is late inside the optimizer step of the averaging steps, so
    rank 0 waits in the average, which runs inside its optimizer step."""
    return _fit_dense_mlp({"data_parallel_mode": "local_sgd", "local_sgd_period": 2}, 6, dense_s=LOCAL_SGD_DENSE_S,
                          averaging_delay_s=LOCAL_SGD_DELAY_S)


def _fit_with_a_late_rank() -> dict[str, list[dict[str, float]]]:
    """The fits in one pair of processes (a launch costs more than any of them)."""
    warnings.simplefilter("ignore")
    return {"tp": _fit_tp_with_a_late_rank(), "ddp": _fit_ddp_with_a_late_rank(), "local_sgd": _fit_local_sgd_with_a_late_rank()}


@functools.lru_cache(maxsize=1)
def _late_rank_runs() -> tuple[dict[str, list[dict[str, float]]], ...]:
    return tuple(run_distributed(_fit_with_a_late_rank, 2, init_process_group=False, timeout_s=240))


def test_ddp_waits_for_a_late_rank_are_timed_as_the_dp_exchange() -> None:
    """DDP's exchange overlaps backward, so it was booked as compute; what outlasts the dense
    backward (here: waiting for the late rank's buckets) is the dp exchange's."""
    early, late = (rank["ddp"] for rank in _late_rank_runs())
    assert statistics.median(s["time/dp_exchange_s"] for s in early) >= DDP_DELAY_S - 0.01
    for step in early:
        assert step["time/dp_exchange_s"] <= DDP_DELAY_S + 0.1  # (+ the ordinary waits of a 2-core box)
        parts = ("time/embedding_s", "time/dp_exchange_s", "time/pipeline_idle_s", "time/optimizer_s", "time/tp_wait_s")
        assert step["time/dense_compute_s"] == pytest.approx(step["time/step_s"] - sum(step.get(k, 0.0) for k in parts), abs=1e-9)
    assert statistics.median(s["time/dp_exchange_s"] for s in late) < DDP_DELAY_S / 2
    for step in late:
        assert step["time/dense_compute_s"] >= DDP_DELAY_S  # its sleep is its own time


def test_tensor_parallel_waits_are_timed_apart_from_compute() -> None:
    early, late = (rank["tp"] for rank in _late_rank_runs())
    for step in early:  # rank 0 waits for rank 1 in the all-reduce, and that is not compute
        assert TP_DELAY_S - 0.005 <= step["time/tp_wait_s"] <= TP_DELAY_S + 0.1  # (+ the ordinary waits of a 2-core box)
        parts = ("time/embedding_s", "time/dp_exchange_s", "time/pipeline_idle_s", "time/optimizer_s", "time/tp_wait_s")
        assert step["time/dense_compute_s"] == pytest.approx(step["time/step_s"] - sum(step[k] for k in parts), abs=1e-9)
    # the late rank itself hardly waits: compared over the steps' medians, since on a loaded 2-core
    # box one step of the late rank can wait too (its partner descheduled), which says nothing of the timer
    assert len(early) == len(late)
    assert statistics.median(b["time/tp_wait_s"] for b in late) < statistics.median(a["time/tp_wait_s"] for a in early) - TP_DELAY_S / 2
    for b in late:
        assert b["time/dense_compute_s"] >= TP_DELAY_S  # its sleep is its own (dense) time


def test_local_sgd_waits_are_the_dp_exchange_not_the_optimizer() -> None:
    """Local SGD averages inside the optimizer step: rank 0's wait there for the late rank is dp
    exchange time, not optimizer time, and that step's dense compute keeps its own time (it read 0
    when the wait was booked in both)."""
    early, late = (rank["local_sgd"] for rank in _late_rank_runs())
    averaging = [s for s in early if int(s["step"]) % 2 == 0]  # (global_step after the step)
    assert len(averaging) >= 2
    for step in averaging:
        assert LOCAL_SGD_DELAY_S - 0.01 <= step["time/dp_exchange_s"] <= LOCAL_SGD_DELAY_S + 0.1
        assert step["time/optimizer_s"] < LOCAL_SGD_DELAY_S / 2
        assert step["time/dense_compute_s"] >= LOCAL_SGD_DENSE_S - 0.005
    for step in early:
        if int(step["step"]) % 2 == 1:
            assert step["time/dp_exchange_s"] == 0.0  # no average on this step
    for step in late:  # its sleep is in its own optimizer step
        if int(step["step"]) % 2 == 0:
            assert step["time/optimizer_s"] >= LOCAL_SGD_DELAY_S - 0.005
