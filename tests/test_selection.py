"""The recommendation rule against a target that binds: real artifacts of two speeds, re-measured in one child
process alternating with the baseline, judged by the upper confidence bound of their latency percentile.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from autotune.records import Stage, TrialRecord
from autotune.selection import choose_recommendation, judge
from autotune.tasks import Timed
from autotune.trial import Target, TrialPipeline
from profilers.isolated import OnnxRequest, measure_onnx_interleaved
from profilers.latency import summarize


def stats_of(samples: list[float]):
    return summarize(samples, converged=True, seconds=1.0, batch_size=1, threads=1, peak_rss_delta_bytes=0)


def test_judge_separates_meets_within_noise_and_over() -> None:
    steady = stats_of([1.0 + 0.001 * i for i in range(300)])  # p95 ~1.28 ms, upper bound ~1.29 ms
    p95, (_, upper) = steady.p95_ms, steady.bounds_ms(95)
    assert judge(steady, upper * 1.06, 95, 0.05)[0] == "meets"
    verdict, why = judge(steady, (p95 + upper) / 2, 95, 0.0)
    assert verdict == "within noise" and "upper bound" in why
    assert judge(steady, p95 * 0.9, 95, 0.0)[0] == "over"


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


@pytest.mark.slow
def test_the_more_accurate_but_slower_candidate_is_passed_over_with_its_reason(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from autotune.runtime import load_artifact

    from autotune.caches import write_manifest

    slow = load_artifact(export_shape(tmp_path / "slow", tiny_bert_dir, 6, 256))
    fast = load_artifact(export_shape(tmp_path / "fast", tiny_bert_dir, 1, 32))
    for artifact in (slow, fast):
        write_manifest(artifact.dir)  # as the trial pipeline publishes its artifacts: verified, not rebuilt

    def timing(artifact, t, providers) -> OnnxRequest:
        return OnnxRequest(str(artifact.onnx_path), artifact.input_names, t.batch_size, t.seq_len, artifact.vocab_size, t.threads)

    probe = measure_onnx_interleaved([timing(a, SimpleNamespace(batch_size=1, seq_len=64, threads=1), ()) for a in (slow, fast)])
    # Binds, far from both: half the slow one's p95 and, on any host, several times the fast one's (a shared CI
    # host once put the fast one's upper bound within 5% of a geometric-mean target).
    target_ms = probe[0].p95_ms / 2
    assert probe[1].p95_ms < target_ms / 3
    target = Target(target_ms, 95, 1, 64, 1, "onnxruntime", "cpu")
    def time_together(artifacts, t) -> list[Timed]:
        return [Timed({"latency": stats}) for stats in measure_onnx_interleaved([timing(a, t, ()) for a in artifacts])]

    ctx = SimpleNamespace(target=target, task=SimpleNamespace(time_together=time_together, objective_name="accuracy"))
    pipeline = TrialPipeline(ctx)
    records = [TrialRecord(number=n, state="COMPLETE", candidate=None, stage=Stage.EVALUATED, accuracy=accuracy,
                           latency_ms=target_ms * 0.9, artifact=str(artifact.dir))  # both looked feasible in the search
               for n, accuracy, artifact in ((1, 0.9, slow), (2, 0.8, fast))]
    notes: list[str] = []
    choice = choose_recommendation(pipeline, slow, records, margin=0.05, note=notes.append)
    assert choice.recommended is not None and choice.recommended.number == 2 and choice.verdict == "meets"
    confirmation = choice.confirmation
    assert confirmation.measured.bounds_ms(95)[1] <= target_ms * 0.95
    assert choice.recommended.latency_ms == confirmation.measured.p95_ms
    assert [p["number"] for p in choice.passed_over] == [1] and "over the" in choice.passed_over[0]["reason"]
    assert notes and notes[0].startswith("trial 1 (evaluated, accuracy 0.9000)")
    assert confirmation.baseline.runs == confirmation.measured.runs == 300  # alternating: the same minutes
    assert len(confirmation.speedups) == 3 and confirmation.baseline.p50_ms / confirmation.measured.p50_ms in confirmation.speedups
    assert confirmation.baseline.p95_ms / confirmation.measured.p95_ms in confirmation.tail_speedups
    low, high = choice.speedup_interval
    assert 1 < low <= choice.speedup <= high
