"""Lightning callbacks shipped with lightning_hybrid."""

from lightning_hybrid.callbacks.averaging import EMAWeightAveraging
from lightning_hybrid.callbacks.monitor import HybridMonitor
from lightning_hybrid.callbacks.predictions import MetricsSummary, RecommendationWriter

__all__ = ["EMAWeightAveraging", "HybridMonitor", "MetricsSummary", "RecommendationWriter"]
