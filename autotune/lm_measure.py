"""Measure a causal LM as deployed on this machine: perplexity and teacher agreement on held-out text, computed on
the ONNX artifact, and TTFT / decode latency with peak memory in a clean child process.

This is the causal-LM counterpart of timing and scoring one encoder artifact: `autotune measure-lm` and
`bench/llm_operators.py` call it for the teacher in fp32 and for each compressed variant, so every row of a
comparison is built, scored and timed the same way, from the exports `autotune.tasks.lm_exports` caches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autotune.runtime.genai import CALIBRATED, LMArtifact, WeightOnly
from autotune.tasks.lm_exports import LMShape, cached_export, max_positions
from autotune.tasks.lm_quality import LMScore, score_lm
from profilers.generation import GenerationRequest, GenerationStats, measure_generation


@dataclass(frozen=True)
class LMMeasurement:
    """One artifact's row: its name, quality on the validation windows, generation latency and size on disk."""

    name: str
    score: LMScore
    generation: GenerationStats
    size_bytes: int

    def row(self) -> dict[str, Any]:
        """The flat JSON row the bench and `measure-lm --json` print."""
        return {"name": self.name, "ppl": self.score.perplexity, "agreement": self.score.agreement,
                "ttft_ms": self.generation.ttft.p50_ms, "ttft_p95_ms": self.generation.ttft.p95_ms,
                "decode_ms": self.generation.decode.p50_ms, "decode_p95_ms": self.generation.decode.p95_ms,
                "peak_mb": self.generation.peak_rss_bytes / 2**20, "size_mb": self.size_bytes / 2**20}


def measure_artifact(name: str, artifact: LMArtifact, windows: np.ndarray, shape: LMShape, threads: int,
                     vocab_size: int, reference: np.ndarray | None = None, runs: int = 10) -> LMMeasurement:
    """Score `artifact` on `windows` (agreement against `reference`, a teacher's predictions) and time it in a
    child process at `shape`."""
    score = score_lm(artifact.directory, windows, reference=reference, threads=threads)
    request = GenerationRequest(str(artifact.directory), prompt_len=shape.prompt_len, context_len=shape.context_len,
                                threads=threads, vocab_size=vocab_size, runs=runs)
    return LMMeasurement(name, score, measure_generation(request), artifact.size_bytes)


#: Windows of training text GPTQ calibrates on.
CALIBRATION_WINDOWS = 16


def split_windows(hf_dir: Path, text: str, column: str | None, split: str, window: int, limit: int) -> np.ndarray:
    """The first `limit` windows of `window` tokens of one split of the text, as the model tokenizes it."""
    from transformers import AutoTokenizer

    from autotune.tasks.lm_text import load_text, token_windows

    documents = getattr(load_text(text, column=column), split)
    return token_windows(AutoTokenizer.from_pretrained(hf_dir), documents, window, limit=limit).numpy()


def measure_model(model: str, text: str, weights: WeightOnly | None, *, column: str | None = None,
                  prompt_len: int = 128, context_len: int = 256, window: int = 256, windows: int = 12,
                  threads: int = 1, progress=lambda line: None) -> list[LMMeasurement]:
    """The fp32 model's row and, given `weights`, the quantized variant's (its accuracy level set by this CPU's
    recipe), each scored on the validation split and timed in a child process. Every user mistake (model, text,
    lengths) surfaces before the first export."""
    from autotune.tasks.lm_models import prepare_causal_lm

    progress(f"preparing {model}")
    hf_dir = prepare_causal_lm(model)
    shape = LMShape(prompt_len, context_len, window).check(max_positions(hf_dir))
    data = split_windows(hf_dir, text, column, "validation", window, windows)
    calibrated = weights is not None and weights.method in CALIBRATED
    calibration = split_windows(hf_dir, text, column, "train", window, CALIBRATION_WINDOWS) if calibrated else None
    vocab_size = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    progress(f"{len(data)} validation windows of {window} tokens; exporting fp32")
    teacher = measure_artifact("teacher-fp32", cached_export(hf_dir, None), data, shape, threads, vocab_size)
    if weights is None:
        return [teacher]
    progress(f"exporting {weights.name} (accuracy level {weights.accuracy_level})")
    variant = measure_artifact(weights.name, cached_export(hf_dir, weights, calibration), data, shape, threads,
                               vocab_size, reference=teacher.score.predictions)
    return [teacher, variant]
