"""Count the bytes a rank sends in torchrec's embedding collectives (the all-to-alls and, for
row-wise tables, the reduce-scatters / all-gathers), forward and backward.

torchrec issues these collectives from two modules, `torchrec.distributed.comm_ops` (the pooled /
sequence embedding all-to-alls, reduce-scatters and their autograd backward passes) and
`torchrec.distributed.dist_data` (the KeyedJaggedTensor input all-to-alls: split sizes, lengths,
ids, weights). Both call ``torch.distributed`` through their module-level name ``dist``;
`count_embedding_bytes` swaps that name for a thin proxy that adds each call's bytes to an
`EmbeddingByteCounter` and then calls the real function. Nothing else changes: same function,
same arguments, same process group; no other code (DDP, our compressed exchange, tensor
parallelism) goes through the proxy, so the count is the embedding traffic alone.

What "bytes sent" means, per call (this rank's outgoing bytes; the dp and tp counters use the same
conventions, see `lightning_hybrid.comm.compress` and `lightning_hybrid.parallel.tensor`):

- ``all_to_all_single``: exact, the input rows addressed to the other ranks (the chunk a rank
  keeps for itself does not cross the wire);
- ``reduce_scatter_tensor`` / ``reduce_scatter``: ring count, the input minus this rank's chunk;
- ``all_gather_into_tensor`` / ``all_gather``: ring count, (ranks - 1) x this rank's input
  (`ByteCounter.all_gather_bytes`, as for the dp exchange).

Usable without Lightning::

    counter = count_embedding_bytes()        # installs the proxy (idempotent per process)
    loss = model(batch).sum(); loss.backward()
    sent = counter.take_step()               # bytes since the last take_step
    counter.close()                          # uninstalls when the last counter closes
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_hybrid.comm.compress import ByteCounter

# torchrec modules whose ``dist`` name the proxy replaces (the step-time collectives live there)
_PATCHED_MODULES = ("torchrec.distributed.comm_ops", "torchrec.distributed.dist_data")
_LOCK = threading.Lock()
_ACTIVE: list[EmbeddingByteCounter] = []
_ORIGINALS: dict[str, Any] = {}


class EmbeddingByteCounter(ByteCounter):
    """Bytes this rank sent in torchrec's embedding collectives (``step`` until `take_step`,
    ``total`` since creation, as the dp exchange's `ByteCounter`)."""

    def close(self) -> None:
        """Stop counting; the last open counter puts torchrec's own ``dist`` back."""
        with _LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            if not _ACTIVE:
                _uninstall()


def count_embedding_bytes() -> EmbeddingByteCounter:
    """A new counter of torchrec's embedding collectives in this process (see the module docstring)."""
    counter = EmbeddingByteCounter()
    with _LOCK:
        if not _ACTIVE:
            _install()
        _ACTIVE.append(counter)
    return counter


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _group_size_rank(group: Any) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _record(nbytes: float) -> None:
    for counter in list(_ACTIVE):
        counter.add(nbytes)


def _all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,  # noqa: A002 - torch.distributed's own parameter name
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    size, rank = _group_size_rank(group)
    total = _nbytes(input)
    if input_split_sizes:
        rows = input.size(0) if input.dim() else 1
        row_bytes = total // rows if rows else 0
        kept = int(input_split_sizes[rank]) * row_bytes
    else:
        kept = total // size  # equal chunks
    _record(total - kept)
    return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def _reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, *args: Any, group: Any = None, **kwargs: Any) -> Any:  # noqa: A002
    size, _ = _group_size_rank(group)
    _record(ByteCounter.all_gather_bytes(_nbytes(input) // size, size))  # (the mirror of an all-gather)
    return dist.reduce_scatter_tensor(output, input, *args, group=group, **kwargs)


def _reduce_scatter(output: torch.Tensor, input_list: list[torch.Tensor], *args: Any, group: Any = None, **kwargs: Any) -> Any:
    _, rank = _group_size_rank(group)
    _record(sum(_nbytes(t) for t in input_list) - _nbytes(input_list[rank]))
    return dist.reduce_scatter(output, input_list, *args, group=group, **kwargs)


def _all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, *args: Any, group: Any = None, **kwargs: Any) -> Any:  # noqa: A002
    size, _ = _group_size_rank(group)
    _record(ByteCounter.all_gather_bytes(_nbytes(input), size))
    return dist.all_gather_into_tensor(output, input, *args, group=group, **kwargs)


def _all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, *args: Any, group: Any = None, **kwargs: Any) -> Any:
    size, _ = _group_size_rank(group)
    _record(ByteCounter.all_gather_bytes(_nbytes(tensor), size))
    return dist.all_gather(tensor_list, tensor, *args, group=group, **kwargs)


class _CountingDist:
    """Stands in for ``torch.distributed`` inside torchrec's comm modules: the collectives above
    count and forward; every other attribute is torch.distributed's own."""

    all_to_all_single = staticmethod(_all_to_all_single)
    reduce_scatter_tensor = staticmethod(_reduce_scatter_tensor)
    reduce_scatter = staticmethod(_reduce_scatter)
    all_gather_into_tensor = staticmethod(_all_gather_into_tensor)
    all_gather = staticmethod(_all_gather)

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)


def _install() -> None:
    import importlib

    proxy = _CountingDist()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        _ORIGINALS[name] = module.dist
        module.dist = proxy  # type: ignore[attr-defined]


def _uninstall() -> None:
    import importlib

    for name, original in list(_ORIGINALS.items()):
        module = importlib.import_module(name)
        if isinstance(module.dist, _CountingDist):
            module.dist = original  # type: ignore[attr-defined]
        del _ORIGINALS[name]
