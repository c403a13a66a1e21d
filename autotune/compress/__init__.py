"""Compression operators: each is a plain function that takes a model and returns a model.

Nothing here imports Optuna: the operators know nothing of the study that calls them.
"""

from autotune.compress.decoder import (
    block_importance,
    blocks_to_keep,
    decoder_sparsity,
    drop_blocks,
    ffn_importance,
    narrow_ffn,
    prune_decoder,
)
from autotune.compress.distillation import (
    OPTIMIZER,
    DistillResult,
    TokenizedData,
    distill,
    finetune_teacher,
    mean_kd_loss,
    teacher_logits,
    teacher_states,
    tokenize,
)
from autotune.compress.healing import HealResult, TeacherTargets, heal, teacher_targets, topk_kd_loss
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
    "OPTIMIZER",
    "build_variant",
    "check_bits",
    "quantize_artifact",
    "DistillResult",
    "HealResult",
    "PruneResult",
    "PruningSchedule",
    "TeacherTargets",
    "TokenizedData",
    "block_importance",
    "blocks_to_keep",
    "decoder_sparsity",
    "distill",
    "drop_blocks",
    "even_layer_indices",
    "ffn_importance",
    "finetune_teacher",
    "heal",
    "make_student",
    "mean_kd_loss",
    "measured_sparsity",
    "narrow_ffn",
    "prune",
    "prune_decoder",
    "shaped_like",
    "sparsity_schedule",
    "teacher_logits",
    "teacher_states",
    "teacher_targets",
    "tokenize",
    "topk_kd_loss",
]
