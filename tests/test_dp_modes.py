"""Tier 2: compressed gradient exchange and sync/async data-parallel modes through HybridStrategy.

2 gloo processes, the TinyRec click model (row-wise sharded tables, SGD):
- local SGD with period 1 equals synchronous training (weights averaged after every SGD step);
- every compressor trains through the strategy (DDP hooks) and sends the bytes it says it does;
- the async mode (staleness 1) converges on the small problem and keeps the replicas identical.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch
from torch.testing import assert_close

from lightning_hybrid.testing import run_distributed

SHARDED = {"t_user": "row_wise", "t_item": "row_wise", "t_category": "row_wise"}


def _fit(strategy_kwargs: dict[str, Any], steps: int, lr: float = 0.1) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl

    from lightning_hybrid import HybridStrategy
    from lightning_hybrid.checkpoint import full_state_dict
    from tests.helpers import TinyRec, loader, quiet_trainer

    bytes_per_step: list[float] = []

    class Bytes(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            bytes_per_step.append(float(trainer.strategy.comm_bytes_last_step))

    torch.manual_seed(0)
    model = TinyRec(lr=lr, dim=16)
    strategy = HybridStrategy(embedding_sharding=SHARDED, **strategy_kwargs)
    trainer = quiet_trainer(strategy=strategy, devices=2, max_steps=steps, callbacks=[Bytes()])
    trainer.fit(model, train_dataloaders=loader(8, n=8 * 2 * steps, ranks=2))
    mlp = {k: v.detach().clone() for k, v in model.mlp.state_dict().items()}
    return {"losses": model.losses, "mlp": mlp, "state": full_state_dict(model), "bytes": bytes_per_step}


def test_local_sgd_with_period_1_equals_synchronous_training() -> None:
    sync = run_distributed(_fit, 2, {}, 4, init_process_group=False, timeout_s=120)
    local = run_distributed(_fit, 2, {"data_parallel_mode": "local_sgd", "local_sgd_period": 1}, 4, init_process_group=False, timeout_s=120)
    for a, b in zip(sync, local, strict=True):
        assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-5, atol=1e-6)
    for key, value in sync[0]["state"].items():
        assert_close(local[0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def _fit_many(configs: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    return [_fit(c, steps) for c in configs]


def test_compressed_exchange_through_the_strategy() -> None:
    from lightning_hybrid.comm import GradientCompression

    configs = [
        {},
        {"gradient_compression": GradientCompression(method="fp16")},
        {"gradient_compression": GradientCompression(method="powersgd", rank=1, start_iter=0, min_numel=64)},
        {"gradient_compression": GradientCompression(method="topk", density=0.05, start_iter=0, min_numel=64)},
        {"gradient_compression": GradientCompression(method="sign", start_iter=0, min_numel=64)},
    ]
    results = run_distributed(_fit_many, 2, configs, 4, init_process_group=False, timeout_s=240)
    none, fp16, powersgd, topk, sign = results[0]
    mlp_floats = (5 + 16 * 3) * 16 + 16 + 16 + 1  # the dense part DDP exchanges
    assert none["bytes"] == [4.0 * mlp_floats] * 4  # ring all-reduce over 2 ranks: 4 bytes per float
    assert fp16["bytes"] == [2.0 * mlp_floats] * 4
    for compressed in (powersgd, topk, sign):
        assert all(0 < b < 0.5 * none["bytes"][0] for b in compressed["bytes"])
    # replicas stay identical: every rank decodes the same average
    for config_index in range(len(configs)):
        for key, value in results[0][config_index]["mlp"].items():
            assert_close(results[1][config_index]["mlp"][key], value, msg=lambda m, k=key, c=config_index: f"{configs[c]} {k}: {m}")
    # fp16 on the wire: the same training within fp16 rounding
    assert_close(torch.tensor(fp16["losses"]), torch.tensor(none["losses"]), rtol=1e-2, atol=1e-3)


def _fit_regression(strategy_kwargs: dict[str, Any], steps: int) -> dict[str, Any]:
    """A learnable problem: y = X w* + noise, a 2-layer MLP, SGD; each rank sees its own samples."""
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_hybrid import HybridStrategy
    from tests.helpers import quiet_trainer

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(16 * 2 * steps, 16, generator=g)
    y = x @ torch.randn(16, generator=g) + 0.01 * torch.randn(len(x), generator=g)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=2, rank=int(os.environ["RANK"]), shuffle=False)
    model = Regression()
    trainer = quiet_trainer(strategy=HybridStrategy(**strategy_kwargs), devices=2, max_steps=steps)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=16, sampler=sampler))
    return {"losses": model.losses, "weights": [p.detach().clone() for p in model.parameters()]}


def test_async_mode_converges_and_keeps_replicas_identical() -> None:
    steps = 60
    sync = run_distributed(_fit_regression, 2, {}, steps, init_process_group=False, timeout_s=180)
    stale = run_distributed(_fit_regression, 2, {"data_parallel_mode": "async", "async_staleness": 1}, steps, init_process_group=False, timeout_s=180)
    for s_rank, a_rank in zip(sync, stale, strict=True):
        first = sum(a_rank["losses"][:5]) / 5
        last_async, last_sync = sum(a_rank["losses"][-10:]) / 10, sum(s_rank["losses"][-10:]) / 10
        assert last_async < 0.2 * first, (first, last_async)  # converges
        assert last_async < 2.0 * last_sync + 1e-3, (last_async, last_sync)  # close to synchronous training
    for a, b in zip(stale[0]["weights"], stale[1]["weights"], strict=True):
        assert_close(a, b)  # every replica applied the same stale averages


def _delayed_sgd_reference(steps: int, staleness: int, lr: float = 0.05) -> list[torch.Tensor]:
    """One process, the global batch (both ranks' shards), SGD that applies at step t the gradient
    computed at step t - staleness (nothing before): what async mode promises."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16 * 2 * steps, 16, generator=g)
    y = x @ torch.randn(16, generator=g) + 0.01 * torch.randn(len(x), generator=g)
    pending: list[list[torch.Tensor]] = []
    for t in range(steps):
        # DistributedSampler(shuffle=False, 2 replicas): step t's global batch is rows 32t .. 32t+31
        xb, yb = x[32 * t : 32 * (t + 1)], y[32 * t : 32 * (t + 1)]
        net.zero_grad()
        torch.nn.functional.mse_loss(net(xb).squeeze(-1), yb).backward()
        pending.append([p.grad.detach().clone() for p in net.parameters()])
        if len(pending) > staleness:
            old = pending.pop(0)
            with torch.no_grad():
                for p, grad in zip(net.parameters(), old, strict=True):
                    p -= lr * grad
    return [p.detach().clone() for p in net.parameters()]


def test_async_mode_applies_the_gradient_of_s_steps_earlier() -> None:
    """Staleness 2: the weights equal a one-process SGD run that applies each global-batch
    gradient two steps late, and differ from synchronous training (so the test can fail)."""
    steps, staleness = 6, 2
    stale = run_distributed(_fit_regression, 2, {"data_parallel_mode": "async", "async_staleness": staleness}, steps, init_process_group=False, timeout_s=180)
    sync = run_distributed(_fit_regression, 2, {}, steps, init_process_group=False, timeout_s=180)
    reference = _delayed_sgd_reference(steps, staleness)
    for got, want in zip(stale[0]["weights"], reference, strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(sync[0]["weights"], reference, strict=True)) > 1e-3


def _local_sgd_reference(steps: int, period: int, overlap: bool, lr: float = 0.05) -> list[list[torch.Tensor]]:
    """One process, both replicas: each steps SGD on its own shard of the batch (DistributedSampler,
    shuffle=False: rank r gets rows r, r + 2, ...); every ``period`` steps the weights are
    averaged, or with ``overlap`` the weights sent then are averaged and applied at the next
    averaging step (and at the end), each replica keeping its progress since:
    ``x_r <- mean(sent) + x_r - sent_r``. Each replica's weights at the end."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16 * 2 * steps, 16, generator=g)
    y = x @ torch.randn(16, generator=g) + 0.01 * torch.randn(len(x), generator=g)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)))
    replicas = [list(net.parameters()) for net in nets]
    sent: list[list[torch.Tensor]] | None = None

    def apply_sent() -> None:
        assert sent is not None
        with torch.no_grad():
            for r, params in enumerate(replicas):
                for i, p in enumerate(params):
                    p += (sent[0][i] + sent[1][i]) / 2 - sent[r][i]

    for t in range(steps):
        for r, net in enumerate(nets):
            xb, yb = x[32 * t : 32 * (t + 1)][r::2], y[32 * t : 32 * (t + 1)][r::2]
            net.zero_grad()
            torch.nn.functional.mse_loss(net(xb).squeeze(-1), yb).backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= lr * p.grad
        if (t + 1) % period:
            continue
        if not overlap:
            with torch.no_grad():
                for a, b in zip(*replicas, strict=True):
                    a.copy_((a + b) / 2)
                    b.copy_(a)
            continue
        if sent is not None:
            apply_sent()
        sent = [[p.detach().clone() for p in params] for params in replicas]
    if overlap and sent is not None:
        apply_sent()  # the strategy waits for the last average at the end of training
    return [[p.detach().clone() for p in params] for params in replicas]


def test_overlapped_local_sgd_applies_each_average_one_period_late() -> None:
    """``local_sgd_overlap=True``: every rank's weights equal its replica in a one-process run of
    the rule (the average of the weights sent at one averaging step, applied at the next, each
    replica's progress since kept); plain local SGD is the other reference, so the test tells the
    two apart."""
    steps, period = 7, 2  # averages sent at steps 2, 4, 6; the last one applied at the end
    overlapped = run_distributed(
        _fit_regression, 2, {"data_parallel_mode": "local_sgd", "local_sgd_period": period, "local_sgd_overlap": True}, steps,
        init_process_group=False, timeout_s=180,
    )
    plain = run_distributed(
        _fit_regression, 2, {"data_parallel_mode": "local_sgd", "local_sgd_period": period}, steps, init_process_group=False, timeout_s=180
    )
    want_overlap = _local_sgd_reference(steps, period, overlap=True)
    want_plain = _local_sgd_reference(steps, period, overlap=False)
    for rank in range(2):
        for got, want in zip(overlapped[rank]["weights"], want_overlap[rank], strict=True):
            assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(plain[rank]["weights"], want_plain[rank], strict=True):
            assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(want_overlap[0], want_plain[0], strict=True)) > 1e-4


def _async_group() -> dict[str, Any]:
    import torch.distributed as dist

    from lightning_hybrid.comm.exchange import DenseExchange
    from lightning_hybrid.mesh import build_device_mesh
    from lightning_hybrid.plan import ParallelPlan

    mesh = build_device_mesh(ParallelPlan(data_parallel=2, tensor_parallel=2), "cpu")
    param = torch.nn.Parameter(torch.ones(3))
    exchange = DenseExchange.build(mesh=mesh, compression=None, mode="async", local_world_size=4, explicit_params=[param])
    group = exchange.stale.group
    return {
        "ranks": dist.get_process_group_ranks(group),
        "dp_ranks": dist.get_process_group_ranks(mesh["dp"].get_group()),
        "separate": group is not mesh["dp"].get_group() and group is not dist.group.WORLD,
    }


def test_async_all_reduces_run_on_a_group_of_their_own() -> None:
    """In flight for s steps, they must not hold up the other collectives (NCCL runs a
    communicator's work in order): the same ranks as the dp axis, another group."""
    for result in run_distributed(_async_group, 4, timeout_s=60):
        assert result["separate"] and result["ranks"] == result["dp_ranks"]


def _overlapped(bucket_mb: float) -> dict[str, Any]:
    import torch.distributed as dist

    from lightning_hybrid.comm.compress import NoCompression
    from lightning_hybrid.comm.exchange import DenseExchange
    from lightning_hybrid.comm.overlap import OverlappedExchange
    from lightning_hybrid.mesh import build_device_mesh
    from lightning_hybrid.plan import ParallelPlan

    rank = dist.get_rank()

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 30), torch.nn.Linear(30, 1), torch.nn.Linear(2, 2))

    def backward(net: torch.nn.Module, micro: int) -> None:
        gen = torch.Generator().manual_seed(10 * rank + micro)
        x = torch.randn(8, 6, generator=gen)
        net[3](net[2](net[1](net[0](x)))).pow(2).mean().backward()  # (net[4] unused: no gradient)

    # the reference: two accumulated micro-batches, then the after-backward exact average
    ref = model()
    for micro in range(2):
        backward(ref, micro)
    NoCompression(None, dist.group.WORLD).reduce([p.grad for p in ref.parameters()])
    # overlapped: the first micro-batch under no_sync (hooks disarmed), the second armed; twice
    # (the second time with the buckets rebuilt in the order the gradients came)
    net, allowed = model(), [False]
    overlap = OverlappedExchange(list(net.parameters()), dist.group.WORLD, compressor=NoCompression(None, dist.group.WORLD),
                                 armed=lambda: allowed[0], bucket_mb=bucket_mb)
    early, started, grads = [], [], []
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        allowed[0] = False
        backward(net, 0)
        early.append(len(overlap._in_flight))  # nothing may start while accumulating
        allowed[0] = True
        backward(net, 1)
        started.append(len(overlap._in_flight))
        overlap.finish()
        grads.append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
    mesh = build_device_mesh(ParallelPlan(data_parallel=2), "cpu")
    chosen = DenseExchange.build(mesh=mesh, compression=None, mode="sync", local_world_size=2, explicit_params=list(net.parameters()))
    return {
        "ref": [None if p.grad is None else p.grad.clone() for p in ref.parameters()], "got": grads,
        "early": early, "started_in_backward": started, "buckets": len(overlap.buckets),
        "bytes": overlap.counter.total, "uses_overlap": chosen.overlap is not None,
        "last_bucket": [n for n, p in net.named_parameters() if any(p is q for q in overlap.buckets[-1])],
    }


def _overlap_runs() -> dict[str, Any]:
    """The exact runs (one bucket per few parameters / everything in one) and the compressed one,
    in one pair of processes (a launch costs more than all three)."""
    return {"exact": {bucket_mb: _overlapped(bucket_mb) for bucket_mb in (1e-4, 25.0)}, "compressed": _overlapped_compressed()}


@functools.lru_cache(maxsize=1)
def _overlap_results() -> tuple[dict[str, Any], ...]:
    return tuple(run_distributed(_overlap_runs, 2, timeout_s=90))


def test_overlapped_exact_exchange_equals_the_after_backward_average() -> None:
    """Buckets started from gradient hooks during backward (tp layouts' explicit exchange): the
    same averages as `NoCompression` after backward, with accumulation and an unused parameter."""
    for bucket_mb in (1e-4, 25.0):  # one bucket per few parameters / everything in one
        for result in (rank["exact"][bucket_mb] for rank in _overlap_results()):
            for step in result["got"]:
                for got, want in zip(step, result["ref"], strict=True):
                    assert (got is None) == (want is None)
                    if got is not None:
                        torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert result["early"] == [0, 0] and result["uses_overlap"]
            if bucket_mb < 1:
                # first step: the unused layer (last registered, so first bucket) holds every bucket
                # back to finish(); rebuilt in arrival order, the used layers' buckets start in backward
                assert result["buckets"] > 3 and result["started_in_backward"][0] == 0
                assert result["started_in_backward"][1] >= result["buckets"] - 2
                assert result["last_bucket"] == ["4.weight", "4.bias"]
            n = sum(p.numel() for p in (torch.nn.Linear(6, 40), torch.nn.Linear(40, 30), torch.nn.Linear(30, 1)) for p in p.parameters())
            assert result["bytes"] == 2 * 2 * (2 - 1) / 2 * n * 4


def _overlapped_compressed() -> dict[str, Any]:
    import threading

    import torch.distributed as dist

    from lightning_hybrid.comm.compress import GradientCompression, build_compressor
    from lightning_hybrid.comm.exchange import DenseExchange
    from lightning_hybrid.comm.overlap import WORKER_THREAD_PREFIX, OverlappedExchange
    from lightning_hybrid.mesh import build_device_mesh
    from lightning_hybrid.plan import ParallelPlan

    rank, world = dist.get_rank(), dist.group.WORLD

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 30), torch.nn.Linear(30, 1))

    def backward(net: torch.nn.Module, step: int) -> None:
        gen = torch.Generator().manual_seed(10 * rank + step)
        net(torch.randn(8, 6, generator=gen)).pow(2).mean().backward()

    mesh = build_device_mesh(ParallelPlan(data_parallel=2), "cpu")
    out: dict[str, Any] = {}
    for method in ("fp16", "powersgd", "topk", "sign"):
        config = GradientCompression(method=method, rank=2, density=0.1, start_iter=1, min_numel=64, error_feedback=True)
        ref, net = model(), model()
        names = {id(p): n for n, p in net.named_parameters()}
        ref_compressor, compressor = build_compressor(config, world), build_compressor(config, world)
        threads: list[str] = []

        def recording(reduce: Any, _threads: list[str] = threads) -> Any:
            def recorded(*args: Any, **kwargs: Any) -> None:
                _threads.append(threading.current_thread().name)
                reduce(*args, **kwargs)

            return recorded

        compressor.reduce = recording(compressor.reduce)  # type: ignore[method-assign]
        overlap = OverlappedExchange(list(net.parameters()), world, compressor=compressor, names=names, bucket_mb=1e-4)
        got, want, started = [], [], []
        for step in range(4):  # step 0 uncompressed (start_iter), then error feedback carries over
            ref.zero_grad(set_to_none=True)
            backward(ref, step)
            ref_compressor.reduce([p.grad for p in ref.parameters()], names=list(dict(ref.named_parameters())), iteration=step)
            want.append([p.grad.clone() for p in ref.parameters()])
            net.zero_grad(set_to_none=True)
            backward(net, step)
            overlap.finish()
            compressor.optimizer_steps += 1
            started.append(overlap.started_in_backward)
            got.append([p.grad.clone() for p in net.parameters()])
        overlap.close()
        out[method] = {"got": got, "want": want, "started": started, "buckets": len(overlap.buckets),
                       "threads": sorted(set(threads)), "prefix": WORKER_THREAD_PREFIX}
        # DDP's path (tp = pp = 1): the compressor as its comm hook, on the worker thread
        exchange = DenseExchange.build(mesh=mesh, compression=config, mode="sync", local_world_size=2)
        ddp_net = model()
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_net, bucket_cap_mb=1e-3)
        exchange.register_ddp_hook(ddp)
        threads.clear()
        exchange.compressor.reduce = recording(exchange.compressor.reduce)  # type: ignore[method-assign]
        ddp_got = []
        for step in range(4):
            ddp.zero_grad(set_to_none=True)
            backward(ddp, step)
            exchange.after_optimizer_step()
            ddp_got.append([p.grad.clone() for p in ddp_net.parameters()])
        exchange.drain()
        out[method]["ddp"] = ddp_got
        out[method]["ddp_threads"] = sorted(set(threads))
    # through DenseExchange.build: the compressed exchange overlaps, on a dp group of its own
    chosen = DenseExchange.build(mesh=mesh, compression=GradientCompression(method="powersgd"), mode="sync", local_world_size=2,
                                 explicit_params=list(model().parameters()))
    group = chosen.compressor.group
    out["build"] = {"overlap": chosen.overlap is not None, "own_group": group is not mesh["dp"].get_group() and group is not world,
                    "ranks": dist.get_process_group_ranks(group)}
    return out


def test_overlapped_compressed_exchange_equals_the_after_backward_compressor() -> None:
    """tp/pp layouts' compressed exchange, started from gradient hooks on a worker thread, and DDP's
    comm hook on that thread: each method's averages (error feedback, PowerSGD's warm start carried
    over steps) equal the compressor run after backward on the same gradients; buckets start
    during backward."""
    for result in (rank["compressed"] for rank in _overlap_results()):
        for method in ("fp16", "powersgd", "topk", "sign"):
            r = result[method]
            for step, (got, want) in enumerate(zip(r["got"], r["want"], strict=True)):
                for g, w in zip(got, want, strict=True):
                    assert_close(g, w, rtol=0, atol=0, msg=lambda m, method=method, step=step: f"{method} step {step}: {m}")
            assert r["buckets"] > 3 and all(s >= r["buckets"] - 1 for s in r["started"][1:]), (method, r["started"])
            for threads in (r["threads"], r["ddp_threads"]):
                assert threads and all(t.startswith(r["prefix"]) for t in threads), (method, threads)
            # DDP's hook (its own buckets) gives the same averages
            for step, (got, want) in enumerate(zip(r["ddp"], r["want"], strict=True)):
                for g, w in zip(got, want, strict=True):
                    assert_close(g, w, rtol=0, atol=0, msg=lambda m, method=method, step=step: f"DDP {method} step {step}: {m}")
        assert result["build"] == {"overlap": True, "own_group": True, "ranks": [0, 1]}
