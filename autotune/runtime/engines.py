"""OpenVINO's int8: NNCF's post-training quantization of an ONNX export into an OpenVINO IR. The IR runs in
`autotune.runtime.sessions.OpenVinoRuntime` (which also compiles the ONNX export in fp32, or bf16 where the CPU
computes it natively); ONNX Runtime's own static int8 is `autotune.compress.quantization`'s. Which engine and mode
pay on a CPU is `profilers.recipes`'s business, and bench/operators.py shows the rows behind it.

OpenVINO and NNCF are optional (`pip install -e ".[engines]"`): they are imported when used, and a missing one is
one sentence that says how to install it. Calibration feeds come from the caller, who takes them from the user's
training split: a run never reads other data.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from autotune.runtime.sessions import select_feeds
from profilers.openvino import Shape, fix_shape, optional_module


def quantize_openvino_int8(onnx_path: Path, calibration: Sequence[Mapping[str, np.ndarray]], out_xml: Path,
                           shape: Shape | None = None) -> Path:
    """NNCF's post-training int8 quantization (transformer preset: SmoothQuant, fast bias correction) of an ONNX
    classifier, calibrated on `calibration` feeds (of any shape), saved as OpenVINO IR at `out_xml` with its inputs
    fixed to `shape` (None: any shape)."""
    if not calibration:
        raise ValueError("static int8 needs calibration feeds (batches of the training split); got none")
    ov, nncf = optional_module("openvino"), optional_module("nncf")
    model = ov.Core().read_model(str(onnx_path))
    names = tuple(port.get_any_name() for port in model.inputs)
    dataset = nncf.Dataset([select_feeds(feeds, names) for feeds in calibration])
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars: a tuner's own progress line is the one shown
        quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(fix_shape(quantized, shape), str(out_xml))
    return out_xml


def convert_openvino_fp32(onnx_path: Path, out_xml: Path, shape: Shape | None = None) -> Path:
    """The ONNX export as an OpenVINO IR at `out_xml`, weights kept in fp32 (OpenVINO would store them in fp16 by
    default), inputs fixed to `shape` (None: any shape): OpenVINO's fp32 deployment of the same model."""
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov = optional_module("openvino")
    ov.save_model(fix_shape(ov.Core().read_model(str(onnx_path)), shape), str(out_xml), compress_to_fp16=False)
    return out_xml
