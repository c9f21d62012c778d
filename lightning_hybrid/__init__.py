"""lightning_hybrid: hybrid parallelism for PyTorch Lightning recommenders.

``Trainer(strategy=HybridStrategy(...))`` or, after ``import lightning_hybrid``,
``Trainer(strategy="hybrid")``.

Importing the package imports nothing heavy: `HybridStrategy` and `ParallelPlan` load on first
use, and ``"hybrid"`` is put in Lightning's strategy registry when ``lightning.pytorch`` is (or
once it gets) imported. So ``lightning-hybrid --help`` / ``convert`` / ``export`` / ``plan`` and a
script that imports one helper do not pay for Lightning and torchrec.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"
__all__ = ["HybridStrategy", "ParallelPlan", "__version__"]

_REGISTRY_MODULE = "lightning.pytorch.strategies"


def _strategy_class() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every torchrec import prints an unrelated `is_fx_tracing` warning
        from lightning_hybrid.strategies import HybridStrategy
    return HybridStrategy


def __getattr__(name: str) -> Any:
    if name == "HybridStrategy":
        return _strategy_class()
    if name == "ParallelPlan":
        from lightning_hybrid.plan import ParallelPlan

        return ParallelPlan
    raise AttributeError(f"module 'lightning_hybrid' has no attribute {name!r}")


def _make_hybrid(**kwargs: Any) -> Any:
    return _strategy_class()(**kwargs)


def _register(registry: Any) -> None:
    if "hybrid" not in registry:
        # a factory, not the class: the strategy's modules load when a Trainer asks for "hybrid"
        registry.register("hybrid", _make_hybrid, description="lightning_hybrid: torchrec-sharded embeddings + tensor/pipeline/data parallelism")


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Registers ``"hybrid"`` right after Lightning's strategy registry module is executed (the
    package was imported before Lightning was)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once; and let the other finders find the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _register(module.StrategyRegistry)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _REGISTRY_MODULE in sys.modules and hasattr(sys.modules[_REGISTRY_MODULE], "StrategyRegistry"):
    _register(sys.modules[_REGISTRY_MODULE].StrategyRegistry)
elif not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterLightning())
