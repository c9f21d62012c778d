"""Build the named DeviceMesh of a job from its `ParallelPlan`.

The mesh is the one place where ranks are assigned to axes; techniques ask it for their process
group (``mesh["dp"].get_group()``) instead of computing rank lists themselves.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_hybrid.plan import AXIS_NAMES, ParallelPlan


def build_device_mesh(plan: ParallelPlan, device_type: str) -> DeviceMesh:
    """Create the ``("pp", "dp", "tp")`` mesh for ``plan`` over the default process group.

    Every axis exists even when its size is 1, so code can always say ``mesh["tp"]``.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "build_device_mesh needs an initialized default process group; call "
            "torch.distributed.init_process_group first (HybridStrategy does this in setup_environment)."
        )
    plan.validate_world_size(torch.distributed.get_world_size())
    return init_device_mesh(device_type, plan.mesh_shape, mesh_dim_names=AXIS_NAMES)


def data_parallel_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's position on the data axis and the axis size (what a sampler needs)."""
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()
