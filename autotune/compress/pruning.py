"""Magnitude pruning of the encoder's Linear weights: unstructured (global or per layer) or N:M.

What is prunable: the weight of every nn.Linear inside the transformer layers (attention Q/K/V/O and the
FFN). Embeddings are lookups, not matmuls, so zeros there buy no speed; the pooler and classifier are tiny
and most sensitive, so they are left dense unless `include_head=True`. Biases and LayerNorms stay dense.

The result is always a plain model: masks are applied through `torch.nn.utils.prune` and then made
permanent with `prune.remove`, so an exporter sees real zeros and no `weight_orig`/`weight_mask`. The
achieved sparsity is measured by counting zeros, never inferred from the request.

Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune") lives in `PruningSchedule`, which
`distill` follows: it prunes a little at evenly spaced steps along a cubic curve, trains in between, and
re-applies the masks after every optimizer step so pruned weights stay zero.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from autotune.models import family_of

PATTERN_HELP = "'unstructured' or 'N:M' with 0 < N < M such as '2:4'"


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: unstructured, or keep `n` of every `m` consecutive input weights."""

    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        """Whether this is an N:M pattern, whose sparsity is fixed and local to each group, rather than an amount to
        rank weights by."""
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes by definition; None when unstructured."""
        return None if self.m is None else 1.0 - self.n / self.m


def parse_pattern(pattern: str) -> Pattern:
    """The `Pattern` of a pattern string, or a ValueError naming the accepted forms, so a typo fails before any
    training."""
    if pattern == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", pattern or "")
    if match and 0 < int(match[1]) < int(match[2]):
        return Pattern(int(match[1]), int(match[2]))
    raise ValueError(f"Unknown pruning pattern {pattern!r}; accepted: {PATTERN_HELP}.")


@dataclass(frozen=True)
class PruneResult:
    """The pruned (plain) model, the measured sparsity of its prunable weights, and the boolean keep-masks."""

    model: nn.Module
    achieved_sparsity: float
    masks: Mapping[str, torch.Tensor]


def prunable_linears(model: nn.Module, *, include_head: bool = False) -> dict[str, nn.Linear]:
    """Qualified name -> Linear for the weights pruning may touch (see the module docstring)."""
    family = family_of(model)
    layers_prefix = f"{family.base}.{family.layers}."
    embeddings_prefix = f"{family.base}.embeddings."
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and (name.startswith(layers_prefix) or (include_head and not name.startswith(embeddings_prefix)))
    }


def measured_sparsity(model: nn.Module, *, include_head: bool = False) -> float:
    """Fraction of exactly-zero weights among the prunable ones."""
    weights = [m.weight for m in prunable_linears(model, include_head=include_head).values()]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def _check_amount(amount: float) -> float:
    if not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(f"Pruning amount must be a fraction in [0, 1), got {amount!r}.")
    return float(amount)


def _resolve_amount(amount: float | None, pattern: Pattern) -> float:
    """The sparsity to reach: the request when unstructured, the pattern's own when N:M."""
    if not pattern.structured:
        if amount is None:
            raise ValueError("Unstructured pruning needs an amount in [0, 1).")
        return _check_amount(amount)
    if amount is not None and abs(_check_amount(amount) - pattern.sparsity) > 1e-9:
        raise ValueError(
            f"Pattern {pattern.n}:{pattern.m} fixes sparsity at {pattern.sparsity:g}; got amount={amount!r} "
            "(pass None or that value)."
        )
    return pattern.sparsity


def _keep_smallest_out(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask that drops exactly `count` entries with the smallest scores."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if count > 0:
        keep[torch.topk(scores.flatten(), count, largest=False).indices] = False
    return keep.view(scores.shape)


def _scores(weight: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """|w|, with weights already pruned ranked lowest so that masks only ever grow (gradual pruning)."""
    scores = weight.detach().abs().float()
    return scores if previous is None else scores.masked_fill(~previous, -1.0)


def unstructured_masks(
    weights: Mapping[str, torch.Tensor],
    amount: float,
    scope: str,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks removing the `amount` smallest-magnitude weights, over all tensors or per tensor."""
    previous = previous or {}
    scores = {name: _scores(w, previous.get(name)) for name, w in weights.items()}
    if scope == "layer":
        return {name: _keep_smallest_out(s, round(amount * s.numel())) for name, s in scores.items()}
    if scope != "global":
        raise ValueError(f"Unknown pruning scope {scope!r}; accepted: 'global' or 'layer'.")
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_smallest_out(flat, round(amount * flat.numel()))
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def n_m_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive weights along the input dim (dim 1 of a Linear weight)."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"An {n}:{m} pattern needs input widths divisible by {m}; found a weight of width {cols}.")
    groups = weight.detach().abs().reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def compute_masks(
    model: nn.Module,
    amount: float | None,
    *,
    pattern: str = "unstructured",
    scope: str = "global",
    include_head: bool = False,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (module name -> mask) for the prunable weights, without touching the model."""
    parsed = parse_pattern(pattern)
    target = _resolve_amount(amount, parsed)
    weights = {name: m.weight for name, m in prunable_linears(model, include_head=include_head).items()}
    if parsed.structured:
        return {name: n_m_mask(w, parsed.n, parsed.m) for name, w in weights.items()}
    return unstructured_masks(weights, target, scope, previous)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked-out weights in place; cheap enough to call after every optimizer step."""
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask.to(dtype=torch.bool))


def prune(
    model: nn.Module,
    amount: float | None,
    *,
    pattern: str = "unstructured",
    scope: str = "global",
    include_head: bool = False,
) -> PruneResult:
    """Magnitude-prune the model in place to `amount` (or the N:M pattern's fixed sparsity); return it plain.

    `scope="global"` ranks all prunable weights together (layers that matter less lose more);
    `scope="layer"` prunes every Linear to the same fraction. N:M ignores scope: it is local by definition.
    """
    masks = compute_masks(model, amount, pattern=pattern, scope=scope, include_head=include_head)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        torch_prune.custom_from_mask(module, "weight", mask)
        torch_prune.remove(module, "weight")
    return PruneResult(model=model, achieved_sparsity=measured_sparsity(model, include_head=include_head), masks=masks)


def sparsity_schedule(final_amount: float, steps: int, kind: str = "cubic") -> tuple[float, ...]:
    """Target sparsity after each of `steps` pruning events, ending exactly at `final_amount`.

    cubic (Zhu & Gupta 2017): s_i = s_f * (1 - (1 - i/steps)^3); it prunes fast while many redundant
    weights remain and slowly near the end, when each weight matters. linear: s_i = s_f * i/steps.
    """
    final_amount = _check_amount(final_amount)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Pruning schedule steps must be an integer >= 1, got {steps!r}.")
    curves = {"cubic": lambda x: 1.0 - (1.0 - x) ** 3, "linear": lambda x: x}
    if kind not in curves:
        raise ValueError(f"Unknown schedule kind {kind!r}; accepted: {', '.join(curves)}.")
    return tuple(final_amount * curves[kind](i / steps) for i in range(1, steps + 1))


@dataclass(frozen=True)
class PruningSchedule:
    """Gradual pruning during training: `steps` events spread over [start, end] of the training steps.

    After `end` the masks stay fixed while training recovers accuracy. An N:M pattern has one fixed
    sparsity, so it is applied once, at `start`, and then held.
    """

    final_amount: float | None
    steps: int = 10
    kind: str = "cubic"
    pattern: str = "unstructured"
    scope: str = "global"
    start: float = 0.0
    end: float = 0.7
    include_head: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"Pruning schedule needs 0 <= start <= end <= 1, got start={self.start}, end={self.end}.")
        _resolve_amount(self.final_amount, parse_pattern(self.pattern))
        if not parse_pattern(self.pattern).structured:
            sparsity_schedule(self.final_amount, self.steps, self.kind)

    def events(self, total_steps: int) -> dict[int, float | None]:
        """Training step (0-based, before its update) -> sparsity to reach there (None for N:M)."""
        first = round(self.start * max(total_steps - 1, 0))
        if parse_pattern(self.pattern).structured:
            return {first: None}
        last = round(self.end * max(total_steps - 1, 0))
        amounts = sparsity_schedule(self.final_amount, self.steps, self.kind)
        events: dict[int, float | None] = {}
        for i, amount in enumerate(amounts):
            at = first if self.steps == 1 else first + round(i * (last - first) / (self.steps - 1))
            events[at] = amount  # events that collide on a short run keep the later, larger amount
        return events
