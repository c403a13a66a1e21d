"""Candidate: one point of the search, frozen and hashable, so it doubles as the key of every cache.

Two derived keys matter for cost: `shape_key` (what latency depends on: architecture and bits, not trained
weights) keys the latency gate cache, and `student_key` (architecture and sparsity, not bits) keys the trained
student cache, because bit widths are applied after training: one trained student serves every bit width.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

BIT_WIDTHS = (32, 16, 8, 4)
SPARSITY_PATTERNS = ("unstructured", "2:4")
BITS_NAMES = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """One compressed model to try: architecture, sparsity, bit width and optionally thread count.

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
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"candidate {name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"candidate hidden {self.hidden} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"candidate sparsity must be in [0, 1), got {self.sparsity}")
        if self.sparsity_pattern not in SPARSITY_PATTERNS:
            raise ValueError(f"candidate sparsity_pattern must be one of {list(SPARSITY_PATTERNS)}, got {self.sparsity_pattern!r}")
        if self.sparsity_pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"a 2:4 pattern prunes exactly half the weights; sparsity must be 0.5, got {self.sparsity}")
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"candidate bits must be one of {list(BIT_WIDTHS)}, got {self.bits!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"candidate threads must be >= 1, got {self.threads}")

    @classmethod
    def canonical(cls, **params: Any) -> "Candidate":
        """Build from sampled knob values, folding spellings of the same model into one candidate.

        Dense weights have no pattern (sparsity 0 -> 'unstructured'), and 2:4 means exactly 50%, so a sampler
        that proposes (2:4, 0.3) and (2:4, 0.7) gets the same candidate, and the same cache entries.
        """
        sparsity = float(params.get("sparsity", 0.0))
        pattern = params.get("sparsity_pattern", "unstructured")
        if sparsity == 0.0:
            pattern = "unstructured"
        elif pattern == "2:4":
            sparsity = 0.5
        return cls(**{**params, "sparsity": sparsity, "sparsity_pattern": pattern})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Candidate":
        """Rebuild from stored JSON (results, caches), refusing unknown fields so a file from another version fails
        loudly rather than silently dropping a knob."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown candidate field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data, for result.json and for hashing into `key`."""
        return asdict(self)

    @property
    def key(self) -> str:
        """A short hash of every field that names this candidate's artifacts and de-duplicates repeated proposals;
        unlike hash(), it is the same in every process, so it can name files."""
        return _digest(self.to_dict())

    @property
    def shape_key(self) -> str:
        """Latency depends on shape, bits and threads, not on trained weights. Unstructured zeros run through
        the same dense kernels, so their amount is left out; a 2:4 pattern can select sparse kernels, so it is in."""
        return _digest({"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn": self.ffn,
                        "bits": self.bits, "threads": self.threads, "semi_structured": self.sparsity_pattern == "2:4"})

    @property
    def student_key(self) -> str:
        """Everything training depends on; bits are post-training, so they are left out."""
        return _digest({"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn": self.ffn,
                        "sparsity": self.sparsity, "sparsity_pattern": self.sparsity_pattern})

    def describe(self) -> str:
        """In words, e.g. '4 layers x 384 hidden (12 heads, FFN 1536), 50% unstructured sparsity, int8'."""
        sparsity = "dense" if self.sparsity == 0 else f"{self.sparsity:.0%} {self.sparsity_pattern} sparsity"
        threads = f", {self.threads} threads" if self.threads else ""
        heads = f"{self.heads} head" + ("s" if self.heads != 1 else "")
        layers = f"{self.layers} layer" + ("s" if self.layers != 1 else "")
        return (f"{layers} x {self.hidden} hidden ({heads}, FFN {self.ffn}), "
                f"{sparsity}, {BITS_NAMES[self.bits]}{threads}")
