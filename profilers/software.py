"""Versions of the libraries that decide inference speed, and ONNX Runtime's execution providers."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class SoftwareInfo:
    """Versions of the runtimes that execute the model: a new ONNX Runtime or torch changes kernels, hence latency.

    Each library is None when absent, because a profile must still be writable on a machine without it.
    """

    python: str
    torch: str | None
    onnxruntime: str | None
    onnxruntime_providers: tuple[str, ...]
    optuna: str | None
    transformers: str | None
    #: Whether ONNX Runtime's CPU provider runs fp16 MatMul with its own kernel here (None: not probed, an older
    #: profile). A flag says a kernel may exist; this probe says ORT chose one rather than casting to fp32.
    onnxruntime_cpu_fp16: bool | None = None
    #: OpenVINO and NNCF (its post-training quantizer), the optional engine int8 may run in (None: absent, or an
    #: older profile).
    openvino: str | None = None
    nncf: str | None = None

    @property
    def has_openvino(self) -> bool:
        """Whether OpenVINO models can be built (NNCF) and run here."""
        return self.openvino is not None and self.nncf is not None


def package_version(name: str) -> str | None:
    """An installed distribution's version from its metadata, None if absent: reading metadata avoids importing
    heavy packages such as torch just to learn their version."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def probe_software() -> SoftwareInfo:
    """This environment's SoftwareInfo; ONNX Runtime is imported because only it can list its execution providers."""
    try:
        import onnxruntime

        from onnx import TensorProto

        from profilers.ort import cpu_runs_natively

        providers = tuple(onnxruntime.get_available_providers())
        ort_version: str | None = onnxruntime.__version__
        fp16: bool | None = cpu_runs_natively(TensorProto.FLOAT16)
    except ImportError:
        providers, ort_version, fp16 = (), None, None
    return SoftwareInfo(
        python=platform.python_version(),
        torch=package_version("torch"),
        onnxruntime=ort_version,
        onnxruntime_providers=providers,
        optuna=package_version("optuna"),
        transformers=package_version("transformers"),
        onnxruntime_cpu_fp16=fp16,
        openvino=package_version("openvino"),
        nncf=package_version("nncf"),
    )
