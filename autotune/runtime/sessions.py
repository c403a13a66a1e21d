"""One small runtime interface for everything that runs a model: evaluation and latency measurement.

Accuracy and latency must come from the same deployable thing in the same runtime setting, otherwise a
report can pair the accuracy of one model with the speed of another. So both go through an
`InferenceRuntime`: `run(feeds)` returns logits for evaluation, `measure(batch, seq, settings)` times the same
object on synthetic feeds of that shape through `profilers.latency`.

- `OrtRuntime`: an ONNX file in an ONNX Runtime session built by `profilers.ort.make_session` (spinning off,
  so several runtimes alive in one process do not steal each other's cores).
- `OpenVinoRuntime`: an ONNX file or OpenVINO IR compiled by `profilers.openvino.compile_openvino`; an IR fixed to
  one input shape gets every input padded and cut to it.
- `TorchRuntime`: an in-memory transformers model in fp32, bf16 or dynamic int8 (Linear layers).
"""

from __future__ import annotations

import copy
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from autotune.models import FAMILIES
from autotune.runtime.export import Artifact, load_artifact, model_family
from profilers.isolated import feeds_for
from search_spaces.hardware import DEVICES, RUNTIMES
from profilers.latency import LatencyStats, MeasureSettings, measure_ort_session, measure_pooled, measure_torch_module, torch_threads
from profilers.openvino import OvPrecision, Shape, compile_openvino, fixed_shape, optional_module
from profilers.ort import CUDA_PROVIDER, make_session, providers_for, session_threads

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
Precision = Literal["fp32", "bf16", "int8"]
RuntimeName = Literal["onnxruntime", "torch"]
Feeds = Mapping[str, np.ndarray]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def _check_choice(field: str, value: str, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"{field} must be one of {', '.join(accepted)}, got {value!r}")


def select_feeds(feeds: Feeds, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's own inputs from `feeds` as int64 (tokenizers may return more, e.g. token_type_ids for RoBERTa)."""
    missing = [name for name in input_names if name not in feeds]
    if missing:
        raise ValueError(f"feeds lack model inputs {missing}; the model takes {list(input_names)}")
    return {name: np.asarray(feeds[name], dtype=np.int64) for name in input_names}


class InferenceRuntime(ABC):
    """A runnable deployable model: logits for evaluation, latency for the search, one description for reports."""

    input_names: tuple[str, ...]
    vocab_size: int
    threads: int

    @abstractmethod
    def run(self, feeds: Feeds) -> np.ndarray:
        """Float32 logits of shape (batch, num_labels) for `feeds` (extra keys are ignored)."""

    @abstractmethod
    def measure_feeds(self, feeds: Feeds, *, batch_size: int, settings: MeasureSettings) -> LatencyStats:
        """Latency of `run` on these exact feeds."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready facts about this runtime (kind, device, threads, precision or file) for reports."""

    def measure(self, batch_size: int, seq_len: int, settings: MeasureSettings = MeasureSettings(), *, seed: int = 0) -> LatencyStats:
        """Latency at one shape, on synthetic feeds from `feeds_for`."""
        feeds = feeds_for(self.input_names, batch_size, seq_len, self.vocab_size, seed)
        return self.measure_feeds(feeds, batch_size=batch_size, settings=settings)


class OrtRuntime(InferenceRuntime):
    """An ONNX model in one ONNX Runtime session (CPU or CUDA provider), `threads` intra-op threads, no spinning."""

    def __init__(self, onnx_path: str | os.PathLike[str], *, threads: int, vocab_size: int, device: Device = "cpu") -> None:
        _check_choice("device", device, DEVICES)
        providers = providers_for(device)
        available = ort.get_available_providers()
        if device == "cuda" and CUDA_PROVIDER not in available:
            raise RuntimeError(
                f"device='cuda' needs ONNX Runtime's {CUDA_PROVIDER} (the onnxruntime-gpu build); "
                f"this installation only has {available}"
            )
        self.model_path = Path(onnx_path)
        self.device = device
        self.threads = threads
        self.vocab_size = vocab_size
        self.session = make_session(self.model_path, threads=threads, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self._output_names = [self.session.get_outputs()[0].name]

    def run(self, feeds: Feeds) -> np.ndarray:
        """Logits from the session, fed only the model's own inputs (a tokenizer may give more)."""
        logits = self.session.run(self._output_names, select_feeds(feeds, self.input_names))[0]
        return np.asarray(logits, dtype=np.float32)

    def measure_feeds(self, feeds: Feeds, *, batch_size: int, settings: MeasureSettings) -> LatencyStats:
        """Time this very session on `feeds`, so the latency belongs to the object that produced the accuracy."""
        return measure_ort_session(self.session, select_feeds(feeds, self.input_names), batch_size=batch_size, settings=settings)

    def describe(self) -> dict[str, Any]:
        """The session as it runs, providers and threads read back from ONNX Runtime rather than from the request."""
        return {
            "runtime": "onnxruntime",
            "onnxruntime_version": ort.__version__,
            "onnx_path": str(self.model_path),
            "device": self.device,
            "providers": self.session.get_providers(),
            "threads": session_threads(self.session),
            "input_names": list(self.input_names),
        }


def at_fixed_shape(feeds: Mapping[str, np.ndarray], shape: Shape) -> list[tuple[dict[str, np.ndarray], int]]:
    """`feeds` cut into batches of `shape`'s batch size and right-padded with zeros to its sequence length, each with
    how many of its rows are real: zero attention mask on the padding, so no real token's output changes (the
    encoders export their mask into every attention)."""
    batch, length = shape
    rows, given = next(iter(feeds.values())).shape[:2]
    if given > length:
        raise ValueError(f"the model is fixed to inputs of {length} tokens (batch {batch}), got {given}: truncate inputs "
                         f"to {length} tokens (the tokenizer's max_length)")
    chunks = []
    for start in range(0, rows, batch):
        real = min(batch, rows - start)
        chunks.append(({name: np.pad(array[start:start + real], ((0, batch - real), (0, length - given)))
                        for name, array in feeds.items()}, real))
    return chunks


class OpenVinoRuntime(InferenceRuntime):
    """An ONNX (or OpenVINO IR) classifier compiled by OpenVINO for the CPU at `threads` threads, latency hint, in
    `precision` (bf16 only where the CPU has it natively). An IR fixed to one input shape (`fixed_shape`) runs every
    input through that shape, so the logits of evaluation come from the compiled model that is timed."""

    def __init__(self, model_path: str | os.PathLike[str], *, threads: int, vocab_size: int,
                 precision: OvPrecision = "fp32") -> None:
        self.model_path = Path(model_path)
        self.threads = threads
        self.vocab_size = vocab_size
        self.precision = precision
        self.compiled = compile_openvino(self.model_path, threads=threads, precision=precision)
        self.version = optional_module("openvino").__version__
        self.request = self.compiled.create_infer_request()
        self.input_names = tuple(port.get_any_name() for port in self.compiled.inputs)
        self.fixed_shape = fixed_shape(self.compiled)

    def _logits(self, feeds: Feeds) -> np.ndarray:
        return np.asarray(self.request.infer(feeds)[self.compiled.outputs[0]], dtype=np.float32)

    def run(self, feeds: Feeds) -> np.ndarray:
        """Float32 logits of the first output (one call per batch of the fixed shape, if the model has one)."""
        selected = select_feeds(feeds, self.input_names)
        if self.fixed_shape is None:
            return self._logits(selected)
        return np.concatenate([self._logits(chunk)[:real] for chunk, real in at_fixed_shape(selected, self.fixed_shape)])

    def measure_feeds(self, feeds: Feeds, *, batch_size: int, settings: MeasureSettings) -> LatencyStats:
        """Time this compiled model's infer request on `feeds` (padded to the fixed shape, whose batch they must have)."""
        selected = select_feeds(feeds, self.input_names)
        if self.fixed_shape is not None:
            if batch_size != self.fixed_shape[0]:
                raise ValueError(f"the model is fixed to batch {self.fixed_shape[0]}, asked to time batch {batch_size}")
            selected = at_fixed_shape(selected, self.fixed_shape)[0][0]
        return measure_pooled(lambda: self.request.infer(selected), threads=self.threads, batch_size=batch_size,
                              settings=settings)

    def describe(self) -> dict[str, Any]:
        """The engine as compiled: version, precision, threads read back from OpenVINO, the fixed input shape."""
        return {"runtime": "openvino", "openvino_version": self.version, "model_path": str(self.model_path),
                "precision": self.precision, "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                "input_names": list(self.input_names),
                "fixed_shape": list(self.fixed_shape) if self.fixed_shape else None}


def _prepare_torch_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A copy of `model` in `precision`, so the caller's model (e.g. a teacher still in use) is untouched."""
    if precision == "int8":
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    if precision == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16).eval()
    return model.eval()


class TorchRuntime(InferenceRuntime):
    """A transformers classifier run by PyTorch in fp32, bf16 (weights and compute) or dynamic int8 Linear layers."""

    def __init__(self, model: torch.nn.Module, *, threads: int, precision: Precision = "fp32", device: Device = "cpu") -> None:
        _check_choice("precision", precision, PRECISIONS)
        _check_choice("device", device, DEVICES)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' needs a CUDA build of torch and a visible GPU; torch.cuda.is_available() is False")
        if device == "cuda" and precision == "int8":
            raise ValueError("precision='int8' (torch dynamic quantization) runs on CPU only; use fp32 or bf16 on cuda")
        self.input_names = FAMILIES[model_family(model)].inputs
        self.vocab_size = int(model.config.vocab_size)
        self.threads = threads
        self.precision = precision
        self.device = device
        self.model = _prepare_torch_model(model, precision).to(device)

    def _tensors(self, feeds: Feeds) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(array).to(self.device) for name, array in select_feeds(feeds, self.input_names).items()}

    def run(self, feeds: Feeds) -> np.ndarray:
        """Float32 logits, computed at this runtime's thread count so evaluation runs in the setting that is timed."""
        with torch_threads(self.threads), torch.inference_mode():
            logits = self.model(**self._tensors(feeds)).logits
        return logits.float().cpu().numpy()

    def measure_feeds(self, feeds: Feeds, *, batch_size: int, settings: MeasureSettings) -> LatencyStats:
        """Time the prepared module (its precision and device) on `feeds` at this runtime's threads."""
        return measure_torch_module(self.model, self._tensors(feeds), batch_size=batch_size, threads=self.threads, settings=settings)

    def describe(self) -> dict[str, Any]:
        """The torch setting (version, precision, device, threads) behind a figure, for reports."""
        return {
            "runtime": "torch",
            "torch_version": torch.__version__,
            "model": type(self.model).__name__,
            "precision": self.precision,
            "device": self.device,
            "threads": self.threads,
            "input_names": list(self.input_names),
        }


def open_runtime(
    target: Artifact | str | os.PathLike[str] | torch.nn.Module,
    runtime: RuntimeName = "onnxruntime",
    *,
    threads: int,
    device: Device = "cpu",
    precision: Precision = "fp32",
) -> InferenceRuntime:
    """The runtime for an artifact (object or directory) under its engine (`artifact_runtime`), or for a torch model
    under torch.

    `precision` applies to torch only: an artifact's precision is fixed by the bit width it was built with.
    """
    _check_choice("runtime", runtime, RUNTIMES)
    if isinstance(target, torch.nn.Module):
        if runtime != "torch":
            raise ValueError("a torch model runs with runtime='torch'; export it with export_artifact to use onnxruntime")
        return TorchRuntime(target, threads=threads, precision=precision, device=device)
    if runtime != "onnxruntime":
        raise ValueError("an ONNX artifact runs with runtime='onnxruntime'; pass the torch model itself for runtime='torch'")
    return artifact_runtime(target if isinstance(target, Artifact) else load_artifact(target), threads=threads,
                            device=device)


def artifact_runtime(artifact: Artifact, *, threads: int, device: Device = "cpu") -> InferenceRuntime:
    """The artifact's model in the engine it was built for: ONNX Runtime, or OpenVINO (CPU only)."""
    if artifact.engine == "openvino":
        if device != "cpu":
            raise ValueError(f"{artifact.dir} is built for OpenVINO, which autotune runs on the CPU only, not {device!r}")
        return OpenVinoRuntime(artifact.model_path, threads=threads, vocab_size=artifact.vocab_size)
    return OrtRuntime(artifact.model_path, threads=threads, vocab_size=artifact.vocab_size, device=device)
