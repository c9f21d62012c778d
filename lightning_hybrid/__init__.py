"""lightning_hybrid: hybrid parallelism for PyTorch Lightning recommenders.

``Trainer(strategy=HybridStrategy(...))`` or, after ``import lightning_hybrid``,
``Trainer(strategy="hybrid")``.
"""

import warnings as _warnings

from lightning.pytorch.strategies import StrategyRegistry as _StrategyRegistry

with _warnings.catch_warnings():
    # every torchrec import prints an unrelated `is_fx_tracing` warning
    _warnings.simplefilter("ignore")
    from lightning_hybrid.plan import ParallelPlan
    from lightning_hybrid.strategies import HybridStrategy

if HybridStrategy.strategy_name not in _StrategyRegistry:
    HybridStrategy.register_strategies(_StrategyRegistry)

__version__ = "0.1.0"
__all__ = ["HybridStrategy", "ParallelPlan", "__version__"]
