"""The parallel layout of a job: how many ranks go to each mesh axis.

One frozen, validated object (`ParallelPlan`) is the single source of truth for the degrees of
data, tensor and pipeline parallelism. Everything that needs a degree (the mesh, the sampler,
the embedding sharding environment) reads it from here, so a bad layout is refused once, at the
start, with a message naming the values and the fix, identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AxisSize = int | Literal["auto"]

#: Mesh axis names, outermost first. Tensor parallelism is innermost so that its frequent
#: collectives stay between neighbouring ranks (same node); pipeline is outermost because its
#: point-to-point traffic is the cheapest to send across nodes.
AXIS_NAMES: tuple[str, str, str] = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of parallelism along each mesh axis. Their product is the world size.

    Attributes:
        data_parallel: replicas of the dense model (the ``"dp"`` axis).
        tensor_parallel: ranks that split each transformer block (the ``"tp"`` axis).
        pipeline_parallel: pipeline stages (the ``"pp"`` axis).
    """

    data_parallel: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("data_parallel", "tensor_parallel", "pipeline_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"ParallelPlan: {name}={value!r} is not a positive integer. "
                    f"Give a whole number of ranks >= 1 (or 'auto' where the strategy accepts it)."
                )

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.tensor_parallel * self.pipeline_parallel

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        """Sizes in the order of `AXIS_NAMES`."""
        return (self.pipeline_parallel, self.data_parallel, self.tensor_parallel)

    def describe(self) -> str:
        return f"dp={self.data_parallel} x tp={self.tensor_parallel} x pp={self.pipeline_parallel}"

    def validate_world_size(self, world_size: int) -> None:
        """Raise if the plan does not use exactly ``world_size`` ranks."""
        if self.world_size != world_size:
            raise ValueError(
                f"ParallelPlan(data_parallel={self.data_parallel}, tensor_parallel={self.tensor_parallel}, "
                f"pipeline_parallel={self.pipeline_parallel}) uses {self.world_size} ranks, but the job has "
                f"world size {world_size} (devices x num_nodes). Make the product of the degrees equal "
                f"{world_size}, or set data_parallel='auto' to fill the remaining ranks."
            )

    @classmethod
    def resolve(
        cls,
        *,
        world_size: int,
        data_parallel: AxisSize = "auto",
        tensor_parallel: AxisSize = 1,
        pipeline_parallel: AxisSize = 1,
        devices_per_node: int | None = None,
    ) -> ParallelPlan:
        """Turn user-facing degrees (which may be ``"auto"``) into a validated plan.

        ``"auto"`` rules: tensor parallelism fills one node (``devices_per_node``, its collectives
        are the most bandwidth-hungry), pipeline parallelism defaults to 1, and data parallelism
        takes whatever ranks remain.
        """
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1.")
        tp = _resolve_axis("tensor_parallel", tensor_parallel, default=devices_per_node or 1)
        pp = _resolve_axis("pipeline_parallel", pipeline_parallel, default=1)
        if data_parallel == "auto":
            if world_size % (tp * pp) != 0:
                raise ValueError(
                    f"ParallelPlan: world size {world_size} is not divisible by tensor_parallel={tp} x "
                    f"pipeline_parallel={pp} = {tp * pp}, so data_parallel='auto' has no whole value. "
                    f"Choose degrees whose product divides {world_size}."
                )
            dp = world_size // (tp * pp)
        else:
            dp = _resolve_axis("data_parallel", data_parallel, default=1)
        plan = cls(data_parallel=dp, tensor_parallel=tp, pipeline_parallel=pp)
        plan.validate_world_size(world_size)
        if devices_per_node is not None and tp > 1 and devices_per_node % tp != 0 and tp % devices_per_node != 0:
            raise ValueError(
                f"ParallelPlan: tensor_parallel={tp} does not fit the node layout of {devices_per_node} devices "
                f"per node: a tensor-parallel group would straddle nodes unevenly. Use a tensor_parallel that "
                f"divides {devices_per_node}."
            )
        return plan


def _resolve_axis(name: str, value: AxisSize, *, default: int) -> int:
    if value == "auto":
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ParallelPlan: {name}={value!r} must be a positive integer or 'auto'.")
    return value
