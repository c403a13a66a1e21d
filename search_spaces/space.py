"""Space: the named knobs of a search, checked so that every point a sampler can propose is a valid model.

The samplers draw each knob independently, so validity is a property of the whole product of knob values,
checked once when the space is built rather than trial by trial: a space in which some (hidden, heads) pair
would not divide is refused with the offending pairs named, and the sampler can never propose one. The rest of
the rules (2:4 means 50%, dense has no pattern) are folded by `Candidate.canonical`.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, replace
from typing import Any, Mapping

from search_spaces.candidate import (
    BIT_WIDTHS, LM_BLOCK_SIZES, LM_FIELDS, LM_METHODS, LM_WEIGHT_BITS, SPARSITY_PATTERNS, Candidate,
)
from search_spaces.knobs import Categorical, FloatRange, IntRange, Knob

REQUIRED_KNOBS = ("layers", "hidden", "heads", "ffn", "sparsity", "sparsity_pattern", "bits")
#: A causal LM's own knobs (see search_spaces.candidate), which an encoder's candidate leaves None, and an encoder's
#: head width (heads kept whole when the attention is narrower than hidden).
OPTIONAL_KNOBS = LM_FIELDS + ("head_dim",)
KNOB_NAMES = REQUIRED_KNOBS + OPTIONAL_KNOBS


class SpaceError(ValueError):
    """A search space that cannot be searched; the message is one sentence naming the knob."""


def check_knob_name(name: str) -> None:
    """Refuse a name that is not a knob, with the nearest one; `threads` is the target's, not the search's."""
    if name == "threads":
        raise SpaceError("threads is not a knob: a candidate runs at the target's threads (target.threads), the "
                         "threads its deployment will have")
    if name not in KNOB_NAMES:
        raise SpaceError(f"unknown knob {name!r}{did_you_mean(name, KNOB_NAMES)}; knobs: {list(KNOB_NAMES)}")


def did_you_mean(name: str, options: tuple[str, ...] | list[str]) -> str:
    """A " (did you mean ...?)" suffix naming the closest option, or an empty string: names come from hand-written
    configs, and an error that names the likely fix can be acted on without looking anything up."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class TeacherShape:
    """The uncompressed model's architecture: the upper bound of every architecture knob."""

    layers: int
    hidden: int
    heads: int
    ffn: int

    def as_candidate(self, bits: int = 32) -> Candidate:
        """The teacher itself as a dense candidate at `bits`, so the baseline and its plain quantizations go through
        the same pipeline and caches as any compressed candidate."""
        return Candidate(layers=self.layers, hidden=self.hidden, heads=self.heads, ffn=self.ffn, bits=bits)

    def cut_to(self, layers: int, bits: int = 32) -> Candidate:
        """The teacher with only `layers` of its layers, at full width: the layer-dropping student."""
        return replace(self.as_candidate(bits), layers=layers)


@dataclass(frozen=True)
class Removal:
    """A knob value taken out of the space, and why (logged and shown in the report)."""

    knob: str
    value: Any
    reason: str


@dataclass(frozen=True)
class Space:
    """The knobs of one search and the teacher that bounds them, validated as a whole when built.

    Samplers draw knobs independently, so every combination must be a valid model; checking that once here means
    no trial is wasted on an impossible candidate.
    """

    knobs: tuple[Knob, ...]
    teacher: TeacherShape

    def __post_init__(self) -> None:
        names = [k.name for k in self.knobs]
        for name in names:
            check_knob_name(name)
        missing = [n for n in REQUIRED_KNOBS if n not in names]
        if missing:
            raise SpaceError(f"search space lacks knob(s) {missing}")
        if len(set(names)) != len(names):
            raise SpaceError(f"search space names a knob twice: {names}")
        self._check_values()

    def knob(self, name: str) -> Knob:
        """The knob called `name`. Knobs are an ordered tuple rather than a dict, so a Space stays frozen and
        hashable like its parts; this is the lookup that costs."""
        return next(k for k in self.knobs if k.name == name)

    def has(self, name: str) -> bool:
        """Whether the space searches the knob `name` (the optional ones may be absent)."""
        return any(k.name == name for k in self.knobs)

    def _check_lm_values(self) -> None:
        accepted = {"block_size": LM_BLOCK_SIZES, "method": LM_METHODS, "head_bits": LM_WEIGHT_BITS,
                    "sensitive_int8": (False, True)}
        for name, options in accepted.items():
            bad = [v for v in self.knob(name).values() if v not in options] if self.has(name) else []
            if bad:
                raise SpaceError(f"knob {name!r} has values {bad}; accepted: {list(options)}")
        heal = self.knob("heal_tokens").values() if self.has("heal_tokens") else ()
        bad_heal = [v for v in heal if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad_heal:
            raise SpaceError(f"knob 'heal_tokens' has values {bad_heal}; accepted: integers >= 0 (training tokens)")

    def _check_values(self) -> None:
        self._check_lm_values()
        limits = {"layers": self.teacher.layers, "hidden": self.teacher.hidden, "heads": self.teacher.heads, "ffn": self.teacher.ffn}
        for name, limit in limits.items():
            values = self.knob(name).values()
            bad = [v for v in values if not isinstance(v, int) or not 1 <= v <= limit]
            if bad:
                raise SpaceError(f"knob {name!r} has values {bad} outside 1..{limit} (the teacher's {name})")
        bits = [b for b in self.knob("bits").values() if b not in BIT_WIDTHS]
        if bits:
            raise SpaceError(f"knob 'bits' has values {bits}; accepted: {list(BIT_WIDTHS)}")
        patterns = [p for p in self.knob("sparsity_pattern").values() if p not in SPARSITY_PATTERNS]
        if patterns:
            raise SpaceError(f"knob 'sparsity_pattern' has values {patterns}; accepted: {list(SPARSITY_PATTERNS)}")
        sparsity = self.knob("sparsity")
        amounts = sparsity.values() if not isinstance(sparsity, FloatRange) or sparsity.step else (sparsity.low, sparsity.high)
        out = [a for a in amounts if not isinstance(a, (int, float)) or not 0 <= a < 1]
        if out:
            raise SpaceError(f"knob 'sparsity' has values {out}; accepted: fractions in [0, 1)")
        if self.has("head_dim"):
            self._check_head_dims()
        pairs = [(h, n) for h, n in itertools.product(self.knob("hidden").values(), self.knob("heads").values()) if h % n]
        if pairs:
            raise SpaceError(
                f"knobs 'hidden' and 'heads' allow pairs where hidden is not a multiple of heads: {pairs[:5]}; "
                "choose hidden values that every heads value divides"
            )

    def _check_head_dims(self) -> None:
        """Head widths are integers, and no heads x head_dim is wider than the teacher's attention (a student keeps
        teacher heads, it cannot add any)."""
        dims = self.knob("head_dim").values()
        bad = [d for d in dims if not isinstance(d, int) or isinstance(d, bool) or d < 1]
        if bad:
            raise SpaceError(f"knob 'head_dim' has values {bad}; accepted: positive integers")
        widest = max(self.knob("heads").values()) * max(dims)
        if widest > self.teacher.hidden:
            raise SpaceError(f"knobs 'heads' and 'head_dim' allow an attention {widest} wide, wider than the "
                             f"teacher's {self.teacher.hidden}; a student keeps teacher heads, it cannot add any")

    def candidate(self, params: Mapping[str, Any]) -> Candidate:
        """The canonical candidate for sampled knob values (see Candidate.canonical); the teacher's own depth and
        widths have nothing to heal, so their healing budget folds to 0."""
        params = dict(params)
        t = self.teacher
        if params.get("heal_tokens") and (params["layers"], params["ffn"]) == (t.layers, t.ffn):
            params["heal_tokens"] = 0
        return Candidate.canonical(**params)

    def params_of(self, candidate: Candidate) -> dict[str, Any]:
        """The knob values that sample `candidate` (the inverse of `candidate`, for enqueueing hand-picked ones): a
        knob the candidate leaves None (a causal LM's, for an encoder) is left out, a default head layout is spelled
        out as its head_dim where the space searches head widths, and the teacher shape's folded healing budget of 0
        is sampled as the knob's first value."""
        values = candidate.to_dict()
        if self.has("head_dim") and candidate.head_dim is None and candidate.hidden % candidate.heads == 0:
            values["head_dim"] = candidate.hidden // candidate.heads  # the default layout, spelled out
        params = {k.name: values[k.name] for k in self.knobs if values.get(k.name) is not None}
        t = self.teacher
        if params.get("heal_tokens") == 0 and (candidate.layers, candidate.ffn) == (t.layers, t.ffn):
            params["heal_tokens"] = self.knob("heal_tokens").values()[0]
        return params

    def contains(self, candidate: Candidate) -> bool:
        """Whether every knob admits the candidate's value: lets hand-picked candidates such as the teacher's cuts be
        tried only when the space allows them."""
        params = self.params_of(candidate)
        return all(k.contains(params[k.name]) for k in self.knobs if k.name in params)

    def without(self, knob_name: str, value: Any, reason: str) -> tuple["Space", Removal]:
        """The space with one categorical value removed; refusing to empty the knob."""
        knob = self.knob(knob_name)
        if not isinstance(knob, Categorical):
            raise SpaceError(f"knob {knob_name!r} is a range; only listed values can be removed")
        kept = tuple(v for v in knob.choices if v != value)
        if not kept:
            raise SpaceError(f"knob {knob_name!r} has no value left on this machine: {value!r} {reason}")
        knobs = tuple(Categorical(knob_name, kept) if k.name == knob_name else k for k in self.knobs)
        return replace(self, knobs=knobs), Removal(knob_name, value, reason)

    def describe(self) -> dict[str, Any]:
        """Knob name -> values (or range) for result.json and the report."""
        out: dict[str, Any] = {}
        for k in self.knobs:
            if isinstance(k, Categorical):
                out[k.name] = list(k.choices)
            else:
                out[k.name] = {"low": k.low, "high": k.high, "step": k.step, "log": k.log}
        return out


def knob_from_spec(name: str, spec: Any) -> Knob:
    """A knob from a spec value: a list of values, or a mapping {low, high[, step][, log]}."""
    if isinstance(spec, (list, tuple)):
        return Categorical(name, tuple(spec))
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"low", "high", "step", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            raise SpaceError(f"knob {name!r} range needs 'low' and 'high' (optional 'step', 'log'), got {sorted(spec)}")
        low, high = spec["low"], spec["high"]
        if isinstance(low, int) and isinstance(high, int) and isinstance(spec.get("step", 1), int):
            return IntRange(name, low, high, spec.get("step", 1), bool(spec.get("log", False)))
        return FloatRange(name, float(low), float(high), spec.get("step"), bool(spec.get("log", False)))
    if isinstance(spec, (int, float, str)):
        return Categorical(name, (spec,))
    raise SpaceError(f"knob {name!r} must be a list of values or a {{low, high}} range, got {type(spec).__name__}")


def with_overrides(space: Space, overrides: Mapping[str, Any]) -> Space:
    """Narrow or replace knobs of a preset; every override is checked like the preset itself."""
    for name in overrides:
        check_knob_name(name)
    try:
        replaced = {name: knob_from_spec(name, spec) for name, spec in overrides.items()}
    except ValueError as exc:
        raise SpaceError(str(exc)) from None
    knobs = tuple(replaced.pop(k.name, k) for k in space.knobs) + tuple(replaced.values())
    return replace(space, knobs=knobs)
