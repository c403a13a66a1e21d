"""Engines beyond ONNX Runtime's CPU provider with dynamic int8: OpenVINO (fp32, bf16, NNCF static int8) and ONNX
Runtime's static int8, on a real exported tiny BERT; and the rules that keep each mode on a CPU."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from autotune.runtime import OrtRuntime, export_artifact, feeds_for
from autotune.runtime.engines import OpenVinoRuntime, optional_module, quantize_openvino_int8
from profilers.latency import MeasureSettings
from profilers.recipes import engine_modes

QUICK = MeasureSettings(warmup=2, min_runs=5, max_runs=20, max_seconds=1.0, rel_ci=0.5)
AVX2 = ("avx", "avx2", "fma")
AMX = AVX2 + ("avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


@pytest.fixture(scope="module")
def bert(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    return export_artifact(model, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path_factory.mktemp("engines"))


def calibration(artifact, rows: int = 8) -> list[dict[str, np.ndarray]]:
    return [feeds_for(artifact.input_names, 2, 16, artifact.vocab_size, seed=s) for s in range(rows)]


def test_openvino_runs_the_onnx_export_to_the_same_logits_and_times_it(bert) -> None:
    pytest.importorskip("openvino")
    feeds = feeds_for(bert.input_names, 3, 16, bert.vocab_size, seed=5)
    expected = OrtRuntime(bert.onnx_path, threads=1, vocab_size=bert.vocab_size).run(feeds)
    runtime = OpenVinoRuntime(bert.onnx_path, threads=1, vocab_size=bert.vocab_size)
    np.testing.assert_allclose(runtime.run(feeds | {"unused": np.zeros(1)}), expected, atol=1e-4)
    stats = runtime.measure(1, 16, QUICK)
    assert stats.p50_ms > 0 and stats.runs >= 5
    assert runtime.describe()["runtime"] == "openvino" and runtime.describe()["threads"] == 1


def test_openvino_bf16_runs_only_where_the_cpu_computes_it_natively(bert) -> None:
    ov = pytest.importorskip("openvino")
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if native:
        feeds = feeds_for(bert.input_names, 2, 16, bert.vocab_size, seed=5)
        assert np.isfinite(OpenVinoRuntime(bert.onnx_path, threads=1, vocab_size=bert.vocab_size, precision="bf16").run(feeds)).all()
    else:
        with pytest.raises(ValueError, match="no native bf16"):
            OpenVinoRuntime(bert.onnx_path, threads=1, vocab_size=bert.vocab_size, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVinoRuntime(bert.onnx_path, threads=1, vocab_size=bert.vocab_size, precision="fp8")  # type: ignore[arg-type]


def test_nncf_static_int8_runs_in_openvino_close_to_fp32(bert, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    feeds = feeds_for(bert.input_names, 4, 16, bert.vocab_size, seed=9)
    fp32 = OrtRuntime(bert.onnx_path, threads=1, vocab_size=bert.vocab_size).run(feeds)
    ov_xml = quantize_openvino_int8(bert.onnx_path, calibration(bert), tmp_path / "ov" / "model.xml")
    assert ov_xml.exists() and ov_xml.with_suffix(".bin").exists()
    int8 = OpenVinoRuntime(ov_xml, threads=1, vocab_size=bert.vocab_size).run(feeds)
    assert int8.shape == fp32.shape and float(np.abs(int8 - fp32).max()) < 0.2 * float(np.abs(fp32).max()) + 0.05
    with pytest.raises(ValueError, match="needs calibration feeds"):
        quantize_openvino_int8(bert.onnx_path, [], tmp_path / "empty" / "model.xml")


def test_a_missing_engine_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def without_openvino(name: str, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_openvino)
    with pytest.raises(ImportError, match=r'engines extra: pip install -e "\.\[engines\]"'):
        optional_module("openvino")


def test_the_rules_keep_native_modes_only() -> None:
    avx2 = {m.name: m for m in engine_modes(AVX2)}
    amx = {m.name: m for m in engine_modes(AMX)}
    for modes in (avx2, amx):
        assert modes["onnxruntime-fp32"].kept and modes["onnxruntime-int8-dynamic"].kept and modes["openvino-fp32"].kept
    assert not avx2["openvino-bf16"].kept and "no native bf16" in avx2["openvino-bf16"].reason
    assert not avx2["openvino-int8-static"].kept and "no VNNI/AMX" in avx2["openvino-int8-static"].reason
    assert amx["openvino-bf16"].kept and amx["openvino-int8-static"].kept and "amx_int8" in amx["openvino-int8-static"].reason
