"""ONNX export: dynamic axes, per-family inputs, a self-contained artifact dir, and pruned zeros kept exact."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from autotune.compress.quantization import quantize_artifact
from autotune.runtime import OrtRuntime, export_artifact, feeds_for, fuse_onnx, load_artifact
from autotune.runtime.export import ARTIFACT_JSON, model_family

FAMILIES = ("bert", "roberta", "distilbert")


def torch_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def padded_feeds(input_names: tuple[str, ...], batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Synthetic feeds whose first row is padded at the end, so the exported mask handling is exercised."""
    feeds = feeds_for(input_names, batch, seq, vocab, seed)
    feeds["attention_mask"][0, seq // 2 :] = 0
    return feeds


@pytest.fixture(scope="module")
def artifacts(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One exported artifact per family, with the torch model it came from."""
    out = {}
    for family, directory in tiny_model_dirs.items():
        model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        artifact = export_artifact(model, tokenizer, tmp_path_factory.mktemp(f"art-{family}"), labels=["neg", "pos"])
        out[family] = (model, artifact)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_logits_match_torch_at_two_shapes(artifacts, family: str) -> None:
    model, artifact = artifacts[family]
    runtime = OrtRuntime(artifact.model_path, threads=1, vocab_size=artifact.vocab_size)
    for batch, seq in ((1, 7), (3, 19)):
        feeds = padded_feeds(artifact.input_names, batch, seq, artifact.vocab_size, seed=batch)
        logits = runtime.run(feeds)
        assert logits.shape == (batch, 2)
        np.testing.assert_allclose(logits, torch_logits(model, feeds), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_are_int64_and_only_those_the_family_uses(artifacts, family: str) -> None:
    _, artifact = artifacts[family]
    graph = onnx.load(artifact.model_path).graph
    names = tuple(i.name for i in graph.input)
    expected = ("input_ids", "attention_mask") + (("token_type_ids",) if family == "bert" else ())
    assert names == expected == artifact.input_names
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    assert [o.name for o in graph.output] == ["logits"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]


def test_artifact_dir_round_trips(artifacts) -> None:
    model, artifact = artifacts["bert"]
    loaded = load_artifact(artifact.dir)
    assert loaded == artifact
    meta = json.loads((artifact.dir / ARTIFACT_JSON).read_text())
    assert meta["family"] == "bert" and meta["num_heads"] == 4 and meta["hidden_size"] == 32
    assert meta["bits"] == 32 and meta["fused"] is False and meta["labels"] == ["neg", "pos"]
    assert meta["size_bytes"] == artifact.model_path.stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(loaded.dir)
    encoded = tokenizer(["a good movie", "the plot was very dull and flat"], padding=True, return_tensors="np")
    logits = OrtRuntime(loaded.model_path, threads=1, vocab_size=loaded.vocab_size).run(encoded)
    np.testing.assert_allclose(logits, torch_logits(model, {k: encoded[k] for k in loaded.input_names}), atol=1e-4)


def _zero_half_of_linears(model: torch.nn.Module) -> list[np.ndarray]:
    """Zero the smaller-magnitude half of every Linear weight (what magnitude pruning leaves behind)."""
    weights = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                threshold = module.weight.abs().flatten().median()
                module.weight[module.weight.abs() <= threshold] = 0.0
                weights.append(module.weight.numpy().copy())
    return weights


def _float_initializers(path: Path) -> list[np.ndarray]:
    model = onnx.load(path)
    return [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]


def test_pruned_zeros_stay_exact_zeros(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    pruned = _zero_half_of_linears(model)
    assert all((w == 0).mean() >= 0.5 for w in pruned)
    artifact = export_artifact(model, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path / "art")
    initializers = _float_initializers(artifact.model_path)
    for weight in pruned:
        assert any(
            np.array_equal(weight, init) or np.array_equal(weight.T, init) for init in initializers
        ), f"Linear weight {weight.shape} not found bit-exact among the ONNX initializers"
    fused = fuse_onnx(artifact.model_path, tmp_path / "fused.onnx", num_heads=4, hidden_size=32)
    zeros_fused = sum(int((init == 0).sum()) for init in _float_initializers(fused))
    assert zeros_fused >= sum(int((w == 0).sum()) for w in pruned)


@pytest.mark.parametrize("bits", [32, 8])
def test_a_student_with_pruned_heads_exports_fuses_and_matches_torch(tiny_bert_dir: Path, tmp_path: Path, bits: int) -> None:
    from autotune.compress import make_student
    from autotune.runtime import op_counts

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    student = make_student(teacher, 2, 32, 2, 64, head_dim=8)  # half the heads, each the teacher's width
    plain = export_artifact(student, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path / "fp32")
    assert (plain.num_heads, plain.hidden_size) == (2, 16)  # the attention's, what the fusion is told
    variant = quantize_artifact(plain, tmp_path / f"{bits}", bits=bits)
    fused = op_counts(onnx.load(str(variant.model_path)))
    assert fused.get("Attention" if bits == 32 else "QAttention") == 2
    feeds = padded_feeds(variant.input_names, 3, 19, variant.vocab_size, seed=3)
    logits = OrtRuntime(variant.model_path, threads=1, vocab_size=variant.vocab_size).run(feeds)
    np.testing.assert_allclose(logits, torch_logits(student, feeds), atol=1e-4 if bits == 32 else 0.05)


def test_unsupported_family_is_rejected() -> None:
    with pytest.raises(ValueError, match="model family must be one of"):
        model_family(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))


def test_quantize_artifact_writes_a_self_contained_variant_dir(artifacts, tmp_path: Path) -> None:
    model, artifact = artifacts["distilbert"]
    variant = quantize_artifact(artifact, tmp_path / "int8", bits=8)
    assert (variant.bits, variant.fused) == (8, True) and load_artifact(variant.dir) == variant
    tokenizer = AutoTokenizer.from_pretrained(variant.dir)
    encoded = tokenizer(["a good movie"], return_tensors="np")
    logits = OrtRuntime(variant.model_path, threads=1, vocab_size=variant.vocab_size).run(encoded)
    reference = torch_logits(model, {k: encoded[k] for k in variant.input_names})
    assert np.abs(logits - reference).max() <= 0.05 * np.abs(reference).max() + 1e-4
    with pytest.raises(ValueError, match="plain fp32 export"):
        quantize_artifact(variant, tmp_path / "again", bits=4)
