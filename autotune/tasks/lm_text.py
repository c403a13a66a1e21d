"""Text for causal language models: documents on disk -> `TextSplits`, and fixed-length token windows.

A split is by document (a play, a file, a paragraph of a single file, a row), never inside one, so no text of a
validation or test document is ever trained on, and windows never straddle two documents.

Sources (`load_text`):
- `builtin:shakespeare`: the 38 plays, split by a fixed list: 4 plays for validation (SHAKESPEARE_VALIDATION), 4 for
  test (SHAKESPEARE_TEST), the other 30 for training. The fractions and seed do not apply: every run, on every
  machine, compares on the same plays. The 8 held-out plays stand alone (no sequel of them is trained on).
- a `.txt` file: documents are its paragraphs (separated by blank lines).
- a directory: each `*.txt` file in it (not recursive) is one document, in name order.
- `.jsonl` / `.ndjson` / `.csv`: each row's `column` (required) is one document; rows with no text are skipped.
- another builtin name resolves to its file (e.g. `builtin:vader-movie-reviews` with column `text`).
Other sources are split by a seeded shuffle of the documents: `round(n * fraction)` (at least one) for validation
and for test, the rest (at least one) for training; each split keeps the documents' original order.
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from autotune.builtin import SHAKESPEARE, resolve_data
from autotune.tasks.data import DataError, json_object, read_utf8

SHAKESPEARE_VALIDATION = ("the-comedy-of-errors", "henry-viii", "julius-caesar", "the-tempest")
SHAKESPEARE_TEST = ("twelfth-night", "king-john", "measure-for-measure", "macbeth")
ROW_SUFFIXES = (".jsonl", ".ndjson", ".csv")
MIN_DOCUMENTS = 3


@dataclass(frozen=True)
class TextSplits:
    """Documents per split (each a whole play, file, paragraph or row; none in two splits)."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]


def load_text(path: str | Path, column: str | None = None, validation_fraction: float = 0.1,
              test_fraction: float = 0.1, seed: int = 0) -> TextSplits:
    """The documents of `path` (see the module docstring for the sources) split by document."""
    if str(path) == SHAKESPEARE:
        return shakespeare_splits(Path(resolve_data(SHAKESPEARE)))
    documents = read_documents(Path(resolve_data(str(path))), column)
    return split_documents(documents, validation_fraction, test_fraction, seed)


def shakespeare_splits(directory: Path) -> TextSplits:
    """The fixed split of the builtin plays by name."""
    plays = {file.stem: file for file in sorted(directory.glob("*.txt"))}
    missing = [name for name in SHAKESPEARE_VALIDATION + SHAKESPEARE_TEST if name not in plays]
    if missing:
        raise DataError(f"{directory} lacks the plays {', '.join(missing)}; run `autotune fetch --force` to fetch them again")
    held_out = set(SHAKESPEARE_VALIDATION + SHAKESPEARE_TEST)

    def texts(names: Sequence[str]) -> tuple[str, ...]:
        return tuple(plays[name].read_text(encoding="utf-8") for name in names)

    return TextSplits(train=texts([name for name in plays if name not in held_out]),
                      validation=texts(SHAKESPEARE_VALIDATION), test=texts(SHAKESPEARE_TEST))


def read_documents(path: Path, column: str | None = None) -> list[str]:
    """The non-empty documents of a .txt file, a directory of .txt files, or a column of a .jsonl/.csv file."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        documents = [read_text(file) for file in sorted(path.glob("*.txt"))]
        if not documents:
            raise DataError(f"data directory {path} has no .txt files")
    elif path.suffix.lower() == ".txt":
        documents = re.split(r"\n[ \t]*\n", read_text(path))
    elif path.suffix.lower() in ROW_SUFFIXES:
        documents = row_texts(path, read_text(path), column)
    else:
        raise DataError(f"{path}: text must be a .txt, .jsonl or .csv file or a directory of .txt files, "
                        f"not {path.suffix or 'a file without an extension'}")
    documents = [document.strip() for document in documents if document.strip()]
    if not documents:
        raise DataError(f"{path} has no text")
    return documents


def read_text(path: Path) -> str:
    """A text file's contents with every line end (`\\r\\n`, `\\r`) made `\\n`, as Python's universal newlines do
    (paragraphs are split on blank lines); may be empty."""
    return re.sub(r"\r\n?", "\n", read_utf8(path))


def row_texts(path: Path, content: str, column: str | None) -> list[str]:
    """The `column` of every row of a JSONL or CSV file (missing or null cells read as empty)."""
    if not column:
        raise DataError(f"{path}: a .jsonl or .csv file needs the name of its text column (data.text_column)")
    if path.suffix.lower() == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(content, newline="")))
    else:
        rows = [json_object(path, number, line) for number, line in enumerate(content.split("\n"), start=1) if line.strip()]
    present = sorted({key for row in rows for key in row if key is not None})
    if column not in present:
        raise DataError(f"{path} has no column {column!r}; its columns are {', '.join(map(repr, present)) or 'none'}")
    texts = [row.get(column) for row in rows]
    bad = next((text for text in texts if text is not None and not isinstance(text, str)), None)
    if bad is not None:
        raise DataError(f"{path}: column {column!r} holds a {type(bad).__name__} ({bad!r}), not text")
    return [text or "" for text in texts]


def split_documents(documents: Sequence[str], validation_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0) -> TextSplits:
    """A seeded split by document: at least one document in each split, each in its original order."""
    for name, fraction in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 < fraction < 1:
            raise DataError(f"{name} must be between 0 and 1 (exclusive), got {fraction}")
    n = len(documents)
    if n < MIN_DOCUMENTS:
        raise DataError(f"the text has {n} document(s), too few to split into training, validation and test "
                        f"(at least {MIN_DOCUMENTS}: paragraphs, files or rows)")
    n_validation, n_test = (max(1, round(n * fraction)) for fraction in (validation_fraction, test_fraction))
    if n - n_validation - n_test < 1:
        raise DataError(f"validation_fraction {validation_fraction} and test_fraction {test_fraction} of {n} documents "
                        "leave none for training; use smaller fractions")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts = order[:n_validation], order[n_validation:n_validation + n_test], order[n_validation + n_test:]
    validation, test, train = (tuple(documents[i] for i in sorted(part)) for part in parts)
    return TextSplits(train=train, validation=validation, test=test)


def token_windows(tokenizer: Any, documents: Sequence[str], length: int, stride: int | None = None,
                  limit: int | None = None) -> torch.Tensor:
    """Fixed windows of `length` token ids, [n, length] int64, cut from each document on its own (none straddles two),
    every `stride` tokens (default `length`: no overlap); a document's short tail is dropped; `limit` keeps the first
    windows in document order. Documents are tokenized without special tokens (`add_special_tokens=False`): a window
    starts anywhere inside a document, so a BOS on the first one only would make windows unlike each other; every
    window is plain text, scored the same way."""
    stride = length if stride is None else stride
    for name, value in (("window length", length), ("stride", stride), ("limit", 1 if limit is None else limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"the {name} must be a positive integer, got {value!r}")
    if length < 2:
        raise DataError(f"the window length must be at least 2 tokens (an input and a next token), got {length}")
    windows: list[torch.Tensor] = []
    count, longest = 0, 0
    for document in documents:
        ids = torch.tensor(tokenizer(document, add_special_tokens=False)["input_ids"], dtype=torch.long)
        longest = max(longest, len(ids))
        if len(ids) >= length:
            windows.append(ids.unfold(0, length, stride))
            count += len(windows[-1])
        if limit is not None and count >= limit:
            break
    if not windows:
        raise DataError(f"no window of {length} tokens fits: the longest of the {len(documents)} document(s) has "
                        f"{longest} tokens; use a shorter window or longer texts")
    return torch.cat(windows)[:limit].contiguous()
