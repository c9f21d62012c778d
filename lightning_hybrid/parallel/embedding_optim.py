"""Give sharded embedding tables the optimizer the user asked for in ``configure_optimizers``.

torchrec's fast path ("fused" kernel) updates tables inside backward with an fbgemm optimizer, so
the user's torch optimizer never sees them; with nothing configured fbgemm silently uses its own
SGD at lr 0.01. Here we read which torch optimizer and parameter group holds each table, and:

* translate it to the equivalent fbgemm optimizer where one exists with the *same* update rule on
  this device (SGD without momentum/decay; Adagrad without lr decay), and later forward the
  group's learning rate so LR schedulers reach the fused tables;
* Adam/AdamW on CUDA only when asked for (``embedding_kernels={table: "fused"}``): fbgemm's fused
  Adam is a *lazy* Adam, not torch's rule. It updates only the rows a batch looked up, so the
  moments of untouched rows do not decay and those rows do not move (torch's Adam moves every row
  with a non-zero moment every step), and it applies weight decay inside that update (decoupled,
  AdamW-style), so torch ``Adam(weight_decay=...)`` (an L2 term in the gradient) has no fused
  equivalent and is refused. By default these tables use the dense kernel and torch's optimizer;
* otherwise choose the "dense" kernel for that table: it keeps ``.grad``, so the user's own
  optimizer updates the table exactly (slower and more memory for very large tables). A warning
  names each such table and the reason, e.g. fbgemm has no fused Adam on CPU.

Gradient accumulation also forces the dense kernel: fused tables would update every micro-batch.
Sequence (EmbeddingCollection) tables follow the same rules: their dense kernel looks up with torch
(`lightning_hybrid.parallel.embedding.use_torch_sequence_lookup`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torchrec.optim as trec_optim

FUSED = "fused"
DENSE = "dense"


@dataclass(frozen=True)
class FusedTableOptimizer:
    """The fbgemm optimizer of one fused table and where its learning rate comes from."""

    optimizer_class: type[Optimizer]
    kwargs: dict[str, Any]
    #: (index of the user's optimizer, index of its param group) that held this table.
    source: tuple[int, int]


@dataclass(frozen=True)
class TableOptimizerChoice:
    kernels: dict[str, str]
    fused: dict[str, FusedTableOptimizer]
    #: table -> why it uses the dense kernel (empty when it was asked for or accumulation needs it)
    dense_reasons: dict[str, str]


LAZY_ADAM = (
    "fbgemm's fused Adam is a lazy Adam (it updates only the rows a batch looks up; untouched rows' moments do not "
    "decay), not torch's update rule; set embedding_kernels={table: 'fused'} to choose it"
)


def _translate(
    optimizer: Optimizer, group: Mapping[str, Any], device_type: str, *, allow_lazy: bool = False
) -> tuple[type[Optimizer], dict[str, Any]] | str:
    """Return the fbgemm optimizer class and kwargs with torch's rule (or, with ``allow_lazy``,
    fbgemm's lazy Adam for Adam/AdamW on CUDA), or a reason why there is none."""
    name = type(optimizer).__name__
    lr = float(group["lr"])
    if group.get("maximize", False):
        return f"{name}(maximize=True) has no fused equivalent"
    if type(optimizer) is torch.optim.SGD:
        if group.get("momentum", 0) or group.get("weight_decay", 0) or group.get("nesterov", False):
            return "fbgemm's fused SGD has no momentum, nesterov or weight_decay"
        return trec_optim.SGD, {"lr": lr}
    if type(optimizer) is torch.optim.Adagrad:
        if group.get("lr_decay", 0) or group.get("initial_accumulator_value", 0) or group.get("weight_decay", 0):
            return "fbgemm's fused Adagrad has no lr_decay, initial_accumulator_value or weight_decay"
        return trec_optim.Adagrad, {"lr": lr, "eps": float(group["eps"])}
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        if device_type != "cuda":
            return f"fbgemm has no fused {name} on {device_type} (only SGD and Adagrad variants run fused on CPU)"
        if not allow_lazy:
            return LAZY_ADAM
        if group.get("amsgrad", False):
            return "fbgemm's fused Adam has no amsgrad"
        beta1, beta2 = group["betas"]
        kwargs: dict[str, Any] = {"lr": lr, "beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"])}
        weight_decay = float(group.get("weight_decay", 0.0))
        if weight_decay and type(optimizer) is torch.optim.Adam:
            return (
                f"torch Adam(weight_decay={weight_decay}) adds an L2 term to the gradient, while fbgemm's lazy Adam applies "
                "weight decay inside its update (decoupled); use AdamW for the table, or weight_decay=0"
            )
        if weight_decay:
            from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode  # (fbgemm 1.8)

            kwargs["weight_decay"] = weight_decay
            kwargs["weight_decay_mode"] = WeightDecayMode.DECOUPLE
        return trec_optim.Adam, kwargs
    return f"{name} has no fused fbgemm equivalent"


def choose_table_optimizers(
    *,
    optimizers: Sequence[Optimizer],
    table_weights: Mapping[str, nn.Parameter],
    device_type: str,
    accumulate_grad_batches: int,
    forced_kernels: Mapping[str, str],
    data_parallel_tables: Sequence[str] = (),
) -> TableOptimizerChoice:
    """Decide fused vs dense per table from the user's optimizers (built on the unsharded model).
    Pooled and sequence (EmbeddingCollection) tables alike: the dense kernel of sequence tables
    looks up with torch (`lightning_hybrid.parallel.embedding.use_torch_sequence_lookup`)."""
    from lightning_hybrid.optim import GroupedOptimizer

    # id(param) -> (index of the optimizer, index of the group in its param_groups, the torch
    # optimizer whose update rule applies: a GroupedOptimizer's sub-optimizer)
    owner: dict[int, tuple[int, int, Optimizer]] = {}
    for opt_idx, optimizer in enumerate(optimizers):
        for group_idx, group in enumerate(optimizer.param_groups):
            rule = optimizer.optimizer_of_group(group_idx)[0] if isinstance(optimizer, GroupedOptimizer) else optimizer
            for param in group["params"]:
                owner.setdefault(id(param), (opt_idx, group_idx, rule))

    kernels: dict[str, str] = {}
    fused: dict[str, FusedTableOptimizer] = {}
    reasons: dict[str, str] = {}
    for table, weight in table_weights.items():
        if id(weight) not in owner:
            raise ValueError(
                f"Embedding table {table!r} is in no optimizer returned by configure_optimizers(), so it would "
                f"never train (or train with fbgemm's default SGD). Include the table's parameters in an "
                f"optimizer, or remove the table from the model."
            )
        opt_idx, group_idx, optimizer = owner[id(weight)]
        forced = forced_kernels.get(table)
        if table in data_parallel_tables:
            kernels[table] = DENSE
            continue
        translated = _translate(optimizer, optimizers[opt_idx].param_groups[group_idx], device_type, allow_lazy=forced == FUSED)
        if forced == DENSE:
            kernels[table] = DENSE
            continue
        if isinstance(translated, str):
            if forced == FUSED:
                raise ValueError(
                    f"HybridStrategy(embedding_kernels={{{table!r}: 'fused'}}) is impossible: the table's optimizer "
                    f"is {type(optimizer).__name__} and {translated}. Use an SGD/Adagrad group for the table "
                    f"(AdamW or Adam without weight decay on CUDA), or let the strategy use the dense kernel."
                )
            kernels[table] = DENSE
            reasons[table] = translated
            continue
        if accumulate_grad_batches > 1 and forced != FUSED:
            kernels[table] = DENSE
            reasons[table] = (
                f"accumulate_grad_batches={accumulate_grad_batches}: fused tables update every micro-batch"
            )
            continue
        kernels[table] = FUSED
        cls, kwargs = translated
        fused[table] = FusedTableOptimizer(optimizer_class=cls, kwargs=kwargs, source=(opt_idx, group_idx))
    return TableOptimizerChoice(kernels=kernels, fused=fused, dense_reasons=reasons)


def apply_fused_optimizers(table_weights: Mapping[str, nn.Parameter], choice: TableOptimizerChoice) -> None:
    """Attach the fbgemm optimizer spec to each fused table (read by torchrec's sharder)."""
    from torch.distributed.optim import _apply_optimizer_in_backward

    for table, spec in choice.fused.items():
        _apply_optimizer_in_backward(spec.optimizer_class, [table_weights[table]], dict(spec.kwargs))


def sync_fused_learning_rates(
    fused_optimizers: Mapping[str, Any],
    choice: TableOptimizerChoice,
    optimizers: Sequence[Optimizer],
) -> None:
    """Copy each source param group's current lr into the fused tables it drives.

    Called before every training forward: fbgemm captures the learning rate when the forward
    runs and applies the update during backward, so the rate must be set before the forward; it
    is the lr the user's optimizer will use at this step's ``step()``.
    """
    for table, spec in choice.fused.items():
        fused = fused_optimizers.get(table)
        if fused is None:
            continue
        opt_idx, group_idx = spec.source
        lr = optimizers[opt_idx].param_groups[group_idx]["lr"]
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        changed = False
        for group in fused.param_groups:
            # fbgemm keeps the rate in float32: compare loosely so an unchanged rate is not reset every step
            if not math.isclose(float(group.get("lr", float("nan"))), lr, rel_tol=1e-6):
                group["lr"] = lr
                changed = True
        if changed:
            # torchrec's fused optimizers push param_groups[..]["lr"] into the fbgemm module in step();
            # the update itself already happened in backward, so step() only sets the rate.
            fused.step()
