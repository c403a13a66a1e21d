"""The runtime interface: ORT and torch give the same logits as the source model, and measure honours threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from autotune.runtime import InferenceRuntime, OrtRuntime, TorchRuntime, export_artifact, feeds_for, open_runtime
from profilers.latency import LatencyStats, MeasureSettings
from profilers.ort import CUDA_PROVIDER, session_threads

QUICK = MeasureSettings(warmup=1, min_runs=3, max_runs=6, max_seconds=0.5, round_size=3)


@pytest.fixture(scope="module")
def bert(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    artifact = export_artifact(model, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path_factory.mktemp("rt-art"))
    feeds = feeds_for(artifact.input_names, 3, 12, artifact.vocab_size, seed=2)
    with torch.no_grad():
        reference = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    return model, artifact, feeds, reference


def test_feeds_for_builds_int64_feeds_of_the_shape() -> None:
    feeds = feeds_for(("input_ids", "attention_mask", "token_type_ids"), 2, 5, vocab_size=10, seed=0)
    assert all(a.shape == (2, 5) and a.dtype == np.int64 for a in feeds.values())
    assert feeds["input_ids"].max() < 10 and feeds["attention_mask"].all() and not feeds["token_type_ids"].any()
    np.testing.assert_array_equal(feeds["input_ids"], feeds_for(("input_ids",), 2, 5, 10, seed=0)["input_ids"])
    with pytest.raises(ValueError, match="cannot synthesise inputs"):
        feeds_for(("pixel_values",), 1, 1, 10)


@pytest.mark.parametrize("threads", [1, 2])
def test_ort_runtime_matches_torch_and_honours_threads(bert, threads: int) -> None:
    model, artifact, feeds, reference = bert
    runtime = open_runtime(artifact, threads=threads)
    assert isinstance(runtime, OrtRuntime) and isinstance(runtime, InferenceRuntime)
    np.testing.assert_allclose(runtime.run(feeds), reference, atol=1e-4)
    assert session_threads(runtime.session) == threads
    stats = runtime.measure(2, 16, QUICK)
    assert isinstance(stats, LatencyStats)
    assert stats.threads == threads and stats.batch_size == 2 and stats.runs >= 3 and stats.p50_ms > 0
    assert runtime.describe()["threads"] == threads


def test_ort_runtime_opens_an_artifact_dir_and_ignores_extra_feeds(bert) -> None:
    _, artifact, feeds, reference = bert
    runtime = open_runtime(str(artifact.dir), "onnxruntime", threads=1)
    np.testing.assert_allclose(runtime.run({**feeds, "extra": np.zeros(1)}), reference, atol=1e-4)
    with pytest.raises(ValueError, match="feeds lack model inputs"):
        runtime.run({"input_ids": feeds["input_ids"]})


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-6), ("bf16", 5e-3), ("int8", 5e-3)])
def test_torch_runtime_matches_torch_and_honours_threads(bert, precision: str, atol: float) -> None:
    model, _, feeds, reference = bert
    runtime = open_runtime(model, "torch", threads=1, precision=precision)
    assert isinstance(runtime, TorchRuntime)
    logits = runtime.run(feeds)
    assert logits.dtype == np.float32 and logits.shape == reference.shape
    np.testing.assert_allclose(logits, reference, atol=atol)
    stats = runtime.measure(1, 8, QUICK)
    assert stats.threads == 1 and stats.batch_size == 1
    assert runtime.describe()["precision"] == precision
    assert next(model.parameters()).dtype == torch.float32, "the caller's model must not be converted"


@pytest.mark.skipif(CUDA_PROVIDER in ort.get_available_providers(), reason="CUDA provider present")
def test_cuda_without_provider_is_a_clear_error(bert) -> None:
    _, artifact, _, _ = bert
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        open_runtime(artifact, threads=1, device="cuda")


def test_runtime_choices_are_validated(bert) -> None:
    model, artifact, _, _ = bert
    with pytest.raises(ValueError, match="runtime must be one of"):
        open_runtime(artifact, "tensorrt", threads=1)
    with pytest.raises(ValueError, match="runs with runtime='onnxruntime'"):
        open_runtime(artifact, "torch", threads=1)
    with pytest.raises(ValueError, match="runs with runtime='torch'"):
        open_runtime(model, "onnxruntime", threads=1)
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchRuntime(model, threads=1, precision="fp8")
