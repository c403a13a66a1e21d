"""Task families behind one interface (`base.TaskFamily`), chosen by `model.task`: text classification and causal
language models.

- `base`: the interface, and the values it returns (`Score`, `Timing`).
- `text_classification`: the encoder-classifier family.
- `causal_lm`: the causal-LM family (llama-family decoders, perplexity, generation latencies).
- `data`: labelled text files -> `LabeledTexts`; seeded stratified `split` and `subsample`.
- `metrics`: `accuracy`, `macro_f1` in numpy.
- `encoding`: per-batch padded `encode_batches`; `predict` / `evaluate` through any runtime's
  `run(feeds) -> logits`.
"""

from autotune.tasks.base import Score, TaskFamily, Timed, Timing
from autotune.tasks.data import DataError, LabeledTexts, Splits, load_labeled_texts, split, subsample
from autotune.tasks.metrics import accuracy, macro_f1
from autotune.tasks.encoding import (
    EncodedBatch,
    EvalResult,
    RunLogits,
    encode_batches,
    evaluate,
    predict,
    predict_logits,
)
from autotune.caches import cache_root
from autotune.config import TuneSpec
from autotune.progress import SilentProgress
from autotune.tasks.text_classification import TextClassification
from autotune.tasks.causal_lm import CausalLM

#: Task families by `model.task`.
TASKS: dict[str, type[TaskFamily]] = {TextClassification.name: TextClassification, CausalLM.name: CausalLM}


def family_for(task: str) -> type[TaskFamily]:
    """The family class registered for `model.task`, or ValueError naming those there are."""
    if task not in TASKS:
        raise ValueError(f"model.task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]


def prepared_task(spec: TuneSpec) -> TaskFamily:
    """The spec's task ready for students, as a tune prepares it (teacher fine-tuned, its targets cached, in the
    user's cache), without a study or a profile: what the benchmarks measure operators on."""
    family = family_for(spec.model.task)
    return family.prepare(family.load(spec), spec, cache_root(), SilentProgress())


__all__ = [
    "CausalLM",
    "DataError",
    "EncodedBatch",
    "EvalResult",
    "LabeledTexts",
    "RunLogits",
    "Score",
    "TASKS",
    "TaskFamily",
    "TextClassification",
    "Timed",
    "Timing",
    "family_for",
    "prepared_task",
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
