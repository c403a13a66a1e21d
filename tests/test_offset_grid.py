"""Int4 with per-block offsets kept (`autotune.runtime.offset_grid`): a weight already on 4-bit grids (a GGUF Q4_1
model's) is reproduced to within its offsets' own rounding, and ONNX Runtime's kernel computes what the packed
layout says, on a real session."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autotune.runtime.offset_grid import dequantized, grid_codes, offset_grid_model, offset_grid_weight


def q4_1_weight(k: int, n: int, block: int = 32, seed: int = 0) -> np.ndarray:
    """A MatMul weight [k, n] as a GGUF Q4_1 model stores it: per column, blocks along k of `min + step * code`
    whose codes span 0..15 (min and max of each block are on the grid), min mostly below zero."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n, k // block, block))
    codes[..., 0], codes[..., 1] = 0, 15
    step = rng.uniform(0.002, 0.02, size=(n, k // block, 1))
    low = -step * rng.uniform(2, 13, size=(n, k // block, 1))
    return (low + step * codes).reshape(n, k).T.astype(np.float32)


def effective(packed, block: int) -> np.ndarray:
    """The weight the widened MatMul computes with: each block's grid plus its offset."""
    weight = dequantized(packed)
    k = packed.k - packed.k // (block + 1)
    return weight[:k] + np.repeat(weight[k:], block, axis=0)


def rtn_asym(weight: np.ndarray, block: int) -> np.ndarray:
    """Asymmetric RTN with integer zero points (what a plain int4 re-quantization does), dequantized."""
    k, n = weight.shape
    codes, scales, zeros, _ = grid_codes(weight.T.reshape(n, k // block, block).astype(np.float64))
    return ((codes - zeros[..., None].astype(float)) * scales[..., None]).reshape(n, k).T


def matmul_model(k: int, n: int, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """MatMuls of one input x [1, 3, k] by each weight [k, n], named as the weights."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])]
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=name) for name in weights]
    outputs = [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, 3, n]) for name in weights]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_a_weight_on_4_bit_grids_is_kept_far_closer_than_by_integer_zero_points() -> None:
    weight = q4_1_weight(96, 40)
    packed = offset_grid_weight(weight, 32)
    assert packed.k == 96 + 3  # the input widened by one sum per block
    kept = np.abs(effective(packed, 32) - weight).max()
    requantized = np.abs(rtn_asym(weight, 32) - weight).max()
    assert kept < requantized / 10
    # the grids themselves are exact: only the offsets' own 4-bit rounding is lost
    _, _, _, offsets = grid_codes(weight.T.reshape(40, 3, 32).astype(np.float64))
    offset_range = np.maximum(offsets.max(axis=1), 0) - np.minimum(offsets.min(axis=1), 0)  # the padding is zero
    assert kept <= offset_range.max() / 30 + 1e-6  # half a step of the offsets' 16-level grid


@pytest.mark.parametrize("level", [0, 4])
def test_onnx_runtime_computes_the_widened_matmul_of_the_packed_layout(level: int) -> None:
    weight = q4_1_weight(64, 24)
    model = matmul_model(64, 24, {"w": weight})
    assert offset_grid_model(model, 32, level) == 1
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).standard_normal((1, 3, 64)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    widened = np.concatenate([x, x.reshape(1, 3, 2, 32).sum(-1)], axis=-1)
    expected = widened @ dequantized(offset_grid_weight(weight, 32))
    # level 4 quantizes the activations to int8 per block: a percent, not more
    np.testing.assert_allclose(y, expected, rtol=0, atol=(1e-4 if level == 0 else 2e-2) * np.abs(expected).max())
    np.testing.assert_allclose(y, x @ weight, rtol=0, atol=3e-2 * np.abs(expected).max())


def test_an_input_shared_by_several_matmuls_is_widened_once() -> None:
    model = matmul_model(64, 24, {"a": q4_1_weight(64, 24, seed=1), "b": q4_1_weight(64, 24, seed=2)})
    assert offset_grid_model(model, 32, 4) == 2
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Concat") == 1 and ops.count("MatMulNBits") == 2
    assert not {"a", "b"} & {init.name for init in model.graph.initializer}  # the fp32 weights are gone


def test_excluded_matmuls_and_weights_read_elsewhere_are_kept() -> None:
    model = matmul_model(64, 24, {"a": q4_1_weight(64, 24, seed=1), "b": q4_1_weight(64, 24, seed=2)})
    model.graph.node.append(helper.make_node("Transpose", ["a"], ["a_t"], name="reads_a"))
    assert offset_grid_model(model, 32, 4, exclude=frozenset(["b"])) == 1
    assert {"a", "b"} <= {init.name for init in model.graph.initializer}
    assert [node.op_type for node in model.graph.node if node.name == "b"] == ["MatMul"]


def test_an_input_width_off_the_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        offset_grid_weight(np.zeros((40, 8), np.float32), 32)
