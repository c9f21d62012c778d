"""Automatic parallel planning: a cost model of a training step, calibrated on the machine at
hand, a search over hybrid layouts, and a simulator for clusters larger than this one.

- `Cluster` (`cluster.py`): nodes, devices, links; presets and YAML.
- `ModelSpec`, `Layout`, `CostModel` (`cost.py`): what a step costs, by part, and its memory.
- `calibrate` (`calibrate.py`): fit the model's multipliers to measured step times;
  `load_calibration` reads them back from the JSON file the benchmark writes.
- `search`, `candidate_layouts`, `single_mode_layouts` (`search.py`): ranked layouts that fit.
"""

from lightning_hybrid.planner.calibrate import Measurement, calibrate, load_calibration, relative_errors
from lightning_hybrid.planner.cluster import PRESETS, Cluster, DeviceSpec, Link, load_cluster, preset
from lightning_hybrid.planner.cost import (
    CostModel,
    Estimate,
    Layout,
    ModelSpec,
    all_gather_time,
    all_reduce_time,
    all_to_all_time,
    send_time,
)
from lightning_hybrid.planner.search import (
    best,
    candidate_layouts,
    search,
    single_mode_layouts,
)

__all__ = [
    "PRESETS", "Cluster", "CostModel", "DeviceSpec", "Estimate", "Layout", "Link", "Measurement", "ModelSpec",
    "all_gather_time", "all_reduce_time", "all_to_all_time", "best", "calibrate", "candidate_layouts", "preset",
    "load_calibration", "load_cluster", "relative_errors", "search", "send_time", "single_mode_layouts",
]
