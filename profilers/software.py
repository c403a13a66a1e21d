"""Versions of the libraries that decide inference speed, and ONNX Runtime's execution providers."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class SoftwareInfo:
    python: str
    torch: str | None
    onnxruntime: str | None
    onnxruntime_providers: tuple[str, ...]
    optuna: str | None
    transformers: str | None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def probe_software() -> SoftwareInfo:
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        providers, ort_version = (), None
    return SoftwareInfo(
        python=platform.python_version(),
        torch=package_version("torch"),
        onnxruntime=ort_version,
        onnxruntime_providers=providers,
        optuna=package_version("optuna"),
        transformers=package_version("transformers"),
    )
