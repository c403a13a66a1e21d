"""Text classification: tokenised batches padded per batch, and accuracy measured in the deployment runtime.

Why per-batch padding: on a CPU training and evaluation are compute-bound, and encoder cost grows with
the padded width (linearly in the FFN, quadratically in attention). Texts are short next to `max_length`, so
padding every row to `max_length` mostly computes on padding. Grouping texts of similar token length into a
batch and padding only to that batch's longest member removes most of it; since padded positions are masked
out, predictions do not change. Each batch carries the original row indices so results map back to input
order.

`evaluate` scores any `run_logits` callable (feeds -> logits), which is the interface the ONNX Runtime and
torch runtimes expose as `run(feeds)`, so the number reported is the one of the artifact that ships.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Mapping, Sequence

import numpy as np

from autotune.tasks.data import LabeledTexts
from autotune.tasks.metrics import accuracy, macro_f1

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

RunLogits = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True, eq=False)
class EncodedBatch:
    """One padded batch: int64 arrays of shape (rows, width) and `indices`, each row's position in the input."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def feeds(self, input_names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays by input name, limited to `input_names` when a runtime takes fewer (DistilBERT has no
        token_type_ids); a name this batch cannot supply is an error, not a silent omission."""
        available = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            available["token_type_ids"] = self.token_type_ids
        if input_names is None:
            return available
        missing = [name for name in input_names if name not in available]
        if missing:
            raise ValueError(
                f"the runtime needs inputs {', '.join(map(repr, missing))} but the tokenizer gives only "
                f"{', '.join(map(repr, available))}"
            )
        return {name: available[name] for name in input_names}


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on one labelled set; `seconds` is wall time for tokenising plus inference."""

    accuracy: float
    macro_f1: float
    n: int
    seconds: float


def _pad(rows: Sequence[Sequence[int]], width: int, value: int, left: bool) -> np.ndarray:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        if left:
            out[i, width - len(row):] = row
        else:
            out[i, : len(row)] = row
    return out


def encode_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    sort_by_length: bool = True,
) -> list[EncodedBatch]:
    """Tokenise (truncating to `max_length`), group by token length, and pad each batch to its longest row.

    With `sort_by_length=False` batches follow input order (still padded per batch), e.g. for training
    where the batch composition should be the caller's shuffle.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token, so batches cannot be padded")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids: list[list[int]] = encoded["input_ids"]
    types: list[list[int]] | None = encoded.get("token_type_ids")
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(ids))
    left = tokenizer.padding_side == "left"
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = int(lengths[chunk].max())
        mask_rows = [[1] * int(lengths[i]) for i in chunk]
        batches.append(
            EncodedBatch(
                input_ids=_pad([ids[i] for i in chunk], width, tokenizer.pad_token_id, left),
                attention_mask=_pad(mask_rows, width, 0, left),
                token_type_ids=None
                if types is None
                else _pad([types[i] for i in chunk], width, tokenizer.pad_token_type_id, left),
                indices=chunk.astype(np.int64),
            )
        )
    return batches


def predict_logits(
    run_logits: RunLogits,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    input_names: Collection[str] | None = None,
) -> np.ndarray:
    """Logits of shape (len(texts), num_labels) in input order; e.g. a teacher's, computed once and cached."""
    logits: np.ndarray | None = None
    for batch in encode_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
        out = np.asarray(run_logits(batch.feeds(input_names)))
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise ValueError(
                f"run_logits returned shape {out.shape} for a batch of {len(batch)}; expected (rows, labels)"
            )
        if logits is None:
            logits = np.empty((len(texts), out.shape[1]), dtype=out.dtype)
        logits[batch.indices] = out
    if logits is None:
        raise ValueError("no texts to predict")
    return logits


def predict(
    run_logits: RunLogits,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    input_names: Collection[str] | None = None,
) -> np.ndarray:
    """Predicted class ids (int64) in input order."""
    logits = predict_logits(
        run_logits, tokenizer, texts, batch_size=batch_size, max_length=max_length, input_names=input_names
    )
    return logits.argmax(axis=1).astype(np.int64)


def evaluate(
    run_logits: RunLogits,
    tokenizer: PreTrainedTokenizerBase,
    data: LabeledTexts,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    input_names: Collection[str] | None = None,
) -> EvalResult:
    """Accuracy and macro-F1 of `run_logits` on `data`; the number of classes is the width of the logits."""
    start = time.perf_counter()
    logits = predict_logits(
        run_logits, tokenizer, data.texts, batch_size=batch_size, max_length=max_length, input_names=input_names
    )
    num_labels = logits.shape[1]
    if max(data.labels) >= num_labels:
        raise ValueError(f"the data has label {max(data.labels)} but the model gives only {num_labels} logits")
    preds = logits.argmax(axis=1)
    result = EvalResult(
        accuracy=accuracy(data.labels, preds),
        macro_f1=macro_f1(data.labels, preds, num_labels),
        n=len(data),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "evaluated %d rows: accuracy %.4f, macro-F1 %.4f in %.2fs",
        result.n, result.accuracy, result.macro_f1, result.seconds,
    )
    return result
