"""Time a causal LM as it generates: time to first token (prefill) and per-token decode, in a fresh child process.

A causal LM has two latencies that move in opposite directions under compression: prefill of a prompt is a
batch of GEMMs (compute-bound), decode of one token at a time is a chain of GEMVs over every weight (bandwidth-
bound). int4 weights make decode several times faster and can make prefill slower on a CPU. So both are timed,
each with its percentiles, the way a deployment runs them: ONNX Runtime GenAI's `Generator` with its KV cache.

- TTFT: `append_tokens` of a `prompt_len`-token prompt on a fresh generator (the prefill that yields the first
  token's logits).
- Decode: after a prefill of `context_len` tokens, each `generate_next_token` call is one forward pass of one
  token with a KV cache of about `context_len` (the first call after a prefill only samples from the logits the
  prefill computed, so it is not timed). After `decode_tokens` steps the generator is rewound to the context
  (`Generator.rewind_to`) and decodes again, `decode_rounds` times: one prefill then yields decode_rounds x
  decode_tokens samples at the same contexts. Prefill is most of a run's time, and a decode p95's confidence
  interval needs hundreds of samples: with 96 its upper bound is the sample maximum.

The child imports only onnxruntime-genai and numpy (see `profilers.isolated` for why timing never shares a
process with training), builds random token ids of the requested lengths (latency depends on lengths, not on
which tokens), and answers each command with a line of JSON on stdout. Models timed together each get their own
child and take turns of one run (`measure_generations`). Peak resident memory is the child's own high-water
mark: the model's weights, its KV cache and the runtime, as a deployment would see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from profilers.latency import LatencyStats, summarize


class GenerationError(RuntimeError):
    """The child process could not time the model; the message carries its last error line."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to time: the GenAI model directory, the prompt and context lengths, and how many runs.

    Each run times one prefill of `prompt_len` tokens and `decode_rounds` rounds of `decode_tokens` decode steps at
    a context of `context_len` tokens; so `runs` TTFT samples and `runs * decode_rounds * decode_tokens` decode
    samples.
    """

    model_dir: str
    prompt_len: int
    context_len: int
    threads: int
    vocab_size: int
    runs: int = 10
    decode_tokens: int = 16
    decode_rounds: int = 4
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.context_len < 1:
            raise ValueError(f"prompt_len and context_len must be >= 1, got {self.prompt_len} and {self.context_len}")
        if self.prompt_len > self.context_len:
            raise ValueError(f"prompt_len ({self.prompt_len}) is longer than context_len ({self.context_len}): the "
                             "prompt must fit in the context")
        if min(self.runs, self.decode_tokens, self.decode_rounds, self.threads, self.vocab_size) < 1:
            raise ValueError("runs, decode_tokens, decode_rounds, threads and vocab_size must be >= 1")

    @property
    def max_length(self) -> int:
        """The longest sequence a run reaches: the context, the untimed first step and a round's decoded tokens, plus
        one: after a rewind the sequence ends one token longer than before it (seen with onnxruntime-genai 0.18)."""
        return self.context_len + self.decode_tokens + 2


@dataclass(frozen=True)
class GenerationStats:
    """TTFT and per-token decode latency distributions, and the child's peak resident memory."""

    ttft: LatencyStats
    decode: LatencyStats
    peak_rss_bytes: int
    prompt_len: int
    context_len: int


def measure_generation(request: GenerationRequest, timeout_s: float = 900) -> GenerationStats:
    """Time one model generating, in its own child process (`python -m profilers.generation`)."""
    return measure_generations([request], timeout_s)[0]


def measure_generations(requests: Sequence[GenerationRequest], timeout_s: float = 900) -> list[GenerationStats]:
    """Time several models in the same minutes, each in its own child process, taking turns of one run each until
    every one has its `runs`: the ratios between them are then not the drift of a shared host between two
    measurements (sequential children a few seconds apart gave a speedup of 2.4x to 3.3x). Only one child generates at
    a time, so none competes for the cores, and each child's peak memory is its own model's, as deployed. Stats come
    back in the order of `requests`."""
    if not requests:
        raise ValueError("measure_generations needs at least one model")
    if len({r.runs for r in requests}) != 1:
        raise ValueError(f"models timed together take the same number of runs, got {[r.runs for r in requests]}")
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(_Child(request, timeout_s)) for request in requests]
        for child in children:
            child.load()  # one after another, then the turns
        runs = [[child.ask("run") for child in children] for _ in range(requests[0].runs)]
        peaks = [child.ask("stop")["peak_rss_bytes"] for child in children]
    return [_stats(request, [turn[index] for turn in runs], peak)
            for index, (request, peak) in enumerate(zip(requests, peaks))]


def _stats(request: GenerationRequest, runs: list[dict], peak: int) -> GenerationStats:
    seconds = sum(run["seconds"] for run in runs)
    ttft = [run["ttft"] for run in runs]
    decode = [sample for run in runs for sample in run["decode"]]
    summary = {name: summarize(samples, converged=True, seconds=seconds, batch_size=1, threads=request.threads,
                               peak_rss_delta_bytes=0) for name, samples in (("ttft", ttft), ("decode", decode))}
    return GenerationStats(summary["ttft"], summary["decode"], peak, request.prompt_len, request.context_len)


class _Child:
    """One model's child process, answering one JSON line per command line: the request (it loads the model and
    warms it up), "run" (one timed run), "stop" (its peak memory, then it exits). Killed after `timeout_s`."""

    def __init__(self, request: GenerationRequest, timeout_s: float) -> None:
        self.request = request
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "OMP_NUM_THREADS": str(request.threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "profilers.generation"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.watchdog = threading.Timer(timeout_s, self.proc.kill)
        self.watchdog.start()

    def __enter__(self) -> "_Child":
        return self

    def __exit__(self, *exc: object) -> None:
        self.watchdog.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()

    def load(self) -> dict:
        """Send the request: the child loads its model and warms it up before it answers."""
        return self.ask(json.dumps(asdict(self.request)))

    def ask(self, command: str) -> dict:
        """Send one command line and read the child's answer; a dead child is a GenerationError with its last line."""
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        if not answer:
            self.proc.wait()
            self.stderr.seek(0)
            last = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
            raise GenerationError(f"timing {self.request.model_dir} failed in a child process: {last}")
        return json.loads(answer)


def _model(request: GenerationRequest):
    import onnxruntime_genai as og

    config = og.Config(request.model_dir)
    config.clear_providers()  # CPU
    threads = {"intra_op_num_threads": request.threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    return og, og.Model(config)


def _one_run(og, model, tokens, request: GenerationRequest) -> tuple[float, list[float]]:
    """One TTFT sample (a fresh generator's prefill of the prompt) and `decode_rounds` x `decode_tokens` decode
    samples, rewinding to the context after each round."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=request.max_length, min_length=request.max_length, do_sample=False)
    generator = og.Generator(model, params)
    began = time.perf_counter()
    generator.append_tokens(tokens[: request.prompt_len])
    ttft = (time.perf_counter() - began) * 1000.0
    if request.context_len > request.prompt_len:
        generator.append_tokens(tokens[request.prompt_len: request.context_len])
    generator.generate_next_token()  # samples from the prefill's logits: no forward pass to time
    rewound = generator.token_count()
    decode = []
    for _ in range(request.decode_rounds):
        for _ in range(request.decode_tokens):
            began = time.perf_counter()
            generator.generate_next_token()
            decode.append((time.perf_counter() - began) * 1000.0)
        generator.rewind_to(rewound)
    return ttft, decode


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image, so it starts afresh at exec;
    `ru_maxrss` does not (it keeps the forking parent's peak: a child of a 3 GB process reads 3 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _child() -> None:
    """Serve `_Child`'s commands: the request line, then "run" lines, then "stop"."""
    import numpy as np

    request = GenerationRequest(**json.loads(sys.stdin.readline()))
    og, model = _model(request)
    tokens = np.random.default_rng(request.seed).integers(0, request.vocab_size, size=request.context_len).astype(np.int32)
    for _ in range(request.warmup):
        _one_run(og, model, tokens, request)
    _answer({"ready": True})
    for command in sys.stdin:
        if command.strip() == "stop":
            _answer({"peak_rss_bytes": peak_rss_bytes()})
            return
        began = time.perf_counter()
        ttft, decode = _one_run(og, model, tokens, request)
        _answer({"ttft": ttft, "decode": decode, "seconds": time.perf_counter() - began})


def _answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _child()
