"""Pipeline parallelism for a module that describes nothing: its layer stack split over the pp
ranks, its own ``forward`` routed through them.

A LightningModule holding a Hugging Face decoder trains under ``pipeline_parallel > 1`` without a
`PipelineSpec`: the ``nn.ModuleList`` named in the model's ``config.base_model_pp_plan`` (or the
``pipeline_layers`` option) is cut into ``pp`` contiguous stages, and pp rank ``r`` keeps only the
layers of stage ``r`` (the others become `RoutedElsewhere` placeholders, which hold nothing).
Every rank then runs the module's ``training_step`` / ``validation_step`` / ``predict_step``
unchanged; when the forward reaches the layers:

- stage ``r > 0`` replaces the hidden state at its first layer by the one stage ``r - 1`` sends
  (its own copy, computed by the layers it does not hold, is ignored);
- stage ``r < pp - 1`` sends the output of its last layer to stage ``r + 1``;
- after the last layer the last stage broadcasts the hidden state to every pp rank, so what comes
  after the layers (final norm, item head, loss, metrics) runs on every rank, as written.

Backward retraces the route: the broadcast's gradients are summed on the last stage, each stage
sends the gradient of its input to the previous one. Every pp rank computes the same loss, so
the strategy backpropagates ``loss / pp`` on each (``loss_scale``); the parameters outside the
layers (input projection, final norm, head: one copy per pp rank) then hold ``1/pp`` of their
gradient from each rank's head and the whole gradient of the input side on stage 0 only, and
`sum_shared_gradients` sums them over the pp group after the last backward of a step, so every
copy takes the same, single-process update. torchrec-sharded tables are excluded: their lookup
backward runs on every rank together (`lightning_hybrid.parallel.replica_lookup` sums it over the
pp ranks).

What it costs: the stages run one after another on each batch (no microbatches interleaved, the
bubble is ``(pp - 1) / pp``), and the layers outside this rank cost nothing but the input side
and the head run on every pp rank. So it buys memory (each rank holds ``1/pp`` of the layers and
their optimizer state), not throughput. For a scheduled pipeline (GPipe, 1F1B, interleaved,
zero-bubble) give the module a ``pipeline_spec()`` (`lightning_hybrid.parallel.pipeline`;
`lightning_hybrid.models.llm_rec.LLMRec` has one).

Layers must take the hidden state first (positionally or as ``hidden_states=``) and return a
tensor of the same shape, or a tuple whose first element is one (Hugging Face decoder layers do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_hybrid.parallel.pipeline import (
    check_stage_count,
    even_split,
    parameters_outside,
    stage_ranges,
    sum_gradients,
)


class RoutedElsewhere(nn.Module):
    """Stands in for a layer another pp rank holds: no parameters; returns the hidden state it is
    given (which the stage that holds the next layers replaces by the one it receives). Plain
    attributes of the layer it replaces (``attention_type``, ``layer_idx``) are kept, since model
    code reads them while looping over the layers."""

    def __init__(self, layer: nn.Module, name: str, stage: int, broadcast: LayerPipeline | None) -> None:
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (str, int, float, bool)) and key != "training":
                setattr(self, key, value)
        self.name = name
        self.stage = stage
        self._broadcast = [broadcast] if broadcast is not None else []  # a list: not a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = _hidden_of(args, kwargs)
        if self._broadcast:  # the last layer: every rank takes part in the broadcast
            return self._broadcast[0].broadcast_output(hidden)
        return hidden


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise TypeError("lightning_hybrid.parallel.layer_pipeline: a layer was called without a hidden state (first argument or hidden_states=).")


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (hidden, *output[1:])
    raise TypeError(
        f"lightning_hybrid.parallel.layer_pipeline: a layer returned {type(output).__name__}; layers split without a "
        "pipeline_spec() must return the hidden state (a tensor, or a tuple starting with it)."
    )


def _first_output(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class _Receive(torch.autograd.Function):
    """Forward: the hidden state from ``src``; backward: its gradient back to ``src``. The local
    input gets a zero gradient, so this rank's input side (collective table lookups included)
    still runs its backward."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, _anchor: torch.Tensor | None, src: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.src, ctx.group = src, group
        out = torch.empty_like(local, memory_format=torch.contiguous_format)
        dist.recv(out, src=src, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        dist.send(grad.contiguous(), dst=ctx.src, group=ctx.group)
        return torch.zeros_like(grad), None, None, None


class _Send(torch.autograd.Function):
    """Forward: send the hidden state to ``dst`` (and pass it on); backward: the gradient ``dst``
    sends back replaces the one arriving here (which is zero: the next layers are elsewhere)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, _anchor: torch.Tensor | None, dst: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dst, ctx.group = dst, group
        dist.send(hidden.contiguous(), dst=dst, group=group)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.recv(out, src=ctx.dst, group=ctx.group)
        return out, None, None, None


class _Broadcast(torch.autograd.Function):
    """Forward: the last stage's hidden state on every pp rank; backward: the ranks' gradients
    summed on the last stage (zero for the others' local input)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, _anchor: torch.Tensor | None, src: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.src, ctx.group = src, group
        ctx.is_src = dist.get_rank() == src
        out = hidden.detach().clone(memory_format=torch.contiguous_format) if ctx.is_src else torch.empty_like(hidden, memory_format=torch.contiguous_format)
        dist.broadcast(out, src=src, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad = grad.contiguous().clone()
        dist.reduce(grad, dst=ctx.src, group=ctx.group)
        return (grad if ctx.is_src else torch.zeros_like(grad)), None, None, None


class LayerPipeline:
    """Splits ``model.get_submodule(layers_path)`` over ``pp_group`` and routes its forward (see
    the module docstring). Build it after tensor parallelism and table sharding, before the
    optimizer is created."""

    def __init__(
        self,
        model: nn.Module,
        layers_path: str,
        *,
        pp_group: dist.ProcessGroup,
        blocks_per_stage: Sequence[int] | None = None,
        shared_exclude: Sequence[str] = (),
    ) -> None:
        layers = model.get_submodule(layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"HybridStrategy(pipeline_layers={layers_path!r}): that is a {type(layers).__name__}, not an nn.ModuleList "
                "of layers. Name the ModuleList holding the model's layers."
            )
        self.model, self.layers_path, self.group = model, layers_path, pp_group
        self.pp, self.pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        check_stage_count(len(layers), self.pp)
        split = list(blocks_per_stage) if blocks_per_stage is not None else even_split(len(layers), self.pp)
        if len(split) != self.pp or sum(split) != len(layers) or min(split) < 1:
            raise ValueError(
                f"HybridStrategy(pipeline_split={split}) must give each of the {self.pp} stages at least one of the "
                f"{len(layers)} layers of {layers_path!r} and cover them all exactly."
            )
        self.blocks_per_stage = split
        self.ranks = [dist.get_global_rank(pp_group, s) for s in range(self.pp)]
        self.loss_scale = 1.0 / self.pp
        # makes the route's autograd nodes run whenever grad mode is on, even where nothing
        # before the layers requires grad (a neighbour waits for their send/receive)
        self._anchor = torch.zeros((), requires_grad=True)
        ranges = stage_ranges(split)
        mine = ranges[self.pp_rank]
        last = len(layers) - 1
        for i in range(len(layers)):
            stage = next(s for s, r in enumerate(ranges) if i in r)
            if stage != self.pp_rank:
                layers[i] = RoutedElsewhere(layers[i], f"{layers_path}.{i}", stage, self if i == last else None)
                continue
            layer = layers[i]
            if i == mine.start and stage > 0:
                layer.register_forward_pre_hook(self._receive_hook, with_kwargs=True)
            if i == mine.stop - 1 and stage < self.pp - 1:
                layer.register_forward_hook(self._send_hook)
            if i == last:
                layer.register_forward_hook(self._broadcast_hook)
        self.shared_params = parameters_outside(model, {id(p) for p in layers.parameters()}, shared_exclude)

    def _anchor_arg(self) -> torch.Tensor | None:
        return self._anchor if torch.is_grad_enabled() else None

    def _receive_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = _Receive.apply(_hidden_of(args, kwargs), self._anchor_arg(), self.ranks[self.pp_rank - 1], self.group)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _send_hook(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        sent = _Send.apply(_first_output(output), self._anchor_arg(), self.ranks[self.pp_rank + 1], self.group)
        return _replace_output(output, sent)

    def _broadcast_hook(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        return _replace_output(output, self.broadcast_output(_first_output(output)))

    def broadcast_output(self, hidden: torch.Tensor) -> torch.Tensor:
        return _Broadcast.apply(hidden, self._anchor_arg(), self.ranks[-1], self.group)

    def sum_shared_gradients(self) -> None:
        """Sum the gradients of the parameters outside the layers over the pp group (call once
        per optimizer step, after the last backward): one all-reduce for all of them."""
        if self.pp > 1:
            sum_gradients(self.shared_params, self.group)
