"""End-to-end studies on a tiny headless BERT and synthetic reviews: real ONNX export, real ORT sessions, real
Optuna on SQLite, every run in its own temp directory and every cache under a temp AUTOTUNE_CACHE_DIR.

The teacher is saved without a classification head, so each run fine-tunes it first (cached) and accuracies
mean something. A tiny model runs in well under a millisecond, so targets are absolute: 50 ms (everything is
feasible) or 0.001 ms (nothing can be). The machine profile is measured once per module (it is this machine
either way, and each measurement costs ~5 s); the one run through a real subprocess measures its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import optuna
import pytest
import yaml
from transformers import AutoTokenizer

from autotune import api
from autotune.cli import main
from autotune.config import load_spec
from autotune.predict import load_model
from autotune.runtime import artifact_runtime, load_artifact
from autotune.tasks import TextClassification, evaluate, predict_logits, prepared_task
from autotune.records import LATENCY_CONSTRAINT
from autotune.study import anchors, kept_trials
from autotune.tasks.text_classification import encoder_anchors, load_splits
from autotune.trial import TrialPipeline
from profilers.hardware import PROFILE_ENV, collect_profile, profile_for
from profilers.openvino import openvino_installed
from search_spaces import Candidate, TeacherShape, preset, with_overrides
from conftest import save_headless_bert, synthetic_rows, tiny_config, write_csv, write_tokenizer

GENEROUS_MS = 50.0
IMPOSSIBLE_MS = 0.001
SEQ_LEN = 32
ONE_STUDENT_KNOBS = {"layers": [1], "hidden": [32], "heads": [4], "ffn": [64], "sparsity": [0.3], "bits": [32, 8, 4]}


@pytest.fixture(scope="module", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A module-wide temp cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOTUNE_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_headless_bert(tmp_path_factory.mktemp("headless-bert"))


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", synthetic_rows(200))


def make_spec(teacher: Path, data: Path, *, latency_ms: float = GENEROUS_MS, trials: int = 4,
              knobs: dict[str, Any] | None = None, threads: int | str = 1) -> dict[str, Any]:
    """A small spec: 200 rows, 32 tokens, one student epoch; the teacher head learns in 5 quick epochs."""
    return {
        "name": "tiny",
        "model": {"path": str(teacher)},
        "data": {"path": str(data), "max_length": SEQ_LEN},
        "target": {"latency_ms": latency_ms, "seq_len": SEQ_LEN, "threads": threads},
        "space": {"preset": "bert-default", "knobs": knobs or {}},
        "search": {"trials": trials, "seed": 0},
        "training": {"epochs": 1, "batch_size": 16, "teacher_epochs": 5, "teacher_lr": 3e-3},
    }


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def tune_cli(*args: str) -> int:
    """`autotune tune ...` in this process (so the module's profile and caches apply); returns the exit code."""
    return main(["tune", *map(str, args)])


def result_json(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text(encoding="utf-8"))


def logits_of(artifact_dir: str | Path, texts: Sequence[str]) -> np.ndarray:
    """The artifact's logits for `texts`, through its own tokenizer, in its engine."""
    artifact = load_artifact(artifact_dir)
    runtime = artifact_runtime(artifact, threads=1)
    return predict_logits(runtime.run, AutoTokenizer.from_pretrained(artifact.dir), texts, max_length=SEQ_LEN)


# -- a feasible run through the CLI: the recommendation, the schema, the artifact --------------------------

@pytest.fixture(scope="module")
def feasible_spec(teacher_dir: Path, data_csv: Path) -> dict[str, Any]:
    return make_spec(teacher_dir, data_csv, threads="auto")


@pytest.fixture(scope="module")
def feasible_run(feasible_spec: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one run of the suite that measures this machine itself (every other reads $AUTOTUNE_PROFILE)."""
    root = tmp_path_factory.mktemp("feasible")
    out = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(PROFILE_ENV)
        assert tune_cli(write_spec(root / "spec.yaml", feasible_spec), "--out", out) == 0
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_recommendation_meets_target_with_full_schema_and_portable_artifact(
    feasible_run: Path, feasible_spec: dict[str, Any], tmp_path: Path
) -> None:
    data = result_json(feasible_run)
    assert data["schema_version"] == 1
    target = data["target"]
    assert isinstance(target["threads"], int) and target["threads"] >= 1  # "auto" resolved
    assert target["latency_ms"] == GENEROUS_MS
    assert data["hardware"]["fingerprint"]
    baseline = data["baseline"]
    assert baseline["accuracy"]["validation"] > 0.8, "the fine-tuned teacher should learn the synthetic cue words"
    assert baseline["accuracy"]["test"] is not None
    assert 0 < baseline["latency_ms"]["p50"] <= baseline["latency_ms"]["p95"]
    # The reference is the fastest of the fused and unfused fp32 exports (and OpenVINO's, where it is installed),
    # timed together in this run.
    choices = baseline["fp32_p50_ms"]
    expected = {"fp32 fused", "fp32 unfused"} | ({"fp32 openvino"} if openvino_installed() else set())
    assert set(choices) == expected and min(choices.values()) > 0
    assert baseline["fused"] == (min(choices, key=choices.get) == "fp32 fused")
    assert len(data["trials"]) == 4
    for trial in data["trials"]:
        assert {"number", "state", "candidate", "stage", "feasible", "accuracy", "latency_ms", "size_mb", "seconds",
                "error"} <= set(trial)
    assert set(data["pareto"]) <= {t["number"] for t in data["trials"]} and data["pareto"]

    recommended = data["recommended"]
    assert recommended is not None and data["reason"] is None
    assert recommended["latency_ms"] <= target["latency_ms"]
    # The speedup is a ratio taken in the same minutes: the final measurement alternates the two in one process.
    final = recommended["final_measurement"]
    assert final["interleaved_runs"] == final["baseline"]["runs"] == final["recommended"]["runs"] == 300
    assert recommended["latency_ms"] == final["recommended"]["p95_ms"]
    assert final["baseline"]["p50_ms"] / final["recommended"]["p50_ms"] in final["speedups"]
    assert final["baseline"]["p95_ms"] / final["recommended"]["p95_ms"] in final["speedups_at_percentile"]
    assert recommended["speedup"] == sorted(final["speedups"])[1]  # the median of three confirmations (p50 ratios)
    low, high = recommended["speedup_interval"]
    assert low <= recommended["speedup"] <= high
    assert recommended["verdict"] == "meets" and recommended["latency_interval_ms"][1] <= target["latency_ms"] * (1 - recommended["margin"])
    assert data["passed_over"] == [] or all(p["reason"] for p in data["passed_over"])
    assert recommended["accuracy"]["test"] is not None

    # Finalists: the most accurate feasible students (not the teacher), one per student, distilled again for one
    # more epoch than the search.
    refined = data["refined"]
    assert 1 <= len(refined) <= 2
    trial_numbers = {t["number"]: t for t in data["trials"]}
    assert len({Candidate.from_dict(r["candidate"]).student_key for r in refined}) == len(refined)
    for record in refined:
        assert record["stage"] == "refined" and record["epochs"] == 2 and record["accuracy"] is not None
        assert trial_numbers[record["number"]]["candidate"] == record["candidate"]
        assert trial_numbers[record["number"]]["stage"] == "evaluated" and Path(record["artifact"]).is_dir()
        c = Candidate.from_dict(record["candidate"])
        assert (c.layers, c.hidden, c.heads, c.ffn, c.sparsity) != (2, 32, 4, 64, 0.0), "the teacher is never refined"
    assert data["counters"]["students_refined"] + data["counters"]["refined_cache_hits"] == len(refined)
    assert recommended["epochs"] == (2 if recommended["refined"] else 1)

    # model/ travels: copied elsewhere, it loads with its own tokenizer and scores what the run recorded.
    assert Path(recommended["artifact"]) == feasible_run / "model"
    moved = shutil.copytree(recommended["artifact"], tmp_path / "shipped")
    artifact = load_artifact(moved)
    assert recommended["engine"] == artifact.engine
    openvino_shape = (target["batch_size"], target["seq_len"]) if artifact.engine == "openvino" else None
    assert artifact.fixed_shape == openvino_shape and recommended["fixed_shape"] == (openvino_shape and list(openvino_shape))
    model_file = "model.xml" if artifact.engine == "openvino" else "model.onnx"
    assert artifact.model_path == moved / model_file and artifact.model_path.exists()
    runtime = artifact_runtime(artifact, threads=1)
    validation = load_splits(load_spec(feasible_spec)).validation
    accuracy = evaluate(runtime.run, AutoTokenizer.from_pretrained(moved), validation, max_length=SEQ_LEN).accuracy
    assert accuracy == pytest.approx(recommended["accuracy"]["validation"])
    # ...and `load_model` predicts what the run measured, naming labels as the data did, at the tuned threads.
    id2label = json.loads((moved / "config.json").read_text())["id2label"]
    assert {int(k): v for k, v in id2label.items()} == dict(enumerate(validation.label_names))
    model = load_model(moved)
    assert model.artifact.measured["threads"] == target["threads"] and model.runtime.threads == target["threads"]
    predicted = [p.label for p in model.predict(validation.texts)]
    truth = [validation.label_names[label] for label in validation.labels]
    assert np.mean([a == b for a, b in zip(predicted, truth)]) == pytest.approx(recommended["accuracy"]["validation"])


@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_api_and_cli_agree_for_the_same_spec_and_seed(
    feasible_run: Path, feasible_spec: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh cache: the API run fine-tunes and distils on its own instead of reading the CLI run's results.
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    result = api.tune(feasible_spec, out=tmp_path / "api")
    given = profile_for(os.environ[PROFILE_ENV], collect_profile(result.data["target"]["threads"], microbench=False))
    assert result.data["hardware"] == given.to_dict()  # this machine's profile, read from the folder it was given
    assert result_json(feasible_run)["hardware"]["created_at"] != given.created_at  # the CLI run measured its own

    def summary(trials: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(t["number"], t["candidate"], t["stage"], t["accuracy"]) for t in trials]

    cli = result_json(feasible_run)
    assert summary(result.trials) == summary(cli["trials"])
    assert result.data["baseline"]["accuracy"] == cli["baseline"]["accuracy"]
    # Accuracies on 20 easy rows saturate; the deployed models' logits show the weights themselves agree.
    texts = load_splits(load_spec(feasible_spec)).validation.texts
    pairs = [(cli["baseline"]["artifact"], result.data["baseline"]["artifact"])]
    pairs += [(a["artifact"], b["artifact"]) for a, b in zip(cli["trials"], result.trials) if a["stage"] == "evaluated"]
    for cli_artifact, api_artifact in pairs:
        np.testing.assert_allclose(logits_of(api_artifact, texts), logits_of(cli_artifact, texts), atol=1e-5)


# -- an impossible target: the real command, exit 3, and no training at all -----------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_impossible_target_exits_3_without_training(teacher_dir: Path, data_csv: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.yaml", make_spec(teacher_dir, data_csv, latency_ms=IMPOSSIBLE_MS, trials=3))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "autotune", "tune", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stderr[-2000:]
    # Not a terminal: one line per finished trial instead of a live bar.
    assert [f"trial {n} gate:" in proc.stderr and "over the target at the gate" in proc.stderr for n in range(3)] == [True] * 3
    data = result_json(out)
    assert data["recommended"] is None
    assert "closest" in data["reason"] and "trial 0" in data["reason"]
    assert data["counters"]["students_trained"] == 0
    assert [t["stage"] for t in data["trials"]] == ["gate"] * 3
    assert all(t["state"] == "COMPLETE" and not t["feasible"] and t["accuracy"] is None for t in data["trials"])
    assert not (out / "model").exists()
    # What the samplers read: each gate rejection's stored constraint is its measured latency over the target.
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}").trials
    by_number = {t["number"]: t for t in data["trials"]}
    for trial in stored:
        assert trial.constraints == {LATENCY_CONSTRAINT: pytest.approx(by_number[trial.number]["latency_ms"] - IMPOSSIBLE_MS)}
        assert trial.constraints[LATENCY_CONSTRAINT] > 0


# -- caches: one student for every bit width; a second run measures and trains nothing -------------------

@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_same_shape_candidates_share_one_student_and_later_runs_hit_the_gate_cache(
    teacher_dir: Path, data_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))  # no entries from other tests
    spec = make_spec(teacher_dir, data_csv, trials=5, knobs=ONE_STUDENT_KNOBS)
    first = api.tune(spec, out=tmp_path / "first")
    bits = {t["candidate"]["bits"] for t in first.trials}
    assert len(bits) >= 2, "precondition: the seeded sampler proposes at least two bit widths"
    assert first.data["counters"]["students_trained"] == 1
    # Repeats are memoised, not re-run; the other bit widths reuse the student (its refinement trains from the start).
    assert first.data["counters"]["student_cache_hits"] == len(bits) - 1
    assert all(t["stage"] == "evaluated" for t in first.trials)
    # One student, so one finalist; refined from the start to its sparsity.
    [refined] = first.data["refined"]
    assert first.data["counters"]["students_refined"] == 1
    assert refined["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)

    # A sub-millisecond tiny model's baseline drifts run to run by more than the 10% a cached gate tolerates on
    # a real model; the drift check has its own test below, so here any drift is accepted.
    monkeypatch.setattr("autotune.trial.GATE_CACHE_DRIFT", float("inf"))
    second = api.tune(spec, out=tmp_path / "second")
    counters = second.data["counters"]
    assert counters["gates_measured"] == 0 and counters["gate_cache_hits"] == len(bits)
    assert counters["students_trained"] == 0 and counters["student_cache_hits"] == len(bits)
    assert all(t["gate_cache_hit"] for t in second.trials)
    assert counters["students_refined"] == 0 and counters["refined_cache_hits"] == 1


def test_anchors_are_the_teacher_its_deepest_cuts_then_the_slimmest_cuts_deepest_first() -> None:
    teacher = TeacherShape(layers=6, hidden=384, heads=12, ffn=1536)
    space = with_overrides(preset("bert-default", teacher), {"layers": [1, 2, 4, 6], "hidden": [384, 192]})
    found = anchors(encoder_anchors(teacher, space), space, budget=16)
    assert found[:2] == [teacher.as_candidate(32), teacher.as_candidate(8)]
    assert [(c.layers, c.hidden, c.heads, c.head_dim, c.ffn, c.bits) for c in found[2:]] == [
        (4, 384, 12, None, 1536, 8), (4, 384, 6, 32, 384, 8), (4, 384, 4, 32, 384, 8),
        (2, 384, 4, 32, 384, 8), (1, 384, 4, 32, 384, 8), (2, 384, 6, 32, 384, 8)]  # half the budget
    assert anchors(encoder_anchors(teacher, space), space, budget=6) == found[:3]  # half the budget: room for sampler and retries
    assert anchors(encoder_anchors(teacher, space), space, budget=3) == found[:1]
    shallow = with_overrides(space, {"layers": [1, 2, 4]})  # the teacher itself is outside: slices only
    assert [c.layers for c in anchors(encoder_anchors(teacher, shallow), shallow, budget=16)] == [4, 4, 4, 2, 1, 2, 1, 2]
    assert anchors(encoder_anchors(teacher, space), with_overrides(space, {"hidden": [192]}), budget=16) == []  # full width is outside
    whole_heads = with_overrides(space, {"heads": [12]})  # no slim cut where the space keeps every head
    assert [c.heads for c in anchors(encoder_anchors(teacher, whole_heads), whole_heads, budget=16)] == [12] * 5


def test_a_cached_gate_is_trusted_only_at_the_same_machine_speed() -> None:
    from types import SimpleNamespace

    pipeline = TrialPipeline.__new__(TrialPipeline)
    pipeline.ctx = SimpleNamespace(reference_ms=10.0)
    def entry(reference_ms: float) -> dict:
        return {"timed": {}, "reference_ms": reference_ms}

    assert pipeline.same_machine_speed(entry(10.5)) and pipeline.same_machine_speed(entry(9.2))
    assert not pipeline.same_machine_speed(entry(12.0)) and not pipeline.same_machine_speed(entry(8.0))
    assert not pipeline.same_machine_speed({"timed": {}})  # an entry without a reference cannot be checked
    assert not pipeline.same_machine_speed({"reference_ms": 10.0})  # one latency only: written before causal LMs


@pytest.mark.parametrize("bits", [32, 8, "openvino int8"])
def test_the_gate_stand_in_size_scaled_to_the_full_token_table_matches_the_real_export(bits: Any, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from autotune.compress import shaped_like
    from autotune.compress.quantization import openvino_int8_artifact, quantize_artifact
    from autotune.runtime import export_artifact, feeds_for
    from autotune.tasks.text_classification import full_table_size_bytes

    if bits == "openvino int8":
        pytest.importorskip("nncf")

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_config(tiny_config("bert")).eval()
    tokenizer_dir = tmp_path / "tokenizer"
    write_tokenizer(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def variant(model: Any, name: str) -> Any:
        plain = export_artifact(model, tokenizer, tmp_path / name)
        if bits == "openvino int8":
            feeds = [feeds_for(plain.input_names, 2, 8, plain.vocab_size, seed=seed) for seed in range(4)]
            return openvino_int8_artifact(plain, tmp_path / f"{name}-ov", feeds)
        return quantize_artifact(plain, tmp_path / f"{name}-{bits}", bits=bits)

    full = variant(shaped_like(teacher, 1, 32, 4, 64), "full")
    stand_in = variant(shaped_like(teacher, 1, 32, 4, 64, vocab_size=7), "stand-in")
    vocab = teacher.config.vocab_size
    assert stand_in.size_bytes < full.size_bytes
    # An IR's XML spells shapes out as text, and its .bin aligns constants: a few bytes in 160 KB.
    assert abs(full_table_size_bytes(stand_in, vocab) - full.size_bytes) <= (16 if bits != "openvino int8" else 200)
    assert full_table_size_bytes(full, vocab) == full.size_bytes
    with pytest.raises(ValueError, match="no weight with 11 rows"):
        full_table_size_bytes(replace(stand_in, vocab_size=11), vocab)


# -- resume ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_resume_adds_trials_and_keeps_finished_ones(
    teacher_dir: Path, data_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", make_spec(teacher_dir, data_csv))
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'study.db'}"

    def finished() -> list[tuple[int, dict[str, Any], list[float] | None]]:
        """The trials that used the budget (a repeat of a measured candidate does not: see autotune.study)."""
        study = optuna.load_study(study_name="tiny", storage=storage)
        return [(t.number, t.params, t.values) for t in kept_trials(study)]

    assert tune_cli(spec, "--out", out, "--trials", 3) == 0
    before = finished()
    assert tune_cli(spec, "--out", out, "--resume", "--trials", 5) == 0
    after = finished()
    assert len(before) == 3 and len(after) == 5 and after[:3] == before
    assert [t["number"] for t in result_json(out)["trials"]] == [number for number, *_ in after]

    capsys.readouterr()
    assert tune_cli(spec, "--out", out, "--trials", 5) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_resume_keeps_the_relative_target_its_first_run_resolved(teacher_dir: Path, data_csv: Path, tmp_path: Path) -> None:
    spec = make_spec(teacher_dir, data_csv, trials=1, knobs={"layers": [2], "hidden": [32], "heads": [4], "ffn": [64],
                                                              "sparsity": [0.0], "bits": [32, 8]})
    spec["target"] = {"speedup": 1.2, "seq_len": SEQ_LEN, "threads": 1}
    first = api.tune(spec, out=tmp_path / "run")
    resolved = first.data["target"]["latency_ms"]
    baseline = first.data["baseline"]["latency_ms"]["p95"]
    assert resolved == pytest.approx(baseline / 1.2)
    resumed = api.tune(spec, out=tmp_path / "run", resume=True, trials=2)
    assert len(resumed.trials) == 2
    assert resumed.data["target"]["latency_ms"] == resolved  # not this run's re-measured baseline / 1.2
    # ...and the median it was resolved against, which the selection scales the target from.
    assert resumed.data["target"]["baseline_p50_ms"] == first.data["target"]["baseline_p50_ms"] == pytest.approx(
        first.data["baseline"]["latency_ms"]["p50"])


# -- a failing trial is recorded and the study goes on -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_failing_trial_is_recorded_and_the_study_goes_on(
    teacher_dir: Path, data_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = TrialPipeline.student

    def student_failing_when_sparse(self: TrialPipeline, candidate: Any, *args: Any, **kwargs: Any) -> Any:
        if candidate.sparsity > 0:
            raise RuntimeError("distillation diverged (injected)")
        return original(self, candidate, *args, **kwargs)

    monkeypatch.setattr(TrialPipeline, "student", student_failing_when_sparse)
    # The teacher's shape, dense or 50% sparse: the anchors (dense fp32, int8) come first and must complete.
    knobs = {"layers": [2], "hidden": [32], "heads": [4], "ffn": [64], "sparsity": [0.0, 0.5], "bits": [32, 8]}
    result = api.tune(make_spec(teacher_dir, data_csv, trials=6, knobs=knobs), out=tmp_path / "run")
    failed = [t for t in result.trials if t["state"] == "FAIL"]
    assert failed, "precondition: the seeded sampler proposes a sparse candidate"
    assert all(t["candidate"]["sparsity"] > 0 for t in failed)
    assert all(t["stage"] == "failed" and "distillation diverged (injected)" in t["error"] for t in failed)
    assert len(result.trials) == 6
    assert [t["state"] for t in result.trials[:2]] == ["COMPLETE", "COMPLETE"]
    assert result.recommended is not None and result.recommended["candidate"]["sparsity"] == 0.0


@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_a_custom_metric_replaces_accuracy(teacher_dir: Path, data_csv: Path, tmp_path: Path) -> None:
    """tune(metric=f) optimises f(labels, logits); here a metric that is 1 - accuracy, so it must differ."""
    seen: list[tuple[int, int]] = []

    def error_rate(labels: np.ndarray, logits: np.ndarray) -> float:
        seen.append((len(labels), logits.shape[1]))
        return float((logits.argmax(axis=1) != labels).mean())

    knobs = {"layers": [2], "hidden": [32], "heads": [4], "ffn": [64], "sparsity": [0.0], "bits": [32]}
    result = api.tune(make_spec(teacher_dir, data_csv, trials=1, knobs=knobs), out=tmp_path / "run", metric=error_rate)
    assert result.data["metric"] == "error_rate" and seen and all(width == 2 for _, width in seen)
    teacher_trial = result.trials[0]
    assert teacher_trial["accuracy"] == pytest.approx(result.data["baseline"]["accuracy"]["validation"])
    assert teacher_trial["accuracy"] < 0.5  # an error rate of a teacher that learnt the data, not its accuracy
    assert "error_rate validation" in (tmp_path / "run" / "report.md").read_text()


# -- bad input through the CLI: exit 2, one sentence, no traceback ----------------------------------------

def bad_inputs(teacher: Path, data: Path, tmp: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (spec file, extra command-line arguments, a phrase the error must contain)."""
    good = make_spec(teacher, data)
    wrong_column = write_csv(tmp / "wrong-column.csv", synthetic_rows(40), label_column="sentiment")
    three_labels = write_csv(tmp / "three-labels.csv", [(text, 2) for text, _ in synthetic_rows(40)])
    empty = tmp / "empty.csv"
    empty.write_text("", encoding="utf-8")
    latin1 = tmp / "latin1.csv"
    latin1.write_bytes("text,label\ncaf\u00e9 was good,1\n".encode("latin-1"))
    no_config = tmp / "no-config"
    no_config.mkdir()
    unsupported = tmp / "gpt2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    other_threads = tmp / "other-threads.json"
    other_threads.write_text(collect_profile(7, microbench=False).to_json(), encoding="utf-8")
    with_data = lambda path: {**good, "data": {**good["data"], "path": str(path)}}  # noqa: E731
    with_target = lambda **fields: {**good, "target": {**good["target"], **fields}}  # noqa: E731
    cases: dict[str, tuple[dict[str, Any] | str, list[str], str]] = {
        "yaml syntax": ("name: tiny\ntarget: {latency_ms: 5\n", [], "line"),
        "unknown key": ({**good, "search": {"trails": 3}}, [], "did you mean 'trials'"),
        "wrong type": (with_target(batch_size="one"), [], "target.batch_size"),
        "latency not positive": (with_target(latency_ms=0), [], "target.latency_ms"),
        "percentile over 100": (with_target(percentile=101), [], "target.percentile"),
        "batch size < 1": (with_target(batch_size=0), [], "target.batch_size"),
        "seq len < 1": (with_target(seq_len=0), [], "target.seq_len"),
        "trials < 1": ({**good, "search": {"trials": 0}}, [], "search.trials"),
        "trials option < 1": (good, ["--trials", "0"], "positive integer"),
        "model missing": ({**good, "model": {"path": str(tmp / "no-model")}}, [], "does not exist"),
        "model not loadable": ({**good, "model": {"path": str(no_config)}}, [], "Cannot load a model config"),
        "architecture unsupported": ({**good, "model": {"path": str(unsupported)}}, [], "gpt2"),
        "data missing": (with_data(tmp / "no-data.csv"), [], "no-data.csv"),
        "data empty": (with_data(empty), [], "is empty"),
        "column missing": (with_data(wrong_column), [], "no column 'label'"),
        "data not UTF-8": (with_data(latin1), [], "not UTF-8"),
        "labels beyond num_labels": (with_data(three_labels), [], "num_labels is 2"),
        "storage malformed": (good, ["--storage", "not a database"], "is not a database URL"),
        "storage driver unknown": (good, ["--storage", "nosuchdb://alice:s3cret@db.example/x"], "nosuchdb://alice:***@db.example/x"),
        "database unreachable": (good, ["--storage", "postgresql+psycopg://alice:s3cret@127.0.0.1:1/db"], "host 127.0.0.1:1"),
        "journal directory missing": (good, ["--storage", f"journal:{tmp / 'nowhere' / 'study.log'}"], "existing directory"),
        # /proc refuses new directories even to root (CI runs as root, for whom permission bits mean nothing).
        "output not writable": (good, ["--out", "/proc/autotune-run"], "cannot be created"),
        "profile missing": (good, ["--profile", str(tmp / "absent.json")], "absent.json does not exist"),
        "profile of other threads": (good, ["--profile", str(other_threads)], "autotune profile --threads 1 -o FILE"),
    }
    files: dict[str, tuple[Path, list[str], str]] = {}
    for name, (spec, extra, phrase) in cases.items():
        path = tmp / f"{name.replace(' ', '-')}.yaml"
        if isinstance(spec, str):
            path.write_text(spec, encoding="utf-8")
        else:
            write_spec(path, spec)
        files[name] = (path, extra, phrase)
    return files | {"spec missing": (tmp / "absent.yaml", [], "does not exist")}


BAD_INPUTS = ["spec missing", "yaml syntax", "unknown key", "wrong type", "latency not positive", "percentile over 100",
              "batch size < 1", "seq len < 1", "trials < 1", "trials option < 1", "model missing", "model not loadable",
              "architecture unsupported", "data missing", "data empty", "column missing", "data not UTF-8",
              "labels beyond num_labels", "storage malformed", "storage driver unknown", "database unreachable",
              "journal directory missing", "output not writable", "profile missing", "profile of other threads"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_sentence_and_exit_2(
    case: str, teacher_dir: Path, data_csv: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    spec, extra, phrase = bad_inputs(teacher_dir, data_csv, tmp_path)[case]
    out = [] if "--out" in extra else ["--out", tmp_path / "run"]
    try:
        code = tune_cli(spec, *out, *extra)
    except SystemExit as exit_info:  # argparse refuses an option before the command runs
        code = exit_info.code
    assert code == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert phrase in err and "Traceback" not in err and "s3cret" not in err


# -- hardware: a study keeps its first worker's fingerprint ------------------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_a_study_from_other_hardware_is_refused_unless_mixing_is_allowed_and_then_kept_apart(
    teacher_dir: Path, data_csv: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("hardware_fingerprint", "other-machine-0")
    teacher_shape = {"layers": 2, "hidden": 32, "heads": 4, "ffn": 64, "sparsity": 0.0, "bits": 32}
    study.add_trial(optuna.create_trial(values=[0.99, 0.01], user_attrs={
        "hardware_fingerprint": "other-machine-0", "stage": "evaluated", "feasible": True, "accuracy": 0.99,
        "accuracy_is_placeholder": False, "latency_ms": 0.01, "candidate": teacher_shape}))
    knobs = {"layers": [2], "hidden": [32], "heads": [4], "ffn": [64], "sparsity": [0.0], "bits": [32]}
    spec = write_spec(tmp_path / "spec.yaml", make_spec(teacher_dir, data_csv, trials=2, knobs=knobs))

    capfd.readouterr()
    assert tune_cli(spec, "--out", out, "--resume") == 2
    err = capfd.readouterr().err
    assert "other-machine-0" in err and "--allow-mixed-hardware" in err and len(err.strip().splitlines()) == 1

    assert tune_cli(spec, "--out", out, "--resume", "--allow-mixed-hardware") == 0
    data = result_json(out)
    assert [t["number"] for t in data["other_hardware_trials"]] == [0]
    assert [t["number"] for t in data["trials"]] == [1]  # the foreign trial used the budget, was not compared
    assert data["recommended"]["number"] == 1 and 0 not in data["pareto"]
    assert data["trials"][0]["hardware_fingerprint"] == data["hardware"]["fingerprint"]
    assert "other hardware" in (out / "report.md").read_text() and "other-machine-0" in (out / "report.html").read_text()


def test_passwords_never_shown_in_commands_and_urls() -> None:
    from autotune.cli import shown_command
    from autotune.study import redact

    url = "postgresql+psycopg://alice:s3cret@db.example:5432/studies"
    assert redact(url) == "postgresql+psycopg://alice:***@db.example:5432/studies"
    assert redact("journal:/tmp/study.log") == "journal:/tmp/study.log"
    shown = shown_command(["autotune", "tune", "spec.yaml", "--storage", url, f"--storage={url}",
                           f"--set=search.storage={url}", "--set", "data.limit=20"])
    assert "s3cret" not in shown and shown.count("alice:***@db.example") == 3 and "data.limit=20" in shown


@pytest.mark.slow
@pytest.mark.usefixtures("machine_profiles")
def test_the_study_loads_in_optuna_dashboard_with_named_objectives_and_attributes(feasible_run: Path) -> None:
    """What a user watching a run with `optuna-dashboard sqlite:///runs/NAME/study.db` sees, through its own API."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    app = optuna_dashboard.wsgi(f"sqlite:///{feasible_run / 'study.db'}")

    def get(path: str, query: str = "") -> dict[str, Any]:
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        environ.update(PATH_INFO=path, QUERY_STRING=query)
        status: list[str] = []
        body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
        assert status == ["200 OK"], body[:300]
        return json.loads(body)

    summary = get("/api/studies")["study_summaries"][0]
    assert summary["study_name"] == "tiny"
    study = get(f"/api/studies/{summary['study_id']}", "after=0")
    assert study["objective_names"] == ["accuracy", "latency_ms"]  # from study.set_metric_names
    for trial in study["trials"]:
        attrs = {a["key"] for a in trial["user_attrs"]}
        # optuna-dashboard 0.21 reads constraints where Optuna 4 kept them, not Optuna 5's set_constraint: the
        # `feasible` and `latency_ms` attributes carry the verdict there.
        assert {"stage", "feasible", "accuracy", "latency_ms", "candidate", "size_mb"} <= attrs


def test_a_spec_s_state_transfer_caches_the_teacher_s_states_and_trains_students_on_them(
        teacher_dir: Path, data_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = make_spec(teacher_dir, data_csv)
    spec["training"] |= {"state_weight": 1.0, "teacher_epochs": 1}
    task = prepared_task(load_spec(spec))
    assert isinstance(task, TextClassification) and task.last_states is not None
    assert task.last_states.shape == (sum(task.train.lengths), task.teacher.config.hidden_size)
    assert list((tmp_path / "cache" / "logits").glob("teacher-states-*.npy"))
    candidate = Candidate(layers=1, hidden=task.teacher.config.hidden_size // 2, heads=2, ffn=32)
    student = task.distil(task.make_student(candidate), candidate, epochs=1, lr=1e-3, seed=0, pruning=None)
    assert student.config.hidden_size == candidate.hidden  # the projection trained alongside is not part of it
