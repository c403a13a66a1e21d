"""Compression operators for causal (decoder-only) language models of the llama family: each a plain function
model -> model.

A llama-family `*ForCausalLM` keeps its decoder blocks in `model.model.layers`; each block has `self_attn`
(q/k/v/o projections and a `layer_idx` that indexes the KV cache) and `mlp` (gate/up/down projections and
`act_fn`). The operators:

- Depth: `block_importance` measures how much each block turns its input (angular distance between the
  residual stream before and after it; Gromov et al. 2024, Men et al. 2024 "ShortGPT"), `blocks_to_keep`
  picks the most important ones and `drop_blocks` removes the rest.
- Width: `ffn_importance` measures each FFN neuron's mean |act_fn(gate(x)) * up(x)| and `narrow_ffn` keeps
  the strongest `width` of them in every block.
- Sparsity: `prune_decoder` zeroes weights of the blocks' linears by |W| ("magnitude") or |W| * ||X||
  ("wanda", Sun et al. 2023), unstructured or N:M; `decoder_sparsity` measures the result.

Every operator returns a NEW model (a deep copy) and leaves its input untouched. Deep copying keeps a tied
LM head tied: `lm_head.weight` stays the very tensor of `embed_tokens.weight`. Calibration data is a LongTensor
of token ids [n, length] without padding; calibration forwards run in eval mode under `torch.no_grad()` in
small batches, and leave the model's train/eval mode as they found it.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from autotune.compress.pruning import PATTERN_HELP, Pattern, n_m_mask, parse_pattern

#: The decoder blocks' linears that pruning may touch; embeddings and the LM head are never pruned.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
PRUNE_METHODS = ("magnitude", "wanda")
CALIBRATION_BATCH = 4


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a llama-family causal LM, or a ValueError saying what was expected, so that an
    unsupported architecture fails with a sentence rather than an AttributeError deep inside an operator."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(
            f"model must be a llama-family *ForCausalLM with decoder blocks in model.model.layers; "
            f"got {type(model).__name__}."
        )
    return layers


def check_windows(windows: torch.Tensor) -> torch.Tensor:
    """The calibration windows if they are a non-empty 2-D integer tensor [n, length], else a ValueError."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a 2-D integer tensor of token ids [n, length]; got {shape}.")
    if windows.numel() == 0:
        raise ValueError("windows is empty; at least one window of at least one token is needed.")
    return windows.long()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live, so calibration batches go there (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients for the duration, the model's previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def run_windows(model: nn.Module, windows: torch.Tensor, batch_size: int = CALIBRATION_BATCH, **kwargs):
    """Yield the model's output for each batch of windows (no cache), for callers whose hooks collect statistics."""
    windows = check_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    device = model_device(model)
    with calibrating(model):
        for batch in windows.split(batch_size):
            yield model(input_ids=batch.to(device), use_cache=False, **kwargs)


@contextmanager
def hooked(modules: Sequence[nn.Module], register: str, hook_of: Callable[[int], Callable]) -> Iterator[None]:
    """Register `hook_of(i)` on `modules[i]` with `register` (e.g. "register_forward_hook"); always removed."""
    handles = [getattr(module, register)(hook_of(i)) for i, module in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def angular_distance(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """arccos(cos(before, after)) / pi per token, in [0, 1]: 0 when a block leaves the direction unchanged."""
    cosine = nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


def block_importance(model: nn.Module, windows: torch.Tensor) -> tuple[float, ...]:
    """Mean angular distance between each block's input and output over all calibration tokens.

    `hidden_states[i]` is block i's input, but transformers replaces the last entry with the output of the final
    norm; the last block's raw output is therefore taken from a forward hook on that block instead.
    """
    blocks = decoder_blocks(model)
    last_output: list[torch.Tensor] = []

    def keep_output(_module, _args, output):
        last_output.append(output[0] if isinstance(output, tuple) else output)

    totals = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    with hooked([blocks[-1]], "register_forward_hook", lambda _: keep_output):
        for out in run_windows(model, windows, output_hidden_states=True):
            states = list(out.hidden_states[:len(blocks)]) + [last_output.pop()]
            for i in range(len(blocks)):
                totals[i] += angular_distance(states[i], states[i + 1]).sum()
            count += states[0].shape[0] * states[0].shape[1]
    return tuple(float(total / count) for total in totals)


def blocks_to_keep(importance: Sequence[float], count: int) -> tuple[int, ...]:
    """The indices of the `count` most important blocks, ascending (ties go to the earlier block)."""
    if not isinstance(count, int) or not 1 <= count <= len(importance):
        raise ValueError(f"count must be an integer in [1, {len(importance)}] (the number of blocks); got {count!r}.")
    ranked = sorted(range(len(importance)), key=lambda i: (-float(importance[i]), i))
    return tuple(sorted(ranked[:count]))


def _is_index(value: object) -> bool:
    """Whether `value` is an integer (Python or numpy/torch scalar), bools excluded."""
    return hasattr(value, "__index__") and not isinstance(value, bool)


def check_keep(keep: Sequence[int], blocks: int) -> tuple[int, ...]:
    """`keep` as sorted distinct block indices, or a ValueError naming the bad entries."""
    indices = tuple(keep)
    if not indices:
        raise ValueError("keep must name at least one block to keep; got none.")
    bad = [i for i in indices if not _is_index(i) or not 0 <= operator.index(i) < blocks]
    if bad:
        raise ValueError(f"keep holds block indices outside [0, {blocks - 1}]: {bad!r}.")
    if len(set(indices)) != len(indices):
        raise ValueError(f"keep names a block more than once: {list(indices)!r}.")
    return tuple(sorted(operator.index(i) for i in indices))


def drop_blocks(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of `model` with only the blocks in `keep` (kept in their original order).

    The config follows (num_hidden_layers, layer_types when present, and teacher_layer_indices, which the
    hidden-state distillation loss reads), and every kept block's attention is re-indexed 0..n-1, since the KV
    cache is addressed by `self_attn.layer_idx`.
    """
    indices = check_keep(keep, len(decoder_blocks(model)))
    result = copy.deepcopy(model)
    blocks = decoder_blocks(result)
    result.model.layers = nn.ModuleList(blocks[i] for i in indices)
    for new_index, block in enumerate(result.model.layers):
        block.self_attn.layer_idx = new_index
    config = result.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in indices]
    origin = list(getattr(config, "teacher_layer_indices", None) or [])
    origin = origin if len(origin) == config.num_hidden_layers else list(range(config.num_hidden_layers))
    config.teacher_layer_indices = [int(origin[i]) for i in indices]
    config.num_hidden_layers = len(indices)
    return result


def ffn_importance(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per block, the mean |act_fn(gate_proj(x)) * up_proj(x)| of each FFN neuron over the calibration tokens:
    the input of down_proj, so a neuron that is rarely active contributes little to the block's output."""
    blocks = decoder_blocks(model)
    sums = [torch.zeros(block.mlp.down_proj.in_features, dtype=torch.float64) for block in blocks]
    tokens = [0]

    def hook_of(i: int):
        def accumulate(_module, args):
            activation = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[i].add_(activation.abs().double().sum(0).cpu())
            if i == 0:
                tokens[0] += activation.shape[0]
        return accumulate

    with hooked([block.mlp.down_proj for block in blocks], "register_forward_pre_hook", hook_of):
        for _ in run_windows(model, windows):
            pass
    return tuple((total / tokens[0]).float() for total in sums)


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping `index` of the outputs (dim=0) or inputs (dim=1); the bias follows the outputs."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    result = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    result.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        result.bias.data.copy_(bias.index_select(0, index) if dim == 0 else bias)
    return result


def check_ffn_importance(importance: Sequence[torch.Tensor], blocks: nn.ModuleList) -> None:
    """A ValueError unless `importance` holds one score vector per block of that block's FFN width."""
    if len(importance) != len(blocks):
        raise ValueError(f"importance has {len(importance)} entries but the model has {len(blocks)} blocks.")
    for i, (scores, block) in enumerate(zip(importance, blocks)):
        if tuple(torch.as_tensor(scores).shape) != (block.mlp.down_proj.in_features,):
            raise ValueError(
                f"importance[{i}] has shape {tuple(torch.as_tensor(scores).shape)}; block {i} has "
                f"{block.mlp.down_proj.in_features} FFN neurons."
            )


def narrow_ffn(model: nn.Module, width: int, importance: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of `model` whose every block keeps its `width` most important FFN neurons, in their original order.

    The width is the same in every block because exporters read one `config.intermediate_size`.
    """
    blocks = decoder_blocks(model)
    current = int(model.config.intermediate_size)
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= current:
        raise ValueError(f"width must be an integer in [1, {current}] (the current FFN width); got {width!r}.")
    check_ffn_importance(importance, blocks)
    result = copy.deepcopy(model)
    for block, scores in zip(decoder_blocks(result), importance):
        keep = torch.topk(torch.as_tensor(scores).float(), width).indices.sort().values
        mlp = block.mlp
        mlp.gate_proj = slice_linear(mlp.gate_proj, keep.to(mlp.gate_proj.weight.device), dim=0)
        mlp.up_proj = slice_linear(mlp.up_proj, keep.to(mlp.up_proj.weight.device), dim=0)
        mlp.down_proj = slice_linear(mlp.down_proj, keep.to(mlp.down_proj.weight.device), dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    result.config.intermediate_size = width
    return result


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Qualified name -> Linear for every q/k/v/o/gate/up/down projection of the decoder blocks."""
    decoder_blocks(model)
    wanted = set(ATTENTION_LINEARS + MLP_LINEARS)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in wanted
    }


def decoder_sparsity(model: nn.Module) -> float:
    """The measured fraction of exactly-zero weights over the decoder blocks' linears."""
    weights = [linear.weight for linear in decoder_linears(model).values()]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def input_norms(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Name -> ||X_j||_2 per input feature j of each decoder linear, over all calibration tokens (Wanda's
    activation statistic)."""
    linears = decoder_linears(model)
    names = list(linears)
    squares = {name: torch.zeros(linear.in_features, dtype=torch.float64) for name, linear in linears.items()}

    def hook_of(i: int):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            squares[names[i]].add_(x.pow(2).sum(0).cpu())
        return accumulate

    with hooked(list(linears.values()), "register_forward_pre_hook", hook_of):
        for _ in run_windows(model, windows):
            pass
    return {name: total.sqrt().float() for name, total in squares.items()}


def row_keep_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask removing, in each output row, the `sparsity` fraction with the lowest scores, or keeping the N
    highest of every M consecutive inputs when `pattern` is N:M."""
    if pattern.structured:
        return n_m_mask(scores, pattern.n, pattern.m)
    rows, cols = scores.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    drop = round(sparsity * cols)
    if drop:
        keep.scatter_(1, torch.topk(scores, drop, dim=1, largest=False).indices, False)
    return keep


def resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The sparsity to reach: the request when unstructured, the pattern's own for N:M, where a different
    request is rejected rather than silently ignored."""
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0
    ):
        raise ValueError(f"sparsity must be a fraction in [0, 1); got {sparsity!r}.")
    if not pattern.structured:
        if sparsity is None:
            raise ValueError("sparsity is needed for unstructured pruning: a fraction in [0, 1).")
        return float(sparsity)
    if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
        raise ValueError(
            f"sparsity={sparsity!r} conflicts with pattern {pattern.n}:{pattern.m}, which fixes it at "
            f"{pattern.sparsity:g}; pass sparsity=None or {pattern.sparsity:g}."
        )
    return pattern.sparsity


def check_prune_request(method: str, pattern: str, windows: torch.Tensor | None) -> Pattern:
    """The parsed pattern, after checking the method and that Wanda has calibration windows."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, PRUNE_METHODS))}; got {method!r}.")
    try:
        parsed = parse_pattern(pattern)
    except ValueError:
        raise ValueError(f"pattern must be {PATTERN_HELP}; got {pattern!r}.") from None
    if method == "wanda":
        if windows is None:
            raise ValueError("method='wanda' needs calibration windows (token ids [n, length]); got windows=None.")
        check_windows(windows)
    return parsed


def prune_decoder(
    model: nn.Module,
    sparsity: float | None,
    method: str = "wanda",
    pattern: str = "unstructured",
    windows: torch.Tensor | None = None,
) -> nn.Module:
    """A copy of `model` whose decoder linears have real zeros: per output row, the lowest-scoring weights removed.

    Scores are |W| ("magnitude") or |W_ij| * ||X_j||_2 ("wanda"). Both compare weights within each output row
    (Wanda's per-output group), so the two methods differ only in the score. Wanda's norms come from one pass of
    the dense model (the paper feeds each block the already-pruned earlier blocks; one pass is cheaper). An N:M
    pattern fixes the sparsity at 1 - N/M: pass None or that value. Embeddings and the LM head stay dense.
    """
    parsed = check_prune_request(method, pattern, windows)
    target = resolve_sparsity(sparsity, parsed)
    result = copy.deepcopy(model)
    norms = input_norms(result, windows) if method == "wanda" else {}
    with torch.no_grad():
        for name, linear in decoder_linears(result).items():
            scores = linear.weight.detach().abs().float()
            if method == "wanda":
                scores = scores * norms[name].to(scores.device).unsqueeze(0)
            linear.weight.mul_(row_keep_mask(scores, target, parsed).to(linear.weight.dtype))
    return result


__all__ = [
    "block_importance", "blocks_to_keep", "decoder_blocks", "decoder_linears", "decoder_sparsity", "drop_blocks",
    "ffn_importance", "input_norms", "narrow_ffn", "prune_decoder",
]
