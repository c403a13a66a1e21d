"""Quantization recipes: how autotune turns an fp32 ONNX graph into int8 or int4, in one place.

The deployed models (autotune.compress.quantization) and the profile's chain microbenchmarks
(profilers/microbench.py) must quantize the same way, or the profile would time kernels the deployed model
never runs. Both call the functions here, with the same `Recipe`; the recipe is chosen from the CPU's ISA flags
by `recipe_for`, and recorded with its reasons in the profile's consumers (result.json, the report).

What depends on the CPU, and the measurement behind each choice (bench/operators.py prints the rows):
- int8 `reduce_range` (7-bit weights) on every CPU. ONNX Runtime's u8 x s8 GEMM on x86 without VNNI multiplies
  pairs into 16-bit intermediate sums (vpmaddubsw), which full-range weights can saturate; 7-bit weights keep
  them in range. With VNNI (vpdpbusd) or AMX nothing saturates, but full-range weights measured neither faster
  nor more accurate there (the dynamic per-tensor activation quantization dominates the error), so one recipe
  serves both.
- the engine of int8. With VNNI or AMX and OpenVINO installed, int8 is OpenVINO's static int8 (NNCF's
  post-training quantization, calibrated on rows of the training split): on an AVX-512 VNNI Xeon it ran the demo's
  teacher at 2.22x its fastest fp32 (OpenVINO's) with validation accuracy unchanged, where ONNX Runtime's dynamic
  int8 ran at 1.30x, and 2x384 / 4x384 students 1.2-1.4x faster than dynamic int8. Without int8 dot products it
  measured 0.74x of fp32 (an AVX2 EPYC), so there, and wherever OpenVINO is absent, int8 is ONNX Runtime's
  dynamic quantization.
- int4 `accuracy_level` of MatMulNBits: 4 lets ONNX Runtime quantize the activations to int8 and run its int8
  dot-product kernels; 0 (its default) dequantizes int4 weights for an fp32 GEMM. Level 4 is chosen where the
  CPU has int8 dot products that accumulate in 32 bits (VNNI, AMX), where it measured faster at equal error;
  elsewhere the default stays, since nothing measured it paying there.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import onnx

#: Flags (the kernel's spelling) of int8 dot-product instructions that accumulate in 32 bits without saturating.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
INT4_BLOCK_SIZE = 32
#: MatMulNBits accuracy levels: 0 leaves ONNX Runtime's default (fp32 compute), 4 computes in int8.
INT4_INT8_COMPUTE = 4


@dataclass(frozen=True)
class Recipe:
    """How int8 and int4 are built on one CPU, and why (one reason per choice)."""

    int8_reduce_range: bool
    int4_block_size: int
    int4_accuracy_level: int
    reasons: tuple[str, ...]
    #: "onnxruntime" (dynamic int8) or "openvino" (NNCF's static int8, run by OpenVINO).
    int8_engine: str = "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form result.json and bench output keep."""
        return asdict(self) | {"reasons": list(self.reasons)}

    def describe(self, bits: int) -> str:
        """One phrase for a bit width's recipe, for reports and bench rows."""
        if bits == 8 and self.int8_engine == "openvino":
            return "int8 static (NNCF, calibrated on the training split), OpenVINO"
        if bits == 8:
            return f"int8 dynamic, per-channel s8 weights{', reduce_range' if self.int8_reduce_range else ', full range'}"
        if bits == 4:
            compute = "int8 compute" if self.int4_accuracy_level == INT4_INT8_COMPUTE else "fp32 compute"
            return f"int4 MatMulNBits, block {self.int4_block_size}, symmetric, {compute}"
        return {32: "fp32", 16: "fp16 weights and compute"}.get(bits, f"{bits} bits")


def engines_text(*engines: str | None) -> str:
    """The engines a run's figures come from, each named once in order (e.g. the target's runtime, the baseline's
    engine, the recipe's int8 engine): "onnxruntime and openvino"; None entries (not recorded) are skipped."""
    named = list(dict.fromkeys(engine for engine in engines if engine))
    return " and ".join(named)


def recipe_for(flags: Iterable[str], *, openvino: bool = False) -> Recipe:
    """The recipe for a CPU with these ISA flags (kernel spelling), `openvino` saying whether OpenVINO and NNCF are
    installed (see the module docstring for why)."""
    dot = sorted(set(flags) & INT8_DOT_FLAGS)
    int8_reason = "int8 reduce_range (7-bit weights): safe from 16-bit saturation without VNNI, and full range measured no better with it"
    if not dot:
        return Recipe(int8_reduce_range=True, int4_block_size=INT4_BLOCK_SIZE, int4_accuracy_level=0,
                      reasons=(int8_reason, "int4 with fp32 compute (accuracy_level 0): no VNNI/AMX int8 dot products"))
    if openvino:
        int8_reason = (f"int8 static in OpenVINO (NNCF, calibrated on the training split): {'/'.join(dot)} int8 dot "
                       "products, where it measured 1.2-1.7x faster than ONNX Runtime's dynamic int8")
    return Recipe(int8_reduce_range=True, int4_block_size=INT4_BLOCK_SIZE, int4_accuracy_level=INT4_INT8_COMPUTE,
                  reasons=(int8_reason, f"int4 with int8 compute (accuracy_level 4): {'/'.join(dot)} int8 dot products"),
                  int8_engine="openvino" if openvino else "onnxruntime")


#: The recipe of a CPU without int8 dot products: the conservative choice where the flags are unknown.
PORTABLE = recipe_for(())

#: Flags of native bf16 arithmetic (AVX512-BF16 dot products, AMX tiles): without them bf16 is emulated.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class EngineMode:
    """An execution engine and precision mode, whether this CPU's rules keep it, and why."""

    engine: str  # "onnxruntime" or "openvino"
    precision: str  # "fp32", "bf16", "int8-dynamic" or "int8-static"
    kept: bool
    reason: str

    @property
    def name(self) -> str:
        """E.g. `openvino-int8-static`."""
        return f"{self.engine}-{self.precision}"


def engine_modes(flags: Iterable[str]) -> tuple[EngineMode, ...]:
    """Every engine and precision mode, kept where this CPU runs it natively and it measured paying (bench/operators.py
    prints the rows behind each reason, kept or not)."""
    flags = set(flags)
    dot, bf16 = sorted(flags & INT8_DOT_FLAGS), sorted(flags & BF16_FLAGS)
    native_int8 = f"{'/'.join(dot)} int8 dot products" if dot else "no VNNI/AMX: int8 dot products saturate or are emulated"
    return (
        EngineMode("onnxruntime", "fp32", True, "the reference engine"),
        EngineMode("onnxruntime", "int8-dynamic", True, "activations quantized per call; pays on every CPU measured"),
        EngineMode("onnxruntime", "int8-static", False, "static QDQ measured slower than dynamic int8 on an AVX2 EPYC "
                                                       "(0.44x vs 1.45x fp32) and an AMX Xeon (1.27-1.33x vs 1.55-2.2x)"),
        EngineMode("openvino", "fp32", True, "a second fp32 engine: the faster of the two is the reference"),
        EngineMode("openvino", "bf16", bool(bf16), f"{'/'.join(bf16)} native bf16" if bf16 else "no native bf16 (emulated)"),
        EngineMode("openvino", "int8-static", bool(dot), native_int8 + (", and the recipe's int8 where OpenVINO is installed" if dot else "")),
    )


def quantize_int8_dynamic(onnx_in: str | os.PathLike[str], onnx_out: str | os.PathLike[str], recipe: Recipe,
                          extra_options: dict[str, Any] | None = None) -> None:
    """int8 weights per channel, activations quantized on the fly per call (ONNX Runtime's dynamic quantizer)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(os.fspath(onnx_in), os.fspath(onnx_out), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=recipe.int8_reduce_range, extra_options=extra_options or {})


def quantize_int4(model: onnx.ModelProto, recipe: Recipe) -> onnx.ModelProto:
    """Weight-only symmetric int4 (MatMulNBits) on every constant-weight MatMul, `recipe.int4_block_size` weights
    per scale. Needs the `onnx_ir` package (ONNX Runtime imports it for this quantizer only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, block_size=recipe.int4_block_size, is_symmetric=True,
                                     accuracy_level=recipe.int4_accuracy_level or None)
    quantizer.process()
    return quantizer.model.model


def int8_chain_bytes(fp32: onnx.ModelProto, recipe: Recipe) -> bytes:
    """A static-shape graph quantized to int8 as deployed, serialized (the microbenchmarks' chains)."""
    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="autotune-chain-") as tmp:
        source, typed, target = (os.path.join(tmp, f"{name}.onnx") for name in ("fp32", "typed", "int8"))
        onnx.save(fp32, source)
        # What the quantizer expects (and warns without); the shapes are static, so ONNX's own shape inference
        # is enough and the symbolic pass (seconds of every profile) is skipped.
        quant_pre_process(source, typed, skip_optimization=True, skip_symbolic_shape=True)
        quantize_int8_dynamic(typed, target, recipe)
        with open(target, "rb") as handle:
            return handle.read()
