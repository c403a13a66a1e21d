"""OpenVINO as an engine beside ONNX Runtime's CPU provider: the ONNX export compiled in fp32, in bf16 where the
CPU computes it natively, or in int8 after NNCF's post-training quantization (ONNX Runtime's own static int8 is
`autotune.compress.quantization`'s). Which engine and mode pay on a CPU is `profilers.recipes.engine_modes`'s and
the bench's business.

OpenVINO and NNCF are optional (`pip install -e ".[engines]"`): they are imported when used, and a missing one is
one sentence that says how to install it. Calibration feeds come from the caller, who takes them from the user's
training split: a run never reads other data.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from autotune.runtime.sessions import Feeds, InferenceRuntime, select_feeds
from profilers.latency import LatencyStats, MeasureSettings, measure

OvPrecision = Literal["fp32", "bf16"]
#: OpenVINO's name of each precision hint.
OV_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
ENGINES_EXTRA = 'pip install -e ".[engines]"'


def optional_module(name: str) -> Any:
    """An optional engine's module, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{name} is not installed; it comes with autotune's engines extra: {ENGINES_EXTRA}") from error


class OpenVinoRuntime(InferenceRuntime):
    """An ONNX (or OpenVINO IR) classifier compiled by OpenVINO for the CPU at `threads` threads, latency hint, in
    `precision` (bf16 only where the CPU has it natively: OpenVINO would otherwise emulate it)."""

    def __init__(self, model_path: str | os.PathLike[str], *, threads: int, vocab_size: int,
                 precision: OvPrecision = "fp32") -> None:
        if precision not in OV_PRECISION_HINTS:
            raise ValueError(f"precision must be one of {sorted(OV_PRECISION_HINTS)}, got {precision!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        ov = optional_module("openvino")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ValueError("this CPU has no native bf16 (OpenVINO lists no BF16 capability); run fp32 here")
        self.model_path = Path(model_path)
        self.threads = threads
        self.vocab_size = vocab_size
        self.precision = precision
        self.version = ov.__version__
        self.compiled = core.compile_model(str(self.model_path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": OV_PRECISION_HINTS[precision]})
        self.request = self.compiled.create_infer_request()
        self.input_names = tuple(port.get_any_name() for port in self.compiled.inputs)

    def run(self, feeds: Feeds) -> np.ndarray:
        """Float32 logits of the first output."""
        result = self.request.infer(select_feeds(feeds, self.input_names))
        return np.asarray(result[self.compiled.outputs[0]], dtype=np.float32)

    def measure_feeds(self, feeds: Feeds, *, batch_size: int, settings: MeasureSettings) -> LatencyStats:
        """Time this compiled model's infer request on `feeds`."""
        selected = select_feeds(feeds, self.input_names)
        return measure(lambda: self.request.infer(selected), batch_size=batch_size, threads=self.threads,
                       settings=settings)

    def describe(self) -> dict[str, Any]:
        """The engine as compiled: version, precision, threads read back from OpenVINO."""
        return {"runtime": "openvino", "openvino_version": self.version, "model_path": str(self.model_path),
                "precision": self.precision, "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                "input_names": list(self.input_names)}


def quantize_openvino_int8(onnx_path: Path, calibration: Sequence[Mapping[str, np.ndarray]], out_xml: Path) -> Path:
    """NNCF's post-training int8 quantization (transformer preset: SmoothQuant, fast bias correction) of an ONNX
    classifier, calibrated on `calibration` feeds, saved as OpenVINO IR at `out_xml`."""
    if not calibration:
        raise ValueError("static int8 needs calibration feeds (batches of the training split); got none")
    ov, nncf = optional_module("openvino"), optional_module("nncf")
    model = ov.Core().read_model(str(onnx_path))
    names = tuple(port.get_any_name() for port in model.inputs)
    dataset = nncf.Dataset([select_feeds(feeds, names) for feeds in calibration])
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_xml))
    return out_xml
