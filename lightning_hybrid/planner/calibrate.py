"""Calibration: fit the cost model's multipliers to step times measured on the actual machine.

A first-principles estimate gets the shape right (what grows with what) but not a given machine's
constants: kernel efficiency at these sizes, gloo's CPU cost per byte, processes sharing cores,
the framework's fixed cost per step. `calibrate` keeps the model's features (compute, memory-bound
work, communication, a constant) and fits one multiplier each by least squares on *relative*
error over short profiling runs (a few layouts), so every layout counts alike whatever its speed.
Multipliers that come out negative are dropped and the rest refitted (non-negative least squares
by elimination).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_hybrid.planner.cluster import Cluster
from lightning_hybrid.planner.cost import DEFAULT_SCALE, FEATURES, CostModel, Layout, ModelSpec


@dataclass(frozen=True)
class Measurement:
    """One profiling run: the layout, the model and batch it trained, its median step time, and
    the cluster it ran on when that differs from the cost model's (e.g. 2 and 4 processes)."""

    model: ModelSpec
    layout: Layout
    step_s: float
    cluster: Cluster | None = None


def _on(cost: CostModel, m: Measurement) -> CostModel:
    return cost if m.cluster is None else dataclasses.replace(cost, cluster=m.cluster)


def calibrate(cost: CostModel, measurements: Sequence[Measurement]) -> CostModel:
    """A copy of ``cost`` whose multipliers fit ``measurements`` (at least as many as `FEATURES`)."""
    if len(measurements) < len(FEATURES):
        raise ValueError(
            f"calibrate: {len(measurements)} measurements cannot fit {len(FEATURES)} multipliers {list(FEATURES)}; "
            f"profile at least {len(FEATURES)} layouts."
        )
    unit = cost.with_scale(dict.fromkeys(FEATURES, 1.0))
    rows = []
    for m in measurements:
        if m.step_s <= 0:
            raise ValueError(f"calibrate: measured step time {m.step_s} of {m.layout.describe()} must be > 0.")
        features = _on(unit, m).estimate(m.model, m.layout).features
        rows.append([features[name] / m.step_s for name in FEATURES])
    a = np.array(rows)
    b = np.ones(len(measurements))
    active = list(range(len(FEATURES)))
    while True:
        solution, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        negative = [active[i] for i, value in enumerate(solution) if value < 0]
        if not negative:
            break
        active.remove(negative[0])
    scale = dict.fromkeys(FEATURES, 0.0)
    for index, value in zip(active, solution, strict=True):
        scale[FEATURES[index]] = float(value)
    return cost.with_scale(scale)


def load_calibration(path: str | os.PathLike[str]) -> dict[str, float]:
    """The multipliers (``{"scale": {feature: value}}``) in a calibration JSON file, as
    ``benchmarks/planner_accuracy.py --json`` writes it, checked: a file that is missing, not JSON,
    or whose scale names no known feature fails here naming the file and the fix, not later as a
    bare parse error or a cost model that prices every layout at zero."""
    fix = "write it with `benchmarks/planner_accuracy.py --json FILE` on this cluster, or leave the option unset"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise FileNotFoundError(f"planner calibration {str(path)!r} cannot be read ({err.strerror}): {fix}.") from err
    try:
        scale = json.loads(text)["scale"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"planner calibration {str(path)!r} is not a calibration file ({type(err).__name__}: {err}); expected "
            f'{{"scale": {{{", ".join(repr(f) + ": ..." for f in FEATURES)}}}}}: {fix}.'
        ) from err
    unknown = sorted(set(scale) - set(FEATURES)) if isinstance(scale, dict) else None
    if unknown is None or unknown or not all(isinstance(v, (int, float)) and v >= 0 for v in scale.values()):
        raise ValueError(
            f"planner calibration {str(path)!r}: scale {scale!r} must map the cost model's features "
            f"{list(FEATURES)} to multipliers >= 0{f' (unknown: {unknown})' if unknown else ''}: {fix}."
        )
    # a feature added to the cost model after the file was written keeps its default multiplier
    return {**DEFAULT_SCALE, **{name: float(value) for name, value in scale.items()}}


def relative_errors(cost: CostModel, measurements: Sequence[Measurement]) -> list[float]:
    """|predicted - measured| / measured for each measurement."""
    return [abs(_on(cost, m).estimate(m.model, m.layout).step_s - m.step_s) / m.step_s for m in measurements]
