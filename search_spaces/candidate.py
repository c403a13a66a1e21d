"""Candidate: one point of the search, frozen and hashable, so it doubles as the key of every cache.

Two derived keys matter for cost: `shape_key` (what latency depends on: architecture and bits, not trained
weights) keys the latency gate cache, and `student_key` (architecture and sparsity, not bits) keys the trained
student cache, because bit widths are applied after training: one trained student serves every bit width.

An encoder's attention may be narrower than its hidden size: `head_dim` set, its `heads` heads of `head_dim` are
teacher heads kept whole (head pruning), and the attention is heads x head_dim wide. Left None (the default layout,
hidden / heads per head), it is left out of every key, so the keys of candidates without it are unchanged.

A causal LM's candidate uses the same architecture fields (`layers` are the decoder blocks kept, `ffn` the FFN
width; hidden and heads stay the teacher's) and adds its own (`WEIGHT_ONLY_FIELDS`, `heal_tokens`). They are None
for an encoder, and a None field is left out of every key and of the stored form, so an encoder's keys, and so its
caches, are what they were before causal LMs came.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

BIT_WIDTHS = (32, 16, 8, 4)
SPARSITY_PATTERNS = ("unstructured", "2:4")
BITS_NAMES = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}
#: How a causal LM's weights are quantized (see autotune.runtime.genai.WeightOnly): they mean nothing at fp32.
WEIGHT_ONLY_FIELDS = ("block_size", "method", "head_bits", "sensitive_int8")
LM_FIELDS = WEIGHT_ONLY_FIELDS + ("heal_tokens",)
#: The fields a candidate may leave None, and then leaves out of its stored form and keys.
OPTIONAL_FIELDS = LM_FIELDS + ("head_dim",)
#: Weight-only quantization of a causal LM: round-to-nearest (symmetric, the builder's default), asymmetric,
#: asymmetric with every block's offset kept (autotune.runtime.offset_grid), k-quant (the builder's), HQQ and GPTQ
#: (ONNX Runtime's quantizer); block sizes; widths of the linears and LM head.
LM_METHODS = ("rtn", "rtn-asym", "rtn-offset", "k-quant", "hqq", "gptq")
#: The methods the builder runs itself, the only ones that can keep sensitive layers at int8 (`mixed_layers`).
LM_BUILDER_METHODS = ("rtn", "rtn-asym", "k-quant")
#: With rtn-offset and a 4-bit LM head, the share of the vocabulary's first rows (a BPE vocabulary's most frequent
#: pieces) kept at int8: on SmolLM2, 8,192 of 49,152 rows took the head's cost from +10.6% to +2.0% perplexity for
#: 2.3 MB (measured in torch); see WeightOnly.head_int8_rows.
HEAD_INT8_SHARE = 1 / 6
LM_BLOCK_SIZES = (16, 32, 64, 128, 256)
LM_WEIGHT_BITS = (4, 8, 32)


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """One compressed model to try: architecture, sparsity and bit width (and a causal LM's own knobs).

    Validated on construction, so an impossible model (hidden not divisible by heads, 2:4 at other than 50%) fails
    here with a sentence instead of deep inside training or export.
    """

    layers: int
    hidden: int
    heads: int
    ffn: int
    sparsity: float = 0.0
    sparsity_pattern: str = "unstructured"
    bits: int = 32
    #: Causal LMs only (None elsewhere): int4/int8 block size, quantization method, LM head bits, whether the
    #: sensitive layers stay int8 in an int4 body, and the tokens of distillation that heal a student.
    block_size: int | None = None
    method: str | None = None
    head_bits: int | None = None
    sensitive_int8: bool | None = None
    heal_tokens: int | None = None
    #: Encoders only: the width of each attention head when the attention is narrower than hidden (see the module
    #: docstring); None means hidden / heads.
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"candidate {name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool)
                                          or self.head_dim < 1):
            raise ValueError(f"candidate head_dim must be a positive integer, got {self.head_dim!r}")
        if self.hidden % self.heads:  # transformers' encoders build their layers only so, whatever the head width
            raise ValueError(f"candidate hidden {self.hidden} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"candidate sparsity must be in [0, 1), got {self.sparsity}")
        if self.sparsity_pattern not in SPARSITY_PATTERNS:
            raise ValueError(f"candidate sparsity_pattern must be one of {list(SPARSITY_PATTERNS)}, got {self.sparsity_pattern!r}")
        if self.sparsity_pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"a 2:4 pattern prunes exactly half the weights; sparsity must be 0.5, got {self.sparsity}")
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"candidate bits must be one of {list(BIT_WIDTHS)}, got {self.bits!r}")
        if self.heal_tokens is not None and (not isinstance(self.heal_tokens, int) or self.heal_tokens < 0):
            raise ValueError(f"candidate heal_tokens must be an integer >= 0, got {self.heal_tokens!r}")
        if self.head_bits is not None and self.head_bits not in LM_WEIGHT_BITS:
            raise ValueError(f"candidate head_bits must be one of {list(LM_WEIGHT_BITS)}, got {self.head_bits!r}")
        if self.block_size is not None and self.block_size not in LM_BLOCK_SIZES:
            raise ValueError(f"candidate block_size must be one of {list(LM_BLOCK_SIZES)}, got {self.block_size!r}")
        if self.method is not None and self.method not in LM_METHODS:
            raise ValueError(f"candidate method must be one of {list(LM_METHODS)}, got {self.method!r}")

    @classmethod
    def canonical(cls, **params: Any) -> "Candidate":
        """Build from sampled knob values, folding spellings of the same model into one candidate.

        Dense weights have no pattern (sparsity 0 -> 'unstructured'), and 2:4 means exactly 50%, so a sampler
        that proposes (2:4, 0.3) and (2:4, 0.7) gets the same candidate, and the same cache entries. A head_dim of
        hidden / heads is the default layout (None).
        A causal LM's weight-only fields mean nothing at fp32 (they are dropped), a 4-bit-only method at int8 means
        the builder's RTN, and `sensitive_int8` means something only in an int4 body quantized by the builder (False
        elsewhere).
        """
        sparsity = float(params.get("sparsity", 0.0))
        pattern = params.get("sparsity_pattern", "unstructured")
        if sparsity == 0.0:
            pattern = "unstructured"
        elif pattern == "2:4":
            sparsity = 0.5
        folded: dict[str, Any] = {"sparsity": sparsity, "sparsity_pattern": pattern}
        if params.get("head_dim") is not None and params["head_dim"] * params["heads"] == params["hidden"]:
            folded["head_dim"] = None  # heads of hidden / heads: the default layout, one candidate with one key
        if params.get("bits", 32) == 32:
            folded |= dict.fromkeys(WEIGHT_ONLY_FIELDS)
        else:
            builder_method = (params.get("method") or "rtn") in LM_BUILDER_METHODS  # None: the builder's default
            if params.get("bits") == 8 and not builder_method:
                folded["method"] = "rtn"  # the other methods quantize to 4 bits; int8 is the builder's RTN
            if params.get("sensitive_int8") is not None and (params.get("bits") != 4 or not builder_method):
                folded["sensitive_int8"] = False
        return cls(**{**params, **folded})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Candidate":
        """Rebuild from stored JSON (results, caches), refusing unknown fields so a file from another version fails
        loudly rather than silently dropping a knob. An empty `threads`, which files before its removal store, is
        dropped: it never changed what was measured."""
        known = {f.name for f in fields(cls)}
        data = {name: value for name, value in data.items() if not (name == "threads" and value is None)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown candidate field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data, for result.json and for hashing into `key`; a causal LM's fields and head_dim
        only where set."""
        return {name: value for name, value in asdict(self).items() if value is not None or name not in OPTIONAL_FIELDS}

    @property
    def attention_width(self) -> int:
        """The attention's width (heads x head size, what Q, K and V project to): hidden unless head_dim narrows it."""
        return self.hidden if self.head_dim is None else self.heads * self.head_dim

    def set_fields(self, *names: str) -> dict[str, Any]:
        """The named optional fields that are set, for the keys (a causal LM's are empty for an encoder, and head_dim
        for a default layout, so those keys stay as they were)."""
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @property
    def key(self) -> str:
        """A short hash of every field that names this candidate's artifacts and de-duplicates repeated proposals;
        unlike hash(), it is the same in every process, so it can name files."""
        return _digest(self.to_dict())

    @property
    def shape_key(self) -> str:
        """Latency depends on shape and bits, not on trained weights. Unstructured zeros run through
        the same dense kernels, so their amount is left out; a 2:4 pattern can select sparse kernels, so it is in."""
        return _digest({"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn": self.ffn,
                        "bits": self.bits, "semi_structured": self.sparsity_pattern == "2:4",
                        **self.set_fields(*WEIGHT_ONLY_FIELDS, "head_dim")})

    @property
    def student_key(self) -> str:
        """Everything training depends on; bits are post-training, so they are left out."""
        return _digest({"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn": self.ffn,
                        "sparsity": self.sparsity, "sparsity_pattern": self.sparsity_pattern,
                        **self.set_fields("heal_tokens", "head_dim")})

    def describe(self) -> str:
        """In words, e.g. '4 layers x 384 hidden (12 heads, FFN 1536), 50% unstructured sparsity, int8', or for a
        causal LM '24 blocks, FFN 1152, int4 rtn block 32 (sensitive layers int8), LM head int8, healed 65,536 tokens'."""
        if self.method is not None or self.heal_tokens is not None:
            return self.describe_decoder()
        sparsity = "dense" if self.sparsity == 0 else f"{self.sparsity:.0%} {self.sparsity_pattern} sparsity"
        heads = f"{self.heads} head" + ("s" if self.heads != 1 else "") + (f" of {self.head_dim}" if self.head_dim else "")
        layers = f"{self.layers} layer" + ("s" if self.layers != 1 else "")
        return (f"{layers} x {self.hidden} hidden ({heads}, FFN {self.ffn}), "
                f"{sparsity}, {BITS_NAMES[self.bits]}")

    def describe_decoder(self) -> str:
        """A causal LM candidate in words (see `describe`)."""
        parts = [f"{self.layers} block" + ("s" if self.layers != 1 else ""), f"FFN {self.ffn}"]
        if self.bits == 32:
            parts.append("fp32")
        else:
            mixed = " (sensitive layers int8)" if self.sensitive_int8 else ""
            parts.append(f"{BITS_NAMES[self.bits]} {self.method} block {self.block_size}{mixed}")
            if self.head_bits is not None and self.head_bits != self.bits:
                parts.append(f"LM head {BITS_NAMES[self.head_bits]}")
            elif self.method == "rtn-offset" and self.bits == 4:
                parts.append(f"LM head int4 (its first {HEAD_INT8_SHARE:.0%} of rows int8)")
        if self.heal_tokens:
            parts.append(f"healed {self.heal_tokens:,} tokens")
        return ", ".join(parts)
