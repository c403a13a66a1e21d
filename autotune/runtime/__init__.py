"""The deployment runtime: ONNX export, graph fusion, and one interface over ONNX Runtime, OpenVINO and torch."""

from autotune.runtime.export import Artifact, export_artifact, export_onnx, load_artifact
from autotune.runtime.fusion import fuse_onnx, op_counts
from autotune.runtime.sessions import (
    InferenceRuntime,
    OpenVinoRuntime,
    OrtRuntime,
    TorchRuntime,
    artifact_runtime,
    feeds_for,
    open_runtime,
)

__all__ = [
    "Artifact",
    "InferenceRuntime",
    "OpenVinoRuntime",
    "OrtRuntime",
    "TorchRuntime",
    "artifact_runtime",
    "export_artifact",
    "export_onnx",
    "feeds_for",
    "fuse_onnx",
    "load_artifact",
    "op_counts",
    "open_runtime",
]
