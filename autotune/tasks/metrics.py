"""Classification metrics in plain numpy, so the figure the tuner optimises needs no sklearn at run time.

Macro-F1 is reported next to accuracy because compression tends to hurt minority classes first: a student
that drops a rare class can keep its accuracy on an imbalanced set while its macro-F1 falls.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ArrayLike = Sequence[int] | np.ndarray


def _as_pair(labels: ArrayLike, preds: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels, dtype=np.int64).ravel(), np.asarray(preds, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    if y.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    return y, p


def accuracy(labels: ArrayLike, preds: ArrayLike) -> float:
    """Fraction of predictions equal to their label."""
    y, p = _as_pair(labels, preds)
    return float(np.mean(y == p))


def macro_f1(labels: ArrayLike, preds: ArrayLike, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in `labels` or `preds`.

    A class absent from both has no true positives, false positives or false negatives, so its F1 is 0/0;
    it is left out of the mean rather than counted as 0 (which would punish a model for a class the
    evaluation set does not contain) or 1. This matches scikit-learn's `f1_score(average="macro")` with its
    default `labels=None`. A class present in only one of the two scores 0, as it should.
    """
    y, p = _as_pair(labels, preds)
    for name, values in (("label", y), ("prediction", p)):
        if values.min() < 0 or values.max() >= num_labels:
            raise ValueError(f"a {name} lies outside 0..{num_labels - 1} (num_labels={num_labels})")
    confusion = np.bincount(y * num_labels + p, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return float(f1.mean())
