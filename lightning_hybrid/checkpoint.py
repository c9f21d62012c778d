"""Checkpoints of sharded state with torch.distributed.checkpoint (DCP).

A checkpoint is a directory: DCP shards (every rank writes its own part of the sharded tables,
optimizer states and dense weights once) plus ``meta.pt`` (Lightning's loop, callback and
scheduler state, written by rank 0). Saving is collective and atomic: everything is written into
a temporary sibling directory that replaces the target only after every rank finished, so a crash
mid-save leaves the previous checkpoint intact and never a half-written one under the real name.

Optimizer state of model-parallel tables that use the dense kernel is per-rank (each rank holds
state for its own rows/columns); we wrap it in a ShardedTensor with the table's own sharding
metadata so DCP stores it shard-aware instead of keeping one rank's copy.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

META_FILENAME = "meta.pt"


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILENAME).is_file() and (path / ".metadata").is_file()


# ----------------------------------------------------------------------------------------------
# Gathering full tensors (for the spawn launcher and for export)
# ----------------------------------------------------------------------------------------------


def full_state_dict(module: nn.Module, *, dst: int = 0) -> dict[str, torch.Tensor]:
    """Collectively gather ``module.state_dict()`` with sharded tensors made whole on rank ``dst``.

    Every rank must call this; only ``dst`` gets a non-empty result. Entries that only other
    ranks hold (the layers of other pipeline stages) are sent to ``dst`` as well.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    full: dict[str, torch.Tensor] = {}
    mine: dict[str, torch.Tensor] = {}  # whole (non-table) entries of this rank
    gather_device = _collective_device()
    for key, value in module.state_dict().items():
        if isinstance(value, ShardedTensor) and _on_a_subgroup(value):
            whole = _gather_from_subgroup(value, dst)
            if rank == dst:
                full[key] = whole
        elif isinstance(value, ShardedTensor):
            # NCCL gathers device tensors only: the whole table lands on dst's device, then the CPU
            out = torch.empty(value.size(), dtype=value.dtype, device=gather_device) if rank == dst else None
            value.gather(dst=dst, out=out)
            if rank == dst:
                full[key] = out.cpu()  # type: ignore[union-attr]
        elif isinstance(value, DTensor):
            mine[key] = value.full_tensor().detach().cpu().clone()  # a Replicate full_tensor() is the live local tensor
        elif isinstance(value, torch.Tensor):
            mine[key] = value.detach().cpu().clone()
    if rank == dst:
        full.update(mine)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box: list[Any] = [set(mine) if rank == dst else None]
        dist.broadcast_object_list(box, src=dst)
        extra = {k: v for k, v in mine.items() if k not in box[0]}
        gathered: list[Any] = [None] * dist.get_world_size() if rank == dst else []
        dist.gather_object(extra, gathered if rank == dst else None, dst=dst)
        if rank == dst:
            for part in gathered:
                for key, value in (part or {}).items():
                    full.setdefault(key, value)
    return full


def _on_a_subgroup(value: ShardedTensor) -> bool:
    group = value._process_group
    return dist.is_initialized() and group is not None and dist.get_world_size(group) < dist.get_world_size()


def _gather_from_subgroup(value: ShardedTensor, dst: int) -> torch.Tensor | None:
    """A ShardedTensor spread over a group of ranks (one copy of the tables per group,
    `parallel.table_groups`) made whole on global rank ``dst``: torch's ``gather`` indexes its
    global placement ranks by group rank. The members of ``dst``'s group send their shards."""
    in_dst_group = dst in dist.get_process_group_ranks(value._process_group)
    mine = [(s.metadata.shard_offsets, s.tensor.detach().cpu()) for s in value.local_shards()] if in_dst_group else []
    gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == dst else []
    dist.gather_object(mine, gathered if dist.get_rank() == dst else None, dst=dst)
    if dist.get_rank() != dst:
        return None
    whole = torch.empty(value.size(), dtype=value.dtype)
    for part in gathered:
        for offsets, tensor in part or []:
            whole[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))] = tensor
    return whole


def _collective_device() -> torch.device:
    """Where tensors handed to the default group's collectives must live (NCCL: this rank's GPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Optimizer state keyed by parameter name, shard-aware
# ----------------------------------------------------------------------------------------------


def param_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in ``module`` (every alias of a shared parameter included)."""
    return {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}


def local_parts(value: Any) -> list[torch.Tensor]:
    """What this rank holds of a state-dict value, as views (writing them writes the value): a
    ShardedTensor's local shards (none, one, or several per rank), a DTensor's local tensor, a
    plain tensor itself."""
    if isinstance(value, ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    if isinstance(value, DTensor):
        return [value.to_local()]
    return [value]


def like_with_parts(template: Any, parts: list[torch.Tensor]) -> Any:
    """A state-dict value with ``template``'s sharding (ShardedTensor metadata, DTensor mesh and
    placements) around this rank's ``parts`` (as `local_parts` lists them): what DCP saves or
    loads shard-aware, e.g. an averaged copy of the weights."""
    if isinstance(template, ShardedTensor):
        shards = [Shard(tensor=t, metadata=s.metadata) for t, s in zip(parts, template.local_shards(), strict=True)]
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, template.metadata(), process_group=template._process_group)
    (local,) = parts
    if isinstance(template, DTensor):
        return DTensor.from_local(local, template.device_mesh, template.placements, run_check=False, shape=template.shape, stride=template.stride())
    return local


def cloned_like(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a state dict with the same sharding, that later training steps cannot change."""
    return {k: like_with_parts(v, [p.detach().clone() for p in local_parts(v)]) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _local_sharded_like(template: ShardedTensor, local: torch.Tensor) -> ShardedTensor:
    if len(template.local_shards()) > 1:
        raise NotImplementedError(
            "Optimizer state of a dense-kernel table with several shards on one rank cannot be "
            "checkpointed yet; use one shard per rank (e.g. row_wise) or the fused kernel."
        )
    return like_with_parts(template, [local] if template.local_shards() else [])


def optimizer_state_dict(
    module: nn.Module,
    optimizer: Optimizer,
    sharded_params: Mapping[str, ShardedTensor],
) -> dict[str, Any]:
    """``{"state": {param_name: {...}}, "param_groups": [...]}`` with shard-aware tensors.

    ``sharded_params`` maps parameter names whose local tensor is a shard to the ShardedTensor
    that describes the whole table (from ``module.state_dict()``).
    """
    names = param_names(module)
    state: dict[str, dict[str, Any]] = {}
    for param, param_state in optimizer.state.items():
        name = names.get(id(param))
        if name is None:
            raise ValueError("optimizer_state_dict: the optimizer holds a parameter that is not in the module.")
        entry: dict[str, Any] = {}
        for key, value in param_state.items():
            if (
                name in sharded_params
                and isinstance(value, torch.Tensor)
                and value.dim() > 0
                and value.shape == param.shape
            ):
                entry[key] = _local_sharded_like(sharded_params[name], value)
            else:
                entry[key] = value
        state[name] = entry
    groups = []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]})
    return {"state": state, "param_groups": groups}


def init_optimizer_state(optimizer: Optimizer, trainable: Iterable[nn.Parameter]) -> None:
    """Create the optimizer's lazily built state (one step with zero grads and lr 0), so DCP can load
    into it. Only ``trainable`` parameters (those that get ``.grad`` in training) take part, and only
    optimizers that lack state for some of them: Adagrad builds its state eagerly, Adam lazily, and
    a GroupedOptimizer may hold both.
    """
    from lightning_hybrid.optim import GroupedOptimizer

    trainable = list(trainable)
    if isinstance(optimizer, GroupedOptimizer):
        for sub in optimizer.optimizers:
            init_optimizer_state(sub, trainable)
        return
    trainable_ids = {id(p) for p in trainable}
    params = [p for group in optimizer.param_groups for p in group["params"] if id(p) in trainable_ids]
    if not params or all(optimizer.state.get(p) for p in params):
        return
    saved_grads = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            saved_grads[id(p)] = p.grad
            p.grad = torch.zeros_like(p) if id(p) in trainable_ids else None
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = saved_grads[id(p)]


def load_optimizer_state_dict(module: nn.Module, optimizer: Optimizer, loaded: Mapping[str, Any]) -> None:
    """Write values loaded in place by DCP back into ``optimizer`` (hyper-parameters, scalars)."""
    by_name = {name: p for name, p in module.named_parameters(remove_duplicate=False)}
    for name, entry in loaded["state"].items():
        param = by_name[name]
        target = optimizer.state[param]
        for key, value in entry.items():
            if isinstance(value, ShardedTensor):
                continue  # loaded in place into the optimizer's own tensor
            if value is target.get(key):
                continue  # DCP already loaded into the optimizer's own tensor
            if isinstance(value, torch.Tensor) and isinstance(target.get(key), torch.Tensor):
                target[key].copy_(value)
            else:
                target[key] = value
    for group, saved in zip(optimizer.param_groups, loaded["param_groups"], strict=True):
        for key, value in saved.items():
            if key != "params":
                group[key] = value


# ----------------------------------------------------------------------------------------------
# Per-rank state, RNG streams, loader positions
# ----------------------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """An opaque DCP value (DCP would otherwise flatten nested dicts and dedupe equal keys)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack(data: Any) -> Any:
    if isinstance(data, io.BytesIO):
        data.seek(0)
        data = data.read()
    return torch.load(io.BytesIO(data), weights_only=False)


def rng_state() -> dict[str, Any]:
    """This process's random streams (Lightning's checkpoints do not hold them; dropout and
    shuffling after a resume depend on them)."""
    import random

    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def set_loader_positions(checkpoint: dict[str, Any]) -> None:
    """Write the number of batches the fit loop finished into the saved state of resumable
    training loaders (`lightning_hybrid.data.resumable`): the loaders themselves count one batch
    more, the one Lightning fetched ahead."""
    try:
        fit_loop = checkpoint["loops"]["fit_loop"]
        loaders = fit_loop["state_dict"]["combined_loader"]
        done = fit_loop["epoch_loop.batch_progress"]["current"]["processed"]
    except (KeyError, TypeError):
        return
    for entry in loaders:
        if isinstance(entry, dict) and "batches_done" in entry:
            entry["batches_done"] = int(done)


# ----------------------------------------------------------------------------------------------
# Saving and loading directories
# ----------------------------------------------------------------------------------------------


def _prepare(path: Path) -> tuple[int, Path, str]:
    """(rank, temporary sibling directory, token) of a save, agreed by every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    token = [uuid.uuid4().hex[:12] if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    tmp = path.parent / f".{path.name}.partial-{token[0]}"
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=False)
    _barrier()
    return rank, tmp, str(token[0])


def _publish(tmp: Path, path: Path, meta: dict[str, Any], token: str) -> None:
    """Rank 0, once every rank's part is on disk: write meta.pt, then swap the directory in."""
    torch.save(meta, tmp / META_FILENAME)
    old = path.parent / f".{path.name}.old-{token}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    # leftovers of saves that crashed half-way (never mistaken for checkpoints: hidden names,
    # no meta.pt or no swap) go once a save of the same name has succeeded
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save(state: dict[str, Any], meta: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Collectively and atomically save ``state`` (DCP) and ``meta`` (rank 0) into directory ``path``."""
    path = Path(path)
    rank, tmp, token = _prepare(path)
    dcp.save(_drop_empty(state), checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        _publish(tmp, path, meta, token)
    _barrier()


def _host_copy(value: Any) -> Any:
    """A copy of a state dict on the CPU that later training steps cannot change (no communication).

    ShardedTensors go through ``ShardedTensor.to("cpu", copy=True)``, which also rewrites every
    shard's placement in the metadata to the CPU (a copy that kept ``rank:r/cuda:r`` placements
    around CPU shards is refused by ShardedTensor's own checks on the first GPU save). DTensors
    keep their mesh and placements around a CPU local tensor (``DTensor.to`` is local): no copy
    goes back to the GPU, so a save holds no second copy of the weights in GPU memory.
    """
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_host_copy(v) for v in value]
    if isinstance(value, ShardedTensor):
        return value.to("cpu", copy=True)
    if isinstance(value, DTensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


class _AlreadyStaged:
    """DCP's async stager interface for a state dict that `_host_copy` already staged."""

    _synchronize_after_execute = False

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class AsyncSaver:
    """Checkpoints written in the background while training goes on (`dcp.async_save`).

    ``save`` returns once the state is copied to host memory (the copy training may then change);
    a thread waits for every rank's write to finish (DCP's coordinator writes ``.metadata`` only
    then) and rank 0 swaps the directory into place, so a crash mid-write still leaves the previous
    checkpoint and never a half-written one. One save is in flight at a time: the next ``save``
    (and ``wait``) waits for it. ``group`` must be a CPU (gloo) group of all ranks that no other
    thread uses: the background write's collectives run on it.
    """

    def __init__(self, group: Any | None = None) -> None:
        self.group = group
        self._thread: Any = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], meta: dict[str, Any], path: str | os.PathLike[str]) -> None:
        import threading

        self.wait()
        path = Path(path)
        rank, tmp, token = _prepare(path)
        # our own copy to host memory: DCP's default stager cannot copy torchrec's ShardedTensors
        staged = _host_copy(_drop_empty(state))
        future = dcp.async_save(staged, checkpoint_id=str(tmp), process_group=self.group, async_stager=_AlreadyStaged())

        def finish() -> None:
            try:
                future.result()
                if rank == 0:
                    _publish(tmp, path, meta, token)
            except BaseException as err:  # noqa: BLE001 - reported by the next wait()
                self._error = err

        self._thread = threading.Thread(target=finish, name="lightning_hybrid-async-save", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight is complete; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"An asynchronous checkpoint save failed: {error}") from error


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not is_distributed_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a lightning_hybrid checkpoint directory (expected {META_FILENAME} and DCP "
            f".metadata inside). Point ckpt_path at a directory written by HybridStrategy."
        )
    # map_location: meta.pt written on a GPU may hold CUDA tensors (Lightning's loop or callback
    # state); `convert` and serving read it on CPU-only hosts
    return torch.load(path / META_FILENAME, map_location="cpu", weights_only=False)


def saved_keys(path: str | os.PathLike[str]) -> set[str]:
    """Flattened keys stored in a DCP checkpoint (e.g. ``model.lin.weight``)."""
    reader = dcp.FileSystemReader(str(path))
    return set(reader.read_metadata().state_dict_metadata)


def load(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Collectively load ``path`` into ``state`` in place (tensors and ShardedTensors are filled)."""
    pruned = _drop_empty(state)
    dcp.load(pruned, checkpoint_id=str(path))
    _copy_back(state, pruned)


def _copy_back(target: dict[str, Any], loaded: dict[str, Any]) -> None:
    """DCP replaces non-tensor values (bytes, ints) in the dict it was given, a pruned copy."""
    for key, value in loaded.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _copy_back(target[key], value)
        else:
            target[key] = value


def _drop_empty(state: dict[str, Any]) -> dict[str, Any]:
    """DCP stores an empty dict as a value of its own and then insists on it when loading; leave them out."""
    result = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = _drop_empty(value)
            if not value:
                continue
        result[key] = value
    return result


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Conversion: sharded directory <-> one file
# ----------------------------------------------------------------------------------------------

#: where a single-file checkpoint keeps what is not part of Lightning's own format
EXTRA_KEY = "lightning_hybrid_state"


def to_single_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Turn a sharded checkpoint directory into one ``torch.save`` file, in one process.

    The file is an ordinary Lightning checkpoint: ``state_dict`` holds every weight whole (tables
    gathered from their shards), so ``MyModel.load_from_checkpoint(dst)`` serves it without
    torchrec sharding or a process group; Lightning's loop and hyper-parameter entries are kept.
    The optimizer states (by parameter name), fused-table optimizer states and per-rank entries
    ride along under ``lightning_hybrid_state``, so `to_sharded` can turn it back into a
    resumable directory.
    """
    checkpoint = read_whole(src)
    save_file_atomically(checkpoint, dst)
    return checkpoint


def read_whole(src: str | os.PathLike[str]) -> dict[str, Any]:
    """A sharded checkpoint directory as the dict `to_single_file` writes (every weight whole), or
    a checkpoint file as it is; in one process."""
    if not is_distributed_checkpoint(src):
        return torch.load(src, map_location="cpu", weights_only=False)
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = load_meta(src)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(src)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint = dict(meta)
    checkpoint["state_dict"] = state.pop("model", {})
    checkpoint.setdefault("optimizer_states", [])
    checkpoint[EXTRA_KEY] = state
    return checkpoint


def save_file_atomically(obj: Any, dst: str | os.PathLike[str]) -> None:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{uuid.uuid4().hex[:12]}")
    torch.save(obj, tmp)
    tmp.replace(dst)  # atomic: never a half-written file under the real name


def to_sharded(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Turn a single-file checkpoint (from `to_single_file`, or any Lightning checkpoint whose
    ``state_dict`` matches the model) into a directory HybridStrategy resumes or loads from, in
    any layout: the tensors are stored whole and resharded when loaded."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{src} is not a Lightning checkpoint file (no 'state_dict' entry); nothing to convert.")
    extra = checkpoint.pop(EXTRA_KEY, {}) or {}
    state = {"model": checkpoint.pop("state_dict"), **extra}
    checkpoint.pop("optimizer_states", None)  # Lightning's by-index format: not resumable across layouts
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    dcp.save(_drop_empty(state), checkpoint_id=str(tmp), no_dist=True)
    torch.save(checkpoint, tmp / META_FILENAME)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def convert_main(argv: list[str]) -> None:
    """``lightning-hybrid convert SRC DST``: a sharded directory becomes one file, a file a
    sharded directory (the direction follows SRC)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-hybrid convert",
        description="Convert a HybridStrategy checkpoint directory into one file for serving, or a "
        "single-file checkpoint back into a sharded directory that any layout can resume from.",
    )
    parser.add_argument("src", help="checkpoint directory (sharded) or file")
    parser.add_argument("dst", help="where to write the other form")
    args = parser.parse_args(argv)
    if is_distributed_checkpoint(args.src):
        result = to_single_file(args.src, args.dst)
        n = sum(v.numel() for v in result["state_dict"].values() if isinstance(v, torch.Tensor))
        print(f"wrote {args.dst}: {len(result['state_dict'])} tensors, {n:,} values, step {result.get('global_step', '?')}")
    elif Path(args.src).is_file():
        to_sharded(args.src, args.dst)
        print(f"wrote sharded checkpoint directory {args.dst}")
    else:
        raise SystemExit(
            f"lightning-hybrid convert: {args.src} is neither a checkpoint directory (with meta.pt and .metadata) "
            "nor a checkpoint file."
        )
