"""Lightning callbacks shipped with lightning_hybrid."""

from lightning_hybrid.callbacks.predictions import MetricsSummary, RecommendationWriter

__all__ = ["MetricsSummary", "RecommendationWriter"]
