"""The recommendation rule against a target that binds: real artifacts of two speeds, re-measured in one child
process alternating with the baseline, judged by the upper confidence bound of their latency percentile.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from autotune.records import Stage, TrialRecord
from autotune.selection import choose_recommendation, judge
from autotune.session import measurement_noise
from autotune.tasks import Timed
from autotune.trial import Target, TrialPipeline
from profilers.isolated import OnnxRequest, measure_onnx_interleaved
from profilers.latency import summarize


def stats_of(samples: list[float]):
    return summarize(samples, converged=True, seconds=1.0, batch_size=1, threads=1, peak_rss_delta_bytes=0)


def target_of(latency_ms: float, baseline_p50_ms: float | None = None) -> Target:
    return Target(latency_ms, 95, 1, 64, 1, "onnxruntime", "cpu", baseline_p50_ms=baseline_p50_ms)


def test_judge_separates_meets_within_noise_and_over() -> None:
    steady = stats_of([1.0 + 0.001 * i for i in range(300)])  # p95 ~1.28 ms, upper bound ~1.29 ms
    p95, (_, upper) = steady.p95_ms, steady.bounds_ms(95)
    assert judge(steady, target_of(upper * 1.06), steady, 0.05)[0] == "meets"
    verdict, why = judge(steady, target_of((p95 + upper) / 2), steady, 0.0)
    assert verdict == "within noise" and "upper bound" in why
    assert judge(steady, target_of(p95 * 0.9), steady, 0.0)[0] == "over"


def test_a_relative_target_moves_with_the_baseline_measured_beside_the_candidate() -> None:
    """A host a third slower in the selection's minutes slows the teacher too: the speedup asked for still holds."""
    candidate = stats_of([1.3 + 0.001 * i for i in range(300)])  # p95 ~1.58 ms
    baseline_then, baseline_now = stats_of([3.0] * 300), stats_of([4.0] * 300)
    relative, absolute = target_of(1.2, baseline_p50_ms=baseline_then.p50_ms), target_of(1.2)
    assert relative.latency_ms_beside(baseline_then) == 1.2
    assert relative.latency_ms_beside(baseline_now) == pytest.approx(1.6)
    verdict, why = judge(candidate, relative, baseline_now, 0.05)
    assert verdict == "within noise" and "the 1.20 ms target at the baseline's pace in these minutes, +33%" in why
    assert judge(candidate, absolute, baseline_now, 0.0)[0] == "over"  # a figure the user fixed does not move
    assert judge(candidate, relative, baseline_then, 0.0)[0] == "over"
    faster_host = stats_of([1.5] * 300)
    assert relative.latency_ms_beside(faster_host) == pytest.approx(0.6)  # the pace tightens it as well


def test_a_paced_target_s_noise_is_the_tail_s_spread_over_the_median() -> None:
    """Two minutes of one model, the second a third slower throughout: all pace, no change of shape."""
    minutes = [stats_of([10.0] * 280 + [12.0] * 20), stats_of([13.0] * 280 + [15.6] * 20)]
    assert measurement_noise(minutes, 95, paced=False) == pytest.approx(0.3)
    assert measurement_noise(minutes, 95, paced=True) == pytest.approx(0.0)
    burst = stats_of([13.0] * 280 + [19.5] * 20)  # the same pace, a heavier tail
    assert measurement_noise([minutes[0], burst], 95, paced=True) == pytest.approx(0.25)


def test_a_percentile_with_few_samples_has_a_wide_interval() -> None:
    few, many = stats_of([1.0 + 0.01 * i for i in range(20)]), stats_of([1.0 + 0.01 * (i % 20) for i in range(400)])
    assert few.bounds_ms(95)[1] == max(few.bounds_ms(95)) == 1.19  # with 20 runs p95's upper bound is the maximum
    assert many.bounds_ms(95)[1] - many.bounds_ms(95)[0] <= few.bounds_ms(95)[1] - few.bounds_ms(95)[0]


def export_shape(directory: Path, tiny_bert_dir: Path, layers: int, hidden: int) -> Path:
    """A random BERT of this shape exported to fp32 ONNX (shape decides latency, not weights)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import tiny_config
    from autotune.runtime import export_artifact

    config = tiny_config("bert")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, hidden, 4 * hidden
    config.max_position_embeddings = 128
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    return export_artifact(model, AutoTokenizer.from_pretrained(tiny_bert_dir), directory).dir


def published_copies(tmp_path: Path, tiny_bert_dir: Path, names) -> dict[str, Path]:
    """One tiny export copied under each name and published with its manifest (verified, not rebuilt): the fake
    timings below tell the copies apart by name."""
    import shutil

    from autotune.caches import write_manifest

    source = export_shape(tmp_path / "source", tiny_bert_dir, 1, 32)
    dirs = {name: shutil.copytree(source, tmp_path / name) for name in names}
    for directory in dirs.values():
        write_manifest(directory)
    return dirs


def recommend_between_twins(dirs: dict[str, Path], target: Target, time_together, notes: list[str] | None = None):
    """The recommendation between a refined student (0.85) and its searched twin (0.84), one shape, timed by
    `time_together`; `notes` hears what was passed over."""
    from autotune.runtime import load_artifact
    from search_spaces import Candidate

    task = SimpleNamespace(time_together=time_together, objective_name="accuracy")
    pipeline = TrialPipeline(SimpleNamespace(target=target, task=task))
    candidate = Candidate(layers=1, hidden=32, heads=4, ffn=64, bits=8).to_dict()
    records = [TrialRecord(number=1, state="COMPLETE", candidate=candidate, stage=stage, accuracy=accuracy,
                           latency_ms=1.5, artifact=str(dirs[name]))
               for stage, accuracy, name in ((Stage.REFINED, 0.85, "refined"), (Stage.EVALUATED, 0.84, "searched"))]
    return choose_recommendation(pipeline, load_artifact(dirs["baseline"]), records, margin=0.05,
                                 note=(notes if notes is not None else []).append)


@pytest.mark.slow
def test_the_more_accurate_but_slower_candidate_is_passed_over_with_its_reason_at_the_host_s_pace(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from autotune.runtime import load_artifact

    from autotune.caches import write_manifest

    slow = load_artifact(export_shape(tmp_path / "slow", tiny_bert_dir, 4, 128))
    fast = load_artifact(export_shape(tmp_path / "fast", tiny_bert_dir, 1, 32))
    for artifact in (slow, fast):
        write_manifest(artifact.dir)  # as the trial pipeline publishes its artifacts: verified, not rebuilt

    def timing(artifact, t, providers) -> OnnxRequest:
        return OnnxRequest(str(artifact.model_path), artifact.input_names, t.batch_size, t.seq_len, artifact.vocab_size, t.threads)

    probe = measure_onnx_interleaved([timing(a, SimpleNamespace(batch_size=1, seq_len=64, threads=1), ()) for a in (slow, fast)])
    # Binds, far from both: two thirds of the slow one's p95 and, on any host, several times the fast one's (a
    # shared CI host once put the fast one's upper bound within 5% of a geometric-mean target). The slow one is
    # small enough that its 1,800 alternating runs take seconds.
    target_ms = probe[0].p95_ms / 1.5
    assert probe[1].p95_ms < target_ms / 3
    # A relative target resolved while the host ran three times faster than now (as a shared host's pace moves
    # between the search and the selection): judged beside the baseline re-measured now, the speedup asked for is
    # what decides, so the target in these minutes is back near `target_ms`.
    target = Target(target_ms / 3, 95, 1, 64, 1, "onnxruntime", "cpu", baseline_p50_ms=probe[0].p50_ms / 3)
    def time_together(artifacts, t) -> list[Timed]:
        return [Timed({"latency": stats}) for stats in measure_onnx_interleaved([timing(a, t, ()) for a in artifacts])]

    ctx = SimpleNamespace(target=target, task=SimpleNamespace(time_together=time_together, objective_name="accuracy"))
    pipeline = TrialPipeline(ctx)
    records = [TrialRecord(number=n, state="COMPLETE", candidate=None, stage=Stage.EVALUATED, accuracy=accuracy,
                           latency_ms=target.latency_ms * 0.9, artifact=str(artifact.dir))  # both looked feasible in the search
               for n, accuracy, artifact in ((1, 0.9, slow), (2, 0.8, fast))]
    notes: list[str] = []
    choice = choose_recommendation(pipeline, slow, records, margin=0.05, note=notes.append)
    assert choice.recommended is not None and choice.recommended.number == 2 and choice.verdict == "meets"
    confirmation = choice.confirmation
    assert choice.target_ms == pytest.approx(target_ms * confirmation.baseline.p50_ms / probe[0].p50_ms)
    assert confirmation.measured.bounds_ms(95)[1] <= choice.target_ms * 0.95
    assert choice.recommended.latency_ms == confirmation.measured.p95_ms
    assert [p["number"] for p in choice.passed_over] == [1] and "over the" in choice.passed_over[0]["reason"]
    assert "target at the baseline's pace in these minutes" in choice.passed_over[0]["reason"]
    assert notes and notes[0].startswith("trial 1 (evaluated, accuracy 0.9000)")
    assert confirmation.baseline.runs == confirmation.measured.runs == 300  # alternating: the same minutes
    assert len(confirmation.speedups) == 3 and confirmation.baseline.p50_ms / confirmation.measured.p50_ms in confirmation.speedups
    assert confirmation.baseline.p95_ms / confirmation.measured.p95_ms in confirmation.tail_speedups
    low, high = choice.speedup_interval
    assert 1 < low <= choice.speedup <= high


def test_a_student_over_the_target_beside_the_baseline_is_not_refined_the_next_most_accurate_is(
        tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Refinement is the selection's costliest step: it goes to the most accurate student that still meets the target
    re-measured beside the teacher, not to one that met it alone in a slower minute of the search."""
    from autotune.runtime import load_artifact
    from autotune.selection import finalists
    from search_spaces import Candidate

    p50_ms = {"baseline": 10.0, "edge": 3.6, "fits": 2.0, "teacher": 2.0, "far": 2.0}  # the edge one: over, beside it
    dirs = published_copies(tmp_path, tiny_bert_dir, p50_ms)
    calls: list[list[str]] = []

    def time_together(artifacts, t) -> list[Timed]:
        calls.append([a.dir.name for a in artifacts])
        return [Timed({"latency": stats_of([p50_ms[a.dir.name]] * 300)}) for a in artifacts]

    def candidate(layers: int) -> dict:
        return Candidate(layers=layers, hidden=32, heads=4, ffn=64, bits=8).to_dict()

    target = target_of(3.0, baseline_p50_ms=10.0)
    task = SimpleNamespace(time_together=time_together, is_teacher=lambda c: c.layers == 6)
    pipeline = TrialPipeline(SimpleNamespace(target=target, task=task))
    searched = stats_of([2.5] * 300).__dict__
    records = [TrialRecord(number=n, state="COMPLETE", candidate=candidate(layers), stage=Stage.EVALUATED,
                           accuracy=accuracy, latency_ms=latency_ms, latency=searched, artifact=str(dirs[name]))
               for n, name, layers, accuracy, latency_ms in ((0, "teacher", 6, 0.95, 2.5), (1, "far", 5, 0.94, 9.0),
                                                              (2, "edge", 4, 0.93, 2.9), (3, "fits", 2, 0.90, 2.5))]
    chosen = finalists(pipeline, load_artifact(dirs["baseline"]), records, 1, margin=0.05)
    assert [r.number for r in chosen] == [3]
    assert calls == [["baseline", "edge"], ["baseline", "fits"]]  # the teacher and the one far over: never measured


@pytest.mark.parametrize("alone_ms, refined", [(3.2, 2), (2.95, 1)])
def test_a_student_within_noise_beside_the_baseline_is_confirmed_alone_and_not_refined_if_it_is_over(
        tmp_path: Path, tiny_bert_dir: Path, alone_ms: float, refined: int) -> None:
    """A full-width student at the target's edge once passed the re-measurement within noise, was refined for
    minutes, then measured over: within noise, a finalist is confirmed alone first, as a recommendation is. One the
    confirmation puts within noise again stays a finalist (requiring "meets" outright, under a 15% noise margin,
    passed over the student the selection then recommended with 26% headroom)."""
    from autotune.runtime import load_artifact
    from autotune.selection import finalists
    from search_spaces import Candidate

    dirs = published_copies(tmp_path, tiny_bert_dir, ("baseline", "edge", "fits"))
    target = target_of(3.0, baseline_p50_ms=10.0)
    baseline, fits = stats_of([10.0] * 300), stats_of([2.0] * 300)
    edge_in_batch, edge_alone = stats_of([2.9] * 300), stats_of([alone_ms] * 300)  # within noise (over 3.0 x 0.95)
    assert judge(edge_in_batch, target, baseline, 0.05)[0] == "within noise"
    calls: list[list[str]] = []

    def time_together(artifacts, t) -> list[Timed]:
        names = [a.dir.name for a in artifacts]
        calls.append(names)
        edge = edge_in_batch if len(calls) == 1 else edge_alone
        return [Timed({"latency": {"baseline": baseline, "edge": edge, "fits": fits}[n]}) for n in names]

    def candidate(layers: int) -> dict:
        return Candidate(layers=layers, hidden=32, heads=4, ffn=64, bits=8).to_dict()

    task = SimpleNamespace(time_together=time_together, is_teacher=lambda c: c.layers == 6)
    pipeline = TrialPipeline(SimpleNamespace(target=target, task=task))
    searched = stats_of([2.5] * 300).__dict__
    records = [TrialRecord(number=n, state="COMPLETE", candidate=candidate(layers), stage=Stage.EVALUATED,
                           accuracy=accuracy, latency_ms=2.5, latency=searched, artifact=str(dirs[name]))
               for n, name, layers, accuracy in ((1, "edge", 4, 0.93), (2, "fits", 2, 0.90))]
    chosen = finalists(pipeline, load_artifact(dirs["baseline"]), records, 1, margin=0.05)
    assert [r.number for r in chosen] == [refined]
    confirmed = [["baseline", "edge"], *[["baseline", "edge"]] * 3]
    assert calls == (confirmed + [["baseline", "fits"]] if refined == 2 else confirmed)


def test_a_candidate_within_noise_in_the_batch_is_confirmed_alone_and_recommended_when_it_meets(
        tmp_path: Path, tiny_bert_dir: Path) -> None:
    """A refined student and its searched twin share a shape: one wide interval in the shared batch must not hand the
    recommendation to the less accurate twin."""


    dirs = published_copies(tmp_path, tiny_bert_dir, ("baseline", "refined", "searched"))
    wide = stats_of([1.0] * 280 + [1.7 + 0.7 * i / 19 for i in range(20)])  # p95 under 2 ms, its upper bound over 1.9
    steady, teacher = stats_of([1.0] * 300), stats_of([8.0] * 300)
    target = target_of(2.0)
    assert judge(wide, target, teacher, 0.05)[0] == "within noise" and judge(steady, target, teacher, 0.05)[0] == "meets"
    batches: list[list[str]] = []

    def time_together(artifacts, t) -> list[Timed]:
        names = [a.dir.name for a in artifacts]
        batches.append(names)
        in_batch = len(names) > 2  # the shared batch; a confirmation is one candidate with the baseline
        return [Timed({"latency": teacher if n == "baseline" else wide if in_batch and n == "refined" else steady})
                for n in names]

    choice = recommend_between_twins(dirs, target, time_together)
    assert choice.recommended is not None and choice.recommended.stage == Stage.REFINED and choice.verdict == "meets"
    assert batches[0] == ["baseline", "refined", "searched"] and batches[1:] == [["baseline", "refined"]] * 3


@pytest.mark.parametrize("second_confirmation, recommended_stage", [("steady", Stage.REFINED), ("wide", Stage.EVALUATED)])
def test_a_refined_student_within_noise_is_confirmed_again_when_its_searched_twin_meets_the_target(
        tmp_path: Path, tiny_bert_dir: Path, second_confirmation: str, recommended_stage: Stage) -> None:
    """A refined student's confirmation met the target only within noise, its searched twin's (same shape, a minute
    later) met it: demo 19 and the CI's quick demo recommended the less accurate twin. Their latency is one latency,
    so the refined one is confirmed again in the twin's minutes, and recommended if that meets the target."""
    dirs = published_copies(tmp_path, tiny_bert_dir, ("baseline", "refined", "searched"))
    stats = {"wide": stats_of([1.0] * 280 + [1.7 + 0.7 * i / 19 for i in range(20)]), "steady": stats_of([1.0] * 300)}
    teacher, target = stats_of([8.0] * 300), target_of(2.0)
    alone = {"refined": ["wide"] * 3 + [second_confirmation] * 3, "searched": ["steady"] * 3}
    order: list[str] = []

    def time_together(artifacts, t) -> list[Timed]:
        names = [a.dir.name for a in artifacts]
        if len(names) > 2:  # the shared batch: both within noise there
            return [Timed({"latency": teacher if n == "baseline" else stats["wide"]}) for n in names]
        order.append(names[1])
        return [Timed({"latency": teacher}), Timed({"latency": stats[alone[names[1]].pop(0)]})]

    notes: list[str] = []
    choice = recommend_between_twins(dirs, target, time_together, notes)
    assert notes and notes[0].startswith("trial 1 (refined") and "meets only within noise" in notes[0]
    assert notes[0].endswith(": not recommended yet")  # it may be, when its twin's confirmation meets the target
    assert choice.recommended is not None and choice.recommended.stage == recommended_stage
    assert choice.verdict == "meets" and choice.reconfirmed == (recommended_stage == Stage.REFINED)
    assert order == ["refined"] * 3 + ["searched"] * 3 + ["refined"] * 3
