"""What the machine is and how fast things run on it. Never imports `autotune` (arrows go one way)."""

from profilers.hardware import SCHEMA_VERSION, HardwareProfile, ProfileError, collect_profile, load_profile
from profilers.latency import LatencyStats, MeasureSettings, measure, measure_onnx, measure_ort_session, measure_torch_module

__all__ = [
    "SCHEMA_VERSION",
    "HardwareProfile",
    "LatencyStats",
    "MeasureSettings",
    "ProfileError",
    "collect_profile",
    "load_profile",
    "measure",
    "measure_onnx",
    "measure_ort_session",
    "measure_torch_module",
]
