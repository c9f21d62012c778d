"""Build the named DeviceMesh of a job from its `ParallelPlan`.

The mesh is the one place where ranks are assigned to axes; techniques ask it for their process
group (``mesh["dp"].get_group()``) instead of computing rank lists themselves.
"""

from __future__ import annotations

from typing import Any

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


def replica_group(mesh: DeviceMesh) -> torch.distributed.ProcessGroup:
    """The ranks of this rank's data-parallel replica: its pp x tp block of the mesh (they share
    one batch). Collective the first time: every rank creates every replica's group, in order."""
    import torch.distributed as dist

    pp, dp, tp = mesh.mesh.shape
    if tp == 1:
        return mesh["pp"].get_group()
    me = dist.get_rank()
    mine = None
    for d in range(dp):
        members = sorted(int(r) for r in mesh.mesh[:, d, :].flatten())
        group = dist.new_group(members)
        if me in members:
            mine = group
    assert mine is not None
    return mine


def _dp_rank_lists(mesh: DeviceMesh) -> list[list[int]]:
    """The global ranks of every dp group of the mesh, in one fixed order (every rank must create
    groups in the same order)."""
    grid = mesh.mesh  # [pp, dp, tp]
    return [[int(r) for r in grid[p, :, t]] for p in range(grid.shape[0]) for t in range(grid.shape[2])]


def data_parallel_node_groups(mesh: DeviceMesh, local_world_size: int) -> tuple[Any, Any]:
    """This rank's (within-node, across-node) subgroups of its dp group, a node being
    ``local_world_size`` consecutive ranks. Collective: every rank creates every dp group's."""
    from lightning_hybrid.comm.compress import node_groups

    me = torch.distributed.get_rank()
    mine: tuple[Any, Any] = (None, None)
    for ranks in _dp_rank_lists(mesh):
        groups = node_groups(ranks, local_world_size)
        if me in ranks:
            mine = groups
    return mine


def separate_data_parallel_group(mesh: DeviceMesh) -> torch.distributed.ProcessGroup:
    """A process group of this rank's dp ranks of its own, apart from the mesh's: collectives
    left in flight on it (async data parallelism) do not hold up the others (on NCCL, work on one
    communicator runs in order: an all-to-all queued behind an unfinished all-reduce waits for
    it). Collective: every rank creates every dp group's copy, in order."""
    import torch.distributed as dist

    me = dist.get_rank()
    mine = None
    for ranks in _dp_rank_lists(mesh):
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    assert mine is not None
    return mine
