"""The Lightning strategy (`HybridStrategy`) and what it is made of: its options and their rules
(`options`), the planner glue (`auto`), table sharding (`tables`), checkpoint assembly
(`checkpointing`) and per-step checks (`checks`)."""

from lightning_hybrid.strategies.hybrid import HybridStrategy
from lightning_hybrid.strategies.options import HybridOptions, validate

__all__ = ["HybridOptions", "HybridStrategy", "validate"]
