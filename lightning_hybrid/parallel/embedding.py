"""Shard torchrec embedding modules in place, anywhere inside a model.

What this module adds on top of torchrec's ``shard_modules``:

* discovery: every `EmbeddingBagCollection` / `EmbeddingCollection` in the model is found by
  type, so a LightningModule needs no strategy-specific code;
* planning on every rank with the same deterministic planner (no collective), so a table that
  cannot be placed raises the same clear error on every rank instead of hanging a broadcast;
* sharders that allow ``row_wise`` on CPU (torchrec's default CPU sharder refuses it although the
  fused and dense CPU kernels compute it exactly) and the dense kernel for model-parallel tables;
* EmbeddingCollection tables on the dense kernel look up their local shard with torch
  (`use_torch_sequence_lookup`): fbgemm 1.8's dense unpooled lookup returns the wrong number of
  rows on CPU ("Split sizes doesn't match" in the output all-to-all, or heap corruption), so
  sequence tables could only run fused, with fbgemm's optimizers and no accumulation;
* weights survive sharding (torchrec re-initialises sharded tables; we load the pre-sharding state
  back, which splits full tensors into local shards);
* the pooled output keeps the unsharded key order (sharding reorders a KeyedTensor's keys, which
  silently breaks ``kt.values()`` in user code);
* optional input validation: an id outside its table raises a ValueError naming the feature,
  the id and the table size instead of reading out of bounds in a kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fbgemm_gpu.split_embedding_configs import SparseType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
    from torchrec.distributed.shard import shard_modules
    from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
    from torchrec.modules.embedding_modules import (
        EmbeddingBagCollection,
        EmbeddingBagCollectionInterface,
        EmbeddingCollection,
        EmbeddingCollectionInterface,
    )
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

#: The embedding module types HybridStrategy shards.
SHARDABLE_TYPES: tuple[type[nn.Module], ...] = (EmbeddingBagCollection, EmbeddingCollection)

#: Sharding type names users may force per table (torchrec's own `ShardingType` values).
SHARDING_TYPE_NAMES: tuple[str, ...] = (
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)

_MODEL_PARALLEL_TYPES = [
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
]


def _model_parallel_kernels(base: list[str]) -> list[str]:
    # torchrec lists only fused kernels for model-parallel tables ("TODO re-enable dense"); the dense
    # kernel computes them exactly too and is what keeps `.grad` for optimizers fbgemm cannot fuse.
    kernels = list(base)
    if EmbeddingComputeKernel.DENSE.value not in kernels:
        kernels.append(EmbeddingComputeKernel.DENSE.value)
    return kernels


class HybridEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """torchrec's EBC sharder with row_wise / table_row_wise and the dense kernel on every device."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        base = super().compute_kernels(sharding_type, compute_device_type)
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            return base
        return _model_parallel_kernels(base)


class HybridEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """torchrec's EC sharder, with the dense kernel allowed and data_parallel removed.

    torchrec 1.8 fails inside EmbeddingCollection data_parallel sharding (a ``split_with_sizes``
    error, also in 1.9), so the planner must never propose it.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [t for t in super().sharding_types(compute_device_type) if t != ShardingType.DATA_PARALLEL.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return _model_parallel_kernels(super().compute_kernels(sharding_type, compute_device_type))


def default_sharders() -> list[ModuleSharder[nn.Module]]:
    return [HybridEmbeddingBagCollectionSharder(), HybridEmbeddingCollectionSharder()]  # type: ignore[list-item]


@dataclass(frozen=True)
class TableInfo:
    """What the strategy needs to know of one table."""

    module_fqn: str
    table_name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]
    pooled: bool

    @property
    def weight_fqn(self) -> str:
        attr = "embedding_bags" if self.pooled else "embeddings"
        prefix = f"{self.module_fqn}." if self.module_fqn else ""
        return f"{prefix}{attr}.{self.table_name}.weight"


def find_embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Map FQN -> every shardable torchrec embedding module in ``model`` (outermost only).

    Raises ValueError for torchrec embedding modules of other types (their sharded variants
    need sharders and state handling this strategy does not provide), naming the module.
    """
    found: dict[str, nn.Module] = {}
    for fqn, module in model.named_modules():
        if any(fqn.startswith(f"{prefix}.") for prefix in found if prefix):
            continue
        if type(module) in SHARDABLE_TYPES:
            found[fqn] = module
        elif isinstance(module, (EmbeddingBagCollectionInterface, EmbeddingCollectionInterface)):
            raise ValueError(
                f"HybridStrategy cannot shard the embedding module '{fqn}' of type {type(module).__name__}: "
                f"only {', '.join(t.__name__ for t in SHARDABLE_TYPES)} are supported. Build the tables as a "
                f"plain EmbeddingBagCollection/EmbeddingCollection, or pass HybridStrategy(shard_embeddings=False) "
                f"to keep them replicated."
            )
    if "" in found and len(found) == 1 and model is found[""]:
        raise ValueError(
            "find_embedding_modules: the model itself is an embedding collection; wrap it in a parent module."
        )
    return found


def table_infos(modules: Mapping[str, nn.Module]) -> list[TableInfo]:
    infos: list[TableInfo] = []
    for fqn, module in modules.items():
        if isinstance(module, EmbeddingBagCollection):
            configs, pooled = module.embedding_bag_configs(), True
        else:
            assert isinstance(module, EmbeddingCollection)
            configs, pooled = module.embedding_configs(), False
        for config in configs:
            infos.append(
                TableInfo(
                    module_fqn=fqn,
                    table_name=config.name,
                    num_embeddings=config.num_embeddings,
                    embedding_dim=config.embedding_dim,
                    feature_names=tuple(config.feature_names),
                    pooled=pooled,
                )
            )
    names = [info.table_name for info in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Embedding table names must be unique across the model for sharding constraints, found "
            f"{duplicates} in several modules. Rename the tables (EmbeddingBagConfig(name=...))."
        )
    return infos


@dataclass
class EmbeddingShardingSpec:
    """User requests for sharding, validated against the model's tables.

    Attributes:
        sharding_types: table name -> forced sharding type (a torchrec `ShardingType` value).
        compute_kernels: table name -> forced compute kernel ("fused" or "dense").
        constraints: full torchrec `ParameterConstraints` per table (merged under the above).
        memory_per_rank_bytes: capacity the planner may use per rank for tables (None: torchrec's
            default for the device).
        shard_group_size: shard the tables inside groups of this many ranks (``"node"``: one node's
            processes), one copy per group (`lightning_hybrid.parallel.table_groups`); None: all ranks.
    """

    sharding_types: dict[str, str] = field(default_factory=dict)
    compute_kernels: dict[str, str] = field(default_factory=dict)
    constraints: dict[str, ParameterConstraints] = field(default_factory=dict)
    memory_per_rank_bytes: int | None = None
    shard_group_size: int | str | None = None  # ranks per copy of the tables (`parallel.table_groups`)


def validate_sharding_types(sharding_types: Mapping[str, str]) -> None:
    """Reject unknown sharding type names before any process is started."""
    for table, sharding_type in sharding_types.items():
        if sharding_type not in SHARDING_TYPE_NAMES:
            raise ValueError(
                f"Unknown sharding type {sharding_type!r} for table {table!r}. "
                f"Use one of {list(SHARDING_TYPE_NAMES)} (torchrec ShardingType values)."
            )


def build_constraints(
    infos: Iterable[TableInfo], spec: EmbeddingShardingSpec, kernels: Mapping[str, str]
) -> dict[str, ParameterConstraints]:
    """Merge forced sharding types, the kernels chosen for each table and user constraints."""
    infos = list(infos)
    by_name = {info.table_name: info for info in infos}
    validate_sharding_types(spec.sharding_types)
    for source, mapping in (
        ("embedding_sharding", spec.sharding_types),
        ("embedding_kernels", spec.compute_kernels),
        ("embedding_constraints", spec.constraints),
    ):
        unknown = sorted(set(mapping) - set(by_name))
        if unknown:
            raise ValueError(
                f"HybridStrategy({source}=...) names tables {unknown} that the model does not have. "
                f"Known tables: {sorted(by_name)}."
            )
    for table, kernel in spec.compute_kernels.items():
        if kernel not in (EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.DENSE.value):
            raise ValueError(
                f"Unknown compute kernel {kernel!r} for table {table!r}; use 'fused' or 'dense'."
            )

    constraints: dict[str, ParameterConstraints] = {}
    for info in infos:
        base = spec.constraints.get(info.table_name)
        sharding_type = spec.sharding_types.get(info.table_name)
        kernel = kernels[info.table_name]
        if sharding_type == ShardingType.DATA_PARALLEL.value and not info.pooled:
            raise ValueError(
                f"Table {info.table_name!r} belongs to an EmbeddingCollection, which torchrec 1.8 cannot shard "
                f"data_parallel (it fails inside torchrec). Use table_wise, row_wise or column_wise for it."
            )
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            # data_parallel tables always use the dense kernel; their grads go through DDP.
            kernel = EmbeddingComputeKernel.DENSE.value
        sharding_types = [sharding_type] if sharding_type else (base.sharding_types if base else None)
        if sharding_types is None and kernel == EmbeddingComputeKernel.FUSED.value:
            # a fused table cannot be data_parallel (that path has only the dense kernel)
            sharding_types = list(_MODEL_PARALLEL_TYPES)
        compute_kernels = [kernel]
        if base is not None and base.compute_kernels and not spec.compute_kernels.get(info.table_name):
            compute_kernels = list(base.compute_kernels)
        if base is not None:
            merged = ParameterConstraints(**{**base.__dict__})
            merged.sharding_types = sharding_types
            merged.compute_kernels = compute_kernels
        else:
            merged = ParameterConstraints(sharding_types=sharding_types, compute_kernels=compute_kernels)
        constraints[info.table_name] = merged
    return constraints


def plan_sharding(
    model: nn.Module,
    *,
    env: ShardingEnv,
    device: torch.device,
    constraints: Mapping[str, ParameterConstraints],
    local_world_size: int | None = None,
    memory_per_rank_bytes: int | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
) -> ShardingPlan:
    """Run torchrec's planner locally (deterministic, same answer on every rank)."""
    caps: dict[str, Any] = {}
    if memory_per_rank_bytes is not None:
        caps = {"hbm_cap": memory_per_rank_bytes} if device.type == "cuda" else {"ddr_cap": memory_per_rank_bytes}
    topology = Topology(
        world_size=env.world_size,
        compute_device=device.type,
        local_world_size=local_world_size,
        **caps,
    )
    # torchrec's planner refuses the dense kernel for model-parallel tables ("DENSE kernel requires
    # DATA_PARALLEL"), although the sharded modules run it exactly. Plan placement with the fused
    # kernel, then switch the tables that must keep `.grad` back to dense.
    dense_tables = set()
    planner_constraints = {}
    for table, cons in constraints.items():
        kernels = list(cons.compute_kernels or [])
        mp_types = [t for t in (cons.sharding_types or _MODEL_PARALLEL_TYPES) if t != ShardingType.DATA_PARALLEL.value]
        if kernels == [EmbeddingComputeKernel.DENSE.value] and cons.sharding_types != [ShardingType.DATA_PARALLEL.value]:
            dense_tables.add(table)
            cons = ParameterConstraints(**{**cons.__dict__})
            cons.compute_kernels = [EmbeddingComputeKernel.FUSED.value]
            cons.sharding_types = mp_types if cons.sharding_types is not None else None
        planner_constraints[table] = cons
    planner = EmbeddingShardingPlanner(topology=topology, constraints=planner_constraints)
    try:
        plan = planner.plan(model, sharders or default_sharders())
    except PlannerError as err:
        raise ValueError(
            f"torchrec's planner could not place the embedding tables on {env.world_size} ranks "
            f"({device.type}): {err}\nFix: give the tables more room (more ranks, "
            f"HybridStrategy(embedding_memory_per_rank=...)), allow other sharding types "
            f"(HybridStrategy(embedding_sharding=...)), or shrink the tables."
        ) from None
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():  # type: ignore[union-attr]
            if table in dense_tables and sharding.sharding_type != ShardingType.DATA_PARALLEL.value:
                sharding.compute_kernel = EmbeddingComputeKernel.DENSE.value
    return plan


def plan_sharding_on_rank0(
    model: nn.Module,
    *,
    env: ShardingEnv,
    device: torch.device,
    constraints: Mapping[str, ParameterConstraints],
    local_world_size: int | None = None,
    memory_per_rank_bytes: int | None = None,
) -> ShardingPlan:
    """Plan on rank 0 and broadcast the plan, or the planner's error, to every rank.

    torchrec's planner is not guaranteed to give every rank the same answer (it reads per-process
    environment such as LOCAL_WORLD_SIZE), and ranks with different plans deadlock while creating
    process groups. Broadcasting the error too makes every rank raise it at once.
    """
    import torch.distributed as dist

    outcome: list[Any] = [None]
    if env.rank == 0:
        try:
            outcome[0] = plan_sharding(
                model,
                env=env,
                device=device,
                constraints=constraints,
                local_world_size=local_world_size,
                memory_per_rank_bytes=memory_per_rank_bytes,
            )
        except ValueError as err:
            outcome[0] = err
    if dist.is_initialized() and env.world_size > 1:
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(env.process_group, 0) if env.process_group else 0, group=env.process_group)
    if isinstance(outcome[0], BaseException):
        raise ValueError(str(outcome[0])) from None
    return outcome[0]


def plan_summary(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """table -> {module, sharding_type, compute_kernel, ranks}: a printable view of a ShardingPlan."""
    summary: dict[str, dict[str, Any]] = {}
    for module_fqn, module_plan in plan.plan.items():
        for table, sharding in module_plan.items():  # type: ignore[union-attr]
            summary[table] = {
                "module": module_fqn,
                "sharding_type": sharding.sharding_type,
                "compute_kernel": sharding.compute_kernel,
                "ranks": list(sharding.ranks) if sharding.ranks is not None else None,
            }
    return summary


def shard_embeddings_in_place(
    model: nn.Module,
    *,
    plan: ShardingPlan,
    env: ShardingEnv,
    device: torch.device,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
) -> dict[str, nn.Module]:
    """Replace the planned embedding modules of ``model`` by their sharded variants.

    Returns FQN -> sharded module. The tables keep the values they had before sharding.
    """
    originals = {fqn: model.get_submodule(fqn) for fqn in plan.plan}
    # the values to put back, on the host: a clone on the GPU would hold a second whole table there
    saved = {fqn: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for fqn, m in originals.items()}
    key_orders = {
        fqn: [f for cfg in m.embedding_bag_configs() for f in cfg.feature_names]
        for fqn, m in originals.items()
        if isinstance(m, EmbeddingBagCollection)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shard_modules(model, env=env, device=device, plan=plan, sharders=sharders or default_sharders())
    sharded = {fqn: model.get_submodule(fqn) for fqn in plan.plan}
    for module in sharded.values():
        use_torch_sequence_lookup(module)
        # the ranks holding this module's shards (all ranks, or a table group: `table_groups`)
        module.hybrid_shard_group = env.process_group
    for fqn, module in sharded.items():
        # torchrec initialises sharded tables afresh; put the user's values back (full -> local shards).
        module.load_state_dict(saved[fqn], strict=False)
        if fqn in key_orders:
            module.register_forward_hook(_restore_key_order(key_orders[fqn]))
    return sharded


def _torch_sequence_lookup(kernel: nn.Module, features: KeyedJaggedTensor) -> torch.Tensor:
    """What fbgemm's dense lookup with ``PoolingMode.NONE`` computes: one row per id, in the order
    of ``features.values()`` (key by key), read from this rank's shards by ``F.embedding`` on views
    of the kernel's flat weight, so the gradient lands in that weight's ``.grad``."""
    emb = kernel._emb_module
    weights = emb.weights
    out = []
    for f, ids in enumerate(features.values().split(features.length_per_key())):
        rows, dim = emb.embedding_specs[kernel._feature_table_map[f]]
        offset = int(emb.weights_physical_offsets[kernel._feature_table_map[f]])
        out.append(nn.functional.embedding(ids.long(), weights[offset : offset + rows * dim].view(rows, dim)))
    if not out:
        return weights.new_zeros(0, 0)
    return torch.cat(out).to(torch.float32 if emb.output_dtype == SparseType.FP32.as_int() else weights.dtype)


def use_torch_sequence_lookup(module: nn.Module) -> int:
    """Route the dense-kernel lookups of a sharded EmbeddingCollection through
    `_torch_sequence_lookup` (the module docstring says why); returns how many were changed.
    Fused kernels and pooled (EmbeddingBagCollection) lookups are left to fbgemm."""
    import types

    from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbedding

    changed = 0
    for lookup in getattr(module, "_lookups", []):
        inner = getattr(lookup, "module", lookup)  # (a lookup may be wrapped in DDP)
        for kernel in getattr(inner, "_emb_modules", []):
            if isinstance(kernel, BatchedDenseEmbedding):
                kernel.forward = types.MethodType(_torch_sequence_lookup, kernel)
                changed += 1
    return changed


class ReorderedKeyedTensor(KeyedTensor):
    """A sharded module's pooled output presented in the unsharded key order, copying only if needed.

    ``to_dict()`` and ``kt[key]`` are served from the sharded output without a copy; ``values()``
    (the concatenation in key order, which user code often reshapes) is built once, on first use.
    """

    def __init__(self, source: KeyedTensor, keys: list[str]) -> None:
        self._source = source
        lengths = dict(zip(source.keys(), source.length_per_key(), strict=True))
        super().__init__(
            keys=keys,
            length_per_key=[lengths[k] for k in keys],
            values=None,  # type: ignore[arg-type] - built lazily by the property below
            key_dim=source.key_dim(),
        )

    @property  # type: ignore[override]
    def _values(self) -> torch.Tensor:
        if self._ordered_values is None:
            self._ordered_values = torch.cat([self._source[k] for k in self._keys], dim=self._key_dim)
        return self._ordered_values

    @_values.setter
    def _values(self, value: torch.Tensor | None) -> None:
        self._ordered_values = value

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._source[key]

    def to_dict(self) -> dict[str, torch.Tensor]:
        source = self._source.to_dict()
        return {k: source[k] for k in self._keys}

    def device(self) -> torch.device:
        return self._source.device()


def _restore_key_order(keys: list[str]):  # noqa: ANN202 - a hook factory
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if hasattr(output, "wait") and not isinstance(output, KeyedTensor):
            output = output.wait()
        if not isinstance(output, KeyedTensor) or output.keys() == keys:
            return output
        return ReorderedKeyedTensor(output, keys)

    return hook


def add_id_range_check(module: nn.Module, infos: Iterable[TableInfo]) -> Any:
    """Check every KJT fed to ``module`` against its tables' sizes (raises ValueError, names the id).

    Returns the hook handle.
    """
    limits: dict[str, tuple[int, str]] = {}
    for info in infos:
        for feature in info.feature_names:
            limits[feature] = (info.num_embeddings, info.table_name)

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        features = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(features, KeyedJaggedTensor):
            check_ids(features, limits)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _to_host(stats: torch.Tensor) -> list[int]:
    """The one device-to-host copy (one sync on CUDA) of an id check."""
    return stats.tolist()


def check_ids(features: KeyedJaggedTensor, limits: Mapping[str, tuple[int, str]]) -> None:
    """Raise ValueError if a feature is unknown or an id falls outside its table.

    Every statistic is computed on the ids' device and read back in one copy, so the check costs
    one host sync per lookup on CUDA (not one per feature); the KJT's cached host metadata (keys,
    strides) is used as is, so nothing is synced to find the features' boundaries."""
    keys = features.keys()
    unknown = [k for k in keys if k not in limits]
    if unknown:
        raise ValueError(
            f"Batch has features {unknown} that no embedding table reads (known: {sorted(limits)}). "
            f"Add them to a table's feature_names or drop them from the KeyedJaggedTensor."
        )
    values = features.values()
    if values.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"Feature ids must be int32 or int64, got {values.dtype} for features {keys}. Build the "
            f"KeyedJaggedTensor from integer ids (e.g. values=torch.tensor(ids, dtype=torch.long))."
        )
    raw_lengths = features.lengths()
    if raw_lengths.numel() == 0 or not keys:
        if values.numel():
            raise ValueError(f"KeyedJaggedTensor of features {keys}: no lengths but {values.numel()} values.")
        return
    device, n_keys = values.device, len(keys)
    lengths = raw_lengths.to(torch.int64)
    # each key's number of ids: its lengths are the next stride_per_key() entries (host metadata)
    per_key = torch.stack([part.sum() for part in lengths.split(features.stride_per_key())])
    # which key each id belongs to (well defined even when the lengths are wrong: that is reported first)
    value_key = torch.bucketize(torch.arange(values.numel(), device=device), per_key.cumsum(0), right=True).clamp_(max=n_keys - 1)
    ids = values.to(torch.int64)
    big = torch.iinfo(torch.int64).max
    low = torch.full((n_keys,), big, dtype=torch.int64, device=device).scatter_reduce_(0, value_key, ids, "amin")
    high = torch.full((n_keys,), -big, dtype=torch.int64, device=device).scatter_reduce_(0, value_key, ids, "amax")
    stats = _to_host(torch.cat([lengths.min().view(1), lengths.sum().view(1), per_key, low, high]))
    min_length, total = stats[0], stats[1]
    per_key_n, lows, highs = stats[2:2 + n_keys], stats[2 + n_keys:2 + 2 * n_keys], stats[2 + 2 * n_keys:]
    if min_length < 0:
        raise ValueError(f"KeyedJaggedTensor of features {keys} has a negative length ({min_length}).")
    if total != values.numel():
        raise ValueError(
            f"KeyedJaggedTensor of features {keys}: its lengths add up to {total} ids but it holds "
            f"{values.numel()} values. Build it with KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)."
        )
    for key, count, lo, hi in zip(keys, per_key_n, lows, highs, strict=True):
        if count == 0:
            continue
        size, table = limits[key]
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"Feature {key!r} has id {bad}, outside table {table!r} of {size} rows (valid ids: 0..{size - 1}). "
                f"Fix the data (remap or hash ids into range) or enlarge the table (num_embeddings)."
            )
