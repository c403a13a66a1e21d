"""Predictions from a deployed classifier directory: what a user does with `runs/NAME/model/`.

`load_model(dir)` reads the artifact (ONNX file, tokenizer, `artifact.json`, `config.json`) and returns a
`Classifier` whose `predict(texts)` pads per batch, runs ONNX Runtime with the threads the model was tuned for,
and names each label as the training data did. `autotune predict` prints the same from the command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autotune.models import ModelError
from autotune.runtime import Artifact, InferenceRuntime, artifact_runtime, load_artifact
from autotune.runtime.export import ARTIFACT_JSON
from autotune.tasks.encoding import predict_logits

#: Token length a model is fed when its artifact does not say what it was tuned at.
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class Prediction:
    """One text's label (its name, or its class id as text where the data had none) and that label's probability."""

    text: str
    label: str
    score: float


@dataclass(frozen=True)
class Classifier:
    """A deployed text classifier ready to predict; build it with `load_model`."""

    artifact: Artifact
    tokenizer: Any
    runtime: InferenceRuntime
    max_length: int

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        """Labels and probabilities for `texts`, in their order; batches are grouped by length and padded per batch."""
        if not texts:
            return []
        logits = predict_logits(self.runtime.run, self.tokenizer, list(texts), batch_size=batch_size,
                                max_length=self.max_length)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        names = self.artifact.labels or tuple(str(i) for i in range(logits.shape[1]))
        return [Prediction(text, names[int(row.argmax())], float(row.max())) for text, row in zip(texts, probabilities)]


def load_model(directory: str | os.PathLike[str], threads: int | None = None) -> Classifier:
    """The classifier in an artifact directory, run with `threads` (default: the threads it was tuned for, else all
    physical cores). A directory that is not an artifact is one ModelError sentence."""
    from transformers import AutoTokenizer

    from profilers.cpu import probe_cpu
    from profilers.hardware import default_threads

    root = Path(directory)
    if not (root / ARTIFACT_JSON).is_file():
        raise ModelError(f"{root} is not a model directory autotune wrote (no {ARTIFACT_JSON}); "
                         "pass a run's model/ directory, e.g. runs/sentiment/model")
    artifact = load_artifact(root)
    measured = artifact.measured or {}
    threads = threads or measured.get("threads") or default_threads(probe_cpu())
    runtime = artifact_runtime(artifact, threads=int(threads))
    return Classifier(artifact, AutoTokenizer.from_pretrained(root), runtime,
                      int(measured.get("max_length") or DEFAULT_MAX_LENGTH))
