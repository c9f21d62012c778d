"""Tensor parallelism of transformer blocks with DTensor, on the mesh's ``tp`` axis.

A plan maps module-name patterns (``fnmatch`` style, relative to the module being parallelised,
e.g. ``"blocks.*.q"``) to torch's ParallelStyles or their names:

    plan = {"blocks.*.q": "colwise", "blocks.*.k": "colwise", "blocks.*.v": "colwise",
            "blocks.*.out": "rowwise", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
    apply_tensor_parallel(model, mesh["tp"], plan)

Column-wise layers keep their output local (each rank computes ``1/tp`` of the heads or of the MLP
width); the row-wise layer after them all-reduces, so every block's input and output stay
replicated on the ``tp`` axis and the rest of the model (norms, embeddings, loss) is unchanged.
`reference_plan` is the plan of `lightning_hybrid.models.sasrec.CausalSelfAttentionBlock` stacks.
A plan may also be a callable ``plan(module, tp_mesh)`` that parallelises the module itself.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

StyleName = str
Plan = Mapping[str, ParallelStyle | StyleName] | Callable[[nn.Module, DeviceMesh], Any]

_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
}


def reference_plan(prefix: str = "blocks") -> dict[str, StyleName]:
    """Plan for a ``ModuleList`` of `CausalSelfAttentionBlock` at ``prefix`` (heads and MLP split)."""
    return {
        f"{prefix}.*.q": "colwise",
        f"{prefix}.*.k": "colwise",
        f"{prefix}.*.v": "colwise",
        f"{prefix}.*.out": "rowwise",
        f"{prefix}.*.up": "colwise",
        f"{prefix}.*.down": "rowwise",
    }


def resolve_plan(module: nn.Module, plan: Mapping[str, ParallelStyle | StyleName]) -> dict[str, ParallelStyle]:
    """Expand patterns to concrete module names; raise on patterns that match nothing or bad styles."""
    names = [name for name, _ in module.named_modules() if name]
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        if isinstance(style, str):
            if style not in _STYLES:
                raise ValueError(f"Tensor-parallel plan: unknown style {style!r} for {pattern!r}; use one of {sorted(_STYLES)} or a ParallelStyle.")
            make: Callable[[], ParallelStyle] = _STYLES[style]
        elif isinstance(style, ParallelStyle):
            make = lambda style=style: style  # noqa: E731 - a ready style object
        else:
            raise TypeError(f"Tensor-parallel plan: {pattern!r} maps to {style!r}, not a ParallelStyle or style name.")
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise ValueError(
                f"Tensor-parallel plan: pattern {pattern!r} matches no module of {type(module).__name__}. "
                f"Module names look like {names[:8]}{' ...' if len(names) > 8 else ''}."
            )
        for name in matches:
            if not isinstance(module.get_submodule(name), (nn.Linear, nn.Embedding)):
                raise ValueError(
                    f"Tensor-parallel plan: {name!r} is a {type(module.get_submodule(name)).__name__}; colwise/rowwise "
                    f"apply to nn.Linear and nn.Embedding."
                )
            resolved[name] = make()
    return resolved


def check_divisibility(module: nn.Module, tp_size: int) -> None:
    """Heads and projection widths must split evenly over the tp ranks."""
    for name, sub in module.named_modules():
        heads = getattr(sub, "num_heads", None)
        if isinstance(heads, int) and heads % tp_size != 0:
            raise ValueError(
                f"Tensor parallelism over {tp_size} ranks needs the number of heads of {name or 'the model'} "
                f"({heads}) to be divisible by {tp_size}. Change num_heads or tensor_parallel."
            )


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: Plan) -> nn.Module:
    """Parallelise ``module`` in place over ``tp_mesh`` (a 1-D mesh) according to ``plan``."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs the 1-D tp sub-mesh (mesh['tp']), got a {tp_mesh.ndim}-D mesh.")
    if callable(plan) and not isinstance(plan, Mapping):
        plan(module, tp_mesh)
        return module
    resolved = resolve_plan(module, plan)
    check_divisibility(module, tp_mesh.size())
    for name, style in resolved.items():
        sub = module.get_submodule(name)
        width = sub.out_features if isinstance(style, ColwiseParallel) and isinstance(sub, nn.Linear) else None
        if width is not None and width % tp_mesh.size() != 0:
            raise ValueError(f"Tensor parallelism: {name} has {width} output features, not divisible by tp={tp_mesh.size()}.")
    return parallelize_module(module, tp_mesh, resolved)
