"""Tier 1: sequence loaders (every format, malformed input), splits and distributed evaluation shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_hybrid.data.sequences import (
    EvenShardSampler,
    SequenceDataModule,
    load_movielens,
    load_sasrec_lines,
    synthetic_sequences,
)


def test_sasrec_lines(tmp_path: Path) -> None:
    f = tmp_path / "seq.txt"
    f.write_text("1 10 30 20\n2 30 10\n\n3 20 20 40 10\n")
    data = load_sasrec_lines(f)
    # raw ids 10, 20, 30, 40 -> 1, 2, 3, 4 (0 is padding)
    assert data.sequences == [[1, 3, 2], [3, 1], [2, 2, 4, 1]]
    assert data.user_ids == ["1", "2", "3"] and data.item_ids == ["10", "20", "30", "40"]


def test_sasrec_pairs_one_interaction_per_line_read_as_the_lines(tmp_path: Path) -> None:
    """The original SASRec / BERT4Rec files: 'user item' per line, in time order, users repeated."""
    pairs, lines = tmp_path / "pairs.txt", tmp_path / "lines.txt"
    pairs.write_text("1 10\n1 30\n2 30\n1 20\n2 10\n3 20\n3 20\n3 40\n3 10\n")
    lines.write_text("1 10 30 20\n2 30 10\n3 20 20 40 10\n")
    got, want = load_sasrec_lines(pairs), load_sasrec_lines(lines)
    assert got.sequences == want.sequences == [[1, 3, 2], [3, 1], [2, 2, 4, 1]]
    assert got.user_ids == want.user_ids and got.item_ids == want.item_ids


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 10 20\n2\n", r"seq.txt:2: expected 'user item \[item ...\]'.*empty sequence"),
        ("1 10 x2\n", r"seq.txt:1: ids must be integers, got 'x2'"),
        ("1 10 30\n1 20\n", r"seq.txt:2: user 1 appears on two lines \(again on line 2\) and line 1 holds several items"),
        ("1 10\n2 30\n1 20\n3 10 20\n", r"seq.txt:4: user 1 appears on two lines \(again on line 3\) and line 4 holds"),
        ("1 -5 3\n", r"seq.txt:1: ids must be non-negative"),
        ("\n\n", r"holds no sequences"),
    ],
)
def test_sasrec_lines_malformed(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "seq.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_sasrec_lines(f)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_sasrec_lines(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("u.data", "7\t5\t3\t300\n7\t9\t4\t100\n8\t5\t5\t50\n7\t1\t2\t200\n"),
        ("ratings.dat", "7::5::3::300\n7::9::4::100\n8::5::5::50\n7::1::2::200\n"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n7,5,3.0,300\n7,9,4.0,100\n8,5,5.0,50\n7,1,2.5,200\n"),
    ],
)
def test_movielens_formats_are_time_ordered(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    data = load_movielens(tmp_path / name)
    # user 7 watched 9 (t=100), 1 (t=200), 5 (t=300); raw items 1, 5, 9 -> 1, 2, 3
    assert data.user_ids == ["7", "8"]
    assert data.sequences == [[3, 1, 2], [2]]
    assert load_movielens(tmp_path).sequences == data.sequences  # a directory works too


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("ratings.csv", "user,item\n1,2\n", r"ratings.csv:1: expected header"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.0\n", r"ratings.csv:2: expected user, item, rating, timestamp"),
        ("u.data", "1\t2\tgood\t5\n", r"u.data:1: rating and timestamp must be numbers"),
    ],
)
def test_movielens_malformed(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_movielens(tmp_path / name)


def test_leave_one_out_split_and_padding() -> None:
    dm = SequenceDataModule(format="synthetic", max_len=4, synthetic_users=5, synthetic_items=20, synthetic_min_len=3, synthetic_max_len=6)
    dm.setup("fit")
    seq = dm.load().sequences[0]
    train = dm.train_set[0]
    part = seq[:-2][-5:]
    expected_input = ([0] * 4 + part[:-1])[-4:]
    assert train["input"].tolist() == expected_input
    assert train["target"].tolist() == ([0] * 4 + part[1:])[-4:]
    val, test = dm.val_set[0], dm.test_set[0]
    assert val["target"].item() == seq[-2] and test["target"].item() == seq[-1]
    assert val["input"].tolist() == ([0] * 4 + seq[:-2])[-4:]
    assert test["input"].tolist() == ([0] * 4 + seq[:-1])[-4:]
    assert set(test["seen"].tolist()) == set(seq[:-1])


def test_too_many_items_for_the_model(tmp_path: Path) -> None:
    f = tmp_path / "seq.txt"
    f.write_text("1 1 2 3 4 5\n")
    with pytest.raises(ValueError, match=r"5 distinct items but the model is configured for num_items=3"):
        SequenceDataModule(path=str(f), num_items=3).load()


def test_even_shards_have_every_user_once() -> None:
    dataset = list(range(7))
    shards = [list(EvenShardSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]  # type: ignore[arg-type]
    assert [len(s) for s in shards] == [3, 3, 3]
    real = sorted(i for s in shards for i in s if i >= 0)
    assert real == list(range(7))
    assert sum(i == -1 for s in shards for i in s) == 2


def test_synthetic_is_seeded_and_learnable_shape() -> None:
    a = synthetic_sequences(num_users=10, num_items=30, seed=3)
    b = synthetic_sequences(num_users=10, num_items=30, seed=3)
    assert a.sequences == b.sequences
    assert all(5 <= len(s) <= 50 and min(s) >= 1 and max(s) <= 30 for s in a.sequences)
    with pytest.raises(ValueError, match="min_len"):
        synthetic_sequences(num_users=1, num_items=10, min_len=2)
    counts = SequenceDataModule(format="synthetic", synthetic_users=10, synthetic_items=30, seed=3).item_counts()
    assert counts[0] == 0 and counts.sum() == sum(len(s) - 2 for s in a.sequences)
    assert torch.is_tensor(counts)


def test_movielens_item_text_and_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,5,3,1\n1,9,3,2\n1,7,3,3\n")
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n5,Toy Story (1995),Animation|Comedy\n9,"Heat, The (1995)",Action\n7,Alien (1979),Horror|Sci-Fi\n'
    )
    dm = SequenceDataModule(path=str(tmp_path / "ratings.csv"), item_text=True, text_len=5)
    tokens = dm.item_text_tokens
    assert tokens is not None and tokens.shape == (4, 5)
    assert tokens[0].tolist() == [0, 0, 0, 0, 0]
    # items remapped 5 -> 1, 7 -> 2, 9 -> 3; every word known, "1995" shared by two titles
    assert (tokens[1:, 0] > 1).all()
    assert tokens[1, 2].item() == tokens[3, 2].item()  # "1995" in "Toy Story (1995)" and "Heat, The (1995)"
    assert dm.text_vocab_size > 8


def test_item_text_missing_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,5,3,1\n")
    with pytest.raises(FileNotFoundError, match="No item text beside the ratings"):
        _ = SequenceDataModule(path=str(tmp_path / "ratings.csv"), item_text=True).item_text_tokens


def test_side_information_for_side_features(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,5,3,0\n1,9,3,2592000\n1,7,3,5184000\n1,8,3,7776000\n2,5,3,100\n"
    )
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n5,A (1),Comedy|Drama\n9,B (2),Action\n7,C (3),Comedy\n8,D (4),Action\n")
    dm = SequenceDataModule(path=str(tmp_path / "ratings.csv"), max_len=4)
    # 30-day buckets from the first interaction, 1-based
    assert dm.time_buckets() == [[1, 2, 3, 4], [1]]
    # items 5, 7, 8, 9 -> 1, 2, 3, 4; genres Action=1, Comedy=2
    assert dm.item_categories().tolist() == [0, 2, 2, 1, 1]
    assert dm.num_users == 2
    dm.setup("fit")
    row = dm.train_set[0]
    # user 1 trains on its first two items: input (item 1), times (bucket 1)
    assert row["user"].item() == 0 and row["input"].tolist() == [0, 0, 0, 1] and row["time"].tolist() == [0, 0, 0, 1]
    assert dm.test_set[0]["time"].tolist() == [0, 1, 2, 3]


def test_resumable_loader_skips_the_trained_batches_once() -> None:
    from lightning_hybrid.data.resumable import ResumableDataLoader

    loader = ResumableDataLoader(list(range(10)), batch_size=2)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert loader.state_dict() == {"batches_done": 5}
    loader.load_state_dict({"batches_done": 3})  # resumed after 3 batches of the epoch
    assert len(loader) == 5
    assert [b.tolist() for b in loader] == [[6, 7], [8, 9]]
    assert [b.tolist() for b in loader][0] == [0, 1]  # the next epoch starts at the beginning again
    loader.load_state_dict({"batches_done": 5})  # saved at the end of an epoch: nothing to skip
    assert len(list(loader)) == 5
    persistent = ResumableDataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True)
    persistent.load_state_dict({"batches_done": 1})
    assert [b.tolist() for b in persistent] == [[2, 3], [4, 5], [6, 7]]
    assert [b.tolist() for b in persistent] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_loaders_pin_memory_only_when_the_job_trains_on_cuda() -> None:
    from types import SimpleNamespace

    from lightning_hybrid.data.resumable import pin_memory_for

    assert pin_memory_for(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0))))
    assert not pin_memory_for(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))))
    assert not pin_memory_for(None)


def test_click_batches_built_by_loader_workers_equal_those_built_in_process() -> None:
    from lightning_hybrid.data.clicks import ClickDataModule

    def batches(workers: int) -> list[dict]:
        dm = ClickDataModule(num_samples=96, num_val_samples=32, batch_size=32, num_workers=workers)
        dm.setup("fit")
        return list(dm.val_dataloader())

    inline, workers = batches(0), batches(2)
    assert len(inline) == len(workers) == 1
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a["dense"], b["dense"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["sparse"].values(), b["sparse"].values()) and torch.equal(a["sparse"].lengths(), b["sparse"].lengths())
