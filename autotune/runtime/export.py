"""Export a Hugging Face sequence classifier to a self-contained ONNX artifact directory.

An artifact directory holds `model.onnx`, the tokenizer files and `artifact.json`, so whatever consumes it
(evaluation, the latency gate, a user deploying it) needs nothing but the directory:
`AutoTokenizer.from_pretrained(dir)` and an ONNX Runtime session.

Exporter choice: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) needs no extra package
(the dynamo exporter needs onnxscript), and, with the model switched to eager attention for the export,
yields a graph on which ONNX Runtime's BERT optimizer fuses every layer (Attention, SkipLayerNormalization,
BiasGelu, and EmbedLayerNormalization for BERT/DistilBERT). With transformers' SDPA attention the mask subgraph
(IsNaN/Where guards) defeats the Attention fusion, so eager attention is not optional here.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from autotune.models import FAMILIES, attention_layout

logger = logging.getLogger(__name__)

ONNX_FILENAME = "model.onnx"
ARTIFACT_JSON = "artifact.json"
DEFAULT_OPSET = 17
LOGITS = "logits"

@dataclass(frozen=True)
class Artifact:
    """A deployable model directory: the model file, its tokenizer and what it is.

    `engine` is what runs the model file: "onnxruntime" (an ONNX file) or "openvino" (an OpenVINO IR, `model.xml`
    with its weights in `model.bin` beside it); `fixed_shape` is the (batch, sequence length) an OpenVINO IR's inputs
    are fixed to, which its runtime pads inputs to (None: any shape). `bits` and `fused` say which variant the file
    is (the plain export is 32 bits, unfused, ONNX); `size_bytes` is the model's size on disk, the figure reports
    quote. `num_heads` and `hidden_size` are the attention's heads and width, what ONNX Runtime's attention fusion is
    told (the width is the model's hidden size unless its heads were pruned).
    """

    dir: Path
    model_path: Path
    family: str
    input_names: tuple[str, ...]
    num_heads: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    bits: int
    fused: bool
    opset: int
    size_bytes: int
    labels: tuple[str, ...] | None = None
    #: How the deployed model was measured where it was tuned (latency at its percentile, batch, sequence length,
    #: threads, hardware fingerprint, quantization recipe); set on the recommended model, None elsewhere.
    measured: dict[str, Any] | None = None
    engine: str = "onnxruntime"
    fixed_shape: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        """The `artifact.json` payload: paths are stored relative to the directory so it can move."""
        payload = asdict(self)
        payload["dir"] = "."
        payload["model_path"] = self.model_path.name
        payload["input_names"] = list(self.input_names)
        payload["labels"] = list(self.labels) if self.labels is not None else None
        payload["fixed_shape"] = list(self.fixed_shape) if self.fixed_shape is not None else None
        return payload


def model_family(model: torch.nn.Module) -> str:
    """The supported family of a transformers model (autotune.models.FAMILIES), or ValueError naming them."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"model family must be one of {sorted(FAMILIES)}, got {family!r}")
    return family


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Switch the model to eager attention for the block (fusable graph), restoring the previous setting."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _example_inputs(input_names: Sequence[str], vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Batch 2 x seq 8 example tensors: >1 on both axes so the tracer cannot specialise either to 1."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 8), generator=generator, dtype=torch.int64)
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return tuple(tensors[name] for name in input_names)


def export_onnx(model: torch.nn.Module, onnx_path: Path, *, opset: int = DEFAULT_OPSET) -> tuple[str, ...]:
    """Export `model` to `onnx_path` with dynamic batch and sequence axes; returns the input names.

    Weights go in as initializers unchanged (constant folding only transposes), so pruned zeros stay exact.
    """
    family = model_family(model)
    input_names = FAMILIES[family].inputs
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names} | {LOGITS: {0: "batch"}}
    args = _example_inputs(input_names, int(model.config.vocab_size))
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter's own deprecation notices, tracer notes on shape-dependent Python in
            # transformers' mask code, and its generic advice about negative indices (the mask path indexes
            # with arange, never negative) are known and covered by the export tests.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message="You are using the legacy TorchScript")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            torch.onnx.export(
                model,
                args,
                str(onnx_path),
                input_names=list(input_names),
                output_names=[LOGITS],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.train(was_training)
    logger.info("exported %s to %s (opset %d)", family, onnx_path, opset)
    return input_names


def write_artifact_json(artifact: Artifact) -> None:
    """Write the artifact's description beside its ONNX file: what makes the directory self-describing for
    `load_artifact`."""
    (artifact.dir / ARTIFACT_JSON).write_text(json.dumps(artifact.to_json(), indent=2) + "\n", encoding="utf-8")


def save_config(model: torch.nn.Module, directory: Path, labels: Sequence[str] | None) -> None:
    """The model's Hugging Face `config.json` as exported (layers, hidden, heads, FFN), with `id2label`/`label2id`
    from the data's label names: what the ecosystem's loaders (Optimum's ORTModelFor...) read beside the ONNX file."""
    config = copy.deepcopy(model.config)
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: index for index, name in enumerate(labels)}
    config.save_pretrained(directory)


def export_artifact(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    labels: Sequence[str] | None = None,
) -> Artifact:
    """Export `model` (fp32, unfused) plus `tokenizer` into `out_dir` and describe it in `artifact.json`."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / ONNX_FILENAME
    input_names = export_onnx(model, onnx_path, opset=opset)
    tokenizer.save_pretrained(directory)
    save_config(model, directory, labels)
    config = model.config
    heads, attention_width = attention_layout(model)
    artifact = Artifact(
        dir=directory,
        model_path=onnx_path,
        family=model_family(model),
        input_names=input_names,
        num_heads=int(heads),
        hidden_size=int(attention_width),
        num_layers=int(config.num_hidden_layers),
        vocab_size=int(config.vocab_size),
        bits=32,
        fused=False,
        opset=opset,
        size_bytes=onnx_path.stat().st_size,
        labels=tuple(labels) if labels is not None else None,
    )
    write_artifact_json(artifact)
    return artifact


def load_artifact(directory: str | Path) -> Artifact:
    """Read an artifact directory's `artifact.json` back into an Artifact rooted at `directory` (one written before
    OpenVINO artifacts came names its ONNX file `onnx_path`)."""
    root = Path(directory)
    payload = json.loads((root / ARTIFACT_JSON).read_text(encoding="utf-8"))
    labels = payload.pop("labels")
    shape = payload.pop("fixed_shape", None)
    if "onnx_path" in payload:
        payload["model_path"] = payload.pop("onnx_path")
    return Artifact(
        **{
            **payload,
            "dir": root,
            "model_path": root / payload["model_path"],
            "input_names": tuple(payload["input_names"]),
            "labels": tuple(labels) if labels is not None else None,
            "fixed_shape": tuple(shape) if shape is not None else None,
        }
    )
