"""Causal LMs as deployable ONNX models with a KV cache, built by ONNX Runtime GenAI's model builder.

The builder is the ecosystem's standard path for llama-family decoders: it writes GroupQueryAttention with a KV
cache, fuses the norms, and quantizes weights to `MatMulNBits` (int8/int4, round-to-nearest or k-quant, a block
size, an accuracy level, the LM head at its own width). Its output directory (`model.onnx`, external weights,
`genai_config.json`, tokenizer) is what `onnxruntime_genai.Model` loads, so the artifact we measure is the one a
user deploys. HQQ is the one method it does not offer: that comes from ONNX Runtime's `MatMulNBitsQuantizer`,
applied to the builder's fp32 graph.

A student (fewer blocks, a narrower FFN) is a Hugging Face directory like the teacher, so it exports through the
same call.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Weight-only methods: round-to-nearest, symmetric (the builder's default) or asymmetric (uint zero points);
#: k-quant (llama.cpp's search of scales per block, in the builder); HQQ (half-quadratic scale and zero-point
#: optimisation, Badri & Shaji 2023, from ONNX Runtime's quantizer; its zero points are floats).
METHODS = ("rtn", "rtn-asym", "k-quant", "hqq")
BLOCK_SIZES = (16, 32, 64, 128, 256)
#: Widths of the decoder's linear layers and of the LM head: 32 is fp32 (not quantized).
WEIGHT_BITS = (4, 8, 32)
LM_HEAD = "/lm_head/MatMul"


class ExportError(RuntimeError):
    """The builder could not export or quantize a model; the message says which and why."""


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only quantization of a decoder: the linear layers at `bits`, blocks of `block_size` weights per
    scale, by `method`; the LM head (which, tied to the embedding, dominates decode time in small models) at
    `head_bits`, None meaning the same as the body. `accuracy_level` is MatMulNBits' compute type (4: int8
    activations, where the CPU has int8 dot products; 0: fp32), as the hardware recipe says."""

    bits: int = 4
    block_size: int = 32
    method: str = "rtn"
    head_bits: int | None = None
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8 for weight-only quantization, got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.head_bits is not None and self.head_bits not in WEIGHT_BITS:
            raise ValueError(f"head_bits must be one of {WEIGHT_BITS} or None, got {self.head_bits}")
        if self.method == "hqq" and self.bits != 4:
            raise ValueError("method 'hqq' quantizes to 4 bits only")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4, got {self.accuracy_level}")

    @property
    def lm_head_bits(self) -> int:
        """The LM head's width, resolved."""
        return self.bits if self.head_bits is None else self.head_bits

    @property
    def name(self) -> str:
        """A short label for tables and cache keys, e.g. `int4-rtn-b32` or `int4-hqq-b64-head8`."""
        head = "" if self.lm_head_bits == self.bits else f"-head{self.lm_head_bits}"
        return f"int{self.bits}-{self.method}-b{self.block_size}{head}"


@dataclass(frozen=True)
class LMArtifact:
    """A causal LM as ONNX Runtime GenAI loads it: the directory, and how its weights were quantized (None: fp32)."""

    directory: Path
    weights: WeightOnly | None

    @property
    def onnx_path(self) -> Path:
        """The decoder graph (its weights sit beside it in external data)."""
        return self.directory / "model.onnx"

    @property
    def size_bytes(self) -> int:
        """Size on disk of the graph and its weights (what a deployment ships besides the tokenizer)."""
        return sum(p.stat().st_size for p in self.directory.glob("model.onnx*"))


def builder_options(weights: WeightOnly) -> tuple[str, list[str]]:
    """The builder's precision and extra options for a weight-only scheme the builder implements itself."""
    options = [f"block_size={weights.block_size}", f"accuracy_level={weights.accuracy_level}"]
    if weights.method == "rtn-asym" or weights.lm_head_bits != weights.bits:
        # The builder shares a tied embedding with the LM head's quantized weights, and writes a graph ONNX Runtime
        # rejects when those are asymmetric or at another width than the body (onnxruntime-genai 0.18: a uint8
        # Reshape feeding a float Gather; a Gather reading a tensor that was never written): keep them apart.
        options.append("shared_embeddings=false")
    if weights.method == "rtn-asym":
        options.append("is_symmetric=false")
    elif weights.method == "k-quant":
        options.append("algo_config=k_quant")
    if weights.lm_head_bits == 32:
        options.append(f"nodes_to_exclude={LM_HEAD}")
    elif weights.lm_head_bits != weights.bits:
        options.append(f"matmul_mixed_precision=last_matmul:int{weights.lm_head_bits}")
    return f"int{weights.bits}", options


@contextlib.contextmanager
def quiet_quantizer():
    """ONNX Runtime's weight quantizer logs a line per node at INFO (thousands for a real model): keep warnings."""
    loggers = [logging.getLogger(name) for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run_builder(hf_dir: Path, out_dir: Path, precision: str, options: list[str]) -> None:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    chatter = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="autotune-builder-") as cache, quiet_quantizer(), \
            contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        try:
            prepared = parse_extra_options(None, str(hf_dir), str(out_dir), precision, "cpu", cache, options)
            create_model(None, str(hf_dir), str(out_dir), precision, "cpu", cache, **prepared)
        except Exception as error:  # the builder raises bare Exceptions and asserts; name what failed
            raise ExportError(f"the ONNX Runtime GenAI builder could not export {hf_dir} at {precision} "
                              f"({type(error).__name__}: {error})") from error
    log.debug("builder output for %s: %s", hf_dir, chatter.getvalue()[-2000:])


def export_causal_lm(hf_dir: Path, out_dir: Path, weights: WeightOnly | None = None) -> LMArtifact:
    """The Hugging Face causal LM in `hf_dir` as an ONNX Runtime GenAI model directory in `out_dir` (fp32 when
    `weights` is None). Builder methods come straight from the source weights; HQQ quantizes the fp32 export."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if weights is None:
        _run_builder(hf_dir, out_dir, "fp32", [])
    elif weights.method == "hqq":
        with tempfile.TemporaryDirectory(prefix="autotune-fp32-") as tmp:
            plain = export_causal_lm(hf_dir, Path(tmp) / "fp32")
            quantize_hqq(plain, out_dir, weights)
    else:
        precision, options = builder_options(weights)
        _run_builder(hf_dir, out_dir, precision, options)
    return LMArtifact(out_dir, weights)


def quantize_hqq(plain: LMArtifact, out_dir: Path, weights: WeightOnly) -> LMArtifact:
    """HQQ int4 of an fp32 export's MatMuls (the LM head left fp32 when `head_bits` is 32), written as a GenAI
    model directory beside the same config and tokenizer. ONNX Runtime's HQQ does not set an accuracy level and
    stores float zero points, which its CPU kernels run on a slow path: the benchmark shows what that costs."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if weights.lm_head_bits not in (4, 32):
        raise ValueError("with method 'hqq' the LM head is 4-bit (like the body) or fp32 (head_bits=32)")
    shutil.copytree(plain.directory, out_dir, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(str(plain.onnx_path))
    excluded = [LM_HEAD] if weights.lm_head_bits == 32 else []
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=excluded,
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=weights.block_size, bits=4))
    with quiet_quantizer():
        quantizer.process()
    onnx.save(quantizer.model.model, str(out_dir / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data")
    return LMArtifact(out_dir, weights)
