"""Quantization recipes: chosen from the CPU's flags, and the same in the deployed models and the profile's chains.

Nothing here assumes the development box: the machine's own recipe is checked against what its profile says
this CPU is, and the rules against flag sets written out.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from profilers.cpu import probe_cpu
from profilers.microbench import gemm_chain_model, quantized_chain
from profilers.recipes import INT4_INT8_COMPUTE, PORTABLE, Recipe, recipe_for


def accuracy_levels(model: onnx.ModelProto) -> set[int]:
    """The accuracy_level of every MatMulNBits node (0 where the attribute is absent: ONNX Runtime's default)."""
    return {next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
            for node in model.graph.node if node.op_type == "MatMulNBits"}


@pytest.mark.parametrize(("flags", "level"), [
    ((), 0), (("avx2", "fma"), 0), (("avx2", "avx512f", "avx512bw"), 0),
    (("avx2", "avx512_vnni"), INT4_INT8_COMPUTE), (("avx2", "avx_vnni"), INT4_INT8_COMPUTE),
    (("avx512_vnni", "amx_int8", "amx_tile"), INT4_INT8_COMPUTE),
])
def test_int4_computes_in_int8_only_where_the_cpu_has_int8_dot_products(flags: tuple[str, ...], level: int) -> None:
    recipe = recipe_for(flags)
    assert recipe.int4_accuracy_level == level and recipe.int8_reduce_range and recipe.int4_block_size == 32
    assert len(recipe.reasons) == 2 and all(recipe.reasons)
    assert ("int8 compute" in recipe.describe(4)) == (level == INT4_INT8_COMPUTE)


def test_the_portable_recipe_is_that_of_a_cpu_without_int8_dot_products() -> None:
    assert PORTABLE == recipe_for(("sse4_2", "avx2"))


def test_this_machines_recipe_follows_its_own_flags() -> None:
    cpu = probe_cpu()
    has_dot = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu.flags))
    assert (recipe_for(cpu.flags).int4_accuracy_level == INT4_INT8_COMPUTE) == has_dot


@pytest.mark.parametrize("level", [0, INT4_INT8_COMPUTE])
def test_the_profile_chain_and_the_deployed_model_carry_the_same_int4_recipe(level: int, tmp_path: Path,
                                                                           tiny_bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from autotune.compress.quantization import quantize_artifact
    from autotune.runtime import export_artifact

    recipe = Recipe(int8_reduce_range=True, int4_block_size=32, int4_accuracy_level=level, reasons=("test",))
    chain = onnx.load_from_string(quantized_chain(gemm_chain_model(), 4, recipe))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    plain = export_artifact(model, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path / "plain")
    deployed = onnx.load(str(quantize_artifact(plain, tmp_path / "int4", bits=4, recipe=recipe).model_path))
    assert accuracy_levels(chain) == accuracy_levels(deployed) == {level}


def test_engines_are_named_once_each_in_order_and_unrecorded_ones_skipped() -> None:
    from profilers.recipes import engines_text

    assert engines_text("onnxruntime", "onnxruntime", "openvino") == "onnxruntime and openvino"
    assert engines_text("onnxruntime", None, "onnxruntime") == "onnxruntime"
