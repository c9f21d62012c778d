"""What HybridStrategy writes into a checkpoint directory and reads back, shard-aware.

A checkpoint is one torch.distributed.checkpoint (DCP) directory (`lightning_hybrid.checkpoint`
writes and reads it atomically). Its DCP state has these parts:

- ``model``: the LightningModule's state dict (ShardedTensor table shards, DTensor TP/FSDP
  weights, each pipeline stage's own blocks), resharded on load into any layout;
- ``optimizers``: each optimizer's state by parameter name (dense-kernel table state as
  ShardedTensors with the table's sharding);
- ``fused``: fbgemm's optimizer state of fused tables, per sharded module;
- ``per_rank_<r>``: this rank's own state (RNG streams, the dp exchange's residuals and gradients
  in flight, local-SGD replica weights), restored only into the same layout;
- ``current_model_state`` (with weight averaging only): the training weights, sharded like
  ``model``, which then holds the averaged weights; a resumed fit trains on from the former and
  hands the latter to the callback as ``checkpoint["state_dict"]``.

Hyper-parameters and Lightning's loop state go into ``meta.pt`` as plain values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_hybrid import checkpoint as ckpt
from lightning_hybrid.export import MODEL_CLASS_KEY
from lightning_hybrid.parallel.data import local_tensor
from lightning_hybrid.plan import ParallelPlan

#: the checkpoint key under which weight averaging (Lightning's `WeightAveraging`, and
#: `lightning_hybrid.callbacks.EMAWeightAveraging`) keeps the training weights while ``state_dict``
#: holds the averaged ones: what ``test``/``predict``/export read
AVERAGED_FROM = "current_model_state"


def fused_states(sharded_modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, Any]]:
    """module name ("root" for the model itself) -> fbgemm optimizer state of its fused tables."""
    return {
        fqn or "root": module.fused_optimizer.state_dict()
        for fqn, module in sharded_modules.items()
        if getattr(module, "fused_optimizer", None) is not None
    }


def sharded_param_templates(module: torch.nn.Module) -> dict[str, Any]:
    """name -> ShardedTensor of each table (the sharding metadata that dense-kernel optimizer
    state is stored with)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return {k: v for k, v in module.state_dict().items() if isinstance(v, ShardedTensor)}


def replica_state(params: Sequence[torch.nn.Parameter], optimizers: Sequence[Optimizer], names: dict[int, str]) -> dict[str, Any]:
    """This replica's own dense weights and their optimizer state (local SGD: replicas drift apart
    between averages, and the shared part of the checkpoint holds rank 0's weights)."""
    return {
        "params": {names[id(p)]: local_tensor(p.detach()).clone() for p in params},
        "optimizers": [
            {names[id(p)]: {k: v.clone() if isinstance(v, Tensor) else v for k, v in opt.state[p].items()} for p in params if p in opt.state}
            for opt in optimizers
        ],
    }


def load_replica_state(module: torch.nn.Module, optimizers: Sequence[Optimizer], state: dict[str, Any]) -> None:
    by_name = dict(module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in state["params"].items():
            local_tensor(by_name[name]).copy_(value)
    for opt, saved in zip(optimizers, state["optimizers"], strict=True):
        for name, entry in saved.items():
            target = opt.state[by_name[name]]
            for key, value in entry.items():
                if isinstance(value, Tensor) and isinstance(target.get(key), Tensor):
                    local_tensor(target[key]).copy_(value)
                else:
                    target[key] = value


def save(
    checkpoint: dict[str, Any],
    path: Path,
    *,
    module: torch.nn.Module,
    sharded_modules: dict[str, torch.nn.Module],
    per_rank: dict[str, Any],
    rank: int,
    world_size: int,
    plan: ParallelPlan,
    writer: Callable[[dict[str, Any], dict[str, Any], Path], None] = ckpt.save,
) -> None:
    """Split Lightning's ``checkpoint`` dict into DCP state and meta, and write them (collective)."""
    checkpoint = dict(checkpoint)
    optimizer_states = checkpoint.pop("optimizer_states", [])
    state = {
        "model": checkpoint.pop("state_dict"),
        # tensors go through DCP (shard-aware); hyper-parameters are plain values kept in meta
        "optimizers": {str(i): {"state": s["state"]} for i, s in enumerate(optimizer_states)},
        "fused": {name: sd for name, sd in fused_states(sharded_modules).items() if sd["state"]},
        f"per_rank_{rank}": ckpt.pack(per_rank),
    }
    if AVERAGED_FROM in checkpoint:  # a weight-averaging callback's training weights: shard-aware too
        state[AVERAGED_FROM] = checkpoint.pop(AVERAGED_FROM)
    ckpt.set_loader_positions(checkpoint)
    checkpoint["lightning_hybrid"] = {
        "world_size": world_size,
        "plan": dataclasses.asdict(plan),  # plain values: weights_only loading accepts them
        "optimizer_param_groups": [s["param_groups"] for s in optimizer_states],
    }
    writer(state, checkpoint, path)


def load(
    path: Path,
    *,
    module: torch.nn.Module,
    optimizers: Sequence[Optimizer],
    sharded_modules: dict[str, torch.nn.Module],
    fused_param_ids: set[int],
    fitting: bool,
    rank: int,
    world_size: int,
    plan: ParallelPlan,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load ``path`` into the model, optimizers and fused tables in place (collective); return
    (meta, this rank's per-rank state or None when the layout changed)."""
    meta = ckpt.load_meta(path)
    keys = ckpt.saved_keys(path)
    state: dict[str, Any] = {"model": module.state_dict()}
    averaged = fitting and any(k.startswith(f"{AVERAGED_FROM}.") for k in keys)
    if averaged:  # resuming a weight-averaged fit: train on from the training weights, hand the average over
        state[AVERAGED_FROM], state["model"] = state["model"], ckpt.cloned_like(state["model"])
    optimizer_states: dict[str, Any] = {}
    fused: dict[str, Any] = {}
    if fitting:
        templates = sharded_param_templates(module)
        trainable = [p for p in module.parameters() if p.requires_grad and id(p) not in fused_param_ids]
        for index, optimizer in enumerate(optimizers):
            ckpt.init_optimizer_state(optimizer, trainable)
            opt_state = ckpt.optimizer_state_dict(module, optimizer, templates)
            prefix = f"optimizers.{index}.state."
            missing = [name for name, entry in opt_state["state"].items() if any(f"{prefix}{name}.{k}" not in keys for k in entry)]
            for name in missing:  # saved before this parameter's first step: start it fresh
                optimizer.state.pop(module.get_parameter(name), None)
                opt_state["state"].pop(name)
            optimizer_states[str(index)] = {"state": opt_state["state"]}
        fused = {name: sd for name, sd in fused_states(sharded_modules).items() if any(k.startswith(f"fused.{name}.") for k in keys)}
    state["optimizers"] = optimizer_states
    state["fused"] = fused
    saved = meta.get("lightning_hybrid", {})
    own_key = f"per_rank_{rank}"
    same_layout = saved.get("world_size") == world_size and saved.get("plan") == dataclasses.asdict(plan)
    if own_key in keys and same_layout:
        state[own_key] = b""
    elif any(k.startswith("per_rank_") for k in keys):
        rank_zero_warn(
            f"Resuming into another layout ({plan.describe()}, world size {world_size}; the checkpoint was written by "
            f"{ParallelPlan(**saved['plan']).describe() if saved.get('plan') else '?'} on world size "
            f"{saved.get('world_size')}): weights and optimizer states are resharded exactly, but per-rank state starts "
            "afresh: RNG streams, gradient-compression residuals and async gradients in flight."
        )
    ckpt.load(state, path)
    saved_groups = saved.get("optimizer_param_groups", [])
    for index, optimizer in enumerate(optimizers):
        if str(index) in optimizer_states:
            ckpt.load_optimizer_state_dict(module, optimizer, {**optimizer_states[str(index)], "param_groups": saved_groups[index]})
    for fqn, sharded in sharded_modules.items():
        if (fqn or "root") in fused:
            sharded.fused_optimizer.load_state_dict(fused[fqn or "root"])
    per_rank = ckpt.unpack(state[own_key]) if own_key in state else None
    if averaged:
        meta["state_dict"] = state["model"]  # (the callback's on_load_checkpoint reads the average here)
    return meta, per_rank


class CheckpointHooks:
    """HybridStrategy's checkpoint hooks (Lightning calls them on the strategy); they assemble and
    read the state described in the module docstring with `save` and `load` above."""

    # ------------------------------------------------------------------------------------------
    # Checkpoints (torch.distributed.checkpoint directories)
    # ------------------------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.lightning_module.state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if self._shard_templates is None:  # fixed once the tables are sharded
            self._shard_templates = sharded_param_templates(self.lightning_module)
        return ckpt.optimizer_state_dict(self.lightning_module, optimizer, self._shard_templates)

    def _per_rank_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": ckpt.rng_state()}
        if self._exchange is not None:
            state.update(self._exchange.state_dict())
            if self._exchange.local_sgd is not None:
                state["replica"] = replica_state(self._exchange.params, self._unwrapped_optimizers(), self._param_names())
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "HybridStrategy.save_checkpoint(storage_options=...) is not supported: checkpoints are written "
                "with torch.distributed.checkpoint, not a CheckpointIO plugin."
            )
        cls = type(self.lightning_module)
        checkpoint[MODEL_CLASS_KEY] = f"{cls.__module__}.{cls.__qualname__}"  # (read by lightning-hybrid export)
        save(
            checkpoint, Path(self.broadcast(str(filepath))), module=self.lightning_module, sharded_modules=self._tables.modules,
            per_rank=self._per_rank_state(), rank=self.global_rank, world_size=self.world_size, plan=self.plan,
            writer=self._async_saver.save if self._async_saver is not None else ckpt.save,
        )

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous save in flight is on disk (no-op otherwise)."""
        if self._async_saver is not None:
            self._async_saver.wait()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        self.wait_for_checkpoint()
        module = self.lightning_module
        trainer = module._trainer
        meta, per_rank = load(
            Path(self.broadcast(str(checkpoint_path))), module=module, optimizers=self._unwrapped_optimizers(),
            sharded_modules=self._tables.modules, fused_param_ids=self._tables.fused_param_ids(),
            fitting=trainer is not None and trainer.state.fn == TrainerFn.FITTING,
            rank=self.global_rank, world_size=self.world_size, plan=self.plan,
        )
        if per_rank is not None:
            ckpt.set_rng_state(per_rank["rng"])
            if self._exchange is not None:
                self._exchange.load_state_dict(per_rank)
                if self._exchange.local_sgd is not None and "replica" in per_rank:
                    load_replica_state(module, self._unwrapped_optimizers(), per_rank["replica"])
        return meta

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # done in load_checkpoint, shard-aware

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass  # done in load_checkpoint, shard-aware

