"""Data parallelism for the dense part of a model whose embedding tables are sharded.

Two ways, chosen with ``HybridStrategy(dense_parallel=...)``: DDP (replicated weights, gradients
all-reduced; fastest while the dense model fits) or FSDP2 (weights, gradients and optimizer state
sharded over ``dp``, gathered block by block; for dense models that do not fit replicated).

DDP replicates and all-reduces what is dense; the sharded embedding modules must be hidden from
it: their parameters are not replicated (each rank holds different rows or tables) and torchrec's
table slices are not autograd leaves, which DDP cannot hook. Replicated (data_parallel) tables
are synchronised by torchrec itself (it wraps their lookup in a DDP of its own, over the world).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def names_under(module: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Names of the parameters and buffers of ``module`` inside the submodules ``prefixes``."""
    def inside(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(f"{p}.") for p in prefixes)

    names = [n for n, _ in module.named_parameters(remove_duplicate=False) if inside(n)]
    names += [n for n, _ in module.named_buffers(remove_duplicate=False) if inside(n)]
    return names


def wrap_dense_data_parallel(
    module: nn.Module,
    *,
    ignored_modules: Sequence[str],
    process_group: dist.ProcessGroup | None,
    device: torch.device,
    find_unused_parameters: bool = False,
    static_graph: bool = False,
    gradient_as_bucket_view: bool = True,
) -> nn.Module:
    """Wrap ``module`` in DDP over ``process_group``, leaving out everything under ``ignored_modules``.

    Returns ``module`` itself when nothing dense is left to synchronise.
    """
    ignored = names_under(module, ignored_modules)
    ignored_set = set(ignored)
    dense = [p for n, p in module.named_parameters() if n not in ignored_set and p.requires_grad]
    if not dense:
        return module
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module,
        device_ids=device_ids,
        process_group=process_group,
        broadcast_buffers=needs_buffer_broadcast(module, ignored_set),
        find_unused_parameters=find_unused_parameters,
        static_graph=static_graph,
        gradient_as_bucket_view=gradient_as_bucket_view,
    )


def needs_buffer_broadcast(module: nn.Module, ignored: set[str]) -> bool:
    """Whether DDP must re-broadcast buffers before every forward: only when a persistent buffer
    outside ``ignored`` exists (e.g. BatchNorm's running statistics, which forward changes). A
    model whose only buffers are non-persistent constants (masks, position ids) skips a
    broadcast per buffer and forward (the weights and buffers are made equal once at setup)."""
    persistent = set(module.state_dict(keep_vars=True))
    return any(name in persistent and name not in ignored for name, _ in module.named_buffers())


def broadcast_tensors(tensors: Iterable[torch.Tensor], process_group: dist.ProcessGroup | None, src_rank: int = 0) -> None:
    """Overwrite ``tensors`` with the values of the group's first rank (in place)."""
    if not dist.is_initialized():
        return
    group_src = dist.get_global_rank(process_group, src_rank) if process_group is not None else src_rank
    for tensor in tensors:
        dist.broadcast(tensor, src=group_src, group=process_group)


def broadcast_dense_state(
    module: nn.Module, *, ignored_modules: Sequence[str], process_group: dist.ProcessGroup | None
) -> None:
    """Make dense parameters and buffers equal to rank 0's (what DDP's constructor does when fitting)."""
    ignored = set(names_under(module, ignored_modules))
    tensors = [local_tensor(p.detach()) for n, p in module.named_parameters() if n not in ignored]
    tensors += [b for n, b in module.named_buffers() if n not in ignored]
    broadcast_tensors(tensors, process_group)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (tensor parallelism keeps replicas of a shard on the dp axis), or the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_dense_fully(
    module: nn.Module,
    *,
    ignored_modules: Sequence[str],
    dp_mesh: DeviceMesh,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 (``fully_shard``) over ``dp_mesh`` for the dense part of ``module``, in place.

    Every ``nn.ModuleList`` element outside ``ignored_modules`` (transformer blocks, MLP layers)
    becomes its own FSDP unit, so only one block's full weights exist at a time; the root gets
    the rest. Sharded embedding modules are left out (``ignored_params``): torchrec owns them.
    Tensor-parallel DTensor weights (on the ``tp`` axis of the same mesh) are sharded further
    over ``dp`` (2-D FSDP + TP). Returns ``module`` (its class now also an ``FSDPModule``).
    """
    from torch.distributed.fsdp import fully_shard

    ignored_names = set(names_under(module, ignored_modules))
    ignored = {p for n, p in module.named_parameters() if n in ignored_names}
    prefixes = tuple(f"{p}." for p in ignored_modules if p)
    if "" in ignored_modules:
        return module  # the whole module is an embedding module: nothing dense to shard
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList) or name.startswith(prefixes) or name in ignored_modules:
            continue
        for block in sub:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    return module


def has_dtensor_parameters(module: torch.nn.Module) -> bool:
    """Whether ``module`` already holds DTensor parameters (it split itself, e.g. in configure_model)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())
