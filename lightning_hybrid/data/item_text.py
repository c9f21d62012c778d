"""Item text for text towers: reading it beside the ratings, and turning it into token ids.

Two tokenizers: `WordTokenizer` (words of the data itself, built offline) or, with
``SequenceDataModule(text_tokenizer=path)``, a Hugging Face tokenizer loaded from a local
directory (never downloaded), so an LLM-based model reads item text with its backbone's own
vocabulary (`lightning_hybrid.models.llm_rec.LLMRec` can start the token table from the
backbone's token embedding). Token id 0 is padding in both: Hugging Face ids are shifted by one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def load_item_text(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Raw item id -> text (title and genres) from ``movies.csv``, ``movies.dat`` or ``u.item``."""
    directory = Path(directory)
    texts: dict[str, str] = {}
    if (directory / "movies.csv").is_file():
        path = directory / "movies.csv"
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:3]] != ["movieId", "title", "genres"]:
                raise ValueError(f"{path}:1: expected header 'movieId,title,genres', got {header!r}.")
            for line_no, row in enumerate(reader, start=2):
                if len(row) < 3:
                    raise ValueError(f"{path}:{line_no}: expected movieId,title,genres; got {row!r}.")
                texts[row[0].strip()] = f"{row[1]} {row[2].replace('|', ' ')}"
    elif (directory / "movies.dat").is_file():
        path = directory / "movies.dat"
        with path.open(encoding="latin-1") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("::")
                if len(fields) < 3:
                    raise ValueError(f"{path}:{line_no}: expected id::title::genres; got {line.strip()!r}.")
                texts[fields[0]] = f"{fields[1]} {fields[2].replace('|', ' ')}"
    elif (directory / "u.item").is_file():
        path = directory / "u.item"
        with path.open(encoding="latin-1") as handle:
            for line_no, line in enumerate(handle, start=1):
                fields = line.rstrip("\n").split("|")
                if len(fields) < 2:
                    raise ValueError(f"{path}:{line_no}: expected id|title|...; got {line.strip()!r}.")
                texts[fields[0]] = fields[1]
    else:
        raise FileNotFoundError(f"No item text beside the ratings in {directory} (movies.csv, movies.dat or u.item).")
    return texts


class WordTokenizer:
    """Lower-cased words and numbers, a vocabulary built from the data (offline, no downloads).

    Id 0 is padding, 1 is unknown; the ``max_vocab - 2`` most frequent words get ids from 2.
    """

    def __init__(self, texts: Sequence[str], max_vocab: int = 20000) -> None:
        import re
        from collections import Counter

        self._split = re.compile(r"[a-z0-9]+")
        counts = Counter(word for text in texts for word in self._split.findall(text.lower()))
        self.vocab = {word: i + 2 for i, (word, _) in enumerate(counts.most_common(max(0, max_vocab - 2)))}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    def encode(self, text: str, length: int) -> list[int]:
        ids = [self.vocab.get(w, 1) for w in self._split.findall(text.lower())][:length]
        return ids + [0] * (length - len(ids))



def encode_item_texts(
    texts: Sequence[str], *, text_len: int, max_vocab: int, tokenizer_path: str | None = None
) -> tuple[torch.Tensor, int]:
    """([len(texts) + 1, text_len] token ids, row 0 padding; the vocabulary size, padding included)."""
    tokens = torch.zeros(len(texts) + 1, text_len, dtype=torch.long)
    if tokenizer_path is None:
        tokenizer = WordTokenizer(texts, max_vocab=max_vocab)
        for index, text in enumerate(texts, start=1):
            tokens[index] = torch.tensor(tokenizer.encode(text, text_len))
        return tokens, tokenizer.vocab_size
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ImportError(
            f"SequenceDataModule(text_tokenizer={tokenizer_path!r}) needs Hugging Face transformers (pip install -r requirements/hf.txt)."
        ) from error
    if not Path(tokenizer_path).is_dir():
        raise FileNotFoundError(
            f"SequenceDataModule(text_tokenizer={tokenizer_path!r}): not a local directory. Give the directory a "
            "tokenizer was saved to (tokenizer.save_pretrained(path), or the backbone's own model directory); nothing is downloaded."
        )
    hf = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    for index, text in enumerate(texts, start=1):
        ids = hf(text, add_special_tokens=False, truncation=True, max_length=text_len)["input_ids"][:text_len]
        if ids:
            tokens[index, : len(ids)] = torch.tensor(ids) + 1  # 0 stays padding
    return tokens, len(hf) + 1
