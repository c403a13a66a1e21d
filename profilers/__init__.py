"""What the machine is and how fast things run on it. Never imports `autotune` (arrows go one way).

The names below load on first use (PEP 562): the timing children (`python -m profilers.isolated`,
`profilers.generation`) import this package too, and the profile's modules (pydantic, onnx, scipy.stats) would
add seconds to every measurement's start.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SCHEMA_VERSION": "profilers.hardware",
    "HardwareProfile": "profilers.hardware",
    "ProfileError": "profilers.hardware",
    "collect_profile": "profilers.hardware",
    "load_profile": "profilers.hardware",
    "LatencyStats": "profilers.latency",
    "MeasureSettings": "profilers.latency",
    "measure": "profilers.latency",
    "measure_onnx": "profilers.latency",
    "measure_ort_session": "profilers.latency",
    "measure_torch_module": "profilers.latency",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'profilers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
