"""Preset spaces derived from the teacher's shape, so one name fits any size of the same family."""

from __future__ import annotations

from typing import Callable

from search_spaces.candidate import BIT_WIDTHS, SPARSITY_PATTERNS
from search_spaces.knobs import Categorical, IntRange
from search_spaces.space import Space, SpaceError, TeacherShape, did_you_mean

WIDTH_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
SPARSITY_AMOUNTS = (0.0, 0.3, 0.5, 0.7)


def _scaled(full: int, fraction: float, multiple: int) -> int:
    """`full * fraction` rounded down to a multiple of `multiple`, never below one multiple."""
    return max(multiple, int(full * fraction) // multiple * multiple)


def head_choices(teacher_heads: int) -> tuple[int, ...]:
    """The teacher's head count and its divisors by 2, 3 and 4 (where they divide it)."""
    return tuple(sorted({teacher_heads // d for d in (1, 2, 3, 4) if teacher_heads % d == 0}, reverse=True))


def bert_default(teacher: TeacherShape) -> Space:
    """Every depth from the teacher's down to 1; hidden and FFN at 100/75/50/25% of the teacher's; the teacher's
    heads and their divisors, each kept whole at the teacher's head width (head pruning: fewer heads, a narrower
    attention); sparsity {0, 0.3, 0.5, 0.7} unstructured or 2:4; all bit widths.

    Heads are pruned rather than merged because attention's cost is its width: at the teacher's width, fewer and
    wider heads cost what the teacher's do (3 MiniLM layers with FFN 768, int8, 64 tokens, 2 threads: 6 heads of 32
    ran 16% faster than 12).
    """
    hidden = tuple(sorted({_scaled(teacher.hidden, f, teacher.heads) for f in WIDTH_FRACTIONS}, reverse=True))
    ffn = tuple(sorted({_scaled(teacher.ffn, f, 8 if teacher.ffn >= 32 else 1) for f in WIDTH_FRACTIONS}, reverse=True))
    return Space(
        knobs=(
            IntRange("layers", 1, teacher.layers),
            Categorical("hidden", hidden),
            Categorical("heads", head_choices(teacher.heads)),
            Categorical("head_dim", (teacher.hidden // teacher.heads,)),
            Categorical("ffn", ffn),
            Categorical("sparsity", SPARSITY_AMOUNTS),
            Categorical("sparsity_pattern", SPARSITY_PATTERNS),
            Categorical("bits", BIT_WIDTHS),
        ),
        teacher=teacher,
    )


def quantize_only(teacher: TeacherShape) -> Space:
    """The teacher's own architecture at every bit width: compression without any training."""
    return Space(
        knobs=(
            Categorical("layers", (teacher.layers,)),
            Categorical("hidden", (teacher.hidden,)),
            Categorical("heads", (teacher.heads,)),
            Categorical("ffn", (teacher.ffn,)),
            Categorical("sparsity", (0.0,)),
            Categorical("sparsity_pattern", ("unstructured",)),
            Categorical("bits", BIT_WIDTHS),
        ),
        teacher=teacher,
    )


#: A causal LM's depth as fractions of its blocks: dropping more than a quarter has not healed within a CPU budget
#: (SmolLM2, 18 of 30 blocks healed on 32k tokens: +256% perplexity, bench/llm_operators.py).
BLOCK_FRACTIONS = (1.0, 0.875, 0.75)
#: Tokens of distillation that heal a student (blocks dropped, FFN narrowed): a few minutes each on 2 cores.
HEAL_TOKENS = (32_768, 131_072)


def llama_default(teacher: TeacherShape) -> Space:
    """A llama-family causal LM: blocks kept (all, 7/8, 3/4 of them, chosen by importance), FFN at 100/75%, linears
    at fp32, int8 or int4, int4 in blocks of 32-128 by round-to-nearest with integer zero points or with offsets
    kept (exact on a GGUF Q4_1 teacher's grids), the sensitive layers kept int8 or not, the LM head at int4 or
    int8, and a healing budget for students. Hidden size and heads stay the teacher's (the KV
    cache and attention kernels are shaped by them); no sparsity (no sparse CPU kernel in ONNX Runtime).

    k-quant is left to the user (`knobs: {method: [rtn, k-quant]}`): on SmolLM2 it decoded 1.5x slower than RTN
    for no better perplexity (bench/llm_operators.py), and ONNX Runtime packs it only where every input splits into
    an even number of blocks (576 wide: block 32 only)."""
    layers = tuple(sorted({max(1, round(teacher.layers * f)) for f in BLOCK_FRACTIONS}, reverse=True))
    ffn = tuple(sorted({_scaled(teacher.ffn, f, 8 if teacher.ffn >= 32 else 1) for f in (1.0, 0.75)}, reverse=True))
    return Space(
        knobs=(
            Categorical("layers", layers),
            Categorical("hidden", (teacher.hidden,)),
            Categorical("heads", (teacher.heads,)),
            Categorical("ffn", ffn),
            Categorical("sparsity", (0.0,)),
            Categorical("sparsity_pattern", ("unstructured",)),
            Categorical("bits", (32, 8, 4)),
            Categorical("block_size", (32, 64, 128)),
            Categorical("method", ("rtn", "rtn-offset")),
            Categorical("sensitive_int8", (False, True)),
            Categorical("head_bits", (4, 8)),
            Categorical("heal_tokens", HEAL_TOKENS),
        ),
        teacher=teacher,
    )


PRESETS: dict[str, Callable[[TeacherShape], Space]] = {
    "bert-default": bert_default, "quantize-only": quantize_only, "llama-default": llama_default,
}


def preset(name: str, teacher: TeacherShape) -> Space:
    """The named preset built for `teacher`; an unknown name is a SpaceError with the closest preset suggested,
    since preset names come from user configs."""
    if name not in PRESETS:
        raise SpaceError(f"unknown search space preset {name!r}{did_you_mean(name, list(PRESETS))}; presets: {sorted(PRESETS)}")
    return PRESETS[name](teacher)
