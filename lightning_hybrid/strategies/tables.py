"""Step 2 of HybridStrategy's setup: shard the module's torchrec tables, and refuse what cannot train.

`apply_embedding_sharding` chooses each table's optimizer and kernel from the module's own
``configure_optimizers`` (`lightning_hybrid.parallel.embedding_optim`), plans and shards the
tables (`lightning_hybrid.parallel.embedding`), and, when several ranks share a batch (tp or pp
> 1), splits each lookup over them (`lightning_hybrid.parallel.replica_lookup`). What it built
comes back as `ShardedTables`; the strategy keeps it and exposes it read-only.

`TablePlacement` (a mixin of the strategy) keeps whole tables off the GPU until they are sharded:
``configure_model`` builds on the host, and ``model_to_device`` moves everything but the tables
that step 2 will shard (whose shards torchrec creates on the device, filled from a host copy).
A whole table on every GPU before sharding would peak at about twice the table per GPU: exactly
the tables that need sharding would run out of memory.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer, _init_optimizers_and_lr_schedulers
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.distributed.device_mesh import DeviceMesh

from lightning_hybrid.parallel import data as data_parallel
from lightning_hybrid.plan import ParallelPlan

# (torchrec is imported where it is needed: `ShardedTables` is importable without it)


@dataclass
class ShardedTables:
    """The outcome of sharding: module FQN -> sharded module, torchrec's plan, the optimizer
    choice per table, the replicated ("data_parallel") table weights, the byte counter."""

    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    plan: Any = None
    choice: Any = None  # emb_optim.TableOptimizerChoice (fitting only)
    dp_table_params: list[torch.nn.Parameter] = field(default_factory=list)
    byte_counter: Any = None
    lookup_counter: Any = None  # parallel.lookup_load.LookupCounter (fitting on several ranks)
    groups: Any = None  # parallel.table_groups.TableGroups: tables sharded per group, one copy per group
    _fused_by_table: dict[str, Any] | None = None  # fixed once sharded; read every step

    @property
    def shard_group(self) -> dist.ProcessGroup | None:
        """The ranks a table's shards are spread over (None: all ranks)."""
        return self.groups.shard_group if self.groups is not None else None

    def after_backward(self) -> None:
        """Average the table gradients over the copies of the tables (`table_groups`); no-op with one copy."""
        if self.groups is None:
            return
        from lightning_hybrid.parallel.table_groups import average_table_gradients, table_parameters

        sent = average_table_gradients(table_parameters(self.modules.values()), self.groups)
        if self.byte_counter is not None:
            self.byte_counter.add(sent)

    def fused_param_ids(self) -> set[int]:
        if self.choice is None:
            return set()
        return {
            id(param)
            for module in self.modules.values()
            for name, param in module.named_parameters()
            if name.split(".")[-2] in self.choice.fused
        }

    def fused_optimizers_by_table(self) -> dict[str, Any]:
        if self._fused_by_table is not None:
            return self._fused_by_table
        found: dict[str, Any] = {}
        for module in self.modules.values():
            fused = getattr(module, "fused_optimizer", None)
            for _name, opt in getattr(fused, "optimizers", []) if fused is not None else []:
                for key in getattr(opt, "params", {}):
                    found[key.split(".")[-2]] = opt
        self._fused_by_table = found
        return found

    def close(self) -> None:
        if self.byte_counter is not None:
            self.byte_counter.close()
            self.byte_counter = None


def _torchrec_tables(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    try:
        from lightning_hybrid.parallel.embedding import find_embedding_modules
    except ImportError:  # (no torchrec: no tables to keep back)
        return {}
    return find_embedding_modules(model)


def move_except_tables(model: torch.nn.Module, device: torch.device) -> list[str]:
    """``model.to(device)`` except its torchrec embedding modules, which stay where they are (the
    host); returns their FQNs. Public module API only: each table is detached from its parent
    during the move and put back."""
    tables = {fqn: m for fqn, m in _torchrec_tables(model).items() if fqn}
    parents = {fqn: model.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else model for fqn in tables}
    for fqn in tables:
        setattr(parents[fqn], fqn.rpartition(".")[2], torch.nn.Identity())
    try:
        model.to(device)
    finally:
        for fqn, table in tables.items():
            setattr(parents[fqn], fqn.rpartition(".")[2], table)
    return list(tables)


class TablePlacement:
    """Strategy mixin: build on the host, move all but the tables to shard (module docstring)."""

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        with super().tensor_init_context(empty_init), torch.device("cpu"):  # type: ignore[misc]
            yield

    def model_to_device(self) -> None:
        strategy: Any = self
        if strategy.root_device.type != "cpu" and strategy.options.embedding.shard_embeddings and not strategy.sharded_modules:
            move_except_tables(strategy.model, strategy.root_device)
        else:
            strategy.model.to(strategy.root_device)


def _warn_tables(reasons: dict[str, str], what: str, fix: str) -> None:
    if reasons:
        lines = "\n".join(f"  - {t}: {why}" for t, why in sorted(reasons.items()))
        rank_zero_warn(f"HybridStrategy: {what}:\n{lines}\n{fix}")


def sharding_spec(options: Any) -> Any:
    """The `EmbeddingShardingSpec` of the strategy's `EmbeddingOptions`."""
    from lightning_hybrid.parallel.embedding import EmbeddingShardingSpec

    return EmbeddingShardingSpec(
        sharding_types=dict(options.embedding_sharding or {}), compute_kernels=dict(options.embedding_kernels or {}),
        constraints=dict(options.embedding_constraints or {}), memory_per_rank_bytes=options.embedding_memory_per_rank,
        shard_group_size=options.embedding_shard_group_size,
    )


def _stateful(optimizers: list[Any]) -> bool:
    """Whether any optimizer keeps per-parameter state (all but momentum-free SGD do)."""
    for opt in optimizers:
        inner = getattr(opt, "optimizers", None)  # GroupedOptimizer
        for o in inner if inner is not None else [opt]:
            if not (isinstance(o, torch.optim.SGD) and all(g.get("momentum", 0) == 0 for g in o.param_groups)):
                return True
    return False


def refuse_multi_shard_dense_state(summary: dict[str, dict[str, Any]], kernels: dict[str, str], optimizers: list[Any], rank: int) -> None:
    """A dense-kernel table with several shards on one rank (column-wise on few ranks) trains, but
    its optimizer state cannot be checkpointed (one ShardedTensor per parameter holds one local
    shard): refuse it at setup, on every rank alike (the plan is the same everywhere)."""
    from lightning_hybrid.parallel import embedding_optim as emb_optim

    if not _stateful(optimizers):
        return
    for table, info in summary.items():
        ranks = info["ranks"] or []
        if kernels.get(table) == emb_optim.DENSE and any(ranks.count(r) > 1 for r in set(ranks)):
            raise ValueError(
                f"HybridStrategy: table {table!r} is {info['sharding_type']} with several shards on one rank (ranks "
                f"{ranks}) on the dense kernel, and its optimizer keeps state, which cannot be checkpointed for such a "
                f"table. Use embedding_sharding={{{table!r}: 'row_wise'}} (one shard per rank), the fused kernel "
                f"(embedding_kernels={{{table!r}: 'fused'}} with SGD/Adagrad), or momentum-free SGD for the table."
            )


def _with_model_kernels(model: torch.nn.Module, spec: Any) -> Any:
    """``spec`` with the kernels the model itself needs (`specs.TableKernelModel.table_kernels`:
    e.g. a tied output scores items with the table's weight, so the table must take gradients,
    i.e. the dense kernel); a contradicting ``embedding_kernels`` is refused, naming both."""
    from lightning_hybrid.specs import TableKernelModel

    if not isinstance(model, TableKernelModel):
        return spec
    needed = dict(model.table_kernels())
    for table, kernel in needed.items():
        asked = spec.compute_kernels.get(table)
        if asked is not None and asked != kernel:
            raise ValueError(
                f"HybridStrategy(embedding_kernels={{{table!r}: {asked!r}}}) contradicts the model, which needs table "
                f"{table!r} on the {kernel!r} kernel ({type(model).__name__}.table_kernels()). Remove {table!r} from "
                f"embedding_kernels or change the model's option that needs it."
            )
    return replace(spec, compute_kernels={**needed, **spec.compute_kernels})


def _table_groups(size: int | str | None, layout: ParallelPlan, local_world_size: int | None) -> Any:
    from lightning_hybrid.parallel.table_groups import make_table_groups, resolve_group_size

    world = dist.get_world_size() if dist.is_initialized() else 1
    resolved = resolve_group_size(size, world=world, local_world_size=local_world_size or world)
    if resolved is None:
        return None
    if layout.tensor_parallel > 1 or layout.pipeline_parallel > 1:  # ("auto" axes resolve only here)
        raise ValueError(
            f"HybridStrategy(embedding_shard_group_size={size!r}) with tensor_parallel={layout.tensor_parallel}, "
            f"pipeline_parallel={layout.pipeline_parallel} is not supported: use tensor_parallel=1 and pipeline_parallel=1 "
            "with table groups, or drop embedding_shard_group_size."
        )
    return make_table_groups(resolved)


def apply_embedding_sharding(
    model: torch.nn.Module,
    *,
    spec: Any,
    trainer: Any,
    fitting: bool,
    device: torch.device,
    local_world_size: int | None,
    validate_inputs: bool,
    layout: ParallelPlan,
    mesh: DeviceMesh,
    replica_group: dist.ProcessGroup | None,
) -> ShardedTables:
    """Shard every torchrec table of ``model`` in place (collective); see the module docstring.
    ``spec``: a `lightning_hybrid.parallel.embedding.EmbeddingShardingSpec` (with ``shard_group_size``:
    one copy of the tables per group of ranks, `lightning_hybrid.parallel.table_groups`)."""
    from torchrec.distributed.types import ShardingEnv

    from lightning_hybrid.parallel import embedding as emb
    from lightning_hybrid.parallel import embedding_optim as emb_optim
    from lightning_hybrid.parallel.embedding_comm import count_embedding_bytes

    modules = emb.find_embedding_modules(model)
    if not modules:
        return ShardedTables()
    infos = emb.table_infos(modules)
    spec = _with_model_kernels(model, spec)
    groups = _table_groups(spec.shard_group_size, layout, local_world_size)
    if groups is not None:  # the copies average gradients: the dense kernel keeps them
        spec = replace(spec, compute_kernels={**{i.table_name: emb_optim.DENSE for i in infos}, **spec.compute_kernels})
    weights = {info.table_name: model.get_parameter(info.weight_fqn) for info in infos}
    dp_tables = [t for t, s in spec.sharding_types.items() if s == "data_parallel"]
    choice = None
    user_optimizers: list[Any] = []
    if fitting:
        probe, _ = _init_optimizers_and_lr_schedulers(model)
        user_optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in probe]
        choice = emb_optim.choose_table_optimizers(
            optimizers=user_optimizers,
            table_weights=weights,
            device_type=device.type,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            forced_kernels=spec.compute_kernels,
            data_parallel_tables=dp_tables,
        )
        _warn_tables(
            choice.dense_reasons,
            "these embedding tables use the dense kernel so that your optimizer updates them exactly (slower and more "
            "memory than fbgemm's fused kernel)",
            "To use the fused kernel, give the tables an SGD or Adagrad param group (Adam/AdamW on CUDA), or set "
            "HybridStrategy(embedding_kernels={table: 'fused'}) where that is possible.",
        )
        emb_optim.apply_fused_optimizers(weights, choice)
        kernels = dict(choice.kernels)
    else:
        kernels = {
            info.table_name: spec.compute_kernels.get(info.table_name, emb_optim.DENSE if info.table_name in dp_tables else emb_optim.FUSED)
            for info in infos
        }
    constraints = emb.build_constraints(infos, spec, kernels)
    env = ShardingEnv.from_process_group(dist.group.WORLD) if groups is None else groups.sharding_env()
    plan = emb.plan_sharding_on_rank0(
        model, env=env if groups is None else groups.planning_env(), device=device, constraints=constraints,
        local_world_size=local_world_size if groups is None else min(groups.size, local_world_size or groups.size),
        memory_per_rank_bytes=spec.memory_per_rank_bytes,
    )
    if groups is not None:
        from lightning_hybrid.parallel.table_groups import move_plan_to_group

        move_plan_to_group(plan, groups)
    summary = emb.plan_summary(plan)
    if fitting:
        refuse_multi_shard_dense_state(summary, kernels, user_optimizers, dist.get_rank())
    tables = ShardedTables(plan=plan, choice=choice, groups=groups)
    tables.modules = emb.shard_embeddings_in_place(model, plan=plan, env=env, device=device)
    if fitting and dist.get_world_size() > 1:
        from lightning_hybrid.parallel.lookup_load import LookupCounter

        tables.byte_counter = count_embedding_bytes()
        features = {f: info.table_name for info in infos for f in info.feature_names}
        replicas = layout.tensor_parallel * layout.pipeline_parallel  # (ranks that feed one batch)
        tables.lookup_counter = LookupCounter(plan, features, world=dist.get_world_size(), rank=dist.get_rank(), replicas=replicas)
        tables.lookup_counter.attach(tables.modules.values())
    for info in infos:
        if summary[info.table_name]["sharding_type"] == "data_parallel":
            tables.dp_table_params.append(model.get_parameter(info.weight_fqn))
    if tables.dp_table_params:
        # replicated tables must start equal on every rank: the user's values were loaded back
        # after torchrec's DDP (which broadcasts only at construction) was built
        data_parallel.broadcast_tensors([p.detach() for p in tables.dp_table_params], None)
    if validate_inputs:
        for fqn, module in tables.modules.items():
            emb.add_id_range_check(module, [i for i in infos if i.module_fqn == fqn])
    if layout.tensor_parallel > 1 or layout.pipeline_parallel > 1:
        # the ranks of one dp replica share one batch: each looks up a slice of it, then they
        # gather (parallel.replica_lookup); under pipelining only the first stage has a
        # gradient for it, so gradients are summed over the replica's ranks and scaled by pp
        # (torchrec divides table gradients by the world size)
        from lightning_hybrid.parallel.replica_lookup import split_lookup_over_group

        if layout.pipeline_parallel > 1:
            group, summed, scale = replica_group, True, float(layout.pipeline_parallel)
        else:
            group, summed, scale = mesh["tp"].get_group(), False, None
        for module in tables.modules.values():
            split_lookup_over_group(module, group, summed_grads=summed, grad_scale=scale)
    rank_zero_info(
        ("" if groups is None else f"HybridStrategy: tables sharded in {groups.copies} groups of {groups.size} ranks, one copy each\n")
        + "HybridStrategy embedding plan:\n"
        + "\n".join(f"  {t}: {s['sharding_type']} ({s['compute_kernel']}) on ranks {s['ranks']}" for t, s in summary.items())
    )
    return tables
