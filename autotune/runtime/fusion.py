"""ONNX Runtime's transformer graph fusions, applied to an exported artifact and checked by counting ops.

A fused BERT-family graph runs each layer as a handful of contrib kernels (Attention, SkipLayerNormalization,
BiasGelu, EmbedLayerNormalization) instead of dozens of small ops; it is the baseline every speedup is
quoted against, so "fusion found nothing" must be visible, not silent: `fuse_onnx` logs the fused-op counts
and `op_counts` lets tests and reports assert on them.

ORT's optimizer has no separate RoBERTa/DistilBERT model type: the "bert" fusions recognise all three
exported graphs, each layer fused to one Attention, two SkipLayerNormalization and one Gelu (BiasGelu); the
fusion tests count them for every family.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import onnx
from onnxruntime.transformers.onnx_model import OnnxModel
from onnxruntime.transformers.optimizer import optimize_model

logger = logging.getLogger(__name__)

ORT_MODEL_TYPE = "bert"


def _not_pruned_attention_notice(record: logging.LogRecord) -> bool:
    """Drop ORT's notice that an attention is narrower than its input: a student with pruned heads is told its
    attention's width (Artifact.hidden_size), which is what the fusion needs to fuse it."""
    return not record.getMessage().startswith("Input hidden size")


logging.getLogger("fusion_attention").addFilter(_not_pruned_attention_notice)


def optimize_transformer(onnx_path: str | os.PathLike[str], *, num_heads: int, hidden_size: int) -> OnnxModel:
    """ORT's fused model object for an exported BERT-family graph (kept in memory for further conversion)."""
    if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
        raise ValueError(f"num_heads ({num_heads}) and hidden_size ({hidden_size}) must be positive, hidden_size a multiple of num_heads")
    optimized = optimize_model(os.fspath(onnx_path), model_type=ORT_MODEL_TYPE, num_heads=num_heads, hidden_size=hidden_size)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    logger.info("fused %s: %s", onnx_path, fused or "nothing")
    return optimized


def fuse_onnx(onnx_in: str | os.PathLike[str], onnx_out: str | os.PathLike[str], *, num_heads: int, hidden_size: int) -> Path:
    """Write the fp32 fused graph of `onnx_in` to `onnx_out`."""
    optimized = optimize_transformer(onnx_in, num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(os.fspath(onnx_out))
    return Path(onnx_out)


def op_counts(model: str | os.PathLike[str] | onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op type the top-level graph has (what a fusion or quantization check counts)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model), load_external_data=False)
    return Counter(node.op_type for node in proto.graph.node)
