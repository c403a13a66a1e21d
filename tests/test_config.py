"""The tune spec: defaults a user expects, and one clear sentence for every way it can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.config import ConfigError, TuneSpec, load_spec, parse_spec

BASE = {"name": "demo", "model": {"path": "m"}, "data": {"path": "d.csv"}, "target": {"latency_ms": 5}}


def test_defaults_a_user_would_expect() -> None:
    spec = parse_spec(BASE)
    assert (spec.data.text_column, spec.data.label_column) == ("text", "label")
    t = spec.target
    assert (t.percentile, t.batch_size, t.threads, t.runtime, t.device) == (95, 1, "auto", "onnxruntime", "cpu")
    assert spec.space.preset == "bert-default" and spec.search.sampler == "nsga2"


def test_yaml_file_with_shorthand_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "tune.yaml"
    path.write_text("name: demo\nmodel: {path: m}\ndata: {path: d.csv}\ntarget: {speedup: 4}\nspace: quantize-only\n"
                    "search: {trials: 5, sampler: tpe}\n")
    spec = load_spec(path, {"search": {"trials": 9}})
    assert spec.space.preset == "quantize-only" and spec.target.speedup == 4 and spec.target.latency_ms is None
    assert spec.search.trials == 9 and spec.search.sampler == "tpe"  # override merged, not replacing `search`
    assert load_spec(spec) == spec and isinstance(spec, TuneSpec)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"serch": {}}, "unknown key 'serch'; did you mean 'search'?"),
        ({"target": {"latency_ms": 5, "percentil": 95}}, "did you mean 'percentile'?"),
        ({"target": {"latency_ms": 5, "threads": 0}}, "target.threads: threads must be a positive integer or 'auto'"),
        ({"target": {"latency_ms": "fast"}}, "target.latency_ms"),
        ({"target": {"latency_ms": 0}}, "target.latency_ms: input should be greater than 0, got 0"),
        ({"target": {"latency_ms": 5, "percentile": 0}}, "target.percentile: input should be greater than 0"),
        ({"target": {"latency_ms": 5, "percentile": 101}}, "target.percentile: input should be less than or equal to 100"),
        ({"target": {"latency_ms": 5, "percentile": 42}}, "one of 50, 90, 95, 99"),
        ({"target": {"latency_ms": 5, "batch_size": 0}}, "target.batch_size"),
        ({"target": {"latency_ms": 5, "seq_len": 0}}, "target.seq_len"),
        ({"target": {"latency_ms": 5, "runtime": "tensorrt"}}, "runtime must be 'onnxruntime' (the runtime tune deploys to), got 'tensorrt'"),
        ({"target": {"latency_ms": 5, "runtime": "torch"}}, "runtime must be 'onnxruntime'"),
        ({"target": {"latency_ms": 5, "margin": -0.1}}, "target.margin: input should be greater than or equal to 0"),
        ({"target": {"latency_ms": 5, "margin": 0.5}}, "target.margin: input should be less than 0.5"),
        ({"target": {}}, "exactly one of latency_ms"),
        ({"target": {"latency_ms": 5, "speedup": 2}}, "exactly one of latency_ms"),
        ({"search": {"trials": 0}}, "search.trials: input should be greater than or equal to 1, got 0"),
        ({"search": {"sampler": "grid"}}, "search.sampler"),
        ({"data": {"path": "d.csv", "split": {"validation": 0.5, "test": 0.5}}}, "at least 10% for training"),
        ({"name": "../escape"}, "may not contain '/'"),
        ({"training": {"refine_epochs": -1}}, "training.refine_epochs: input should be greater than or equal to 0"),
        ({"training": {"finalists": 0}}, "training.finalists: input should be greater than or equal to 1"),
        ({"model": "m"}, "model: input should be a valid dictionary"),
    ],
)
def test_bad_fields_are_one_sentence(patch: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec({**BASE, **patch})
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith("spec: ")


def test_missing_required_section() -> None:
    with pytest.raises(ConfigError, match="spec: model is required"):
        parse_spec({k: v for k, v in BASE.items() if k != "model"})


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: demo\ntarget: {latency_ms: 5\nsearch: []\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_spec(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_spec(empty)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_spec(binary)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_spec(listing)


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_spec(evil)


LM = {"name": "lm", "model": {"path": "m", "task": "causal-lm"}, "data": {"path": "plays"}}


@pytest.mark.parametrize(
    ("model", "target", "fragment"),
    [
        ({"path": "m"}, {"decode_ms": 5}, "decode_ms is a causal-lm target (model.task: causal-lm)"),
        ({"path": "m"}, {"speedup": 2, "peak_mb": 500}, "peak_mb is a causal-lm target"),
        (LM["model"], {"latency_ms": 5}, "latency_ms is an encoder's target; a causal LM takes decode_ms"),
        (LM["model"], {"decode_ms": 5, "speedup": 3}, "at most one of decode_ms (absolute) or speedup"),
        (LM["model"], {"peak_mb": 500}, "a causal LM needs decode_ms, speedup (of decode) or ttft_ms"),
        (LM["model"], {"speedup": 3, "prompt_len": 300, "context_len": 256}, "prompt_len (300) is longer than context_len (256)"),
        (LM["model"], {"decode_ms": -1}, "target.decode_ms"),
        ({"path": "m", "task": "translation"}, {"speedup": 2}, "model.task"),
    ],
)
def test_a_target_of_the_other_task_family_is_one_sentence(model: dict, target: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec({**LM, "model": model, "target": target})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_causal_lm_spec_defaults_to_the_llama_preset_and_a_256_token_context() -> None:
    spec = parse_spec({**LM, "target": {"decode_ms": 8, "ttft_ms": 300, "peak_mb": 400}})
    t = spec.target
    assert spec.space.preset == "llama-default" and (t.prompt_len, t.context_len) == (128, 256)
    assert (t.decode_ms, t.ttft_ms, t.peak_mb, t.latency_ms) == (8, 300, 400, None)


def test_the_state_transfer_weight_keys_students_apart_only_when_on() -> None:
    from types import SimpleNamespace

    from autotune.config import TrainingSpec
    from autotune.trial import TrialPipeline
    from search_spaces import Candidate

    def key(training: TrainingSpec) -> str:
        ctx = SimpleNamespace(task=SimpleNamespace(cache_identity=("teacher",)), training=training, seed=0)
        return TrialPipeline(ctx).student_key(Candidate(layers=2, hidden=32, heads=4, ffn=64))  # type: ignore[arg-type]

    off, on = key(TrainingSpec()), key(TrainingSpec(state_weight=1.0))
    assert off != on and key(TrainingSpec(state_weight=1.0)) == on
    assert off == key(TrainingSpec(finalists=5))  # how finalists are refined never keys the searched student
    with pytest.raises(ConfigError, match="state_weight"):
        load_spec({"name": "n", "model": {"path": "m"}, "data": {"path": "d.csv"}, "target": {"latency_ms": 5},
                   "training": {"state_weight": -1}})
    with pytest.raises(ConfigError, match="applies to text-classification"):
        load_spec({"name": "n", "model": {"path": "m", "task": "causal-lm"}, "data": {"path": "t.txt"},
                   "target": {"speedup": 3}, "training": {"state_weight": 1}})
