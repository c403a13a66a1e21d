"""Bit widths on the ONNX artifact: fusion happened, each width is valid, close to fp32 and smaller.

Tolerances are relative to the largest |fp32 logit| on 8x32 random feeds of the tiny random BERT (whose logits
are ~1e-2, so absolute figures would mean little). Measured with ORT 1.32 on an AVX2 box, worst over the three
families: fp32 fused 3e-7, fp16 1e-3, int8 dynamic 1.9e-2, int8 static (BERT) 1.3e-2, int4 2e-3. Each bound
leaves a few-fold margin over that, tight enough to catch a broken scale or a missed dequantization (those
give errors of order 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from autotune.compress.quantization import ACCEPTED_BITS, build_variant, check_bits
from autotune.runtime import OrtRuntime, export_artifact, feeds_for, fuse_onnx, op_counts

REL_TOL = {32: 1e-5, 16: 1e-2, 8: 5e-2, 4: 2e-2}
STATIC_INT8_REL_TOL = 1e-1


@pytest.fixture(scope="module")
def bert(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny BERT's fp32 artifact, fixed evaluation feeds and their torch logits."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    artifact = export_artifact(model, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path_factory.mktemp("q-art"))
    feeds = feeds_for(artifact.input_names, 8, 32, artifact.vocab_size, seed=1)
    with torch.no_grad():
        reference = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    return artifact, feeds, reference


def relative_error(artifact, onnx_path: Path, feeds, reference) -> float:
    logits = OrtRuntime(onnx_path, threads=1, vocab_size=artifact.vocab_size).run(feeds)
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


def initializer_bytes(path: Path, data_types: set[int] | None = None) -> int:
    """Bytes of stored tensors (the weights), optionally of some element types only.

    Tiny models' files are dominated by graph structure, so sizes are asserted on weight bytes.
    """
    model = onnx.load(path)
    return sum(
        numpy_helper.to_array(i).nbytes for i in model.graph.initializer if data_types is None or i.data_type in data_types
    )


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_fusion_finds_attention_skip_layernorm_and_gelu(tiny_model_dirs, tmp_path: Path, family: str) -> None:
    directory = tiny_model_dirs[family]
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    artifact = export_artifact(model, AutoTokenizer.from_pretrained(directory), tmp_path / "art")
    counts = op_counts(fuse_onnx(artifact.model_path, tmp_path / "fused.onnx", num_heads=4, hidden_size=32))
    layers = artifact.num_layers
    assert counts["Attention"] == layers
    assert counts["SkipLayerNormalization"] == 2 * layers
    assert counts["BiasGelu"] + counts["Gelu"] + counts["FastGelu"] == layers
    assert counts["Softmax"] == 0 and counts["Erf"] == 0


@pytest.mark.parametrize("bits", ACCEPTED_BITS)
def test_each_bit_width_is_valid_and_close_to_fp32(bert, tmp_path: Path, bits: int) -> None:
    artifact, feeds, reference = bert
    path = build_variant(artifact.model_path, tmp_path / f"b{bits}.onnx", bits, num_heads=4, hidden_size=32)
    onnx.checker.check_model(str(path))
    assert relative_error(artifact, path, feeds, reference) <= REL_TOL[bits]
    expected_op = {32: "Attention", 16: "Attention", 8: "QAttention", 4: "MatMulNBits"}[bits]
    assert op_counts(path)[expected_op] >= 1


@pytest.mark.parametrize("bits", [16, 8])
def test_unfused_variants_also_work(bert, tmp_path: Path, bits: int) -> None:
    artifact, feeds, reference = bert
    path = build_variant(artifact.model_path, tmp_path / "v.onnx", bits, fuse=False, num_heads=4, hidden_size=32)
    assert op_counts(path)["Attention"] == 0
    assert relative_error(artifact, path, feeds, reference) <= REL_TOL[bits]


def test_weights_shrink_with_bit_width(bert, tmp_path: Path) -> None:
    artifact, _, _ = bert
    paths = {b: build_variant(artifact.model_path, tmp_path / f"s{b}.onnx", b, num_heads=4, hidden_size=32) for b in ACCEPTED_BITS}
    fp32 = initializer_bytes(paths[32])
    assert 0.45 <= initializer_bytes(paths[16]) / fp32 <= 0.55  # every weight halves
    # int8 covers embeddings, Attention and MatMul weights (1 byte + per-channel scales); LayerNorm, biases,
    # pooler and classifier stay fp32, so the whole is ~0.3 of fp32, not 0.25.
    assert initializer_bytes(paths[8]) / fp32 <= 0.35
    # int4 covers the remaining MatMuls (Q/K/V stay inside fp32 Attention): their weights must cost
    # <= 1/8 + block scales (~0.16) of their fp32 bytes.
    fused = onnx.load(paths[32])
    weights = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    matmul_fp32 = sum(weights[n.input[1]].nbytes for n in fused.graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    nbits_model = onnx.load(paths[4])
    packed = {i.name: numpy_helper.to_array(i) for i in nbits_model.graph.initializer}
    nbits_bytes = sum(packed[name].nbytes for n in nbits_model.graph.node if n.op_type == "MatMulNBits" for name in n.input[1:3])
    assert 0.12 <= nbits_bytes / matmul_fp32 <= 0.17


def test_static_int8_qdq_with_calibration(bert, tmp_path: Path) -> None:
    artifact, feeds, reference = bert
    calibration = [feeds_for(artifact.input_names, 1, 32, artifact.vocab_size, seed=s) for s in range(8)]
    path = build_variant(
        artifact.model_path, tmp_path / "static.onnx", 8, num_heads=4, hidden_size=32, calibration=calibration, static=True
    )
    onnx.checker.check_model(str(path))
    counts = op_counts(path)
    assert counts["QuantizeLinear"] > 0, "activations were not quantized (only weights got Q/DQ)"
    assert counts["Attention"] == artifact.num_layers
    assert relative_error(artifact, path, feeds, reference) <= STATIC_INT8_REL_TOL


@pytest.mark.parametrize("bits", [0, 2, 3, 12, 64])
def test_unsupported_bits_raise_one_sentence(bits: int) -> None:
    with pytest.raises(ValueError, match=r"bits must be one of 32, 16, 8, 4, got"):
        check_bits(bits)


def test_static_needs_calibration_and_eight_bits(bert, tmp_path: Path) -> None:
    artifact, _, _ = bert
    with pytest.raises(ValueError, match="needs calibration"):
        build_variant(artifact.model_path, tmp_path / "x.onnx", 8, num_heads=4, hidden_size=32, static=True)
    with pytest.raises(ValueError, match="bits=8 only"):
        build_variant(artifact.model_path, tmp_path / "x.onnx", 4, num_heads=4, hidden_size=32, static=True, calibration=[])
    with pytest.raises(ValueError, match="bits must be one of"):
        build_variant(artifact.model_path, tmp_path / "x.onnx", 7, num_heads=4, hidden_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_the_predictors_node_counts_are_those_of_a_real_fused_export(tmp_path: Path, bits: int) -> None:
    """profilers/predictor.py counts graph nodes per layer and outside the layers: the fused exports written here
    (1 and 2 layers, the BERT family) must have exactly those counts, or the predictor models another graph."""
    import onnx
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from autotune.compress.quantization import quantize_artifact
    from autotune.runtime import export_artifact
    from conftest import tiny_config, write_tokenizer
    from profilers.predictor import NODES_FIXED, NODES_PER_LAYER

    write_tokenizer(tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    counts = {}
    for layers in (1, 2):
        config = tiny_config("bert")
        config.num_hidden_layers = layers
        config.vocab_size = 256  # more rows than positions, as in real models: ORT fuses the embeddings then
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
        plain = export_artifact(model, tokenizer, tmp_path / f"plain-{layers}")
        variant = quantize_artifact(plain, tmp_path / f"variant-{layers}", bits=bits)
        counts[layers] = len(onnx.load(str(variant.model_path)).graph.node)
    assert counts[2] - counts[1] == NODES_PER_LAYER[bits]
    assert counts[1] - NODES_PER_LAYER[bits] == NODES_FIXED[bits]
