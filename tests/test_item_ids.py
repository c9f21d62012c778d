"""Raw item ids survive a checkpoint: the id -> row mapping is saved, followed, or the run refused.

Data files are remapped by sorting raw ids on every load, so a refreshed file with one new item
that sorts first would shift every row by one: every item would silently get its neighbour's
embedding. These tests pin what happens instead.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_hybrid.data.sequences import (
    SequenceData,
    SequenceDataModule,
    follow_item_ids,
    load_sasrec_lines,
)
from lightning_hybrid.testing import run_distributed

OLD = "1 10 20 30 40\n2 20 30 40 50\n3 30 40 50 10\n4 40 50 10 20\n"
# refreshed: user 5 brings item 5, which sorts before every old id (row 1 would move to item 5)
NEW = OLD + "5 5 10 20 30\n"


def test_a_refreshed_file_keeps_the_rows_of_known_items(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text(OLD)
    (tmp_path / "new.txt").write_text(NEW)
    old, new = load_sasrec_lines(tmp_path / "old.txt"), load_sasrec_lines(tmp_path / "new.txt")
    assert old.item_ids == ["10", "20", "30", "40", "50"]
    assert new.item_ids[0] == "5"  # sorting alone moves every row
    followed = follow_item_ids(new, old.item_ids)
    assert followed.item_ids == ["10", "20", "30", "40", "50", "5"]
    # the same raw id has the same row in both, and user 5's sequence uses the new row 6
    for seq_old, seq_new in zip(old.sequences, followed.sequences, strict=False):
        assert seq_old == seq_new
    assert followed.sequences[4] == [6, 1, 2, 3]


def test_new_items_beyond_the_table_are_an_error() -> None:
    data = SequenceData(sequences=[[1, 2, 3]], user_ids=["u"], item_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="1 items the checkpoint's id mapping does not know \\(first: \\['c'\\]\\)"):
        follow_item_ids(data, ["a", "b"], capacity=2)


def _train_then_resume(tmp: str) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    os.environ.pop("PL_GLOBAL_SEED", None)
    from lightning_hybrid import HybridStrategy
    from tests.helpers import quiet_trainer, sgd_sasrec_class

    def data(name: str, follow: str | None = None) -> SequenceDataModule:
        # (num_items=6: the table has a spare row for an item the refreshed file brings)
        return SequenceDataModule(path=os.path.join(tmp, name), format="sasrec", max_len=4, batch_size=2, eval_batch_size=2,
                                  num_items=6, item_ids_from=follow)

    def model() -> Any:
        torch.manual_seed(0)
        return sgd_sasrec_class()(num_items=6, max_len=4, d_model=8, num_blocks=1, num_heads=1, dropout=0.0)

    def trainer(epochs: int) -> Any:
        return quiet_trainer(strategy=HybridStrategy(embedding_sharding={"item_id": "row_wise"}), devices=2, max_epochs=epochs,
                             limit_val_batches=0, enable_checkpointing=False)

    first = trainer(1)
    first.fit(model(), datamodule=data("old.txt"))
    ckpt = os.path.join(tmp, "ckpt")
    first.save_checkpoint(ckpt)
    out: dict[str, Any] = {}
    # 1. resuming on the refreshed file as it loads: refused, not silently shifted
    try:
        trainer(2).fit(model(), datamodule=data("same_items_other_order.txt"), ckpt_path=ckpt)
        out["plain"] = "no error"
    except ValueError as error:
        out["plain"] = str(error)
    # 2. following the checkpoint's mapping: resumes
    follow = data("same_items_other_order.txt", follow=ckpt)
    trainer(2).fit(model(), datamodule=follow, ckpt_path=ckpt)
    out["followed_items"] = follow.data.item_ids
    return out


def test_resuming_on_a_refreshed_file_is_refused_or_follows_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text(OLD)
    # refreshed: item 10 is gone and item 60 is new, so sorting puts 20..60 on rows 1..5 (all shifted)
    (tmp_path / "same_items_other_order.txt").write_text(OLD.replace(" 10", " 60"))
    for result in run_distributed(_train_then_resume, 2, str(tmp_path), init_process_group=False, timeout_s=180):
        assert "map to other table rows" in result["plain"] and "item_ids_from" in result["plain"], result["plain"]
        # 10 is gone, 60 is new: the old rows of 20..50 stay, 60 takes the next free row
        assert result["followed_items"][:5] == ["10", "20", "30", "40", "50"] and result["followed_items"][5:] == ["60"]
