"""Raw item ids across checkpoints: the id -> table row mapping a checkpoint was trained with.

Data files are numbered by sorting their raw ids on every load, so a refreshed file in which a
new id sorts first would move every item to another row. `SequenceDataModule` saves its mapping in
each checkpoint; `saved_item_ids` reads it back and `follow_item_ids` renumbers new data so known
items keep their rows (see docs/tutorial-own-data.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_hybrid.data.readers import SequenceData


def follow_item_ids(data: SequenceData, known: Sequence[str], *, capacity: int | None = None) -> SequenceData:
    """``data`` with its items renumbered so that every raw id in ``known`` (a checkpoint's
    mapping: ``known[i - 1]`` is row i) keeps its row; items ``known`` lacks get the rows after
    it, in the data's order. ``capacity`` (the model's item rows) makes more items an error."""
    index = {raw: k + 1 for k, raw in enumerate(known)}
    new = [raw for raw in data.item_ids if raw not in index]
    for raw in new:
        index[raw] = len(index) + 1
    if capacity is not None and len(index) > capacity:
        raise ValueError(
            f"The data has {len(new)} items the checkpoint's id mapping does not know (first: {new[:5]}), and the model's "
            f"item table has rows for {capacity} items ({len(known)} known). Train a model with num_items >= {len(index)} "
            "(fine-tune from this checkpoint's weights into a larger table), or drop the new items from the data."
        )
    translate = [0] + [index[raw] for raw in data.item_ids]
    item_ids = [""] * len(index)
    for raw, row in index.items():
        item_ids[row - 1] = raw
    sequences = [[translate[i] for i in seq] for seq in data.sequences]
    from lightning_hybrid.data.readers import SequenceData

    return SequenceData(sequences=sequences, user_ids=data.user_ids, item_ids=item_ids, times=data.times)


def saved_item_ids(checkpoint: str | os.PathLike[str]) -> list[str] | None:
    """The raw item ids (row order) a checkpoint was trained with: from a HybridStrategy checkpoint
    directory, a converted single file, or any Lightning checkpoint of a SequenceDataModule run;
    None when it has none."""
    import torch

    path = Path(checkpoint)
    if path.is_dir():
        from lightning_hybrid.checkpoint import load_meta

        state = load_meta(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
    entry = state.get("SequenceDataModule") if isinstance(state, dict) else None  # (Lightning keys it by class name)
    return list(entry["item_ids"]) if isinstance(entry, dict) and "item_ids" in entry else None
