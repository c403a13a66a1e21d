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
which tokens), and answers with JSON on stdout. Peak resident memory is the child's own high-water mark: the
model's weights, its KV cache and the runtime, as a deployment would see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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

    def to_dict(self) -> dict:
        """The JSON form (result files, bench output)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationStats":
        """Inverse of to_dict."""
        return cls(**{**data, "ttft": LatencyStats(**data["ttft"]), "decode": LatencyStats(**data["decode"])})


def measure_generation(request: GenerationRequest, timeout_s: float = 900) -> GenerationStats:
    """Run the measurement in `python -m profilers.generation` and return its GenerationStats."""
    env = {**os.environ, "OMP_NUM_THREADS": str(request.threads)}
    proc = subprocess.run([sys.executable, "-m", "profilers.generation"], input=json.dumps(asdict(request)),
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GenerationError(f"timing {request.model_dir} failed in a child process: {last}")
    return GenerationStats.from_dict(json.loads(proc.stdout))


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
    import numpy as np

    request = GenerationRequest(**json.loads(sys.stdin.read()))
    og, model = _model(request)
    tokens = np.random.default_rng(request.seed).integers(0, request.vocab_size, size=request.context_len).astype(np.int32)
    ttfts: list[float] = []
    decodes: list[float] = []
    start = time.perf_counter()
    for index in range(request.warmup + request.runs):
        ttft, decode = _one_run(og, model, tokens, request)
        if index >= request.warmup:
            ttfts.append(ttft)
            decodes.extend(decode)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    stats = {name: asdict(summarize(samples, converged=True, seconds=seconds, batch_size=1, threads=request.threads,
                                    peak_rss_delta_bytes=0))
             for name, samples in (("ttft", ttfts), ("decode", decodes))}
    sys.stdout.write(json.dumps({**stats, "peak_rss_bytes": peak, "prompt_len": request.prompt_len,
                                 "context_len": request.context_len}))


if __name__ == "__main__":
    _child()
