"""HybridStrategy: Lightning's lifecycle, orchestrating hybrid parallelism.

The work is done elsewhere (options and their rules: `strategies.options`; layouts chosen by the
planner: `strategies.auto`; tables: `strategies.tables`; checkpoints: `strategies.checkpointing`;
the dp exchange: `comm.exchange`; groups: `mesh`; techniques: `parallel.*`). `setup` applies the
techniques in one fixed order, and the order matters:

1. tensor parallelism first: it turns block weights into DTensors; everything after must see the
   split weights (and the optimizer-state layout follows from them);
2. embedding sharding: it replaces submodules, and the optimizer spec for fused tables must be
   attached to the *unsharded* table parameters before torchrec builds kernels;
3. pipeline stages (a ``pipeline_spec()`` schedule, else the layers routed: `parallel.layer_pipeline`):
   each rank keeps its own blocks (after TP: split blocks; after sharding: tables on every rank);
4. data parallelism over what is left dense, on the mesh's ``dp`` axis: FSDP2, DDP (tp = pp = 1,
   sync; it must not see sharded table parameters), or the explicit exchange (DDP cannot hook
   DTensor parameters; local SGD / async communicate when they decide);
5. the user's ``configure_optimizers`` last, so optimizers hold the final parameters.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_hybrid import checkpoint as ckpt
from lightning_hybrid import launch
from lightning_hybrid.comm.compress import GradientCompression
from lightning_hybrid.comm.exchange import DenseExchange
from lightning_hybrid.comm.modes import DataParallelMode
from lightning_hybrid.failfast import FailFast, augment_with_remote_error
from lightning_hybrid.launch import HybridSpawnLauncher, LauncherName, resolve_launcher, spawn_start_method
from lightning_hybrid.mesh import build_device_mesh, replica_group
from lightning_hybrid.parallel import data as data_parallel
from lightning_hybrid.parallel import pipeline
from lightning_hybrid.parallel import tensor as tensor_parallel
from lightning_hybrid.parallel.layer_pipeline import LayerPipeline
from lightning_hybrid.parallel.pipeline import ScheduleName
from lightning_hybrid.plan import AxisSize, ParallelPlan
from lightning_hybrid.strategies import apply, checkpointing, checks
from lightning_hybrid.strategies.options import (
    DenseParallelName,
    HybridOptions,
    KernelName,
    NonFinitePolicy,
    PipelineSplitName,
    strategy_doc,
    validate,
)
from lightning_hybrid.strategies.steps import PipelineStep
from lightning_hybrid.strategies.tables import (
    ShardedTables,
    TablePlacement,
    apply_embedding_sharding,
    sharding_spec,
)

try:
    from lightning_hybrid.parallel import embedding as emb
    from lightning_hybrid.parallel import embedding_optim as emb_optim

    TORCHREC_IMPORT_ERROR: ImportError | None = None
except ImportError as _error:
    # torchrec / fbgemm not installed (a GPU box with only torch and Lightning): the dense side
    # still works, and a model cannot hold torchrec tables without torchrec.
    emb = emb_optim = None  # type: ignore[assignment]
    TORCHREC_IMPORT_ERROR = _error

log = logging.getLogger(__name__)


class HybridStrategy(checkpointing.CheckpointHooks, TablePlacement, ParallelStrategy):
    strategy_name = "hybrid"

    def __init__(
        self,
        *,
        data_parallel: AxisSize = "auto",
        tensor_parallel: AxisSize = 1,
        tensor_parallel_plan: dict[str, str] | None = None,
        dense_parallel: DenseParallelName = "ddp",
        reshard_after_forward: bool = True,
        pipeline_parallel: AxisSize = 1,
        pipeline_schedule: ScheduleName = "1f1b",
        pipeline_microbatches: int | None = None,
        pipeline_virtual_stages: int = 1,
        pipeline_split: list[int] | PipelineSplitName = "even",
        pipeline_layers: str | None = None,
        pipeline_rebalance_every: int = 0,
        pipeline_rebalance_threshold: float = 1.1,
        gradient_compression: GradientCompression | None = None,
        data_parallel_mode: DataParallelMode = "sync",
        local_sgd_period: int = 4,
        local_sgd_warmup_steps: int = 0,
        local_sgd_overlap: bool = False,
        async_staleness: int = 1,
        plan: Literal["manual", "auto"] = "manual",
        cluster: str | None = None,
        planner_calibration: str | None = None,
        monitor: bool = True,
        shard_embeddings: bool = True,
        embedding_sharding: dict[str, str] | None = None,
        embedding_kernels: dict[str, KernelName] | None = None,
        embedding_constraints: dict[str, Any] | None = None,
        embedding_memory_per_rank: int | None = None,
        embedding_shard_group_size: int | Literal["node"] | None = None,
        validate_inputs: bool = True,
        nonfinite_loss: NonFinitePolicy = "stop",
        async_checkpoint: bool = False,
        launcher: LauncherName = "auto",
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = True,
        process_group_backend: str | None = None,
        timeout_s: float = 1800.0,
        failure_grace_s: float = 10.0,
    ) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        # every rule is checked now, so a bad combination fails before anything is launched
        options = HybridOptions.from_kwargs(**arguments)
        if emb is None and options.embedding.any_set:
            validate(options, torchrec_available=False)  # raises the ImportError naming torchrec
        validate(options, torchrec_available=emb is not None)
        self._options = options
        self.planned: Any = None  # the planner's Estimate when plan="auto"
        self.num_nodes, self.skipped_steps = 1, 0
        self.balance_report: dict[str, Any] | None = None
        self._plan: ParallelPlan | None = None
        self._mesh: DeviceMesh | None = None
        self._failfast: FailFast | None = None
        self._replica_pg: dist.ProcessGroup | None = None
        self._tables = ShardedTables()
        self._pipeline: pipeline.PipelineRunner | None = None
        self._layers: LayerPipeline | None = None  # pipeline_parallel without a pipeline_spec()
        self._exchange: DenseExchange | None = None
        self._async_saver: ckpt.AsyncSaver | None = None
        self._tp_applied, self._tp_bytes, self._loss_parallel = False, None, False
        self._reset_step_state()

    def _reset_step_state(self) -> None:
        self._names_by_id: dict[int, str] | None = None
        self._replica_checked_epoch, self._skip_backward, self._grad_sync_blocked = -1, False, False
        self._shard_templates: dict[str, Any] | None = None
        self.tp_bytes_last_step = self.embedding_bytes_last_step = 0

    # -- Public state (what callbacks, the balancer and users read) ----------------------------------

    @property
    def options(self) -> HybridOptions:
        """The validated options in force (after ``plan="auto"``: the planned layout merged in)."""
        return self._options

    @property
    def plan(self) -> ParallelPlan:
        if self._plan is None:
            raise RuntimeError("HybridStrategy.plan is available after the processes are set up (setup_environment).")
        return self._plan

    @property
    def device_mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("HybridStrategy.device_mesh is available after setup_environment.")
        return self._mesh

    @property
    def sharding_plan(self) -> Any:
        """torchrec ``ShardingPlan`` of the embedding tables (None before setup / without tables)."""
        return self._tables.plan

    @property
    def sharded_modules(self) -> dict[str, torch.nn.Module]:
        """FQN -> torchrec-sharded embedding module (empty before setup / without tables)."""
        return dict(self._tables.modules)

    @property
    def lookup_counter(self) -> Any:
        """Lookups served per rank (`parallel.lookup_load.LookupCounter`; None before fit, on one process)."""
        return self._tables.lookup_counter

    @property
    def pipeline_runner(self) -> pipeline.PipelineRunner | None:
        return self._pipeline

    @property
    def dense_exchange(self) -> DenseExchange | None:
        """The dp exchange of the dense parameters (None outside fitting)."""
        return self._exchange

    @property
    def comm_bytes_last_step(self) -> int:
        return self._exchange.bytes_last_step if self._exchange is not None else 0

    @property
    def comm_seconds_last_step(self) -> float:
        return self._exchange.seconds_last_step if self._exchange is not None else 0.0

    @property
    def is_distributed(self) -> bool:
        return True  # (Lightning injects its DistributedSampler only for strategies that say so)

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Ranks of one data-parallel replica must see the same batch; samples are split over dp only.
        dp = self.device_mesh["dp"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # sharded state can only be loaded into the sharded model

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores optimizers itself (shard-aware)

    # -- Processes -----------------------------------------------------------------------------------

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:
            return
        if resolve_launcher(self._options.process.launcher) == "spawn":
            self._launcher = HybridSpawnLauncher(self, start_method=spawn_start_method())
        else:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self._set_world_ranks()
        if self._options.planning.plan == "auto" and self.planned is None:
            self._apply_automatic_plan()
        layout = self._options.layout
        # Resolve the layout before any collective: a bad plan fails identically on every rank.
        self._plan = ParallelPlan.resolve(
            world_size=self.world_size,
            data_parallel=layout.data_parallel,
            tensor_parallel=layout.tensor_parallel,
            pipeline_parallel=layout.pipeline_parallel,
            devices_per_node=self.num_processes or None,
        )
        # torchrec reads LOCAL_WORLD_SIZE to find node boundaries; Lightning's launchers don't set it
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(self.num_processes))
        backend = self._options.process.process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        kwargs: dict[str, Any] = {"timeout": timedelta(seconds=self._options.reliability.timeout_s)}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        assert self.cluster_environment is not None
        launch.init_process_group(self.cluster_environment, backend, **kwargs)  # (destroyed at exit, any backend)
        self._mesh = build_device_mesh(self._plan, self.root_device.type)
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self._mesh
        if self._options.reliability.async_checkpoint and self._async_saver is None:
            # the background write's collectives get a CPU group of their own: the training
            # thread's collectives on the default group must not interleave with them
            group = dist.new_group(backend="gloo") if self.world_size > 1 else None
            self._async_saver = ckpt.AsyncSaver(group)
        if self._failfast is None and self.world_size > 1:
            # a fresh namespace per start, agreed by broadcast (an elastic restart reuses the store)
            namespace = self.broadcast(uuid.uuid4().hex)
            self._failfast = FailFast(rank=self.global_rank, namespace=namespace, grace_s=self._options.reliability.failure_grace_s)
            self._failfast.start()

    def _apply_automatic_plan(self) -> None:
        """plan="auto": the planner's fastest layout that the user's options allow (strategies.auto)."""
        from lightning_hybrid.strategies.auto import choose_layout

        module = self.lightning_module
        self._options, self.planned = choose_layout(
            self._options, module=module, datamodule=getattr(module.trainer if module is not None else None, "datamodule", None),
            world_size=self.world_size, devices_per_node=self.num_processes or self.world_size, device_type=self.root_device.type,
        )

    def _set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    # -- Model and optimizers: the apply order (module docstring) ------------------------------------

    @override
    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        checks.refuse_unsharded_weight_averaging(trainer.callbacks)
        self._reset_step_state()
        options, layout, model = self._options, self.plan, self.lightning_module
        if layout.tensor_parallel * layout.pipeline_parallel > 1 and self._replica_pg is None:
            self._replica_pg = replica_group(self.device_mesh)  # collective: every rank, same order

        # 1. tensor parallelism
        if layout.tensor_parallel > 1 and not self._tp_applied:
            applied = apply.apply_tensor_parallel(model, self.device_mesh, options.layout.tensor_parallel_plan, layout.tensor_parallel)
            self._tp_applied, self._loss_parallel, self._tp_bytes = True, applied.loss_parallel, applied.byte_counter
        # 2. embedding sharding
        if options.embedding.shard_embeddings and emb is not None and not self._tables.modules:
            self._tables = apply_embedding_sharding(
                model, spec=sharding_spec(options.embedding), trainer=trainer, fitting=fitting, device=self.root_device,
                local_world_size=self.num_processes or None, validate_inputs=options.reliability.validate_inputs,
                layout=layout, mesh=self.device_mesh, replica_group=self._replica_pg,
            )
        sharded = list(self._tables.modules)
        # 3. pipeline stages
        if layout.pipeline_parallel > 1 and self._pipeline is None and self._layers is None:
            built, spec, self.balance_report = apply.apply_pipeline(
                model, options=options, mesh=self.device_mesh, device=self.root_device, sharded=sharded,
                first_batch=lambda: self.batch_to_device(next(iter(_train_loader(trainer)))), precision=self.precision_plugin,
            )
            if spec is None:  # no pipeline_spec(): the module's own forward routed through the layers
                self._layers = built
            else:
                self._pipeline, self._pipeline_step = built, PipelineStep(built, spec, options.pipeline)
        # 4. data parallelism over the dense rest
        if fitting:
            self.model, self._exchange = apply.apply_data_parallel(
                model, options=options, layout=layout, mesh=self.device_mesh, sharded=sharded, device=self.root_device,
                names=self._param_names, local_world_size=self.num_processes or 1, sync_allowed=lambda: not self._grad_sync_blocked,
                pipeline_overlap=apply.pipeline_overlap(self._pipeline, options.pipeline, trainer.accumulate_grad_batches),
            )
        elif not self._is_fsdp():  # (an FSDP-sharded model's shards differ by design)
            data_parallel.broadcast_dense_state(model, ignored_modules=sharded, process_group=self.device_mesh["dp"].get_group())
        if fitting and options.process.monitor:
            from lightning_hybrid.callbacks.monitor import HybridMonitor

            if not any(isinstance(c, HybridMonitor) for c in trainer.callbacks):
                trainer.callbacks.append(HybridMonitor())
        # 5. optimizers see the final parameters
        if fitting:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        apply.check_loss_scaling(
            self.precision_plugin, pipelined=self._pipeline is not None or self._layers is not None, world_size=self.world_size, tables=self._tables,
            optimizers=self.optimizers if fitting else (),
        )
        if fitting:
            from lightning.fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)
            apply.apply_clipping(
                self.precision_plugin, tables=self._tables, layout=layout, options=options, mesh=self.device_mesh,
                runner=self._pipeline or self._layers, clip_val=trainer.gradient_clip_val,
            )

    def _unwrapped_optimizers(self) -> list[Optimizer]:
        return [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]

    def _param_names(self) -> dict[int, str]:
        if self._names_by_id is None:
            self._names_by_id = ckpt.param_names(self.lightning_module)
        return self._names_by_id

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self._pipeline is not None:
            pipeline.check_loader_batches(self.lightning_module.trainer.train_dataloader, self._pipeline.microbatches)

    # -- Steps ---------------------------------------------------------------------------------------

    def _is_fsdp(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.lightning_module, FSDPModule)

    def _through_fsdp_root(self, method: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        # FSDP2 gathers the root's own weights in the root's forward hooks, and Lightning calls
        # training_step, not forward: route the step through the module's __call__
        with context:
            return self._forward_redirection(self.lightning_module, self.lightning_module, method, *args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        module = self.lightning_module
        if self._tables.choice is not None and self._tables.choice.fused:
            # fbgemm reads the learning rate at forward time: LR schedulers must reach it now
            emb_optim.sync_fused_learning_rates(self._tables.fused_optimizers_by_table(), self._tables.choice, self._unwrapped_optimizers())
        # bytes of the previous optimizer step (logging is allowed here, not in optimizer_step), on
        # the steps the loggers write (a self.log call costs more than a small model's step, ~1 ms)
        writes = getattr(getattr(module.trainer, "_logger_connector", None), "should_update_logs", True)
        for name, value, known in (
            ("comm/dp_bytes_per_step", self.comm_bytes_last_step, self._exchange is not None and self._exchange.bytes_total),
            ("comm/tp_bytes_per_step", self.tp_bytes_last_step, self._tp_bytes is not None and module.trainer.global_step > 0),
            ("comm/embedding_bytes_per_step", self.embedding_bytes_last_step,  # torchrec's all-to-alls, fwd and bwd
             self._tables.byte_counter is not None and module.trainer.global_step > 0),
        ):
            if known and writes:
                module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)
        self._skip_backward = False
        epoch = module.trainer.current_epoch
        if self._options.reliability.validate_inputs and self._replica_pg is not None and self._replica_checked_epoch != epoch:
            self._replica_checked_epoch = epoch
            checks.check_replica_batch(args[0] if args else next(iter(kwargs.values())), self._replica_pg, self.root_device)
        if self._pipeline is not None:
            return self._pipeline_step.run(self.lightning_module, self.precision_plugin, args[0], self._check_loss)
        with tensor_parallel.loss_parallel_if(self._loss_parallel):  # (vocab-split logits: fwd and bwd)
            if self._is_fsdp():
                output = self._through_fsdp_root("training_step", self.precision_plugin.train_step_context(), *args, **kwargs)
            else:
                output = super().training_step(*args, **kwargs)
        loss = output.get("loss") if isinstance(output, dict) else output
        if isinstance(loss, Tensor):
            self._check_loss(loss)
        return output

    def _check_loss(self, loss: Tensor) -> bool:
        """The ``nonfinite_loss`` policy; True (kept for backward) when the step must be skipped."""
        policy = self._options.reliability.nonfinite_loss
        skip = checks.nonfinite_verdict(
            loss, policy=policy, rank=self.global_rank, world_size=self.world_size, step=self.lightning_module.trainer.global_step
        )
        if skip:
            self.skipped_steps += 1
            self.lightning_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)
        # with fp16 loss scaling the backward still runs: its NaN/inf gradients are an overflow on
        # every rank (parallel.amp) and GradScaler skips the step (without gradients it would raise
        # "No inf checks were recorded"; fused tables, which would take the NaN, are refused)
        self._skip_backward = skip and getattr(self.precision_plugin, "scaler", None) is None
        return skip

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        if self._pipeline is not None:  # the schedule ran backward already (strategies.steps)
            return self._pipeline_step.hand_over(self, closure_loss)
        if self._skip_backward:
            return closure_loss  # nonfinite_loss="skip": no gradients, so the optimizer changes nothing
        with tensor_parallel.loss_parallel_if(self._loss_parallel):
            scale = self._layers.loss_scale if self._layers is not None else 1.0  # (parallel.layer_pipeline)
            super().backward(closure_loss * scale if scale != 1.0 else closure_loss, optimizer, *args, **kwargs)
            return closure_loss

    def _eval_step(self, method: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        if self._is_fsdp():
            return self._through_fsdp_root(method, context, *args, **kwargs)
        return getattr(super(), method)(*args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", self.precision_plugin.val_step_context(), *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", self.precision_plugin.test_step_context(), *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipeline is not None:
            raise RuntimeError(checks.PREDICT_UNDER_PIPELINE)
        return self._eval_step("predict_step", self.precision_plugin.predict_step_context(), *args, **kwargs)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        if self._grad_sync_blocked:
            return
        if self._layers is not None:
            self._layers.sum_shared_gradients()
        if self._exchange is not None:
            self._exchange.after_backward()
        self._tables.after_backward()  # (the copies of tables in groups; see ShardedTables.after_backward)

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._tp_bytes is not None:
            self.tp_bytes_last_step = self._tp_bytes.take_step()
        if self._tables.byte_counter is not None:
            self.embedding_bytes_last_step = self._tables.byte_counter.take_step()
        if self._exchange is not None:
            self._exchange.after_optimizer_step()
        if self._pipeline is not None and self._pipeline_step.after_optimizer_step(self):
            self._names_by_id = None  # blocks moved between pp ranks (`balance.adaptive`): new parameters
        return out

    @override
    def on_train_end(self) -> None:
        self.wait_for_checkpoint()
        if self._exchange is not None:
            self._exchange.drain()
        super().on_train_end()

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        self._grad_sync_blocked = True
        fsdp = self._is_fsdp()
        try:
            if isinstance(self.model, DistributedDataParallel):
                with self.model.no_sync():
                    yield None
            elif fsdp:
                self.lightning_module.set_requires_gradient_sync(False)  # type: ignore[operator]
                yield None
            else:
                yield None
        finally:
            if fsdp:
                self.lightning_module.set_requires_gradient_sync(True)  # type: ignore[operator]
            self._grad_sync_blocked = False

    # -- Collectives ---------------------------------------------------------------------------------

    @override
    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            dist.barrier(device_ids=[self.root_device.index]) if dist.get_backend() == "nccl" else dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, group=_group.WORLD)
        return box[0]

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # -- Errors and teardown -------------------------------------------------------------------------

    @override
    def on_exception(self, exception: BaseException) -> None:
        if self._failfast is None:
            return
        remote = self._failfast.remote_error()
        if remote is not None:
            augment_with_remote_error(exception, remote)
        else:
            self._failfast.publish(exception)

    @override
    def teardown(self) -> None:
        self._tables.close()
        if self._async_saver is not None:
            self._async_saver.wait()
            self._async_saver = None
        if self._failfast is not None:
            self._failfast.stop()
            self._failfast = None
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.lightning_module
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="lightning_hybrid: torchrec-sharded embeddings + tensor/pipeline/data parallelism")


def _train_loader(trainer: Any) -> Any:
    return trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.fit_loop._data_source.dataloader()


HybridStrategy.__doc__ = strategy_doc()
