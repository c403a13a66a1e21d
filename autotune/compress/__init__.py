"""Compression operators: each is a plain function that takes a model and returns a model.

Nothing here imports Optuna: the operators know nothing of the study that calls them.
"""

from autotune.compress.distillation import (
    DistillResult,
    TokenizedData,
    distill,
    finetune_teacher,
    mean_kd_loss,
    teacher_logits,
    tokenize,
)
from autotune.compress.pruning import (
    PruneResult,
    PruningSchedule,
    measured_sparsity,
    prune,
    sparsity_schedule,
)
from autotune.compress.quantization import ACCEPTED_BITS, build_variant, check_bits, quantize_artifact
from autotune.compress.student import even_layer_indices, make_student, shaped_like

__all__ = [
    "ACCEPTED_BITS",
    "build_variant",
    "check_bits",
    "quantize_artifact",
    "DistillResult",
    "PruneResult",
    "PruningSchedule",
    "TokenizedData",
    "distill",
    "even_layer_indices",
    "finetune_teacher",
    "make_student",
    "mean_kd_loss",
    "measured_sparsity",
    "prune",
    "shaped_like",
    "sparsity_schedule",
    "teacher_logits",
    "tokenize",
]
