"""Cluster descriptions for the planner: devices, their compute and memory, and the links between them.

A `Cluster` is what the cost model needs to price a step: how many nodes and devices per node,
each device's peak FLOP/s and memory (and the fraction of peak real kernels reach), memory
bandwidth (optimizer updates and embedding gathers are memory-bound), and the bandwidth and
latency of the links inside a node and between nodes. Presets cover common machines; any
cluster loads from YAML:

.. code-block:: yaml

    nodes: 16
    devices_per_node: 8
    device: {name: H100-SXM, peak_flops: 9.89e14, memory_bytes: 8.0e10, efficiency: 0.45, memory_bandwidth: 3.35e12}
    intra_node: {bandwidth: 4.5e11, latency: 3.0e-6}     # NVLink, bytes/s per direction
    inter_node: {bandwidth: 5.0e10, latency: 1.0e-5}     # 400 Gb/s InfiniBand per device

Units: FLOP/s, bytes, bytes/s, seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _positive(owner: str, name: str, value: Any, *, integer: bool = False, at_most: float | None = None) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0 or (at_most is not None and value > at_most):
        bound = f" and at most {at_most}" if at_most is not None else ""
        raise ValueError(
            f"{owner}: {name}={value!r} must be a positive {'integer' if integer else 'number'}{bound}. "
            f"Fix the cluster description (units: FLOP/s, bytes, bytes/s, seconds)."
        )


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or one CPU process's share of a machine).

    Attributes:
        name: for reports.
        peak_flops: dense peak FLOP/s at the training precision.
        memory_bytes: memory a process may fill.
        efficiency: fraction of ``peak_flops`` transformer blocks reach (measured by calibration).
        memory_bandwidth: bytes/s for memory-bound work (optimizer updates, embedding gathers).
    """

    name: str
    peak_flops: float
    memory_bytes: float
    efficiency: float = 0.5
    memory_bandwidth: float = 1e12

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bytes", "memory_bandwidth"):
            _positive(f"DeviceSpec({self.name!r})", name, getattr(self, name))
        _positive(f"DeviceSpec({self.name!r})", "efficiency", self.efficiency, at_most=1.0)


@dataclass(frozen=True)
class Link:
    """A communication path: per-device bandwidth (bytes/s, one direction) and per-message latency (s)."""

    bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        _positive("Link", "bandwidth", self.bandwidth)
        if isinstance(self.latency, bool) or not isinstance(self.latency, (int, float)) or self.latency < 0:
            raise ValueError(f"Link: latency={self.latency!r} must be a number >= 0 (seconds).")


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical devices; devices in a node share ``intra_node`` links, nodes ``inter_node``.

    Attributes:
        nodes: number of nodes.
        devices_per_node: devices (processes) per node.
        device: what each device is.
        intra_node: link between devices of one node.
        inter_node: link between nodes (per device).
        cores_per_node: CPU machines only: processes beyond this share cores (compute slows down
            by ``cores_per_node / devices_per_node``); ``None`` for accelerators.
        name: for reports.
    """

    nodes: int
    devices_per_node: int
    device: DeviceSpec
    intra_node: Link
    inter_node: Link
    cores_per_node: int | None = None
    name: str = "cluster"

    def __post_init__(self) -> None:
        _positive(f"Cluster({self.name!r})", "nodes", self.nodes, integer=True)
        _positive(f"Cluster({self.name!r})", "devices_per_node", self.devices_per_node, integer=True)
        if self.cores_per_node is not None:
            _positive(f"Cluster({self.name!r})", "cores_per_node", self.cores_per_node, integer=True)
        for name, kind in (("device", DeviceSpec), ("intra_node", Link), ("inter_node", Link)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"Cluster({self.name!r}): {name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def compute_share(self) -> float:
        """Fraction of a device's speed one process gets (CPU processes sharing cores)."""
        if self.cores_per_node is None:
            return 1.0
        return min(1.0, self.cores_per_node / self.devices_per_node)

    def link_for(self, group_size: int, stride: int = 1) -> Link:
        """The slowest link a group of ``group_size`` ranks, ``stride`` apart in rank order, crosses."""
        span = (group_size - 1) * stride + 1
        return self.intra_node if span <= self.devices_per_node else self.inter_node

    # -- YAML -----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cluster:
        if not isinstance(data, dict):
            raise TypeError(f"A cluster description must be a mapping, got {type(data).__name__}.")
        if "preset" in data:
            base = preset(data["preset"])
            overrides = {k: v for k, v in data.items() if k != "preset"}
            data = {**dataclasses.asdict(base), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Cluster description: unknown keys {unknown}; known keys are {sorted(known)}.")
        missing = [k for k in ("nodes", "devices_per_node", "device", "intra_node", "inter_node") if k not in data]
        if missing:
            raise ValueError(f"Cluster description: missing {missing} (or start from a preset: preset: {sorted(PRESETS)[0]}).")
        try:
            device = data["device"] if isinstance(data["device"], DeviceSpec) else DeviceSpec(**_numbers(data["device"]))
            intra = data["intra_node"] if isinstance(data["intra_node"], Link) else Link(**_numbers(data["intra_node"]))
            inter = data["inter_node"] if isinstance(data["inter_node"], Link) else Link(**_numbers(data["inter_node"]))
        except TypeError as err:
            raise ValueError(f"Cluster description: {err}. See lightning_hybrid.planner.cluster for the fields.") from err
        rest = {k: v for k, v in data.items() if k not in ("device", "intra_node", "inter_node")}
        return cls(device=device, intra_node=intra, inter_node=inter, **rest)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Cluster:
        import yaml

        with open(path) as handle:
            data = yaml.safe_load(handle)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: {err}") from err


def _numbers(fields: Any) -> Any:
    """YAML 1.1 reads ``1.0e14`` (no sign in the exponent) as a string: accept it as a number."""
    if not isinstance(fields, dict):
        return fields
    out = {}
    for key, value in fields.items():
        if isinstance(value, str) and key != "name":
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Presets (published peak figures; efficiencies are typical, calibrate for real numbers)
# ----------------------------------------------------------------------------------------------

_H100 = DeviceSpec(name="H100-SXM-80GB", peak_flops=9.89e14, memory_bytes=80e9, efficiency=0.45, memory_bandwidth=3.35e12)
_A100 = DeviceSpec(name="A100-SXM-80GB", peak_flops=3.12e14, memory_bytes=80e9, efficiency=0.5, memory_bandwidth=2.0e12)

PRESETS: dict[str, Cluster] = {
    # DGX H100: NVLink 4 (450 GB/s per direction per GPU), one 400 Gb/s InfiniBand NIC per GPU
    "h100x8-ib400": Cluster(
        nodes=1, devices_per_node=8, device=_H100,
        intra_node=Link(bandwidth=4.5e11, latency=3e-6), inter_node=Link(bandwidth=5.0e10, latency=1e-5), name="h100x8-ib400",
    ),
    # DGX A100: NVLink 3 (300 GB/s per direction), 200 Gb/s HDR per GPU
    "a100x8-ib200": Cluster(
        nodes=1, devices_per_node=8, device=_A100,
        intra_node=Link(bandwidth=3.0e11, latency=3e-6), inter_node=Link(bandwidth=2.5e10, latency=1e-5), name="a100x8-ib200",
    ),
    # a small CPU box like the CI machines: 2 cores, gloo over loopback (calibrate for real figures)
    "cpu-2core": Cluster(
        nodes=1, devices_per_node=2, cores_per_node=2,
        device=DeviceSpec(name="cpu-core", peak_flops=5e10, memory_bytes=4e9, efficiency=0.3, memory_bandwidth=5e9),
        intra_node=Link(bandwidth=1e9, latency=5e-5), inter_node=Link(bandwidth=1e9, latency=5e-5), name="cpu-2core",
    ),
}


def preset(name: str) -> Cluster:
    if name not in PRESETS:
        raise ValueError(f"Unknown cluster preset {name!r}; presets are {sorted(PRESETS)}.")
    return PRESETS[name]


def load_cluster(name_or_path: str) -> Cluster:
    """A preset by name, or a cluster YAML file (what ``--cluster`` and ``HybridStrategy(cluster=...)`` take)."""
    return preset(name_or_path) if name_or_path in PRESETS else Cluster.from_yaml(name_or_path)
