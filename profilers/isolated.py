"""Time an ONNX model (or an OpenVINO IR) in a fresh child process, where no other thread pool can steal the cores.

In a tuning process, torch's OpenMP workers keep spinning for a while after training and other ORT sessions
may be alive; on a machine with few cores either inflates latencies several-fold, because they compete for the
same cores. A child process that imports only ONNX Runtime and numpy has nothing else running, is cheap to
start, and makes a latency measured right after training equal to one measured on a quiet machine. A request
names its engine: ONNX Runtime (the default) or OpenVINO, compiled as `profilers.openvino` says.

The child builds its own synthetic feeds (random token ids, full attention mask) from a small JSON request,
so nothing large crosses the process boundary; it answers with the LatencyStats as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from profilers.latency import LatencyStats, MeasureSettings


#: The engines a request may name.
ENGINES = ("onnxruntime", "openvino")


class MeasurementError(RuntimeError):
    """The child process could not measure the model; the message carries its last error line."""


@dataclass(frozen=True)
class OnnxRequest:
    """What to time: the model file (ONNX, or an OpenVINO IR when `engine` is "openvino"), the synthetic input shape,
    and how."""

    model_path: str
    input_names: tuple[str, ...]
    batch_size: int
    seq_len: int
    vocab_size: int
    threads: int
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    seed: int = 0
    engine: str = "onnxruntime"


def feeds_for(input_names: Sequence[str], batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic int64 feeds of one shape: random token ids, a full attention mask, a single segment.

    Latency depends on shape, not on which tokens, so this is what the latency gate and benchmarks time.
    """
    if batch_size < 1 or seq_len < 1 or vocab_size < 1:
        raise ValueError(f"batch_size, seq_len and vocab_size must be >= 1, got {batch_size}, {seq_len}, {vocab_size}")
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    makers = {
        "input_ids": lambda: rng.integers(0, vocab_size, size=shape, dtype=np.int64),
        "attention_mask": lambda: np.ones(shape, dtype=np.int64),
        "token_type_ids": lambda: np.zeros(shape, dtype=np.int64),
    }
    unknown = [name for name in input_names if name not in makers]
    if unknown:
        raise ValueError(f"cannot synthesise inputs {unknown}; known inputs: {sorted(makers)}")
    return {name: makers[name]() for name in input_names}


def measure_onnx_isolated(request: OnnxRequest, settings: MeasureSettings = MeasureSettings(), timeout_s: float = 600) -> LatencyStats:
    """Run the measurement in `python -m profilers.isolated` and return its LatencyStats."""
    payload = json.dumps({"request": asdict(request), "settings": asdict(settings)})
    env = {**os.environ, "OMP_NUM_THREADS": str(request.threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "profilers.isolated"], input=payload, capture_output=True, text=True, timeout=timeout_s, env=env,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasurementError(f"measuring {request.model_path} failed in a child process: {last}")
    return LatencyStats(**json.loads(proc.stdout))


#: Timed runs per model in an interleaved measurement: enough that a p95 is the 285th of 300 samples, not the
#: maximum, and its confidence interval is a few ranks wide.
INTERLEAVED_RUNS = 300
#: Each model's turn in an interleaved measurement: this many runs in a row, the first SWITCH_WARMUP_RUNS untimed.
#: The first run after another model's is 5-10% slower at the median and 10-15% at p90 (its caches and its thread
#: pool gone cold: the demo's students beside the teacher, 2 cores); the second is back to steady state. A deployed
#: model serving requests does not pay that switch, and alternating single runs made small students look up to 20%
#: slower beside the teacher than alone.
INTERLEAVED_BLOCK_RUNS, SWITCH_WARMUP_RUNS = 20, 2


def measure_onnx_interleaved(requests: Sequence[OnnxRequest], runs: int = INTERLEAVED_RUNS, warmup: int = 10,
                             timeout_s: float = 900) -> list[LatencyStats]:
    """Time several models in one child process, taking turns (INTERLEAVED_BLOCK_RUNS runs each, warmed after each
    switch) until each has `runs` timed runs, every session with spinning off: the figures share the same minutes,
    so their ratios (speedups) are not the drift of a shared host between two measurements. Stats come back in the
    order of `requests`."""
    if not requests:
        raise ValueError("measure_onnx_interleaved needs at least one model")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    payload = json.dumps({"requests": [asdict(r) for r in requests], "runs": runs, "warmup": warmup})
    env = {**os.environ, "OMP_NUM_THREADS": str(requests[0].threads)}
    proc = subprocess.run([sys.executable, "-m", "profilers.isolated"], input=payload, capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasurementError(f"the interleaved measurement failed in a child process: {last}")
    return [LatencyStats(**stats) for stats in json.loads(proc.stdout)]


def _request(data: dict) -> OnnxRequest:
    request = OnnxRequest(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    if not Path(request.model_path).exists():
        raise SystemExit(f"model {request.model_path} does not exist")
    if request.engine not in ENGINES:
        raise SystemExit(f"engine must be one of {list(ENGINES)}, got {request.engine!r}")
    return request


def _runner(request: OnnxRequest) -> Callable[[dict[str, np.ndarray]], Any]:
    """One forward pass of the requested model in its engine, ready to call with feeds."""
    if request.engine == "openvino":
        from profilers.openvino import compile_openvino

        infer = compile_openvino(request.model_path, threads=request.threads).create_infer_request().infer
        return lambda feeds: infer(feeds)
    from profilers.ort import make_session

    session = make_session(request.model_path, threads=request.threads, providers=request.providers)
    return lambda feeds: session.run(None, feeds)


def _interleaved(requests: list[OnnxRequest], runs: int, warmup: int) -> list[dict]:
    import time

    from profilers.latency import summarize

    runners = [_runner(r) for r in requests]
    feeds = [feeds_for(r.input_names, r.batch_size, r.seq_len, r.vocab_size, r.seed) for r in requests]
    samples: list[list[float]] = [[] for _ in requests]
    start = time.perf_counter()
    for run, feed in zip(runners, feeds):
        for _ in range(warmup):
            run(feed)
    while len(samples[0]) < runs:
        for run, feed, timed in zip(runners, feeds, samples):
            for _ in range(SWITCH_WARMUP_RUNS):
                run(feed)
            for _ in range(min(INTERLEAVED_BLOCK_RUNS - SWITCH_WARMUP_RUNS, runs - len(timed))):
                began = time.perf_counter()
                run(feed)
                timed.append((time.perf_counter() - began) * 1000.0)
    seconds = time.perf_counter() - start
    return [asdict(summarize(timed, converged=True, seconds=seconds, batch_size=r.batch_size, threads=r.threads,
                             peak_rss_delta_bytes=0)) for r, timed in zip(requests, samples)]


def _child() -> None:
    from profilers.latency import measure_onnx, measure_pooled

    message = json.loads(sys.stdin.read())
    if "requests" in message:
        out = _interleaved([_request(r) for r in message["requests"]], message["runs"], message["warmup"])
        sys.stdout.write(json.dumps(out))
        return
    request = _request(message["request"])
    settings = MeasureSettings(**message["settings"])
    feeds = feeds_for(request.input_names, request.batch_size, request.seq_len, request.vocab_size, request.seed)
    if request.engine == "openvino":
        run = _runner(request)
        stats = measure_pooled(lambda: run(feeds), threads=request.threads, batch_size=request.batch_size, settings=settings)
    else:
        stats = measure_onnx(request.model_path, feeds, threads=request.threads, batch_size=request.batch_size,
                             providers=request.providers, settings=settings)
    sys.stdout.write(json.dumps(asdict(stats)))


if __name__ == "__main__":
    _child()
