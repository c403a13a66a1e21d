"""Search spaces: every point is a valid model, candidates are stable cache keys, hardware removes what it can't run."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from profilers.hardware import collect_profile
from search_spaces import (
    Candidate, Categorical, IntRange, FloatRange, SpaceError, TeacherShape, preset, restrict_to_hardware, with_overrides,
)

MINILM = TeacherShape(layers=6, hidden=384, heads=12, ffn=1536)
BERT_BASE = TeacherShape(layers=12, hidden=768, heads=12, ffn=3072)


@pytest.fixture(scope="module")
def profile():
    return collect_profile(microbench=False)


@pytest.mark.parametrize("teacher", [MINILM, BERT_BASE, TeacherShape(2, 32, 4, 64)])
def test_every_point_of_the_default_preset_is_a_valid_candidate(teacher: TeacherShape) -> None:
    space = preset("bert-default", teacher)
    assert space.knob("layers").values() == tuple(range(1, teacher.layers + 1))
    assert max(space.knob("hidden").values()) == teacher.hidden and max(space.knob("ffn").values()) == teacher.ffn
    assert teacher.heads in space.knob("heads").values()
    names = [k.name for k in space.knobs]
    for values in itertools.product(*(k.values() for k in space.knobs)):
        candidate = space.candidate(dict(zip(names, values)))  # raises if invalid
        assert space.contains(candidate)


def test_minilm_preset_values() -> None:
    space = preset("bert-default", MINILM)
    assert space.knob("hidden").values() == (384, 288, 192, 96)
    assert space.knob("heads").values() == (12, 6, 4, 3)
    assert space.knob("ffn").values() == (1536, 1152, 768, 384)
    assert space.knob("sparsity").values() == (0.0, 0.3, 0.5, 0.7)
    assert space.knob("bits").values() == (32, 16, 8, 4)


def test_candidate_is_hashable_round_trips_and_canonicalises() -> None:
    a = Candidate.canonical(layers=4, hidden=384, heads=12, ffn=1536, sparsity=0.3, sparsity_pattern="2:4", bits=8)
    b = Candidate.canonical(layers=4, hidden=384, heads=12, ffn=1536, sparsity=0.7, sparsity_pattern="2:4", bits=8)
    assert a == b and a.sparsity == 0.5 and hash(a) == hash(b) and a.key == b.key
    dense = Candidate.canonical(layers=4, hidden=384, heads=12, ffn=1536, sparsity=0.0, sparsity_pattern="2:4", bits=8)
    assert dense.sparsity_pattern == "unstructured"
    assert Candidate.from_dict(a.to_dict()) == a
    assert len({a, b, dense}) == 2


def test_cache_keys_separate_what_latency_and_training_depend_on() -> None:
    base = Candidate(layers=4, hidden=384, heads=12, ffn=1536, sparsity=0.3, bits=8)
    other_bits = replace(base, bits=4)
    other_sparsity = replace(base, sparsity=0.5)
    assert other_bits.student_key == base.student_key and other_bits.shape_key != base.shape_key
    assert other_sparsity.shape_key == base.shape_key and other_sparsity.student_key != base.student_key
    assert "4 layers x 384 hidden" in base.describe() and "int8" in base.describe()


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"hidden": 100, "heads": 12}, "not a multiple of heads"),
        ({"bits": 6}, "bits must be one of"),
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity_pattern": "4:8", "sparsity": 0.5}, "sparsity_pattern must be one of"),
        ({"sparsity_pattern": "2:4", "sparsity": 0.3}, "exactly half"),
        ({"layers": 0}, "positive integer"),
    ],
)
def test_invalid_candidates_are_refused(fields: dict, fragment: str) -> None:
    base = dict(layers=2, hidden=384, heads=12, ffn=1536)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Candidate(**{**base, **fields})
    with pytest.raises(ValueError, match="unknown candidate field"):
        Candidate.from_dict({**base, "depth": 3})


def test_a_stored_candidate_from_before_the_threads_knob_went_loads_as_it_was_measured() -> None:
    stored = dict(layers=2, hidden=384, heads=12, ffn=1536, sparsity=0.0, sparsity_pattern="unstructured", bits=8)
    assert Candidate.from_dict({**stored, "threads": None}) == Candidate.from_dict(stored)
    with pytest.raises(ValueError, match=r"unknown candidate field\(s\) \['threads'\]"):
        Candidate.from_dict({**stored, "threads": 2})  # a thread count would be a knob dropped silently


def test_overrides_narrow_or_replace_knobs() -> None:
    space = with_overrides(preset("bert-default", MINILM), {"layers": [2, 4], "bits": [8], "sparsity": {"low": 0.0, "high": 0.5}})
    assert space.knob("layers").values() == (2, 4) and space.knob("bits").values() == (8,)
    assert isinstance(space.knob("sparsity"), FloatRange)
    assert isinstance(with_overrides(space, {"layers": {"low": 1, "high": 3}}).knob("layers"), IntRange)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"layer": [2]}, "did you mean 'layers'"),
        ({"layers": [7]}, "outside 1..6"),
        ({"hidden": [384, 100]}, "not a multiple of heads"),
        ({"head_dim": [32, 64]}, "an attention 768 wide, wider than the teacher's 384"),
        ({"head_dim": [0]}, "knob 'head_dim' has values [0]; accepted: positive integers"),
        ({"bits": [32, 2]}, "accepted: [32, 16, 8, 4]"),
        ({"sparsity": [0.0, 1.5]}, "fractions in [0, 1)"),
        ({"sparsity_pattern": ["1:8"]}, "accepted: ['unstructured', '2:4']"),
        ({"layers": {"low": 4, "high": 2}}, "above high"),
        ({"layers": {"lo": 1, "high": 2}}, "needs 'low' and 'high'"),
        ({"bits": []}, "no values"),
        ({"threads": [1, 2]}, "threads is not a knob: a candidate runs at the target's threads"),
    ],
)
def test_bad_overrides_are_one_clear_error(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        with_overrides(preset("bert-default", MINILM), overrides)
    assert fragment in str(info.value)


def test_pruned_heads_are_kept_whole_and_the_default_layout_keeps_its_keys() -> None:
    space = preset("bert-default", MINILM)
    assert space.knob("head_dim").values() == (32,)  # the teacher's head width: heads are pruned, not merged
    pruned = space.candidate({"layers": 2, "hidden": 384, "heads": 4, "head_dim": 32, "ffn": 768, "sparsity": 0.0,
                              "sparsity_pattern": "unstructured", "bits": 8})
    assert pruned.attention_width == 128 and "4 heads of 32" in pruned.describe()
    whole = space.candidate({"layers": 2, "hidden": 384, "heads": 12, "head_dim": 32, "ffn": 768, "sparsity": 0.0,
                             "sparsity_pattern": "unstructured", "bits": 8})
    plain = Candidate(layers=2, hidden=384, heads=12, ffn=768, bits=8)
    assert whole == plain and whole.key == plain.key and "head_dim" not in whole.to_dict()
    assert space.contains(plain) and space.params_of(plain)["head_dim"] == 32
    assert pruned.shape_key != replace(pruned, head_dim=None, heads=12).shape_key
    assert pruned.student_key != replace(pruned, heads=6).student_key
    assert Candidate.from_dict(pruned.to_dict()) == pruned
    with pytest.raises(ValueError, match="head_dim must be a positive integer"):
        Candidate(layers=1, hidden=384, heads=4, ffn=768, head_dim=0)


def test_unknown_preset_suggests_the_name() -> None:
    with pytest.raises(SpaceError, match="did you mean 'bert-default'"):
        preset("bert-defualt", MINILM)


def unprobed(profile, flags: tuple[str, ...]):
    """This machine's profile with other flags and no fp16 probe (an older profile): the flag rule decides."""
    return replace(profile, cpu=replace(profile.cpu, flags=flags), software=replace(profile.software, onnxruntime_cpu_fp16=None))


def test_hardware_removes_what_this_cpu_cannot_run_with_reasons(profile) -> None:
    space = preset("bert-default", MINILM)
    no_fp16_cpu = unprobed(profile, ("avx2", "fma"))
    restricted, removals = restrict_to_hardware(space, no_fp16_cpu, "onnxruntime", "cpu")
    assert 16 not in restricted.knob("bits").values() and "2:4" not in restricted.knob("sparsity_pattern").values()
    assert {(r.knob, r.value) for r in removals} == {("bits", 16), ("sparsity_pattern", "2:4")}
    assert all(r.reason for r in removals)
    fp16_cpu = unprobed(profile, ("avx512f", "avx512_fp16"))
    kept, _ = restrict_to_hardware(space, fp16_cpu, "onnxruntime", "cpu")
    assert 16 in kept.knob("bits").values()
    torch_cpu, removals = restrict_to_hardware(space, no_fp16_cpu, "torch", "cpu")
    assert set(torch_cpu.knob("bits").values()) == {32, 8}


@pytest.mark.parametrize(("flags", "probed", "kept"), [
    (("avx512_fp16",), False, False),  # a flag says a kernel may exist; the probe found ORT casting to fp32
    (("avx2",), True, True),  # the probe found ORT's own fp16 kernel
    (("avx512_fp16",), None, True), (("avx2",), None, False),  # no probe (an older profile): the flag decides
])
def test_fp16_is_kept_where_the_probe_found_a_kernel(profile, flags: tuple[str, ...], probed: bool | None, kept: bool) -> None:
    machine = replace(unprobed(profile, flags), software=replace(profile.software, onnxruntime_cpu_fp16=probed))
    restricted, removals = restrict_to_hardware(preset("bert-default", MINILM), machine, "onnxruntime", "cpu")
    assert (16 in restricted.knob("bits").values()) == kept
    assert kept or any("probed" in r.reason or "flag" in r.reason for r in removals if r.value == 16)


def test_this_machines_fp16_probe_agrees_with_the_space_it_gets(profile) -> None:
    from onnx import TensorProto

    from profilers.ort import cpu_runs_natively

    assert cpu_runs_natively(TensorProto.FLOAT)  # the probe can say yes: fp32 always has its own kernel
    assert profile.software.onnxruntime_cpu_fp16 == cpu_runs_natively(TensorProto.FLOAT16)
    restricted, _ = restrict_to_hardware(preset("bert-default", MINILM), profile, "onnxruntime", "cpu")
    assert (16 in restricted.knob("bits").values()) == profile.software.onnxruntime_cpu_fp16


def test_hardware_refuses_to_empty_a_knob(profile) -> None:
    only_fp16 = with_overrides(preset("bert-default", MINILM), {"bits": [16]})
    no_fp16_cpu = unprobed(profile, ("avx2",))
    with pytest.raises(SpaceError, match="no value left on this machine"):
        restrict_to_hardware(only_fp16, no_fp16_cpu, "onnxruntime", "cpu")
    with pytest.raises(ValueError, match="runtime must be one of"):
        restrict_to_hardware(only_fp16, profile, "tensorrt", "cpu")


def test_knob_types_validate_themselves() -> None:
    with pytest.raises(ValueError, match="twice"):
        Categorical("bits", (8, 8))
    with pytest.raises(ValueError, match="log scale"):
        IntRange("layers", 0, 4, log=True)
    assert FloatRange("sparsity", 0.0, 0.6, step=0.2).values() == (0.0, 0.2, 0.4, 0.6)
    with pytest.raises(ValueError, match="continuous"):
        FloatRange("sparsity", 0.0, 0.6).values()


SMOLLM2 = TeacherShape(layers=30, hidden=576, heads=9, ffn=1536)


def test_the_llama_preset_is_derived_from_the_teacher_and_its_teacher_shape_heals_nothing() -> None:
    space = preset("llama-default", SMOLLM2)
    assert space.knob("layers").values() == (30, 26, 22) and space.knob("ffn").values() == (1536, 1152)
    assert space.knob("hidden").values() == (576,) and space.knob("bits").values() == (32, 8, 4)
    params = {k.name: k.values()[-1] for k in space.knobs} | {"layers": 30, "ffn": 1536, "bits": 4}
    teacher_int4 = space.candidate(params)
    assert teacher_int4.heal_tokens == 0 and space.contains(teacher_int4)  # nothing to heal at the teacher's shape
    assert space.params_of(teacher_int4)["heal_tokens"] in space.knob("heal_tokens").values()  # enqueueable
    assert space.candidate(space.params_of(teacher_int4)) == teacher_int4
    student = space.candidate(params | {"layers": 26})
    assert student.heal_tokens == params["heal_tokens"] and "healed" in student.describe()


def test_a_causal_lm_candidate_folds_what_its_precision_does_not_use() -> None:
    fp32 = Candidate.canonical(layers=30, hidden=576, heads=9, ffn=1536, bits=32, block_size=64, method="rtn",
                               head_bits=4, sensitive_int8=True, heal_tokens=0)
    int8 = Candidate.canonical(layers=30, hidden=576, heads=9, ffn=1536, bits=8, block_size=64, method="rtn",
                               head_bits=4, sensitive_int8=True, heal_tokens=0)
    assert fp32.block_size is None and fp32.head_bits is None and not fp32.sensitive_int8  # fp32 has no scheme
    assert int8.block_size == 64 and not int8.sensitive_int8  # int8 layers in an int8 body mean nothing
    assert fp32.key != int8.key and fp32.student_key == int8.student_key  # one student serves every precision


def test_a_method_the_builder_does_not_run_folds_away_its_int8_layers_and_int8_bodies() -> None:
    offset = Candidate.canonical(layers=30, hidden=576, heads=9, ffn=1536, bits=4, block_size=32, method="rtn-offset",
                                 head_bits=4, sensitive_int8=True, heal_tokens=0)
    builder = Candidate.canonical(layers=30, hidden=576, heads=9, ffn=1536, bits=4, block_size=32, method="rtn",
                                  head_bits=4, sensitive_int8=True, heal_tokens=0)
    assert not offset.sensitive_int8 and builder.sensitive_int8
    int8 = Candidate.canonical(layers=30, hidden=576, heads=9, ffn=1536, bits=8, block_size=32, method="rtn-offset",
                               head_bits=4, sensitive_int8=False, heal_tokens=0)
    assert int8.method == "rtn"  # rtn-offset quantizes to 4 bits: int8 is the builder's RTN, one candidate
    assert "rtn-offset" in offset.describe() and "first 17% of rows int8" in offset.describe()
