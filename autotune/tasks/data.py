"""Labelled text on disk -> `LabeledTexts`, and seeded stratified splits of it.

The tuner's accuracy figure is only as good as the data behind it, so reading is strict: every problem a
user can fix in their file (missing column, stray label, broken quoting, wrong encoding) is one `DataError`
sentence that names the file, the row and the field. The one thing that is forgiven is an empty text cell:
such rows are skipped with a logged count, because exported datasets routinely carry a few blank rows and
refusing the whole file for them helps nobody; a file with no non-empty text at all is still an error.

Formats (chosen from the extension unless `fmt` is given):
- CSV: RFC 4180, header row, double-quote quoting. Every row must have as many fields as the header, which
  catches the classic unquoted comma inside a sentence instead of silently shifting the label column.
- TSV: the IANA text/tab-separated-values format, read WITHOUT quote handling: fields cannot contain tabs or
  newlines, and a `"` in a text is an ordinary character (GLUE-style files rely on this).
- JSONL (also .ndjson): one JSON object per line; blank lines are ignored.
All are decoded as UTF-8 (a leading byte-order mark is accepted, as Excel writes one).

Labels are either all integers (JSON ints, or cells such as "0", "1") or strings. String labels are mapped to
ids in sorted (code point) order of the distinct strings and the mapping is kept in `label_names`, so it can be
saved next to the exported model. When a second file must use the same ids (a separate evaluation file, whose
classes may be a subset), pass the first file's `label_names`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

logger = logging.getLogger(__name__)

Format = Literal["csv", "tsv", "jsonl"]
FORMATS: tuple[str, ...] = ("csv", "tsv", "jsonl")
_SUFFIX_FORMATS: dict[str, Format] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT_LABEL = re.compile(r"[+-]?\d+")


class DataError(ValueError):
    """A problem with the user's data file, stated as one sentence naming the file and the field."""


@dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer class ids; `label_names[i]` is how class `i` was written in the source file."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int] | np.ndarray) -> LabeledTexts:
        """The rows at `indices`, in that order, with the same label mapping."""
        return LabeledTexts(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            label_names=self.label_names,
        )


@dataclass(frozen=True)
class Splits:
    """Disjoint train / validation / test parts of one dataset. Only the final report reads `test`."""

    train: LabeledTexts
    validation: LabeledTexts
    test: LabeledTexts


@dataclass(frozen=True)
class _Record:
    """One source row before labels are interpreted: where it came from, its text, its raw label."""

    where: str
    text: str
    label: int | str


def load_labeled_texts(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    num_labels: int | None = None,
    fmt: Format | None = None,
    label_names: Sequence[str] | None = None,
) -> LabeledTexts:
    """Read a CSV, TSV or JSONL file of labelled texts.

    `num_labels`, when given, bounds integer labels to 0..num_labels-1 and the count of distinct string labels.
    `label_names` fixes the string -> id mapping (id = position) instead of deriving it from this file.
    Raises `DataError` for anything wrong with the file.
    """
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    path = Path(path)
    fmt = _resolve_format(path, fmt)
    content = _read_data_file(path)
    if fmt == "jsonl":
        rows = _jsonl_records(path, content, text_column, label_column)
    else:
        rows = _delimited_records(path, content, "," if fmt == "csv" else "\t", text_column, label_column)
    records = _drop_empty_texts(path, text_column, list(rows))
    ids, names = _label_ids(path, label_column, records, num_labels, label_names)
    return LabeledTexts(texts=tuple(r.text for r in records), labels=ids, label_names=names)


def _resolve_format(path: Path, fmt: str | None) -> Format:
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"{path}: format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
        return fmt  # type: ignore[return-value]
    suffix = path.suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"use {', '.join(_SUFFIX_FORMATS)} or pass fmt= one of {', '.join(FORMATS)}"
        )
    return _SUFFIX_FORMATS[suffix]


def read_utf8(path: Path) -> str:
    """A file's whole text (UTF-8, a leading byte-order mark skipped); may be empty. Files are read at once because
    a classification set or a tuning text fits in memory."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror or err})") from None
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        raise DataError(
            f"{path} is not UTF-8: byte 0x{raw[offset]:02x} at offset {offset} cannot be decoded; "
            "re-save the file as UTF-8"
        ) from None


def json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    """Line `number` of a JSONL file as an object, or DataError naming the line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: line {number} is a JSON {type(obj).__name__}, not an object with fields")
    return obj


def _read_data_file(path: Path) -> str:
    """The labelled data file's text; a missing, irregular or empty file is one DataError."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")
    content = read_utf8(path)
    if not content.strip():
        raise DataError(f"data file {path} is empty")
    return content


def _delimited_records(
    path: Path, content: str, delimiter: str, text_column: str, label_column: str
) -> Iterator[_Record]:
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
        for column in (text_column, label_column):
            if column not in header:
                raise DataError(
                    f"{path} has no column {column!r}; its columns are {', '.join(map(repr, header))}"
                )
        text_at, label_at = header.index(text_column), header.index(label_column)
        for row in reader:
            if not row:
                continue
            where = f"line {reader.line_num}"
            if len(row) != len(header):
                raise DataError(
                    f"{path}: {where} has {len(row)} fields but the header has {len(header)}"
                    + (", so a text probably contains an unquoted ','" if delimiter == "," else "")
                )
            yield _Record(where, row[text_at], row[label_at].strip())
    except csv.Error as err:
        kind = "CSV" if delimiter == "," else "TSV"
        raise DataError(f"{path}: line {reader.line_num} is not valid {kind} ({err})") from None


def _jsonl_records(path: Path, content: str, text_column: str, label_column: str) -> Iterator[_Record]:
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        obj = json_object(path, number, line)
        for column in (text_column, label_column):
            if column not in obj:
                raise DataError(
                    f"{path}: {where} has no field {column!r}; its fields are {', '.join(map(repr, obj))}"
                )
        text, label = obj[text_column], obj[label_column]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path}: {where} field {text_column!r} is a JSON {type(text).__name__}, not a string")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(
                f"{path}: {where} field {label_column!r} is {label!r}; a label must be an integer or a string"
            )
        yield _Record(where, text or "", label.strip() if isinstance(label, str) else label)


def _drop_empty_texts(path: Path, text_column: str, records: list[_Record]) -> list[_Record]:
    if not records:
        raise DataError(f"{path} has no data rows")
    kept = [r for r in records if r.text.strip()]
    skipped = [r.where for r in records if not r.text.strip()]
    if not kept:
        raise DataError(f"{path}: every row has an empty {text_column!r}")
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d rows with an empty %r (%s)", path, len(skipped), text_column, shown)
    return kept


def _label_ids(
    path: Path,
    label_column: str,
    records: list[_Record],
    num_labels: int | None,
    label_names: Sequence[str] | None,
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Class ids and names: integer labels as they are, string labels through a sorted or given mapping."""
    for r in records:
        if r.label == "":
            raise DataError(f"{path}: {r.where} has an empty {label_column!r}")
    if label_names is not None:
        return _mapped_ids(path, label_column, records, num_labels, tuple(label_names))
    if all(isinstance(r.label, int) or _INT_LABEL.fullmatch(r.label) for r in records):
        return _integer_ids(path, label_column, records, num_labels)
    if any(isinstance(r.label, int) for r in records):
        first = next(r for r in records if isinstance(r.label, str) and not _INT_LABEL.fullmatch(r.label))
        raise DataError(
            f"{path}: {first.where} has the string {label_column!r} {first.label!r}, "
            "but other rows have integer labels; use one kind throughout"
        )
    names = tuple(sorted({str(r.label) for r in records}))
    return _mapped_ids(path, label_column, records, num_labels, names)


def _integer_ids(
    path: Path, label_column: str, records: list[_Record], num_labels: int | None
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    ids = tuple(int(r.label) for r in records)
    limit = num_labels if num_labels is not None else max(ids) + 1
    for r, value in zip(records, ids):
        if not 0 <= value < limit:
            bound = f"num_labels is {num_labels}" if num_labels is not None else "labels must be >= 0"
            raise DataError(
                f"{path}: {r.where} has {label_column!r} {value}, outside 0..{limit - 1} ({bound})"
            )
    return ids, tuple(str(i) for i in range(limit))


def _mapped_ids(
    path: Path, label_column: str, records: list[_Record], num_labels: int | None, names: tuple[str, ...]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if num_labels is not None and len(names) > num_labels:
        raise DataError(
            f"{path}: {label_column!r} has {len(names)} classes ({', '.join(map(repr, names))}) "
            f"but num_labels is {num_labels}"
        )
    index = {name: i for i, name in enumerate(names)}
    for r in records:
        if str(r.label) not in index:
            raise DataError(
                f"{path}: {r.where} has {label_column!r} {r.label!r}, which is not one of "
                f"{', '.join(map(repr, names))}"
            )
    return tuple(index[str(r.label)] for r in records), names


def _stratified_order(labels: Sequence[int], rng: np.random.Generator, stratify: bool) -> np.ndarray:
    """A random order of row indices in which every prefix holds each class in proportion (within one row).

    Each row gets its rank within its own class, scaled to (0, 1); sorting by that fraction (random
    tie-break) interleaves the classes evenly, so cutting the order anywhere gives stratified parts whose
    sizes add up exactly, with no per-class rounding to reconcile.
    """
    n = len(labels)
    tie_break = rng.random(n)
    if not stratify:
        return np.argsort(tie_break, kind="stable")
    label_array = np.asarray(labels)
    fraction = np.empty(n)
    for cls in np.unique(label_array):
        members = np.flatnonzero(label_array == cls)
        shuffled = rng.permutation(members)
        fraction[shuffled] = (np.arange(len(shuffled)) + 0.5) / len(shuffled)
    return np.lexsort((tie_break, fraction))


def _rows_for(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))


def split(
    data: LabeledTexts,
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    stratify: bool = True,
) -> Splits:
    """Seeded, disjoint train/validation/test parts, stratified by label; rows keep their input order.

    A fraction of exactly 0 asks for no such split (e.g. the test set is a separate file). A positive fraction
    that rounds to no rows, or fractions that leave no training rows, are refused with ValueError rather than
    silently producing an empty split that would make an accuracy meaningless.
    """
    n = len(data)
    for name, fraction in (("validation", validation), ("test", test)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} fraction must be in [0, 1), got {fraction}")
        if fraction > 0 and _rows_for(fraction, n) == 0:
            raise ValueError(f"{name}={fraction} of {n} rows is less than one row; use a larger fraction")
    n_test, n_validation = _rows_for(test, n), _rows_for(validation, n)
    if n_test + n_validation >= n:
        raise ValueError(
            f"validation={validation} and test={test} of {n} rows leave no training rows; use smaller fractions"
        )
    order = _stratified_order(data.labels, np.random.default_rng(seed), stratify)
    parts = np.split(order, [n_test, n_test + n_validation])
    test_idx, validation_idx, train_idx = (np.sort(p) for p in parts)
    return Splits(train=data.select(train_idx), validation=data.select(validation_idx), test=data.select(test_idx))


def subsample(data: LabeledTexts, n: int, seed: int = 0) -> LabeledTexts:
    """A stratified, seeded subset of `n` rows in input order, for quick modes; all of `data` if n >= len."""
    if n < 1:
        raise ValueError(f"subsample size must be >= 1, got {n}")
    if n >= len(data):
        return data
    order = _stratified_order(data.labels, np.random.default_rng(seed), stratify=True)
    return data.select(np.sort(order[:n]))
