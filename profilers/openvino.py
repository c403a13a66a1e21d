"""OpenVINO compiled models configured for honest timing, the twin of profilers/ort.py.

Every place that runs an OpenVINO model (the child process that times it, the deployment runtime) compiles it
here, so threads, the latency hint and the precision hint are set the same way everywhere; a model whose inputs
have a fixed shape (an IR saved after `fix_shape`) compiles for that shape. OpenVINO is optional
(`pip install -e ".[engines]"`): it is imported when a model is compiled, and a missing one is one sentence that
says how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Literal

OvPrecision = Literal["fp32", "bf16"]
#: (batch, sequence length): the one input shape a model is fixed to.
Shape = tuple[int, int]
#: OpenVINO's name of each precision hint.
OV_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
ENGINES_EXTRA = 'pip install -e ".[engines]"'
#: What building and running OpenVINO models takes: the runtime, and NNCF for its post-training int8.
OPENVINO_MODULES = ("openvino", "nncf")


def optional_module(name: str) -> Any:
    """An optional engine's module, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{name} is not installed; it comes with autotune's engines extra: {ENGINES_EXTRA}") from error


def openvino_installed() -> bool:
    """Whether OpenVINO and NNCF can be imported here (without importing them: that takes seconds)."""
    return all(importlib.util.find_spec(name) is not None for name in OPENVINO_MODULES)


def fix_shape(model: Any, shape: Shape | None) -> Any:
    """`model` (an `openvino.Model`, changed in place) with every input fixed to `shape`; None leaves it as it is.

    Why fix it: OpenVINO compiles a static shape without per-call shape inference and picks its kernels for it. On
    an AVX-512 VNNI Xeon that made the demo's teacher 5% faster in fp32 and 10-16% faster in NNCF's int8, timed
    taking turns; ONNX Runtime's free-dimension overrides bought nothing there.
    """
    if shape is None:
        return model
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, sequence length), both >= 1, got {shape!r}")
    model.reshape({port.get_any_name(): list(shape) for port in model.inputs})
    return model


def fixed_shape(model: Any) -> Shape | None:
    """The (batch, sequence length) a model's (or compiled model's) first input is fixed to; None if it varies."""
    partial = model.inputs[0].get_partial_shape()
    if not partial.is_static:
        return None
    batch, length = partial.to_shape()
    return int(batch), int(length)


def compile_openvino(model_path: str | os.PathLike[str], *, threads: int, precision: OvPrecision = "fp32") -> Any:
    """An ONNX file or OpenVINO IR compiled for the CPU at `threads` threads with the latency hint, in `precision`
    (bf16 only where the CPU computes it natively: OpenVINO would otherwise emulate it)."""
    if precision not in OV_PRECISION_HINTS:
        raise ValueError(f"precision must be one of {sorted(OV_PRECISION_HINTS)}, got {precision!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ov = optional_module("openvino")
    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise ValueError("this CPU has no native bf16 (OpenVINO lists no BF16 capability); run fp32 here")
    return core.compile_model(os.fspath(model_path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": OV_PRECISION_HINTS[precision]})
