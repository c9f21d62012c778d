"""`GroupedOptimizer`: several torch optimizers behind one, for Lightning's automatic optimization.

Recommenders often want one optimizer for the dense network (Adam) and another for embedding
tables (Adagrad, which fbgemm runs fused inside backward). Lightning's automatic optimization
accepts a single optimizer; this class presents several as one:

    def configure_optimizers(self):
        return GroupedOptimizer([
            torch.optim.Adam(self.mlp.parameters(), lr=1e-3),
            torch.optim.Adagrad(self.tables.parameters(), lr=0.05),
        ])

``param_groups`` are the sub-optimizers' own group dicts (so LR schedulers and HybridStrategy's
learning-rate forwarding act on the real ones), ``state`` routes each parameter to the optimizer
that owns it, and ``step``/``zero_grad``/``state_dict`` go to every sub-optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer


class _RoutedState(MutableMapping):
    """``optimizer.state`` view that reads and writes the owning sub-optimizer's state."""

    def __init__(self, owner: GroupedOptimizer) -> None:
        self._owner = owner

    def _target(self, param: torch.Tensor) -> Optimizer:
        return self._owner.optimizer_of(param)

    def __getitem__(self, param: torch.Tensor) -> Any:
        return self._target(param).state[param]

    def __setitem__(self, param: torch.Tensor, value: Any) -> None:
        self._target(param).state[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._target(param).state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for optimizer in self._owner.optimizers:
            yield from list(optimizer.state.keys())

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._owner.optimizers)


class GroupedOptimizer(Optimizer):
    """Several optimizers acting as one (see the module docstring)."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:  # noqa: D107 - see class docstring
        if not optimizers or not all(isinstance(o, Optimizer) for o in optimizers):
            raise TypeError(f"GroupedOptimizer needs a non-empty list of torch optimizers, got {optimizers!r}.")
        self.optimizers = list(optimizers)
        self.reindex()
        # deliberately not calling Optimizer.__init__: groups and state belong to the sub-optimizers
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_step_post_hooks = {}  # type: ignore[assignment]
        self._optimizer_state_dict_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_state_dict_post_hooks = {}  # type: ignore[assignment]
        self._optimizer_load_state_dict_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_load_state_dict_post_hooks = {}  # type: ignore[assignment]

    def reindex(self) -> None:
        """Learn again which sub-optimizer holds each parameter (after parameters were added to or
        removed from their groups, e.g. by `lightning_hybrid.balance.adaptive`)."""
        self._owner: dict[int, Optimizer] = {}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) in self._owner:
                        raise ValueError("GroupedOptimizer: a parameter appears in two optimizers; give each parameter to one.")
                    self._owner[id(param)] = optimizer

    def optimizer_of(self, param: torch.Tensor) -> Optimizer:
        return self._owner[id(param)]

    def optimizer_of_group(self, group_index: int) -> tuple[Optimizer, int]:
        """(sub-optimizer, its own group index) for an index into ``param_groups``."""
        for optimizer in self.optimizers:
            if group_index < len(optimizer.param_groups):
                return optimizer, group_index
            group_index -= len(optimizer.param_groups)
        raise IndexError(group_index)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:  # Optimizer internals may assign; groups stay owned below
        pass

    @property  # type: ignore[override]
    def state(self) -> _RoutedState:
        return _RoutedState(self)

    @state.setter
    def state(self, value: Any) -> None:
        pass

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for optimizer, sub in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(sub)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("GroupedOptimizer: add the group to one of its optimizers instead.")

    def __repr__(self) -> str:
        inner = ", ".join(type(o).__name__ for o in self.optimizers)
        return f"GroupedOptimizer({inner})"


def fused_kernels_apply(params: Sequence[torch.nn.Parameter]) -> bool | None:
    """True when torch's fused Adam kernel can step every one of ``params`` (floating point, on a
    device with the kernel: CPU and CUDA among them), else None (torch's own default).

    Why: on CPU torch's default is the per-tensor loop, which for a large dense layer (a separate
    100k-item output, 6.4M parameters) costs ~5x the fused kernel's time per step, time in which
    the rank neither computes the model nor communicates; torchtitan picks fused for the same reason.
    The kernel steps each param group's tensors in one call, so plain tensors and DTensors (tensor
    parallelism, FSDP2) must not share a group ("mixed torch.Tensor and DTensor"):
    `network_and_table_optimizer` gives each kind its own."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    ok = bool(params) and all(torch.is_floating_point(p) and p.device.type in devices for p in params)
    return True if ok else None


def network_and_table_optimizer(
    params: Iterator[torch.nn.Parameter] | Sequence[torch.nn.Parameter],
    tables: Sequence[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    table_optimizer: str,
    table_lr: float,
) -> GroupedOptimizer:
    """Adam (AdamW with ``weight_decay``; torch's fused kernel where it applies: `fused_kernels_apply`)
    for every parameter of ``params`` outside ``tables``, and ``table_optimizer`` for the embedding
    tables: Adagrad, which HybridStrategy runs fused inside backward on CPU and GPU, or Adam, on the
    dense kernel (torch's rule) unless fused is asked for."""
    from torch.distributed.tensor import DTensor

    table_ids = {id(p) for p in tables}
    dense = [p for p in params if id(p) not in table_ids]
    # Two param groups, plain tensors then DTensors, one possibly empty: torch steps each group with
    # one kernel call, which cannot mix the two (fused_kernels_apply); and the groups stay the same
    # whether the DTensors exist yet or not (FSDP2 makes them after HybridStrategy's probe of this
    # optimizer, whose group indices drive the fused tables' learning rates).
    groups = [{"params": [p for p in dense if not isinstance(p, DTensor)]}, {"params": [p for p in dense if isinstance(p, DTensor)]}]
    fused = fused_kernels_apply(dense)
    # the same betas with and without decay: turning weight_decay on must change only the decay
    if weight_decay:
        dense_opt: Optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, fused=fused)
    else:
        dense_opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.98), fused=fused)
    if table_optimizer == "adagrad":
        # torch's fused Adagrad runs on CPU only; a table it steps at all is one HybridStrategy
        # keeps on the dense kernel (replicated, or sharded in table groups): fused there too
        cpu = all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in tables)
        table_opt: Optimizer = torch.optim.Adagrad(tables, lr=table_lr, fused=fused_kernels_apply(tables) if cpu else None)
    else:
        table_opt = torch.optim.Adam(tables, lr=table_lr, betas=(0.9, 0.98))
    return GroupedOptimizer([dense_opt, table_opt])
