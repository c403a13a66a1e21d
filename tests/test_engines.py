"""Engines beyond ONNX Runtime's CPU provider with dynamic int8: OpenVINO (fp32, bf16, NNCF static int8) and ONNX
Runtime's static int8, on a real exported tiny BERT; and the rules that keep each mode on a CPU."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from autotune.runtime import OrtRuntime, export_artifact, feeds_for
from autotune.runtime.engines import quantize_openvino_int8
from autotune.runtime.sessions import OpenVinoRuntime
from profilers.openvino import optional_module
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
    expected = OrtRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size).run(feeds)
    runtime = OpenVinoRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size)
    np.testing.assert_allclose(runtime.run(feeds | {"unused": np.zeros(1)}), expected, atol=1e-4)
    stats = runtime.measure(1, 16, QUICK)
    assert stats.p50_ms > 0 and stats.runs >= 5
    assert runtime.describe()["runtime"] == "openvino" and runtime.describe()["threads"] == 1


def test_openvino_bf16_runs_only_where_the_cpu_computes_it_natively(bert) -> None:
    ov = pytest.importorskip("openvino")
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if native:
        feeds = feeds_for(bert.input_names, 2, 16, bert.vocab_size, seed=5)
        assert np.isfinite(OpenVinoRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size, precision="bf16").run(feeds)).all()
    else:
        with pytest.raises(ValueError, match="no native bf16"):
            OpenVinoRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVinoRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size, precision="fp8")  # type: ignore[arg-type]


def test_nncf_static_int8_runs_in_openvino_close_to_fp32(bert, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    feeds = feeds_for(bert.input_names, 4, 16, bert.vocab_size, seed=9)
    fp32 = OrtRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size).run(feeds)
    ov_xml = quantize_openvino_int8(bert.model_path, calibration(bert), tmp_path / "ov" / "model.xml")
    assert ov_xml.exists() and ov_xml.with_suffix(".bin").exists()
    int8 = OpenVinoRuntime(ov_xml, threads=1, vocab_size=bert.vocab_size).run(feeds)
    assert int8.shape == fp32.shape and float(np.abs(int8 - fp32).max()) < 0.2 * float(np.abs(fp32).max()) + 0.05
    with pytest.raises(ValueError, match="needs calibration feeds"):
        quantize_openvino_int8(bert.model_path, [], tmp_path / "empty" / "model.xml")


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


def test_an_openvino_int8_artifact_is_built_run_timed_and_loaded_like_any_other(bert, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    from autotune.compress.quantization import openvino_fp32_artifact, openvino_int8_artifact, quantize_artifact
    from autotune.runtime import artifact_runtime, load_artifact
    from profilers.isolated import OnnxRequest, measure_onnx_interleaved, measure_onnx_isolated

    tokens = [{**f, "input_ids": f["input_ids"] + bert.vocab_size} for f in calibration(bert)]  # beyond the table
    int8 = openvino_int8_artifact(bert, tmp_path / "int8", tokens)
    assert (int8.engine, int8.bits, int8.model_path.name) == ("openvino", 8, "model.xml")
    assert int8.size_bytes == int8.model_path.stat().st_size + int8.model_path.with_suffix(".bin").stat().st_size
    assert load_artifact(int8.dir) == int8
    feeds = feeds_for(bert.input_names, 2, 16, bert.vocab_size, seed=3)
    fp32 = OrtRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size).run(feeds)
    logits = artifact_runtime(load_artifact(int8.dir), threads=1).run(feeds)
    assert float(np.abs(logits - fp32).max()) < 0.2 * float(np.abs(fp32).max()) + 0.05
    compiled_fp32 = openvino_fp32_artifact(bert, tmp_path / "ov-fp32")
    assert (compiled_fp32.engine, compiled_fp32.bits, compiled_fp32.fixed_shape) == ("openvino", 32, None)
    np.testing.assert_allclose(artifact_runtime(compiled_fp32, threads=1).run(feeds), fp32, atol=1e-4)

    def request(artifact) -> OnnxRequest:
        return OnnxRequest(model_path=str(artifact.model_path), input_names=artifact.input_names, batch_size=1,
                           seq_len=16, vocab_size=artifact.vocab_size, threads=1, engine=artifact.engine)

    alone = measure_onnx_isolated(request(int8), QUICK)
    together = measure_onnx_interleaved([request(bert), request(int8)], runs=20, warmup=2)
    assert alone.p50_ms > 0 and alone.threads == 1 and [s.runs for s in together] == [20, 20]
    with pytest.raises(ValueError, match="plain fp32 ONNX export"):
        openvino_int8_artifact(int8, tmp_path / "again", tokens)
    with pytest.raises(ValueError, match="plain fp32 ONNX export"):
        openvino_int8_artifact(quantize_artifact(bert, tmp_path / "fused", bits=32), tmp_path / "f", tokens)
    with pytest.raises(ValueError, match="CPU only"):
        artifact_runtime(int8, threads=1, device="cuda")


def test_a_request_for_an_unknown_engine_fails_in_one_sentence(bert) -> None:
    from profilers.isolated import MeasurementError, OnnxRequest, measure_onnx_isolated

    request = OnnxRequest(model_path=str(bert.model_path), input_names=bert.input_names, batch_size=1, seq_len=8,
                          vocab_size=bert.vocab_size, threads=1, engine="tensorrt")
    with pytest.raises(MeasurementError, match="engine must be one of"):
        measure_onnx_isolated(request, QUICK)


@pytest.mark.parametrize("flags, openvino, engine", [(AMX, True, "openvino"), (AMX, False, "onnxruntime"),
                                                     (AVX2, True, "onnxruntime"), (AVX2, False, "onnxruntime")])
def test_int8_runs_in_openvino_where_the_cpu_has_int8_dot_products_and_openvino_is_installed(
        flags: tuple[str, ...], openvino: bool, engine: str) -> None:
    from profilers.recipes import recipe_for

    recipe = recipe_for(flags, openvino=openvino)
    assert recipe.int8_engine == engine
    assert ("OpenVINO" in recipe.describe(8)) == (engine == "openvino")
    assert ("OpenVINO" in recipe.reasons[0]) == (engine == "openvino")


def test_an_openvino_ir_fixed_to_one_shape_pads_and_cuts_inputs_to_it_and_gives_the_same_logits(bert, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    from autotune.compress.quantization import openvino_fp32_artifact, openvino_int8_artifact
    from autotune.runtime import artifact_runtime, load_artifact
    from profilers.isolated import MeasurementError, OnnxRequest, measure_onnx_isolated

    fixed = openvino_fp32_artifact(bert, tmp_path / "fixed", shape=(2, 16))
    assert fixed.fixed_shape == (2, 16) and load_artifact(fixed.dir) == fixed
    runtime = artifact_runtime(load_artifact(fixed.dir), threads=1)
    assert runtime.describe()["fixed_shape"] == [2, 16]
    feeds = feeds_for(bert.input_names, 3, 11, bert.vocab_size, seed=4)  # odd batch, shorter rows: padded and cut
    expected = OrtRuntime(bert.model_path, threads=1, vocab_size=bert.vocab_size).run(feeds)
    np.testing.assert_allclose(runtime.run(feeds), expected, atol=1e-4)
    assert runtime.measure(2, 8, QUICK).p50_ms > 0  # timed at the shape it is fixed to, whatever the feeds' length
    with pytest.raises(ValueError, match="fixed to inputs of 16 tokens.*truncate inputs to 16"):
        runtime.run(feeds_for(bert.input_names, 1, 17, bert.vocab_size, seed=4))
    with pytest.raises(ValueError, match="fixed to batch 2"):
        runtime.measure(1, 16, QUICK)

    int8 = openvino_int8_artifact(bert, tmp_path / "int8", calibration(bert), shape=(1, 16))
    assert int8.fixed_shape == (1, 16) and load_artifact(int8.dir).fixed_shape == (1, 16)
    assert artifact_runtime(int8, threads=1).run(feeds).shape == expected.shape

    def request(seq_len: int) -> OnnxRequest:
        return OnnxRequest(model_path=str(int8.model_path), input_names=int8.input_names, batch_size=1,
                           seq_len=seq_len, vocab_size=int8.vocab_size, threads=1, engine="openvino")

    assert measure_onnx_isolated(request(16), QUICK).p50_ms > 0
    with pytest.raises(MeasurementError):  # the child times the file as it is: another shape is refused
        measure_onnx_isolated(request(8), QUICK)


def test_inputs_are_cut_into_batches_of_the_fixed_shape_and_padded_with_zeros() -> None:
    from autotune.runtime.sessions import at_fixed_shape

    feeds = {"input_ids": np.arange(1, 16).reshape(5, 3), "attention_mask": np.ones((5, 3), dtype=np.int64)}
    chunks = at_fixed_shape(feeds, (2, 4))
    assert [real for _, real in chunks] == [2, 2, 1]
    last, _ = chunks[-1]
    assert last["input_ids"].tolist() == [[13, 14, 15, 0], [0, 0, 0, 0]]
    assert last["attention_mask"].tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("shape", [(0, 16), (1, 0), (1, 16, 2)])
def test_a_bad_fixed_shape_is_refused_in_one_sentence(bert, shape: tuple[int, ...]) -> None:
    ov = pytest.importorskip("openvino")
    from profilers.openvino import fix_shape

    with pytest.raises(ValueError, match=r"shape must be \(batch, sequence length\)"):
        fix_shape(ov.Core().read_model(str(bert.model_path)), shape)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_length, expected", [(64, (1, 64)), (32, (1, 64)), (128, None)])
def test_openvino_builds_are_fixed_to_the_timed_shape_only_where_every_input_fits_in_it(
        max_length: int, expected: tuple[int, int] | None) -> None:
    from autotune.tasks.text_classification import openvino_input_shape

    assert openvino_input_shape(1, 64, max_length) == expected
