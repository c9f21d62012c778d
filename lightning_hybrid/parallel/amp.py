"""fp16 loss scaling (``precision="16-mixed"``) when gradients are sharded across ranks.

``torch.amp.GradScaler`` decides to skip a step from the gradients *this rank* holds. Once
gradients are shards (embedding tables, tensor-parallel or FSDP DTensors), an overflow may show
up on one rank only: that rank would skip the step while the others apply it, and the replicas
silently drift apart. `synchronize_found_inf` makes every rank see the overflow of any rank (the
same fix as FSDP1's ``ShardedGradScaler``, for every kind of sharding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def synchronize_found_inf(scaler: torch.amp.GradScaler, group: dist.ProcessGroup | None = None) -> None:
    """Patch ``scaler.unscale_`` so its overflow flags are the MAX over ``group`` (in place)."""
    if getattr(scaler, "_lightning_hybrid_synced", False):
        return
    original = scaler.unscale_

    def unscale_(optimizer: Any) -> None:
        original(optimizer)
        if not dist.is_initialized():
            return
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        # one flag per rank, whatever devices (or none) its gradients are on: every rank must
        # take part in the same single collective
        device = _flag_device(scaler, found)
        flag = torch.zeros((), device=device)
        for value in found.values():
            flag += value.to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        for value in found.values():
            value.copy_(flag.clamp(max=1).to(value.device))

    scaler.unscale_ = unscale_  # type: ignore[method-assign]
    scaler._lightning_hybrid_synced = True  # type: ignore[attr-defined]


def _flag_device(scaler: torch.amp.GradScaler, found: dict[Any, torch.Tensor]) -> torch.device:
    if found:
        return next(iter(found.values())).device
    if scaler._device == "cpu":
        return torch.device("cpu")
    return torch.device(scaler._device, torch.accelerator.current_device_index())
