"""Kept for imports written before the strategy became a package: see `lightning_hybrid.strategies`."""

from lightning_hybrid.strategies.hybrid import TORCHREC_IMPORT_ERROR, HybridStrategy

__all__ = ["TORCHREC_IMPORT_ERROR", "HybridStrategy"]
