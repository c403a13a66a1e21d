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
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from search_spaces.candidate import LM_BLOCK_SIZES, LM_BUILDER_METHODS, LM_METHODS, LM_WEIGHT_BITS

if TYPE_CHECKING:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

log = logging.getLogger(__name__)

#: Weight-only methods: round-to-nearest, symmetric (the builder's default) or asymmetric (uint zero points), or
#: asymmetric with each block's offset kept exactly (`offset_grid`: lossless on weights already on 4-bit grids);
#: k-quant (llama.cpp's search of scales per block, in the builder); HQQ (half-quadratic scale and zero-point
#: optimisation, Badri & Shaji 2023; its zero points are floats) and GPTQ (Frantar et al. 2023: each column's
#: rounding error compensated on the columns not yet quantized, through the inverse Hessian of the layer's inputs
#: on calibration text; symmetric), both from ONNX Runtime's quantizer.
METHODS = LM_METHODS
#: Methods that quantize the builder's fp32 graph with ONNX Runtime's quantizer rather than inside the builder.
ONNX_METHODS = tuple(m for m in METHODS if m not in LM_BUILDER_METHODS)
#: Methods that need calibration text.
CALIBRATED = ("gptq",)
BLOCK_SIZES = LM_BLOCK_SIZES
#: Widths of the decoder's linear layers and of the LM head: 32 is fp32 (not quantized).
WEIGHT_BITS = LM_WEIGHT_BITS
LM_HEAD = "/lm_head/MatMul"
#: MatMulNBits' compute type for a decoder's weights: int8 activations (accuracy level 4) on every CPU, VNNI or not.
#: Decode is a chain of matrix-vector products, and the fp32-compute path (level 0) dequantizes every block on every
#: call. Measured on a 2-core AVX2-only EPYC (no VNNI), SmolLM2 decode at context 256: int8 weights 396 ms/token at
#: level 0 against 10.8 ms at level 4, int4 16.0 against 6.7 ms. ONNX Runtime computes in fp32 itself where it has no
#: int8 kernel for the CPU.
DECODE_ACCURACY_LEVEL = 4


class ExportError(RuntimeError):
    """The builder could not export or quantize a model; the message says which and why."""


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only quantization of a decoder: the linear layers at `bits`, blocks of `block_size` weights per
    scale, by `method`; the LM head (which, tied to the embedding, dominates decode time in small models) at
    `head_bits`, None meaning the same as the body. `sensitive_int8` keeps the builder's `mixed_layers` at int8 in
    an int4 body: llama.cpp's mixed strategy, the first and last eighth of the blocks plus every third block's
    qkv/v/down projections (on SmolLM2, RTN block 32: +22.6% perplexity instead of +37.7% at 92 MB, measured).
    `accuracy_level` is MatMulNBits' compute type (4: int8 activations, DECODE_ACCURACY_LEVEL; 0: fp32).
    `head_int8_rows` (rtn-offset, 4-bit head) keeps the head's first rows of the vocabulary at int8: a BPE
    vocabulary is in merge order, most frequent pieces first, and those carry most of the head's error (SmolLM2, the
    first 8,192 of 49,152: the head's share of perplexity +10.6% -> +2.0% for 2.3 MB, measured in torch)."""

    bits: int = 4
    block_size: int = 32
    method: str = "rtn"
    head_bits: int | None = None
    accuracy_level: int = DECODE_ACCURACY_LEVEL
    sensitive_int8: bool = False
    head_int8_rows: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8 for weight-only quantization, got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.head_bits is not None and self.head_bits not in WEIGHT_BITS:
            raise ValueError(f"head_bits must be one of {WEIGHT_BITS} or None, got {self.head_bits}")
        if self.method in ONNX_METHODS and self.bits != 4:
            raise ValueError(f"method {self.method!r} quantizes to 4 bits only")
        heads = (4, 8, 32) if self.method == "rtn-offset" else (4, 32)
        if self.method in ONNX_METHODS and self.lm_head_bits not in heads:
            raise ValueError(f"with method {self.method!r} the LM head is at " + " or ".join(map(str, heads))
                             + f" bits, not {self.lm_head_bits}")
        if self.head_int8_rows and (self.method != "rtn-offset" or self.lm_head_bits != 4 or self.head_int8_rows < 0):
            raise ValueError("head_int8_rows keeps rows of a 4-bit LM head at int8 with method 'rtn-offset', not "
                             f"{self.head_int8_rows} rows of a {self.lm_head_bits}-bit head by {self.method!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4, got {self.accuracy_level}")
        if self.sensitive_int8 and (self.bits != 4 or self.method in ONNX_METHODS):
            raise ValueError("sensitive_int8 keeps sensitive layers at int8 in an int4 body quantized by the builder "
                             f"({', '.join(LM_BUILDER_METHODS)}), not at {self.bits} bits by {self.method!r}")

    @property
    def lm_head_bits(self) -> int:
        """The LM head's width, resolved."""
        return self.bits if self.head_bits is None else self.head_bits

    @property
    def name(self) -> str:
        """A short label for tables and cache keys, e.g. `int4-rtn-b32`, `int4-hqq-b64-head8`, `int4-rtn-b32-mixed8`,
        `int4-rtn-offset-b32-head8x8192`."""
        head = "" if self.lm_head_bits == self.bits else f"-head{self.lm_head_bits}"
        rows = f"-head8x{self.head_int8_rows}" if self.head_int8_rows else ""
        return (f"int{self.bits}-{self.method}-b{self.block_size}{head}{rows}"
                + ("-mixed8" if self.sensitive_int8 else ""))


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
    mixed = ["mixed_layers:int8"] if weights.sensitive_int8 else []
    if weights.lm_head_bits == 32:
        options.append(f"nodes_to_exclude={LM_HEAD}")
    elif weights.lm_head_bits != weights.bits:
        mixed.insert(0, f"last_matmul:int{weights.lm_head_bits}")
    if mixed:
        options.append("matmul_mixed_precision=" + ",".join(mixed))
    return f"int{weights.bits}", options


#: What ONNX Runtime's quantizer logs at ERROR when the builder's `mixed_layers:int8` meets a tied embedding: it
#: leaves the shared embedding at 4 bits (a GatherBlockQuantized reading the int4 LM head) and the model is sound,
#: so the line would only alarm a user.
SPURIOUS_GATHER_ERROR = "Gather only supports 4 bits quantization"


def _not_spurious(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(SPURIOUS_GATHER_ERROR)


@contextlib.contextmanager
def quiet_quantizer():
    """ONNX Runtime's weight quantizer logs a line per node at INFO (thousands for a real model): keep warnings,
    less the one spurious error (SPURIOUS_GATHER_ERROR)."""
    loggers = [logging.getLogger(name) for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.addFilter(_not_spurious)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
            logger.removeFilter(_not_spurious)


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


def export_causal_lm(hf_dir: Path, out_dir: Path, weights: WeightOnly | None = None,
                     calibration: np.ndarray | None = None, last_logits_only: bool = False) -> LMArtifact:
    """The Hugging Face causal LM in `hf_dir` as an ONNX Runtime GenAI model directory in `out_dir` (fp32 when
    `weights` is None). Builder methods come straight from the source weights; HQQ and GPTQ quantize the fp32
    export, GPTQ on `calibration` ([n, length] token ids of training text).

    `last_logits_only` is the builder's `prune_lm_head`: the prompt's LM head runs on its last token alone, the only
    one generation samples from, instead of on every token (on SmolLM2, a 49,152-word head over a 128-token prompt
    took 17-19% of TTFT, measured). GenAI generates from such a graph as it is; `lm_quality` scores it
    through a view that gives the head every position again."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if weights is not None and weights.method in CALIBRATED and calibration is None:
        raise ValueError(f"method {weights.method!r} needs calibration windows of training text")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    head = ["prune_lm_head=true"] if last_logits_only else []
    if weights is None:
        _run_builder(hf_dir, out_dir, "fp32", head)
    elif weights.method in ONNX_METHODS:
        with tempfile.TemporaryDirectory(prefix="autotune-fp32-") as tmp:
            plain = export_causal_lm(hf_dir, Path(tmp) / "fp32", last_logits_only=last_logits_only)
            quantize_exported(plain, out_dir, weights, calibration)
    else:
        if weights.method == "k-quant":
            check_k_quant_blocks(hf_dir, weights.block_size)
        precision, options = builder_options(weights)
        _run_builder(hf_dir, out_dir, precision, options + head)
    return LMArtifact(out_dir, weights)


def check_k_quant_blocks(hf_dir: Path, block_size: int) -> None:
    """ExportError unless every linear layer's input splits into an even number of k-quant blocks: ONNX Runtime's
    k-quant packs two 4-bit zero points per byte per column and fails on an odd count (1.32: "cannot reshape
    array"), e.g. SmolLM2's 576-wide inputs in blocks of 64 (9 blocks)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    widths = {"hidden": hidden, "intermediate": config["intermediate_size"],
              "attention": heads * config.get("head_dim", hidden // heads)}
    odd = {name: width for name, width in widths.items() if -(-width // block_size) % 2}
    if odd:
        name, width = next(iter(odd.items()))
        raise ExportError(f"k-quant needs an even number of {block_size}-weight blocks along every input, but the "
                          f"{name} width {width} makes {-(-width // block_size)} (an ONNX Runtime limitation); "
                          f"choose another block size")


class WindowsReader:
    """ONNX Runtime's calibration reader protocol over token windows: one feed per window, run from an empty KV
    cache, the way perplexity is computed."""

    def __init__(self, windows: np.ndarray, cache_shape: tuple[int, int, int]):
        self.windows, self.cache_shape, self.position = np.asarray(windows, dtype=np.int64), cache_shape, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next window's feeds, or None after the last (the protocol's end)."""
        if self.position >= len(self.windows):
            return None
        ids = self.windows[self.position].reshape(1, -1)
        self.position += 1
        return empty_cache_feeds(ids, self.cache_shape)

    def __iter__(self):
        return iter(self.get_next, None)


def cache_shape(model_dir: Path) -> tuple[int, int, int]:
    """(layers, KV heads, head size) from the GenAI config the builder wrote beside the graph."""
    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    return decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]


def empty_cache_feeds(ids: np.ndarray, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Feeds of a builder graph for token ids [1, length] with an empty KV cache (past length 0)."""
    layers, kv_heads, head_size = shape
    empty = np.zeros((1, kv_heads, 0, head_size), dtype=np.float32)
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    feeds |= {f"past_key_values.{layer}.{kind}": empty for layer in range(layers) for kind in ("key", "value")}
    return feeds


def quantize_exported(plain: LMArtifact, out_dir: Path, weights: WeightOnly, calibration: np.ndarray | None) -> LMArtifact:
    """Int4 of an fp32 export's MatMuls by RTN with offsets kept, HQQ or GPTQ (the LM head left fp32 when
    `head_bits` is 32; with rtn-offset, see `offset_grid_quantizer`), written as a GenAI model directory beside the
    same config and tokenizer. ONNX Runtime's HQQ sets no accuracy level and stores float zero points, which its CPU
    kernels run on a slow path: the benchmark shows what that costs."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer,
    )

    shutil.copytree(plain.directory, out_dir, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(str(plain.onnx_path))
    excluded = [LM_HEAD] if weights.lm_head_bits == 32 else []
    if weights.method == "rtn-offset":
        quantizer = offset_grid_quantizer(model, weights)
    elif weights.method == "hqq":
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=excluded,
                                         algo_config=HQQWeightOnlyQuantConfig(block_size=weights.block_size, bits=4))
    else:
        reader = WindowsReader(calibration, cache_shape(plain.directory))
        quantizer = MatMulNBitsQuantizer(model, block_size=weights.block_size, is_symmetric=True,
                                         accuracy_level=weights.accuracy_level or None, nodes_to_exclude=excluded,
                                         algo_config=GPTQWeightOnlyQuantConfig(calibration_data_reader=reader))
    if quantizer is not None:
        with quiet_quantizer():
            quantizer.process()
        model = quantizer.model.model
    onnx.save(model, str(out_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return LMArtifact(out_dir, weights)


def offset_grid_quantizer(model: onnx.ModelProto, weights: WeightOnly) -> MatMulNBitsQuantizer | None:
    """Rewrite `model`'s linears, in place, by RTN with offsets kept (`offset_grid`), the LM head too unless it is
    fp32 or int8; the quantizer still to run on what is left at int8 (the head, or its first `head_int8_rows` rows:
    ONNX Runtime's symmetric RTN), or None."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from autotune.runtime.offset_grid import offset_grid_model, split_columns

    int8 = []
    if weights.lm_head_bits == 8:
        int8 = [LM_HEAD]
    elif weights.head_int8_rows:
        int8 = [split_columns(model, LM_HEAD, weights.head_int8_rows)[0]]
    unwritten = frozenset(int8 + ([LM_HEAD] if weights.lm_head_bits == 32 else []))
    offset_grid_model(model, weights.block_size, weights.accuracy_level, exclude=unwritten)
    if not int8:
        return None
    return MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=weights.block_size, is_symmetric=True, accuracy_level=weights.accuracy_level, bits=8))


def greedy_continuation(model_dir: Path, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
    """The token ids of the GenAI model's greedy continuation of `prompt_ids` (up to `new_tokens`): what a reader
    compares between a teacher and its compressed model to see what a perplexity figure means. Ids in and out, so
    the caller tokenizes with the tokenizer the model was scored with."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(i) for i in generator.get_sequence(0)[len(prompt_ids):]]
