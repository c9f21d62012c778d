"""Reading interaction files into per-user, time-ordered item sequences (`SequenceData`).

The formats `lightning_hybrid.data.sequences.SequenceDataModule` accepts, each read here: SASRec /
ICLRec lines (``user item item ...``, or ``user item`` pairs one per line), MovieLens ``u.data`` /
``ratings.dat`` / ``ratings.csv``, the seeded synthetic generator, and MovieLens item genres. Item
ids are remapped to ``1..num_items`` (0 is padding) in ascending order of the raw id; the raw ids
are kept for writing predictions. Splitting and batching live in `sequences`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_hybrid.data.lengths import long_tail_lengths


@dataclass
class SequenceData:
    """Time-ordered item sequences (remapped ids, 1-based) and the raw ids they came from."""

    sequences: list[list[int]]
    user_ids: list[str]
    item_ids: list[str]  # index i-1 holds the raw id of item i
    times: list[list[int]] | None = None  # unix timestamps aligned with sequences, when the format has them

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def _remap(users: dict[str, list[str]], times: dict[str, list[int]] | None = None) -> SequenceData:
    raw_items = sorted({i for seq in users.values() for i in seq}, key=lambda s: (len(s), s) if s.isdigit() else (math.inf, s))
    index = {raw: k + 1 for k, raw in enumerate(raw_items)}
    user_ids = list(users)
    sequences = [[index[i] for i in users[u]] for u in user_ids]
    aligned_times = [times[u] for u in user_ids] if times is not None else None
    return SequenceData(sequences=sequences, user_ids=user_ids, item_ids=raw_items, times=aligned_times)


def load_sasrec_lines(path: str | os.PathLike[str]) -> SequenceData:
    """Read ``user item item ...`` lines (integers, time-ordered), one per user, or ``user item``
    pairs in time order (SASRec/BERT4Rec files: a user's lines are read in file order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Sequence file {path} does not exist; set data.path to a SASRec-format file.")
    users: dict[str, list[str]] = {}
    repeated: tuple[int, str] | None = None  # (the first line naming a user again, and that user)
    multi: int | None = None  # the first line with several items
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}:{line_no}: expected 'user item [item ...]', got {line.strip()!r} (empty sequence).")
            bad = [f for f in fields if not f.lstrip("-").isdigit()]
            if bad:
                raise ValueError(f"{path}:{line_no}: ids must be integers, got {bad[0]!r}.")
            if any(int(f) < 0 for f in fields):
                raise ValueError(f"{path}:{line_no}: ids must be non-negative, got {line.strip()!r}.")
            user = fields[0]
            multi = line_no if multi is None and len(fields) > 2 else multi
            repeated = (line_no, user) if repeated is None and user in users else repeated
            if repeated is not None and multi is not None:
                raise ValueError(f"{path}:{max(repeated[0], multi)}: user {repeated[1]} appears on two lines (again on line {repeated[0]}) "
                                 f"and line {multi} holds several items: give one line per user ('user item item ...') or one 'user item' pair per line.")
            users.setdefault(user, []).extend(fields[1:])
    if not users:
        raise ValueError(f"{path} holds no sequences.")
    return _remap(users)


def load_movielens(path: str | os.PathLike[str]) -> SequenceData:
    """Read MovieLens ratings (``u.data``, ``ratings.dat`` or ``ratings.csv``; a directory works too)."""
    path = Path(path)
    if path.is_dir():
        for name in ("ratings.csv", "ratings.dat", "u.data"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds none of ratings.csv, ratings.dat, u.data.")
    if not path.is_file():
        raise FileNotFoundError(f"MovieLens file {path} does not exist; set data.path to ratings.csv/ratings.dat/u.data.")
    rows: list[tuple[str, str, float, int]] = []
    with path.open(newline="", encoding="latin-1") as handle:
        if path.suffix == ".csv":
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:4]] != ["userId", "movieId", "rating", "timestamp"]:
                raise ValueError(f"{path}:1: expected header 'userId,movieId,rating,timestamp', got {header!r}.")
            lines: Iterator[tuple[int, list[str]]] = ((n, r) for n, r in enumerate(reader, start=2))
        else:
            sep = "::" if path.name.endswith(".dat") or "::" in path.name else "\t"
            lines = ((n, line.rstrip("\n").split(sep)) for n, line in enumerate(handle, start=1) if line.strip())
        for line_no, fields in lines:
            if len(fields) < 4:
                raise ValueError(f"{path}:{line_no}: expected user, item, rating, timestamp; got {fields!r}.")
            user, item, rating, stamp = (f.strip() for f in fields[:4])
            try:
                rows.append((user, item, float(rating), int(float(stamp))))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: rating and timestamp must be numbers; got {fields!r}.") from None
    if not rows:
        raise ValueError(f"{path} holds no ratings.")
    # time order per user; ties keep file order (stable sort)
    order = sorted(range(len(rows)), key=lambda k: (rows[k][0], rows[k][3]))
    users: dict[str, list[str]] = {}
    times: dict[str, list[int]] = {}
    for k in order:
        users.setdefault(rows[k][0], []).append(rows[k][1])
        times.setdefault(rows[k][0], []).append(rows[k][3])
    # users in numeric order when ids are numbers
    users = dict(sorted(users.items(), key=lambda kv: (int(kv[0]) if kv[0].isdigit() else math.inf, kv[0])))
    return _remap(users, times)


def synthetic_sequences(
    *, num_users: int, num_items: int, min_len: int = 5, max_len: int = 50, num_next: int = 3,
    follow_prob: float = 0.7, zipf_exponent: float = 1.0, seed: int = 0, lengths: str = "uniform",
) -> SequenceData:
    """Users walk a random item graph: with ``follow_prob`` the next item is one of the current
    item's ``num_next`` successors, otherwise a popular item (Zipf). Learnable, seeded. Sequence
    lengths are uniform in ``[min_len, max_len]`` or, with ``lengths="long_tail"``, Amazon
    Beauty-like (median 6, p99 43, clipped to the range; `lightning_hybrid.data.lengths`)."""
    if num_users < 1 or num_items < 2 or min_len < 3 or max_len < min_len:
        raise ValueError(
            f"synthetic_sequences: num_users={num_users}, num_items={num_items}, min_len={min_len}, "
            f"max_len={max_len} need num_users>=1, num_items>=2, 3<=min_len<=max_len."
        )
    gen = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, num_items + 1, dtype=torch.float64) ** zipf_exponent
    successors = torch.randint(1, num_items + 1, (num_items + 1, num_next), generator=gen)
    if lengths not in ("uniform", "long_tail"):
        raise ValueError(f"synthetic_sequences(lengths={lengths!r}): use 'uniform' or 'long_tail'.")
    if lengths == "long_tail":
        per_user = long_tail_lengths(num_users, min_len=min_len, max_len=max_len, generator=gen)
    else:
        per_user = torch.randint(min_len, max_len + 1, (num_users,), generator=gen)
    sequences = []
    for u in range(num_users):
        item = int(torch.multinomial(popularity, 1, generator=gen)) + 1
        seq = [item]
        for _ in range(int(per_user[u]) - 1):
            if float(torch.rand(1, generator=gen)) < follow_prob:
                item = int(successors[item, int(torch.randint(0, num_next, (1,), generator=gen))])
            else:
                item = int(torch.multinomial(popularity, 1, generator=gen)) + 1
            seq.append(item)
        sequences.append(seq)
    # one interaction a day from a per-user start day: gives time buckets something to encode
    starts = torch.randint(0, 365, (num_users,), generator=gen)
    times = [[(int(starts[u]) + t) * 86400 for t in range(len(seq))] for u, seq in enumerate(sequences)]
    return SequenceData(
        sequences=sequences, user_ids=[str(u) for u in range(num_users)], item_ids=[str(i) for i in range(1, num_items + 1)], times=times
    )


def load_item_genres(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Raw item id -> first genre, from ``movies.csv``/``movies.dat`` (genres field) or ``u.item`` (flags)."""
    directory = Path(directory)
    if (directory / "movies.csv").is_file() or (directory / "movies.dat").is_file():
        sep_file = directory / "movies.csv" if (directory / "movies.csv").is_file() else directory / "movies.dat"
        genres: dict[str, str] = {}
        if sep_file.suffix == ".csv":
            with sep_file.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                for row in reader:
                    if len(row) >= 3:
                        genres[row[0].strip()] = row[2].split("|")[0]
        else:
            with sep_file.open(encoding="latin-1") as handle:
                for line in handle:
                    fields = line.rstrip("\n").split("::")
                    if len(fields) >= 3:
                        genres[fields[0]] = fields[2].split("|")[0]
        return genres
    if (directory / "u.item").is_file():
        genres = {}
        with (directory / "u.item").open(encoding="latin-1") as handle:
            for line in handle:
                fields = line.rstrip("\n").split("|")
                flags = fields[5:]
                first = next((k for k, f in enumerate(flags) if f == "1"), None)
                genres[fields[0]] = f"genre{first}" if first is not None else ""
        return genres
    raise FileNotFoundError(f"No item genres beside the ratings in {directory} (movies.csv, movies.dat or u.item).")
