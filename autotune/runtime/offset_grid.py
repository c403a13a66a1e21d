"""Int4 weights whose per-block offsets are kept: asymmetric round-to-nearest in blocks along the input, with
the float zero point that ONNX Runtime's fast CPU kernels cannot hold carried by one extra input block.

Asymmetric int4 writes a block of weights as `scale * (code - zero)`. The fast `MatMulNBits` kernels take `zero` as a
4-bit integer only (float zero points run about 20x slower on this CPU, measured), so the block's grid is shifted by
up to half a step: the offset `lo + scale * zero` the integer cannot hold. Here that offset is kept. A block's weights
are `scale * (code - zero) + offset`, and since `sum_k x_k * offset = offset * sum_k x_k` over the block, the offsets
of a layer form one more small weight matrix [input blocks, outputs] applied to the block sums of the input. The
layer's input is widened by its block sums (`Reshape`, `ReduceSum`, `Concat`, once per distinct input) and the
offsets are quantized to 4 bits as the last blocks of the same `MatMulNBits`: one kernel call per layer, about 8%
more weight bytes. Decode pays for the kernel's zero-point path more than for the sums: on SmolLM2 (2-core AVX2 EPYC,
one interleaved run) symmetric int4 decoded at 6.2-7.4 ms/token, asymmetric int4 at 7.2-8.2, this at 7.8-8.1.
Without zero points (the whole offset in the extra block) it ran at 7.0-7.6 but lost 7% perplexity: the offsets
then span several steps, too wide for their own 4-bit grid.

Why it matters: a model distributed already quantized in 4-bit blocks of 32 (a GGUF Q4_1, as SmolLM2 here, or any
asymmetric int4 checkpoint) lies on exactly such grids. Re-quantizing it with integer zero points adds a second
rounding on top of the first (+22% perplexity on SmolLM2, +37% symmetric); this scheme reproduces it to within the
offsets' own 4-bit rounding (+0.2%). On weights on no grid it is plain min-max asymmetric RTN with exact offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

#: Steps of a 4-bit grid (16 levels).
LEVELS = 15


@dataclass(frozen=True)
class PackedInt4:
    """One `MatMulNBits` weight in ONNX Runtime's layout: codes [N, blocks, block_size/2] (two per byte, low nibble
    first), scales [N * blocks], zero points [N * ceil(blocks/2)] (two per byte), for an input of `k` features."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int


def grid_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blocks [..., size] on their min-max grids of 16 levels: (codes uint8, scales float32, zeros uint8, offsets),
    each [...] but the codes, with block = scale * (code - zero) + offset up to rounding to the grid. A block that
    already lies on a 16-level grid is reproduced exactly; the offset is what the integer zero point cannot hold
    (at most half a step)."""
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    scale = (hi - lo) / LEVELS
    scale = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint((blocks - lo) / scale), 0, LEVELS)
    zero = np.clip(np.rint(-lo / scale), 0, LEVELS)
    offset = (lo + scale * zero)[..., 0]
    return codes.astype(np.uint8), scale[..., 0].astype(np.float32), zero[..., 0].astype(np.uint8), offset


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis (even length) packed into bytes, the first in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def offset_grid_weight(weight: np.ndarray, block_size: int) -> PackedInt4:
    """The `MatMulNBits` weight of a MatMul weight [K, N] whose input is widened by its K/block_size block sums:
    each column's blocks along K on their grids, then the column's offsets on grids of their own (zero-padded to
    whole blocks, where the kernel's padded input is zero too; what those grids' integer zeros cannot hold is
    dropped)."""
    k, n = weight.shape
    if k % block_size:
        raise ValueError(f"the input width {k} is not a multiple of the block size {block_size}")
    sums = k // block_size
    codes, scales, zeros, offsets = grid_codes(weight.T.reshape(n, sums, block_size).astype(np.float64))
    padded = np.zeros((n, -(-sums // block_size) * block_size))
    padded[:, :sums] = offsets
    offset_codes, offset_scales, offset_zeros, _ = grid_codes(padded.reshape(n, -1, block_size))
    all_codes = np.concatenate([codes, offset_codes], axis=1)
    all_zeros = np.concatenate([zeros, offset_zeros], axis=1)
    if all_zeros.shape[1] % 2:
        all_zeros = np.concatenate([all_zeros, np.zeros((n, 1), np.uint8)], axis=1)
    return PackedInt4(pack_nibbles(all_codes), np.concatenate([scales, offset_scales], axis=1).reshape(-1),
                      pack_nibbles(all_zeros).reshape(-1), k + sums)


def dequantized(packed: PackedInt4) -> np.ndarray:
    """The weight [packed.k, N] that `packed` stands for, as the kernel reads it (for tests and error figures)."""
    n, blocks, _ = packed.codes.shape
    codes = np.stack([packed.codes & 0x0F, packed.codes >> 4], axis=-1).reshape(n, blocks, -1).astype(np.float64)
    zeros = np.stack([packed.zero_points & 0x0F, packed.zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    weight = (codes - zeros[..., None]) * packed.scales.reshape(n, blocks, 1).astype(np.float64)
    return weight.reshape(n, -1)[:, :packed.k].T


def offset_grid_model(model: onnx.ModelProto, block_size: int, accuracy_level: int,
                      exclude: frozenset[str] = frozenset()) -> int:
    """Rewrite, in place, every MatMul of `model` with a constant weight (but the nodes named in `exclude`) as a
    `MatMulNBits` on its input widened by the input's block sums; the number rewritten. Inputs shared by several
    MatMuls (a decoder's packed QKV and its gate/up pair) are widened once. Inputs are [batch, sequence, features],
    as in a decoder."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    widened: dict[str, str] = {}
    nodes, replaced = [], []
    shape_name, axis_name = f"offset_grid_block_shape_{block_size}", "offset_grid_last_axis"
    for node in graph.node:
        if node.op_type != "MatMul" or node.name in exclude or node.input[1] not in weights:
            nodes.append(node)
            continue
        source = node.input[0]
        if not widened:
            graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, -1, block_size], np.int64), shape_name),
                                      numpy_helper.from_array(np.array([-1], np.int64), axis_name)])
        if source not in widened:
            stem = f"{node.name}/offset_grid"
            nodes += [helper.make_node("Reshape", [source, shape_name], [f"{stem}/blocks"], name=f"{stem}/Reshape"),
                      helper.make_node("ReduceSum", [f"{stem}/blocks", axis_name], [f"{stem}/sums"],
                                       name=f"{stem}/ReduceSum", keepdims=0),
                      helper.make_node("Concat", [source, f"{stem}/sums"], [f"{stem}/widened"],
                                       name=f"{stem}/Concat", axis=-1)]
            widened[source] = f"{stem}/widened"
        weight = numpy_helper.to_array(weights[node.input[1]])
        packed = offset_grid_weight(weight, block_size)
        names = [f"{node.input[1]}.{part}" for part in ("codes", "scales", "zero_points")]
        for name, array in zip(names, (packed.codes, packed.scales, packed.zero_points)):
            graph.initializer.append(numpy_helper.from_array(array, name))
        nodes.append(helper.make_node("MatMulNBits", [widened[source], *names], list(node.output), name=node.name,
                                      domain="com.microsoft", K=packed.k, N=weight.shape[1], bits=4,
                                      block_size=block_size, accuracy_level=accuracy_level))
        replaced.append(node.input[1])
    del graph.node[:]
    graph.node.extend(nodes)
    for name in set(replaced):
        drop_if_unread(graph, name)
    return len(replaced)


def split_columns(model: onnx.ModelProto, node_name: str, columns: int) -> tuple[str, str]:
    """Split, in place, the MatMul `node_name` (a constant weight [K, N]) into one over its first `columns` outputs
    and one over the rest, joined by a Concat into its old output, so each part can be quantized its own way: the
    names of the two new MatMuls. The old weight stays only if another node reads it (a tied embedding)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    position, node = next((i, n) for i, n in enumerate(graph.node) if n.name == node_name)
    weights = {init.name: init for init in graph.initializer}
    weight = numpy_helper.to_array(weights[node.input[1]])
    if not 0 < columns < weight.shape[1]:
        raise ValueError(f"cannot split {node_name}'s {weight.shape[1]} outputs at {columns}")
    names = (f"{node_name}_first{columns}", f"{node_name}_rest")
    parts = []
    for name, part in zip(names, (weight[:, :columns], weight[:, columns:])):
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(part), f"{name}.weight"))
        parts.append(helper.make_node("MatMul", [node.input[0], f"{name}.weight"], [f"{name}/output_0"], name=name))
    join = helper.make_node("Concat", [p.output[0] for p in parts], list(node.output), name=f"{node_name}_concat",
                            axis=-1)
    graph.node.remove(node)
    for offset, new in enumerate([*parts, join]):
        graph.node.insert(position + offset, new)
    drop_if_unread(graph, node.input[1])
    return names


def drop_if_unread(graph: onnx.GraphProto, name: str) -> None:
    """Remove the initializer `name` unless a node still reads it (a tied embedding reads the LM head's weight)."""
    if not any(name in node.input for node in graph.node):
        graph.initializer.remove(next(init for init in graph.initializer if init.name == name))
