"""``lightning-hybrid export``: one file with what a serving system needs.

A training checkpoint (a HybridStrategy directory, or a single file from ``convert``) holds table
rows, not items: row ``i`` of every item table is the item whose raw id is the data module's
``item_ids[i - 1]`` (row 0 is padding), a mapping that lives in the checkpoint's data-module entry
(`lightning_hybrid.data.item_ids`). `export_for_serving` writes one ``torch.save`` file that is

- a Lightning checkpoint of the whole model (every weight whole, no optimizer state), so
  ``Trainer().predict(model, datamodule=..., ckpt_path=file)`` or ``Model.load_from_checkpoint`` serve it
  in one process, without torchrec sharding or a process group; and
- under ``"serving"``: ``item_ids`` (raw ids) and ``item_tensors``: every weight with one row per
  item table row (the item table, the output layer's weight and bias, side tables sized like it),
  cut to the items and aligned with ``item_ids``, so ``item_tensors[name][k]`` belongs to raw id
  ``item_ids[k]``: what an index for nearest-neighbour retrieval loads. ``model_class`` names the
  LightningModule the weights are for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FORMAT = "lightning_hybrid.export/1"
MODEL_CLASS_KEY = "lightning_hybrid_model_class"  # written by HybridStrategy into every checkpoint


def export_for_serving(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the serving file ``dst`` from checkpoint ``src``; returns its ``"serving"`` entry."""
    import torch

    from lightning_hybrid.checkpoint import EXTRA_KEY, read_whole, save_file_atomically

    if not Path(src).exists():
        raise FileNotFoundError(f"lightning-hybrid export: {src} does not exist (give a checkpoint directory or file).")
    checkpoint = read_whole(src)
    entry = checkpoint.get("SequenceDataModule")
    item_ids = list(entry["item_ids"]) if isinstance(entry, dict) and "item_ids" in entry else None
    if not item_ids:
        raise ValueError(
            f"lightning-hybrid export: {src} holds no raw item ids (its run did not use SequenceDataModule, or predates "
            "id mapping in checkpoints). Export needs them to key the item embeddings; train with "
            "lightning_hybrid.data.sequences.SequenceDataModule, or read the weights with `lightning-hybrid convert`."
        )
    state = checkpoint["state_dict"]
    hparams = checkpoint.get("hyper_parameters") or {}
    num_items = hparams.get("num_items")
    rows = int(num_items) + 1 if isinstance(num_items, int) else _table_rows(state, len(item_ids) + 1)
    if rows < len(item_ids) + 1:
        raise ValueError(
            f"lightning-hybrid export: the checkpoint's id mapping has {len(item_ids)} items but its item table only "
            f"{rows - 1} rows; the checkpoint and its mapping do not belong together."
        )
    tensors = {
        key: value[1 : len(item_ids) + 1].clone()
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.dim() in (1, 2) and value.shape[0] == rows
    }
    serving = {"format": FORMAT, "item_ids": item_ids, "item_tensors": tensors, "model_class": checkpoint.get(MODEL_CLASS_KEY)}
    checkpoint.pop(EXTRA_KEY, None)  # optimizer and per-rank state: not for serving
    checkpoint["optimizer_states"] = []
    checkpoint.pop("lr_schedulers", None)
    checkpoint["serving"] = serving
    save_file_atomically(checkpoint, dst)
    return serving


def _table_rows(state: dict[str, Any], at_least: int) -> int:
    """Rows of the item table when the hyper-parameters do not say: the most common first
    dimension >= ``at_least`` among the weights whose name says ``item``."""
    import collections

    counts = collections.Counter(
        int(v.shape[0]) for k, v in state.items() if "item" in k and getattr(v, "dim", lambda: 0)() == 2 and v.shape[0] >= at_least
    )
    if not counts:
        raise ValueError("lightning-hybrid export: found no item table in the checkpoint (no 2-D weight named '*item*').")
    return counts.most_common(1)[0][0]


def load_serving(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``"serving"`` entry of an export file (item ids, item tensors, model class)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    serving = checkpoint.get("serving") if isinstance(checkpoint, dict) else None
    if not isinstance(serving, dict) or serving.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning-hybrid export file (no 'serving' entry of format {FORMAT!r}).")
    return serving


def export_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-hybrid export",
        description="Write one file for serving: the whole model as a Lightning checkpoint, plus the item embeddings "
        "(every per-item weight) keyed by raw item id.",
    )
    parser.add_argument("src", help="checkpoint directory (sharded) or file")
    parser.add_argument("dst", help="the export file to write")
    args = parser.parse_args(argv)
    serving = export_for_serving(args.src, args.dst)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in serving["item_tensors"].items())
    print(f"wrote {args.dst}: {len(serving['item_ids'])} items; per-item tensors: {shapes}")
