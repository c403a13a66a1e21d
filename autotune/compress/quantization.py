"""Bit widths as post-training passes on an ONNX artifact: ONNX file in, ONNX file out.

Quantization happens after training and after export ("train once, quantize many"): one fp32 export of a
trained student yields every bit width the search asks for, so these are plain functions on ONNX files and
`build_variant` is the single entry point a trial calls.

Order: fuse first, then quantize. Quantizing the unfused export first turns its MatMuls into
DynamicQuantizeLinear/MatMulInteger chains that the fusion patterns no longer match (no Attention,
EmbedLayerNormalization or BiasGelu is fused afterwards), so the int8 model would lose the fused kernels the
fp32 baseline has. Quantizing the fused graph keeps them and lets ORT use its int8 fused kernels (QAttention,
QEmbedLayerNormalization). The catch is that ONNX's own shape inference cannot type the outputs of
com.microsoft contrib ops, which makes the quantizers fail ("Unable to find data type for weight_name",
dynamic) or silently skip every activation (static: only weights got Q/DQ). So the fused graph first goes
through ORT's symbolic shape inference (`quant_pre_process`, which knows the contrib ops), and
`DefaultTensorType=FLOAT` stays as the quantizer's fallback for any tensor that is still untyped.

How int8 and int4 are built (reduce_range, int4 block size and compute) is a `Recipe` of profilers/recipes.py,
shared with the profile's microbenchmarks so that both time the same kernels.

int4 is weight-only block-wise MatMulNBits on the fused graph's remaining MatMuls (attention output and the
FFN: 9/12 of each layer's Linear weights when the FFN is 4x hidden); Q/K/V weights live inside the fused
Attention node and stay fp32, the price of keeping the fused attention kernel.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from onnxruntime.transformers.onnx_model import OnnxModel

from autotune.runtime.engines import convert_openvino_fp32, quantize_openvino_int8
from autotune.runtime.export import ARTIFACT_JSON, ONNX_FILENAME, Artifact, write_artifact_json
from autotune.runtime.fusion import fuse_onnx
from profilers import recipes
from profilers.openvino import Shape
from profilers.recipes import PORTABLE, Recipe
from search_spaces import BIT_WIDTHS

logger = logging.getLogger(__name__)

#: The bit widths a variant can have: the search space's, defined once there.
ACCEPTED_BITS = BIT_WIDTHS
_QUANTIZER_OPTIONS = {"DefaultTensorType": onnx.TensorProto.FLOAT}

PathLike = str | os.PathLike[str]
Feeds = Mapping[str, np.ndarray]


def check_bits(bits: int) -> int:
    """`bits` if it is a supported width, else ValueError in one sentence naming the accepted values."""
    if bits not in ACCEPTED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, ACCEPTED_BITS))}, got {bits!r}")
    return bits


def to_fp16(onnx_in: PathLike, onnx_out: PathLike) -> Path:
    """fp16 weights and compute with fp32 inputs/outputs (`keep_io_types`), so callers feed the same arrays."""
    model = OnnxModel(onnx.load(os.fspath(onnx_in)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(os.fspath(onnx_out))
    return Path(onnx_out)


def infer_shapes(onnx_in: PathLike, onnx_out: PathLike) -> Path:
    """ORT's symbolic shape inference (types contrib-op outputs), without re-optimizing the graph."""
    quant_pre_process(os.fspath(onnx_in), os.fspath(onnx_out), skip_optimization=True, skip_onnx_shape=True, auto_merge=True)
    return Path(onnx_out)


def quantize_int8_dynamic(onnx_in: PathLike, onnx_out: PathLike, recipe: Recipe = PORTABLE) -> Path:
    """int8 weights per channel, activations quantized on the fly per call (no calibration needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        typed = infer_shapes(onnx_in, Path(tmp) / "typed.onnx")
        recipes.quantize_int8_dynamic(typed, onnx_out, recipe, extra_options=_QUANTIZER_OPTIONS)
    return Path(onnx_out)


class FeedsReader(CalibrationDataReader):
    """Hands ORT's calibrator one feed dict at a time, keeping only the inputs the model declares."""

    def __init__(self, feeds: Iterable[Feeds], input_names: Iterable[str]) -> None:
        names = tuple(input_names)
        self._batches: Iterator[dict[str, np.ndarray]] = ({n: np.asarray(f[n]) for n in names} for f in feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration feed dict, or None when exhausted (ORT's CalibrationDataReader protocol)."""
        return next(self._batches, None)


def graph_input_names(onnx_path: PathLike) -> tuple[str, ...]:
    """The inputs a caller must feed: graph inputs that are not initializers (an exporter may list weights as inputs
    too), so calibration feeds only what the model takes."""
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return tuple(i.name for i in model.graph.input if i.name not in initializers)


def quantize_int8_static(onnx_in: PathLike, onnx_out: PathLike, calibration: Iterable[Feeds]) -> Path:
    """int8 QDQ weights and activations, activation ranges calibrated (min-max) on `calibration` feeds."""
    with tempfile.TemporaryDirectory() as tmp:
        typed = infer_shapes(onnx_in, Path(tmp) / "typed.onnx")
        quantize_static(
            typed,
            os.fspath(onnx_out),
            FeedsReader(calibration, graph_input_names(typed)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options=_QUANTIZER_OPTIONS,
        )
    return Path(onnx_out)


def quantize_int4(onnx_in: PathLike, onnx_out: PathLike, recipe: Recipe = PORTABLE) -> Path:
    """Weight-only symmetric int4 as MatMulNBits on every constant-weight MatMul, as the recipe says."""
    onnx.save(recipes.quantize_int4(onnx.load(os.fspath(onnx_in)), recipe), os.fspath(onnx_out))
    return Path(onnx_out)


def build_variant(
    fp32_onnx: PathLike,
    out_path: PathLike,
    bits: int,
    *,
    fuse: bool = True,
    num_heads: int,
    hidden_size: int,
    calibration: Iterable[Feeds] | None = None,
    static: bool = False,
    recipe: Recipe = PORTABLE,
) -> Path:
    """Write the `bits`-wide variant of an fp32 export to `out_path`, fused first when `fuse` (see module doc).

    `static=True` (8 bits only) calibrates activation ranges on `calibration`, an iterable of feed dicts;
    `recipe` says how int8 and int4 are built on the target CPU.
    """
    check_bits(bits)
    if static and bits != 8:
        raise ValueError(f"static quantization applies to bits=8 only, got bits={bits}")
    if static and calibration is None:
        raise ValueError("static int8 quantization needs calibration feeds; pass calibration=[{input: array}, ...]")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(fp32_onnx)
        if fuse:
            source = fuse_onnx(source, Path(tmp) / "fused.onnx", num_heads=num_heads, hidden_size=hidden_size)
        if bits == 32:
            onnx.save(onnx.load(os.fspath(source)), os.fspath(out))
        elif bits == 16:
            to_fp16(source, out)
        elif bits == 8 and static:
            quantize_int8_static(source, out, calibration)
        elif bits == 8:
            quantize_int8_dynamic(source, out, recipe)
        else:
            quantize_int4(source, out, recipe)
    logger.info("built %d-bit%s variant %s (%d bytes)", bits, " fused" if fuse else "", out, out.stat().st_size)
    return out


def published(source: Artifact, **changes: Any) -> Artifact:
    """`source` with `changes` (its new directory, model file, bits, engine), described in that directory's
    `artifact.json`: how every artifact derived from the plain export is finished."""
    artifact = replace(source, **changes)
    write_artifact_json(artifact)
    return artifact


def quantize_artifact(source: Artifact, out_dir: str | Path, *, bits: int, fuse: bool = True, **variant_options: Any) -> Artifact:
    """A new artifact directory holding `source`'s tokenizer and a `bits`-wide (optionally fused) ONNX model.

    The artifact-level twin of `build_variant`: how a trial turns the one fp32 export into each bit width it
    evaluates ("train once, quantize many"); `variant_options` (calibration, static, recipe) pass through to it.
    """
    if source.bits != 32 or source.fused:
        raise ValueError(f"quantize_artifact needs the plain fp32 export as source, got bits={source.bits}, fused={source.fused}")
    directory = Path(out_dir)
    if directory.resolve() == source.dir.resolve():
        raise ValueError(f"out_dir must differ from the source artifact's directory {source.dir}")
    shutil.copytree(source.dir, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ONNX_FILENAME, ARTIFACT_JSON))
    onnx_path = directory / ONNX_FILENAME
    build_variant(
        source.model_path, onnx_path, bits, fuse=fuse, num_heads=source.num_heads, hidden_size=source.hidden_size, **variant_options
    )
    return published(source, dir=directory, model_path=onnx_path, bits=bits, fused=fuse,
                     size_bytes=onnx_path.stat().st_size)


#: The OpenVINO IR's file name in an artifact directory (its weights go to model.bin beside it).
OPENVINO_FILENAME = "model.xml"


def _openvino_directory(source: Artifact, out_dir: str | Path, what: str) -> Path:
    """A new artifact directory holding `source`'s tokenizer, for an OpenVINO IR built from `source`'s plain export."""
    if source.bits != 32 or source.fused or source.engine != "onnxruntime":
        raise ValueError(f"{what} needs the plain fp32 ONNX export as source, got bits={source.bits}, "
                         f"fused={source.fused}, engine={source.engine}")
    directory = Path(out_dir)
    shutil.copytree(source.dir, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ONNX_FILENAME, ARTIFACT_JSON))
    return directory


def _openvino_published(source: Artifact, xml: Path, bits: int, shape: Shape | None) -> Artifact:
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    return published(source, dir=xml.parent, model_path=xml, bits=bits, engine="openvino", size_bytes=size,
                     fixed_shape=None if shape is None else tuple(shape))


def openvino_int8_artifact(source: Artifact, out_dir: str | Path, calibration: Sequence[Feeds],
                           shape: Shape | None = None) -> Artifact:
    """`source`'s int8 OpenVINO IR in a new artifact directory: NNCF's static quantization calibrated on
    `calibration` (feeds from the training split), inputs fixed to `shape` (None: any shape), run by OpenVINO. Token
    ids beyond `source`'s vocabulary (a latency gate's stand-in keeps a cut token table) wrap into it: calibration
    values only matter for accuracy, which a stand-in does not have."""
    directory = _openvino_directory(source, out_dir, "openvino_int8_artifact")
    wrapped = [{**feeds, "input_ids": np.asarray(feeds["input_ids"]) % source.vocab_size} for feeds in calibration]
    return _openvino_published(source, quantize_openvino_int8(source.model_path, wrapped, directory / OPENVINO_FILENAME,
                                                              shape), bits=8, shape=shape)


def openvino_fp32_artifact(source: Artifact, out_dir: str | Path, shape: Shape | None = None) -> Artifact:
    """`source`'s fp32 OpenVINO IR in a new artifact directory, inputs fixed to `shape` (None: any shape): the same
    model, deployed in another engine."""
    directory = _openvino_directory(source, out_dir, "openvino_fp32_artifact")
    return _openvino_published(source, convert_openvino_fp32(source.model_path, directory / OPENVINO_FILENAME, shape),
                               bits=32, shape=shape)
