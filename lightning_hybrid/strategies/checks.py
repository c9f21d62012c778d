"""Per-step checks HybridStrategy runs on what the user's code produced, agreed on every rank.

- `nonfinite_verdict`: the ``nonfinite_loss`` policy (stop / skip / warn / off). One small
  all-reduce, so every rank reaches the same verdict and no rank waits in a backward collective
  that the others skipped.
- `check_replica_batch`: the ranks of one tensor/pipeline-parallel replica must train on the same
  batch; a sampler that splits over all ranks instead of the dp axis would silently mix halves.
- `refuse_unsharded_weight_averaging` (at setup): Lightning's weight averaging of an unsharded copy.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_hybrid.parallel.pipeline import batch_size_of


def nonfinite_verdict(loss: Tensor, *, policy: str, rank: int, world_size: int, step: int) -> bool:
    """True when this step's backward and update must be skipped (policy "skip" and a NaN/inf
    loss on some rank); raises FloatingPointError on every rank under "stop"."""
    if policy == "off":
        return False
    bad = torch.zeros(world_size, device=loss.device)
    bad[rank] = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
    if world_size > 1:
        dist.all_reduce(bad)
    ranks = [r for r, flag in enumerate(bad.tolist()) if flag]
    if not ranks:
        return False
    where = f"the training loss is not finite ({float(loss.detach().float().mean())} here) on rank(s) {ranks} at global step {step}"
    if policy == "stop":
        raise FloatingPointError(
            f"HybridStrategy: {where}. nonfinite_loss='stop' ends the run on every rank. Lower the learning "
            "rate, clip gradients (gradient_clip_val), check the batch, or set nonfinite_loss='skip' to drop such steps."
        )
    if policy == "warn":
        rank_zero_warn(f"HybridStrategy: {where}; training continues (nonfinite_loss='warn').")
        return False
    rank_zero_warn(f"HybridStrategy: {where}; the step is skipped on every rank (nonfinite_loss='skip').")
    return True


def tensors_in(batch: Any) -> Generator[Tensor, None, None]:
    """Every tensor of a batch (dicts, lists, tuples, KeyedJaggedTensors' values)."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from tensors_in(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from tensors_in(value)
    elif callable(getattr(batch, "values", None)) and isinstance(batch.values(), Tensor):
        yield batch.values()


def check_replica_batch(batch: Any, group: dist.ProcessGroup, device: torch.device) -> None:
    """Raise on every rank of ``group`` if its ranks were given different batches."""
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors_in(batch):
        total += tensor.detach().double().sum().cpu()
    mine = torch.tensor([float(batch_size_of(batch)), float(total)], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    if any(not torch.equal(p, parts[0]) for p in parts):
        members = dist.get_process_group_ranks(group)
        sizes = {r: int(p[0]) for r, p in zip(members, parts, strict=True)}
        raise ValueError(
            f"HybridStrategy: the ranks {members} of one tensor/pipeline-parallel replica got different training "
            f"batches (batch sizes by rank {sizes}; the contents differ too if the sizes agree). They must see the "
            "same batch: sample over the data-parallel axis only, with num_replicas and rank from "
            "trainer.strategy.distributed_sampler_kwargs (Lightning does this when it adds the sampler)."
        )


PREDICT_UNDER_PIPELINE = (
    "HybridStrategy: predict with pipeline_parallel > 1 and a pipeline_spec() is not supported (its stages run only "
    "inside a schedule). Checkpoints reshard on load: predict from the checkpoint with pipeline_parallel=1 (e.g. "
    "--trainer.strategy.init_args.pipeline_parallel=1)."
)


def refuse_unsharded_weight_averaging(callbacks: Any) -> None:
    """Lightning's `WeightAveraging` (`EMAWeightAveraging`, SWA) deep-copies the module before the
    strategy sets it up and averages it parameter by parameter with the set-up module, whose
    tables are shards and tp weights DTensors by then: refuse it, on every rank, naming the
    shard-aware callback with the same arguments."""
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    for callback in callbacks:
        if isinstance(callback, WeightAveraging):
            raise ValueError(
                f"HybridStrategy cannot run Lightning's {type(callback).__name__}: it averages a copy of the module made "
                "before HybridStrategy shards the tables and splits the weights (a whole copy of every table per rank, "
                "averaged against shards). Use lightning_hybrid.callbacks.EMAWeightAveraging (the same arguments: decay, "
                "update_every_n_steps, update_starting_at_step, update_starting_at_epoch), which averages each rank's shards."
            )

