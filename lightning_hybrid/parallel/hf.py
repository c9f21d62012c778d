"""Hugging Face ``transformers`` models inside a LightningModule: their own parallel plans.

A ``transformers`` model states how it splits: ``config.base_model_tp_plan`` maps module-name
patterns of its *base model* (e.g. ``LlamaModel``) to styles such as ``"colwise"`` and
``"rowwise"``. `tensor_parallel_plan_of` finds every such model inside a module (a backbone
attribute, a ``*ForCausalLM`` whose base model is ``.model``), prefixes the patterns with the
base model's path, and translates the style names to `lightning_hybrid.parallel.tensor`'s, so
``HybridStrategy(tensor_parallel=2)`` splits a user's Hugging Face backbone with no plan written.

Nothing here imports ``transformers``: models are recognised by their class hierarchy
(``PreTrainedModel``) and ``config`` attribute.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: Hugging Face tp style -> ours (`lightning_hybrid.parallel.tensor.STYLE_NAMES`)
HF_STYLES = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_rep": "colwise_gathered",  # split weight, output gathered to every rank
    "sequence_parallel": "sequence_parallel",
}


def is_pretrained_model(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__) and hasattr(module, "config")


def pretrained_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, model) of the outermost ``transformers`` models inside ``module`` (itself included)."""
    found: list[tuple[str, nn.Module]] = []
    for name, sub in module.named_modules():  # (parents come before their children)
        inside = any(p == "" or name.startswith(f"{p}.") for p, _ in found)
        if not inside and is_pretrained_model(sub):
            found.append((name, sub))
    return found


def _base_model(model: nn.Module) -> tuple[str, nn.Module]:
    """(path relative to ``model``, base model): ``model`` itself for a base model, else the
    submodule named by its ``base_model_prefix`` (``LlamaForCausalLM.model``)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        return prefix, base
    return "", model


def tensor_parallel_plan_of(module: nn.Module) -> dict[str, str] | None:
    """The tensor-parallel plan of the ``transformers`` models inside ``module``, in our style
    names and paths relative to ``module``; None when there is none (no such model, or its config
    has no ``base_model_tp_plan``). Raises ValueError for a style this package does not run."""
    plan: dict[str, str] = {}
    for path, model in pretrained_models(module):
        rel, base = _base_model(model)
        hf_plan: dict[str, Any] = dict(getattr(base.config, "base_model_tp_plan", None) or getattr(model.config, "base_model_tp_plan", None) or {})
        prefix = ".".join(p for p in (path, rel) if p)
        for pattern, style in hf_plan.items():
            ours = HF_STYLES.get(style)
            if ours is None:
                raise ValueError(
                    f"{type(model).__name__}.config.base_model_tp_plan asks for {style!r} at {pattern!r}, which "
                    f"lightning_hybrid does not run (known: {sorted(HF_STYLES)}). Pass HybridStrategy(tensor_parallel_plan=...) "
                    "with the styles you want for those modules."
                )
            plan[f"{prefix}.{pattern}" if prefix else pattern] = ours
    return plan or None


def check_divisible(module: nn.Module, degree: int) -> None:
    """Heads and key/value heads of every ``transformers`` model must split evenly over tp."""
    for _path, model in pretrained_models(module):
        config = model.config
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if isinstance(value, int) and value % degree:
                raise ValueError(
                    f"HybridStrategy(tensor_parallel={degree}): {type(model).__name__} has {name}={value}, which does not "
                    f"split over {degree} ranks. Use a tensor_parallel that divides {value}."
                )


def pipeline_layers_of(module: nn.Module) -> str | None:
    """The path (relative to ``module``) of the layer stack a ``transformers`` model's
    ``config.base_model_pp_plan`` names (its ``nn.ModuleList`` entry, e.g. ``backbone.layers``);
    None when no model inside ``module`` has one. Raises ValueError when several do."""
    found: list[str] = []
    for path, model in pretrained_models(module):
        rel, base = _base_model(model)
        pp_plan = getattr(base.config, "base_model_pp_plan", None) or getattr(model.config, "base_model_pp_plan", None) or {}
        submodules = dict(base.named_modules())
        for name in pp_plan:
            if isinstance(submodules.get(name), nn.ModuleList):
                found.append(".".join(p for p in (path, rel, name) if p))
    if len(found) > 1:
        raise ValueError(
            f"HybridStrategy(pipeline_parallel > 1): the module holds several Hugging Face layer stacks {found}; say which "
            "one to split with HybridStrategy(pipeline_layers=...)."
        )
    return found[0] if found else None
