"""The data-parallel exchange of a job's dense parameters: which path, and running it each step.

Two paths, chosen by `DenseExchange.build`:

- **DDP** (tp = pp = 1, ``data_parallel_mode="sync"``): DDP all-reduces the gradients bucket by
  bucket during backward; a compressor, if any, runs as its comm hook, on a worker thread
  (`lightning_hybrid.comm.hooks`), so it overlaps backward too.
- **explicit** (tp > 1: DDP cannot hook DTensor parameters; pp > 1: each stage's replicas only;
  local SGD / async: they decide themselves when to communicate). The synchronous exchange,
  exact or compressed, overlaps with backward (`lightning_hybrid.comm.overlap`: buckets
  started from gradient hooks) under tensor parallelism always, under a scheduled pipeline when
  the strategy passes ``pipeline_overlap`` (`lightning_hybrid.strategies.apply.pipeline_overlap`:
  not with gradient accumulation, the zero-bubble schedule or the adaptive balancer); otherwise
  the dense gradients go through the compressor after backward (`after_backward`). `StaleGradients`
  starts their all-reduce after backward (async), `LocalSGD` averages the weights after the
  optimizer step.

With ``GradientCompression(hierarchical=True)`` and dp ranks on several nodes, the compressor is
exact within each node and compressed across nodes (groups from `lightning_hybrid.mesh`).
The exchange also keeps the per-step byte and time counts the monitor logs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from lightning_hybrid.comm.compress import (
    ByteCounter,
    Compressor,
    GradientCompression,
    HierarchicalCompressor,
    build_compressor,
)
from lightning_hybrid.comm.modes import LocalSGD, StaleGradients
from lightning_hybrid.comm.overlap import CompressorThread, OverlappedExchange
from lightning_hybrid.mesh import data_parallel_node_groups, separate_data_parallel_group
from lightning_hybrid.parallel.data import local_tensor

if TYPE_CHECKING:
    from lightning_hybrid.comm.hooks import ExposedWait


def build_dp_compressor(
    config: GradientCompression | None, mesh: DeviceMesh, *, local_world_size: int, own_group: bool = False
) -> Compressor:
    """The dp-axis compressor; hierarchical (exact within a node, ``config.method`` across nodes)
    when asked for and the dp ranks span several nodes. ``own_group``: a compressor on a dp
    group of its own (hierarchical ones always have theirs), for collectives run on another
    thread (`lightning_hybrid.comm.overlap`). Collective when it makes groups."""
    world = mesh.mesh.numel()
    if config is None or not config.hierarchical or world <= local_world_size:
        return build_compressor(config, separate_data_parallel_group(mesh) if own_group else mesh["dp"].get_group())
    intra, inter = data_parallel_node_groups(mesh, local_world_size)
    assert intra is not None and inter is not None
    rank_zero_info(
        f"HybridStrategy: hierarchical gradient exchange: exact within each node ({local_world_size} ranks), "
        f"{config.method} across {world // local_world_size} nodes"
    )
    return HierarchicalCompressor(intra, build_compressor(config, inter))


class DenseExchange:
    """One job's dp exchange of the dense parameters (see the module docstring)."""

    def __init__(
        self,
        compressor: Compressor,
        *,
        params: Sequence[torch.nn.Parameter] = (),
        names: dict[int, str] | None = None,
        local_sgd: LocalSGD | None = None,
        stale: StaleGradients | None = None,
        overlap: OverlappedExchange | None = None,
    ) -> None:
        self.compressor = compressor
        self.overlap = overlap
        self.params = list(params)  # explicit path only
        self.names = names or {}
        self.local_sgd = local_sgd
        self.stale = stale
        self.bytes_last_step = 0
        self.seconds_last_step = 0.0
        self.seconds_in_optimizer_last_step = 0.0  # the part of seconds_last_step inside the optimizer step
        self._hook_thread: CompressorThread | None = None
        self._ddp_wait: ExposedWait | None = None

    @classmethod
    def build(
        cls,
        *,
        mesh: DeviceMesh,
        compression: GradientCompression | None,
        mode: str,
        local_world_size: int,
        explicit_params: Sequence[torch.nn.Parameter] | None = None,
        names: dict[int, str] | None = None,
        local_sgd_period: int = 4,
        local_sgd_warmup_steps: int = 0,
        local_sgd_overlap: bool = False,
        async_staleness: int = 1,
        sync_allowed: Callable[[], bool] = lambda: True,
        pipeline_overlap: tuple[Callable[[], int], Sequence[torch.nn.Parameter]] | None = None,
    ) -> DenseExchange:
        """``explicit_params``: the dense parameters to exchange after backward (None: DDP does,
        with the compressor as its hook). ``sync_allowed``: False while gradients accumulate
        without an exchange (the strategy's ``no_sync``), read by the overlapped exchange's hooks.
        ``pipeline_overlap``: (the schedule's microbatches per step, the stages' parameters) to
        overlap the exchange with a pipeline's backward (None with pp > 1: after it)."""
        overlapped = explicit_params is not None and mode == "sync" and (mesh["pp"].size() == 1 or pipeline_overlap is not None)
        compressing = compression is not None and compression.method != "none"
        # (a compressor run on a worker thread, by the overlap or DDP's hook, needs groups of its own)
        own_group = compressing and (explicit_params is None or overlapped)
        compressor = build_dp_compressor(compression, mesh, local_world_size=local_world_size, own_group=own_group)
        if explicit_params is None:
            return cls(compressor)
        group = mesh["dp"].get_group()
        local_sgd = stale = overlap = None
        if overlapped:
            arrivals, stage_params = pipeline_overlap if pipeline_overlap is not None else ((lambda: 1), None)
            overlap = OverlappedExchange(
                explicit_params, group, compressor=compressor, names=names, armed=sync_allowed, arrivals=arrivals, hooked=stage_params
            )
        elif mode == "local_sgd":
            # (a counter of its own: its average happens inside the optimizer step, see after_optimizer_step)
            local_sgd = LocalSGD(
                explicit_params, separate_data_parallel_group(mesh) if local_sgd_overlap else group, counter=ByteCounter(),
                period=local_sgd_period, warmup_steps=local_sgd_warmup_steps, overlap=local_sgd_overlap,
            )
        elif mode == "async":
            stale = StaleGradients(explicit_params, separate_data_parallel_group(mesh), staleness=async_staleness, counter=compressor.counter)
        return cls(compressor, params=explicit_params, names=names, local_sgd=local_sgd, stale=stale, overlap=overlap)

    def register_ddp_hook(self, ddp: DistributedDataParallel) -> None:
        """The DDP path: the compressor becomes ``ddp``'s comm hook, and the part of its exchange
        backward does not hide is timed (`lightning_hybrid.comm.hooks`)."""
        from lightning_hybrid.comm.hooks import ExposedWait, dense_parameters, register_compressor

        if self.compressor.world > 1:
            self._ddp_wait = ExposedWait(dense_parameters(ddp), self.compressor.counter)
        self._hook_thread = register_compressor(ddp, self.compressor, self._ddp_wait)

    @property
    def explicit(self) -> bool:
        return bool(self.params)

    def after_backward(self) -> None:
        """The explicit path's exchange of this step's gradients (on the DDP path, whose hooks
        exchanged them during backward: the time of it that backward did not hide)."""
        if self._ddp_wait is not None:
            self._ddp_wait.after_backward()
        if not self.params or self.compressor.world == 1:
            return
        if self.overlap is not None:
            self.overlap.finish()
        elif self.stale is not None:
            self.stale.exchange()
        elif self.local_sgd is None or self.local_sgd.syncs_gradients():
            params = [p for p in self.params if p.grad is not None]
            self.compressor.reduce(
                [local_tensor(p.grad) for p in params],
                key="dense",
                names=[self.names.get(id(p), str(i)) for i, p in enumerate(params)],
                iteration=self.compressor.optimizer_steps,
            )

    def after_optimizer_step(self) -> None:
        local_bytes, local_s = 0, 0.0
        if self.local_sgd is not None:
            # local SGD's average runs inside the optimizer step: its wait is reported apart, so a
            # monitor that times the optimizer step does not book it twice (optimizer and dp exchange)
            self.local_sgd.after_optimizer_step()
            local_bytes, local_s = self.local_sgd.counter.take_step(), self.local_sgd.counter.take_seconds()
        self.compressor.optimizer_steps += 1
        self.bytes_last_step = self.compressor.counter.take_step() + local_bytes
        self.seconds_in_optimizer_last_step = local_s
        self.seconds_last_step = self.compressor.counter.take_seconds() + local_s

    @property
    def bytes_total(self) -> int:
        """Bytes this rank has sent on the dp axis since fitting began."""
        return self.compressor.counter.total + (self.local_sgd.counter.total if self.local_sgd is not None else 0)

    def drain(self) -> None:
        """At the end of fitting: wait for the async gradients in flight (and apply an overlapped local
        SGD average in flight), stop the overlap's worker."""
        if self.stale is not None:
            self.stale.drain()
        if self.local_sgd is not None:
            self.local_sgd.drain()
        if self.overlap is not None:
            self.overlap.close()
        if self._hook_thread is not None:
            self._hook_thread.close()
            self._hook_thread = None

    def state_dict(self) -> dict[str, Any]:
        """This rank's exchange state (compression residuals, local-SGD step, gradients in flight)."""
        state: dict[str, Any] = {"compressor": self.compressor.state_dict()}
        if self.local_sgd is not None:
            state["local_sgd"] = self.local_sgd.state_dict()
        if self.stale is not None:
            state["async"] = self.stale.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, target in (("compressor", self.compressor), ("local_sgd", self.local_sgd), ("async", self.stale)):
            if target is not None and name in state:
                target.load_state_dict(state[name])
