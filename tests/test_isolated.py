"""profilers.isolated: ONNX timing in a child process, and DESIGN's promise that it makes a latency measured
right after training equal to one measured in a fresh process on a quiet machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import VOCAB
from profilers.isolated import (INTERLEAVED_BLOCK_RUNS, MeasurementError, OnnxRequest, feeds_for, measure_onnx_interleaved,
                                measure_onnx_isolated)
from profilers.latency import LatencyStats, MeasureSettings, measure_onnx

SEQ_LEN = 64
THREADS = 2  # every core of the 2-core box: the setting where a spinning pool would hurt most
SETTINGS = MeasureSettings(warmup=10, min_runs=50, max_runs=2000, max_seconds=2.0)
# The failure the child process exists to prevent (idle OpenMP workers spinning after training) inflates latencies
# 3-5x on a 2-core box. A shared host's drift between the quiet references and the measurement after training
# reached 1.3x on fresh-clone runs (1.077 ms against a 0.83 ms quiet reference), so the bound is 2x: above the
# drift, well under the effect.
TOLERANCE = 1.0


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...]]:
    """A 2-layer, 128-wide BERT classifier exported to ONNX: about a millisecond a call, long enough to time
    steadily, short enough to measure in a second or two."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from autotune.runtime.export import export_onnx

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128, num_labels=2)
    path = tmp_path_factory.mktemp("bert-onnx") / "model.onnx"
    names = export_onnx(BertForSequenceClassification(config).eval(), path)
    return path, tuple(names)


def request_for(path: Path, names: tuple[str, ...], *, threads: int = THREADS, batch_size: int = 1) -> OnnxRequest:
    return OnnxRequest(model_path=str(path), input_names=names, batch_size=batch_size, seq_len=SEQ_LEN,
                       vocab_size=len(VOCAB), threads=threads)


def test_stats_carry_the_requested_threads_and_batch(bert_onnx: tuple[Path, tuple[str, ...]]) -> None:
    path, names = bert_onnx
    stats = measure_onnx_isolated(request_for(path, names, threads=1, batch_size=3), MeasureSettings(min_runs=10, max_seconds=1.0))
    assert isinstance(stats, LatencyStats)
    assert stats.threads == 1 and stats.batch_size == 3
    assert stats.runs >= 10 and 0 < stats.p50_ms <= stats.p95_ms
    assert stats.throughput_items_per_s == pytest.approx(3 * 1000 / stats.p50_ms)  # items/s at the median


def test_interleaved_times_each_model_the_runs_asked_in_request_order(bert_onnx: tuple[Path, tuple[str, ...]]) -> None:
    path, names = bert_onnx
    runs = INTERLEAVED_BLOCK_RUNS + 7  # a last turn shorter than the others
    small, large = measure_onnx_interleaved([request_for(path, names), request_for(path, names, batch_size=8)], runs=runs)
    assert small.runs == large.runs == runs
    assert (small.batch_size, large.batch_size) == (1, 8)
    assert large.p50_ms > small.p50_ms  # eight sequences a call against one: the order of `requests` is kept


@pytest.mark.parametrize("requests, runs", [([], 10), (None, 0)])
def test_interleaved_refuses_no_models_or_no_runs(bert_onnx: tuple[Path, tuple[str, ...]], requests: list[OnnxRequest] | None,
                                                 runs: int) -> None:
    path, names = bert_onnx
    with pytest.raises(ValueError, match="at least one model" if requests == [] else "runs must be >= 1"):
        measure_onnx_interleaved(requests if requests is not None else [request_for(path, names)], runs=runs)


def test_missing_model_is_one_line_measurement_error(tmp_path: Path) -> None:
    request = request_for(tmp_path / "absent.onnx", ("input_ids",))
    with pytest.raises(MeasurementError) as caught:
        measure_onnx_isolated(request)
    message = str(caught.value)
    assert "\n" not in message and "absent.onnx" in message and "does not exist" in message


def test_feeds_for_builds_each_known_input_with_its_shape_and_dtype() -> None:
    feeds = feeds_for(("input_ids", "attention_mask", "token_type_ids"), batch_size=2, seq_len=7, vocab_size=30, seed=1)
    assert {name: (a.shape, a.dtype) for name, a in feeds.items()} == {
        name: ((2, 7), np.dtype(np.int64)) for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 30
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    again = feeds_for(("input_ids",), batch_size=2, seq_len=7, vocab_size=30, seed=1)
    np.testing.assert_array_equal(again["input_ids"], feeds["input_ids"])
    assert list(feeds_for(("input_ids", "attention_mask"), 1, 4, 30)) == ["input_ids", "attention_mask"]
    with pytest.raises(ValueError, match="pixel_values"):
        feeds_for(("input_ids", "pixel_values"), 1, 4, 30)
    with pytest.raises(ValueError, match="must be >= 1"):
        feeds_for(("input_ids",), 0, 4, 30)


def train_briefly(seconds: float, threads: int) -> None:
    """Train a small MLP with `threads` torch threads for about `seconds`, leaving torch's OpenMP pool warm,
    as a distillation leaves it right before the tuner times the student."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        inputs, labels = torch.randn(256, 512), torch.randint(0, 2, (256,))
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
def test_latency_after_training_equals_a_fresh_process(bert_onnx: tuple[Path, tuple[str, ...]]) -> None:
    path, names = bert_onnx
    request = request_for(path, names)
    quiet_before = measure_onnx_isolated(request, SETTINGS).p50_ms
    train_briefly(2.0, threads=THREADS)
    after_training = measure_onnx_isolated(request, SETTINGS).p50_ms
    train_briefly(2.0, threads=THREADS)
    feeds = feeds_for(names, 1, SEQ_LEN, len(VOCAB))
    in_process = measure_onnx(str(path), feeds, threads=THREADS, settings=SETTINGS).p50_ms
    time.sleep(1.0)
    quiet_after = measure_onnx_isolated(request, SETTINGS).p50_ms

    # The quiet references bracket the machine's drift over the test. Threads left spinning after training can
    # only make the figure slower, so that side is held to the tolerance; a faster figure only means the shared
    # machine got quieter during the test (seen here: 0.94 ms after training between two 1.5 ms references), so
    # that side only has to be the same order of magnitude.
    low, high = min(quiet_before, quiet_after), max(quiet_before, quiet_after)
    print(f"p50 ms: isolated quiet {quiet_before:.3f} / {quiet_after:.3f}, isolated right after training "
          f"{after_training:.3f}, in-process right after training {in_process:.3f} ({in_process / low - 1:+.0%} vs quiet)")
    assert low * 0.5 <= after_training <= high * (1 + TOLERANCE), (
        f"isolated p50 right after training {after_training:.3f} ms is outside the quiet range "
        f"{low / 2:.3f}-{high * (1 + TOLERANCE):.3f} ms")
    # The in-process figure is what isolation guards against. Whether training's leftover pool inflates it depends
    # on the machine (on a 2-core Zen 4 it read 0.85 ms against 1.1 ms isolated, so "never faster" would be a
    # flaky claim): it must be a measurement of the same model, within the quiet range's order of magnitude.
    assert low * 0.5 <= in_process <= high * 4, (
        f"in-process p50 {in_process:.3f} ms right after training is outside {low / 2:.3f}-{high * 4:.3f} ms")
