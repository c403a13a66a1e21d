"""Tasks: what "accuracy" means for a task and how its data is read. Text classification is the first.

- `data`: labelled text files -> `LabeledTexts`; seeded stratified `split` and `subsample`.
- `metrics`: `accuracy`, `macro_f1` in numpy.
- `text_classification`: per-batch padded `encode_batches`; `predict` / `evaluate` through any runtime's
  `run(feeds) -> logits`.
"""

from autotune.tasks.data import DataError, LabeledTexts, Splits, load_labeled_texts, split, subsample
from autotune.tasks.metrics import accuracy, macro_f1
from autotune.tasks.text_classification import (
    EncodedBatch,
    EvalResult,
    RunLogits,
    encode_batches,
    evaluate,
    predict,
    predict_logits,
)

__all__ = [
    "DataError",
    "EncodedBatch",
    "EvalResult",
    "LabeledTexts",
    "RunLogits",
    "Splits",
    "accuracy",
    "encode_batches",
    "evaluate",
    "load_labeled_texts",
    "macro_f1",
    "predict",
    "predict_logits",
    "split",
    "subsample",
]
