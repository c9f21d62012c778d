"""A DataLoader that continues mid-epoch after a resume.

Lightning restarts a plain DataLoader from the first batch of the epoch when it resumes from a
checkpoint written mid-epoch (it warns "your dataloader is not resumable"), so the resumed run
sees some batches twice and others never: not the run that was interrupted. Loaders that
implement ``state_dict``/``load_state_dict`` are saved with the loop state and restored before
the first ``iter()``; this one stores how many batches of the epoch were trained and, on
resume, skips that many *index* batches (sampler indices only, no data is loaded for them).

The count is exact under HybridStrategy, which writes the number of batches the loop finished
into the saved state (Lightning fetches one batch ahead, so the loader itself has handed out one
more than was trained). The sampler must give the same order again for the same epoch: a
``DistributedSampler`` (what Lightning injects under distributed strategies) or a seeded one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class _SkipFirst:
    """The loader's index sampler without the batches its resumed epoch already trained. The
    count is read from the loader at each ``iter()`` (the DataLoader's iterator may call it twice
    while starting, and a persistent-workers iterator keeps this object for later epochs)."""

    def __init__(self, sampler: Any, loader: ResumableDataLoader) -> None:
        self.sampler = sampler
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.loader._skip_next_iter, None)

    def __len__(self) -> int:
        # the epoch's full length: Lightning counts the epoch's batches from len(loader)
        return len(self.sampler)


def pin_memory_for(trainer: Any) -> bool:
    """Page-locked batches when the job trains on CUDA (host-to-device copies can then overlap)."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    try:
        return strategy is not None and strategy.root_device.type == "cuda"
    except Exception:  # noqa: BLE001 - no device decided yet (outside a Trainer)
        return False


class ResumableDataLoader(DataLoader):
    """``torch.utils.data.DataLoader`` whose position within the epoch is part of checkpoints."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip_next_iter = 0

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:
        skip = self._skip_next_iter
        self._yielded = skip
        if skip:
            # creating an iterator draws a base seed from the global RNG; the interrupted run drew
            # it at the start of the epoch, before the restored RNG state was saved
            with torch.random.fork_rng(devices=[]):
                iterator = iter(super().__iter__())
                first = next(iterator, None)  # the skip is in effect until the first batch is out
        else:
            iterator = iter(super().__iter__())
            first = next(iterator, None)
        self._skip_next_iter = 0
        if first is None:
            return
        self._yielded += 1
        yield first
        for batch in iterator:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``batches_done``: batches of the current epoch handed out (HybridStrategy replaces it
        with the number the loop finished, which excludes the one fetched ahead)."""
        return {"batches_done": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done = int(state.get("batches_done", 0))
        self._skip_next_iter = done if 0 < done < len(self) else 0
