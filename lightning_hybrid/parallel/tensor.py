"""Tensor parallelism of transformer blocks with DTensor, on the mesh's ``tp`` axis.

A plan maps module-name patterns (``fnmatch`` style, relative to the module being parallelised,
e.g. ``"blocks.*.q"``) to torch's ParallelStyles or their names:

    plan = {"blocks.*.q": "colwise", "blocks.*.k": "colwise", "blocks.*.v": "colwise",
            "blocks.*.out": "rowwise", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
    apply_tensor_parallel(model, mesh["tp"], plan)

Column-wise layers keep their output local (each rank computes ``1/tp`` of the heads or of the MLP
width); the row-wise layer after them all-reduces, so every block's input and output stay
replicated on the ``tp`` axis and the rest of the model (norms, embeddings, loss) is unchanged.
`reference_plan` is the plan of `lightning_hybrid.models.blocks.CausalSelfAttentionBlock` stacks (either layout).
A plan may also be a callable ``plan(module, tp_mesh)`` that parallelises the module itself.

Style names (`STYLE_NAMES`):

- ``"colwise"`` / ``"rowwise"``: the pair above (Megatron-style split of attention and MLP).
- Loss-side projection (the output layer over the item vocabulary), two ways:
  ``"colwise_gathered"`` splits the weight and all-gathers the logits (any loss code works, the
  logits are whole on every rank); ``"vocab_parallel"`` keeps the logits split over the vocabulary
  as a DTensor and `HybridStrategy` runs forward and backward under torch's ``loss_parallel()``,
  so ``F.cross_entropy`` never materialises the full logits (the memory win for large catalogs).
- Sequence parallelism (optional): ``"sequence_split_input"`` on the first block of a stack and
  ``"sequence_gather_output"`` on its last (``"sequence_parallel_region"``: both, on a one-block stack)
  make the residual stream between them sharded along the
  sequence; ``"sequence_parallel"`` runs norms on those shards; ``"colwise_sp"`` all-gathers the
  sequence before a column-wise layer, ``"rowwise_sp"`` reduce-scatters after a row-wise one (the
  all-reduce of plain TP becomes an all-gather + a reduce-scatter, same bytes, 1/tp of the norm and
  residual activations per rank). The sequence length must be divisible by tp.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

StyleName = str
Plan = Mapping[str, ParallelStyle | StyleName] | Callable[[nn.Module, DeviceMesh], Any]


class _SequenceBoundary(ParallelStyle):
    """Re-lay the first positional input (``split``) or the output (``gather``) of a module on dim 1.

    Split: replicated -> this rank's sequence shard (backward all-gathers the gradient, so the
    replicated layers before it get the whole gradient). Gather: shards -> the whole sequence
    (backward keeps this rank's slice of the replicated gradient).
    """

    def __init__(self, *, split: bool, gather: bool) -> None:
        super().__init__()
        self.split = split
        self.gather = gather

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def relayout(x: torch.Tensor, src: Any, dst: Any) -> torch.Tensor:
            if x.shape[1] % device_mesh.size() != 0 and self.split:
                raise ValueError(
                    f"Sequence parallelism over tp={device_mesh.size()} needs the sequence length ({x.shape[1]}) to be "
                    f"divisible by {device_mesh.size()}. Pad the sequences or drop the sequence-parallel styles."
                )
            return DTensor.from_local(x, device_mesh, [src], run_check=False).redistribute(device_mesh, [dst]).to_local()

        if self.split:

            def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (relayout(args[0], Replicate(), Shard(1)), *args[1:])

            module.register_forward_pre_hook(pre_hook)
        if self.gather:

            def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
                return relayout(output, Shard(1), Replicate())

            module.register_forward_hook(hook)
        return module


_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.Dropout)
# name -> (style factory, module types it applies to; None: any module)
_STYLES: dict[str, tuple[Callable[[], ParallelStyle], tuple[type, ...] | None]] = {
    "colwise": (ColwiseParallel, (nn.Linear, nn.Embedding)),
    "rowwise": (RowwiseParallel, (nn.Linear, nn.Embedding)),
    "colwise_gathered": (lambda: ColwiseParallel(output_layouts=Replicate()), (nn.Linear,)),
    "vocab_parallel": (lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False), (nn.Linear,)),
    "sequence_parallel": (SequenceParallel, _NORMS),
    "colwise_sp": (lambda: ColwiseParallel(input_layouts=Shard(1)), (nn.Linear,)),
    "rowwise_sp": (lambda: RowwiseParallel(output_layouts=Shard(1)), (nn.Linear,)),
    "sequence_split_input": (lambda: _SequenceBoundary(split=True, gather=False), None),
    "sequence_gather_output": (lambda: _SequenceBoundary(split=False, gather=True), None),
    "sequence_parallel_region": (lambda: _SequenceBoundary(split=True, gather=True), None),
}
STYLE_NAMES = tuple(_STYLES)


def reference_plan(
    prefix: str = "blocks", *, sequence_parallel: bool = False, num_blocks: int | None = None, gated: bool = False
) -> dict[str, StyleName]:
    """Plan for a ``ModuleList`` of `CausalSelfAttentionBlock` at ``prefix`` (heads and MLP split).

    ``gated=True`` for the ``"ligr"`` layout: its SwiGLU ``gate`` splits column-wise like ``up``
    (the element-wise product then stays local); the residual gates stay replicated.

    ``sequence_parallel=True`` (needs ``num_blocks``) also shards the residual stream between the
    first and the last block along the sequence; the stack's input and output stay whole.
    """
    if not sequence_parallel:
        return {
            f"{prefix}.*.q": "colwise",
            f"{prefix}.*.k": "colwise",
            f"{prefix}.*.v": "colwise",
            f"{prefix}.*.out": "rowwise",
            f"{prefix}.*.up": "colwise",
            f"{prefix}.*.down": "rowwise",
            **({f"{prefix}.*.gate": "colwise"} if gated else {}),
        }
    if gated:
        raise ValueError("reference_plan(gated=True, sequence_parallel=True): LiGR's residual gates read whole sequences; use sequence_parallel=False.")
    if not num_blocks:
        raise ValueError("reference_plan(sequence_parallel=True) needs num_blocks (to gather after the last block).")
    boundaries = (
        {f"{prefix}.0": "sequence_parallel_region"}
        if num_blocks == 1
        else {f"{prefix}.0": "sequence_split_input", f"{prefix}.{num_blocks - 1}": "sequence_gather_output"}
    )
    return {
        **boundaries,
        f"{prefix}.*.attn_norm": "sequence_parallel",
        f"{prefix}.*.mlp_norm": "sequence_parallel",
        f"{prefix}.*.q": "colwise_sp",
        f"{prefix}.*.k": "colwise_sp",
        f"{prefix}.*.v": "colwise_sp",
        f"{prefix}.*.out": "rowwise_sp",
        f"{prefix}.*.up": "colwise_sp",
        f"{prefix}.*.down": "rowwise_sp",
    }


def loss_parallel_if(enabled: bool) -> Any:
    """torch's ``loss_parallel()`` (cross-entropy on vocabulary-split DTensor logits) when ``enabled``."""
    from contextlib import nullcontext

    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel() if enabled else nullcontext()


def uses_loss_parallel(plan: Any) -> bool:
    """Whether ``plan`` leaves logits split over the vocabulary (needs torch's ``loss_parallel()``)."""
    return isinstance(plan, Mapping) and any(style == "vocab_parallel" for style in plan.values())


def resolve_plan(module: nn.Module, plan: Mapping[str, ParallelStyle | StyleName]) -> dict[str, ParallelStyle]:
    """Expand patterns to concrete module names; raise on patterns that match nothing or bad styles."""
    names = [name for name, _ in module.named_modules() if name]
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        kinds: tuple[type, ...] | None = None
        if isinstance(style, str):
            if style not in _STYLES:
                raise ValueError(f"Tensor-parallel plan: unknown style {style!r} for {pattern!r}; use one of {list(_STYLES)} or a ParallelStyle.")
            make, kinds = _STYLES[style]
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
            if kinds is not None and not isinstance(module.get_submodule(name), kinds):
                raise ValueError(
                    f"Tensor-parallel plan: {name!r} is a {type(module.get_submodule(name)).__name__}; {style!r} "
                    f"applies to {' / '.join(k.__name__ for k in kinds)}."
                )
            if name in resolved:
                raise ValueError(f"Tensor-parallel plan: {name!r} is matched by more than one pattern (the last is {pattern!r}).")
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
    wrapped = [
        n for n, sub in module.named_modules()
        if type(sub).__module__.startswith("peft.") and any(fnmatch.fnmatchcase(n, pattern) for pattern in plan)
    ]
    if wrapped:
        raise ValueError(
            f"Tensor parallelism: {wrapped[:3]} are peft (LoRA) layers, which torch's tensor-parallel styles cannot split "
            "(each wraps the frozen base Linear and its low-rank adapters). With LoRA use data_parallel and "
            "pipeline_parallel (both compose with it and with sharded tables), or merge the adapters "
            "(model.merge_and_unload()) before training with tensor_parallel."
        )
    resolved = resolve_plan(module, plan)
    check_divisibility(module, tp_mesh.size())
    # output projections may split unevenly (DTensor pads); split heads and MLP widths may not
    uneven_ok = {
        name
        for pattern, style in plan.items()
        if style in ("vocab_parallel", "colwise_gathered")
        for name in resolved
        if fnmatch.fnmatchcase(name, pattern)
    }
    for name, style in resolved.items():
        if name in uneven_ok:
            continue
        sub = module.get_submodule(name)
        width = sub.out_features if isinstance(style, ColwiseParallel) and isinstance(sub, nn.Linear) else None
        if width is not None and width % tp_mesh.size() != 0:
            raise ValueError(f"Tensor parallelism: {name} has {width} output features, not divisible by tp={tp_mesh.size()}.")
    return parallelize_module(module, tp_mesh, resolved)


class TPByteCounter:
    """Bytes this rank sends in the tensor-parallel collectives of the layers it split, counted
    from the tensors that cross each layer boundary with the ring formulas (all-reduce of B bytes
    over t ranks: 2 (t-1)/t B; all-gather / reduce-scatter of a B-byte whole: (t-1)/t B):

    - ``colwise``: backward all-reduce of the input gradient; ``rowwise``: forward all-reduce of
      the output;
    - ``colwise_sp``: forward all-gather of the input, backward reduce-scatter of its gradient;
      ``rowwise_sp``: forward reduce-scatter of the output, backward all-gather of its gradient;
    - ``colwise_gathered``: forward all-gather of the output, plus the ``colwise`` backward.

    ``vocab_parallel`` (only small statistics of the loss) and user-given ParallelStyle objects
    are not counted.
    """

    def __init__(self) -> None:
        self.step = 0

    def take_step(self) -> int:
        value, self.step = self.step, 0
        return value


def count_tensor_parallel_bytes(module: nn.Module, plan: Any, tp_size: int) -> TPByteCounter:
    """Hook the layers of a (name-pattern) ``plan`` to count their tp collectives (see TPByteCounter)."""
    from lightning_hybrid.parallel.data import local_tensor

    counter = TPByteCounter()
    if not isinstance(plan, Mapping) or tp_size < 2:
        return counter
    all_reduce = 2 * (tp_size - 1) / tp_size
    gather = (tp_size - 1) / tp_size

    def nbytes(t: Any) -> int:
        t = local_tensor(t) if isinstance(t, torch.Tensor) else t
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    names = [name for name, _ in module.named_modules() if name]
    for pattern, style in plan.items():
        if not isinstance(style, str):
            continue
        for name in (n for n in names if fnmatch.fnmatchcase(n, pattern)):
            sub = module.get_submodule(name)

            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, style: str = style) -> None:
                x = args[0] if args else None
                if style == "colwise":
                    counter.step += int(all_reduce * nbytes(x) * (1 if torch.is_grad_enabled() else 0))
                elif style == "rowwise":
                    counter.step += int(all_reduce * nbytes(out))
                elif style == "colwise_sp":
                    full = nbytes(x) * tp_size  # the input arrives as a sequence shard
                    counter.step += int(gather * full * (2 if torch.is_grad_enabled() else 1))
                elif style == "rowwise_sp":
                    full = nbytes(out) * tp_size
                    counter.step += int(gather * full * (2 if torch.is_grad_enabled() else 1))
                elif style == "colwise_gathered":
                    counter.step += int(gather * nbytes(out) + all_reduce * nbytes(x) * (1 if torch.is_grad_enabled() else 0))

            sub.register_forward_hook(hook)
    return counter


class TPWaitTimer:
    """Seconds this rank's host spends waiting for DTensor collectives (the tensor-parallel
    all-reduces, all-gathers and reduce-scatters, forward and backward): the tp communication that
    compute did not hide.

    torch's tensor-parallel styles issue their collectives asynchronously
    (``redistribute(async_op=True)``) and wait for them at the result's first use, through
    ``torch.distributed._functional_collectives.wait_tensor``; `time_tensor_parallel_waits` wraps
    that function with a clock. On CPU the wait blocks, so this is the waiting time; on CUDA it
    only orders streams and the host returns at once, so the timer is not meant for GPUs (the
    monitor does not install it there). Other DTensor collectives (e.g. a norm over DTensor shards
    in gradient clipping) are timed too; the monitor takes its reading before the optimizer phase.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def take(self) -> float:
        value, self.seconds = self.seconds, 0.0
        return value

    def close(self) -> None:
        """Stop timing; the last open timer puts torch's own function back."""
        if self in _WAIT_TIMERS:
            _WAIT_TIMERS.remove(self)
        if not _WAIT_TIMERS and _WAIT_ORIGINAL:
            import torch.distributed._functional_collectives as funcol

            funcol.wait_tensor = _WAIT_ORIGINAL.pop()


_WAIT_TIMERS: list[TPWaitTimer] = []
_WAIT_ORIGINAL: list[Callable[..., Any]] = []


def time_tensor_parallel_waits() -> TPWaitTimer:
    """A new `TPWaitTimer` for this process (installs the clock on the first one)."""
    import time

    import torch.distributed._functional_collectives as funcol

    timer = TPWaitTimer()
    if not _WAIT_TIMERS:
        original = funcol.wait_tensor
        _WAIT_ORIGINAL.append(original)

        def timed_wait_tensor(tensor: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = original(tensor)
            elapsed = time.perf_counter() - start
            for t in _WAIT_TIMERS:
                t.seconds += elapsed
            return out

        funcol.wait_tensor = timed_wait_tensor
    _WAIT_TIMERS.append(timer)
    return timer
