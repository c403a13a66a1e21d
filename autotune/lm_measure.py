"""Measure a causal LM as deployed on this machine: perplexity and teacher agreement on held-out text, computed on
the ONNX artifact, and TTFT / decode latency with peak memory in a clean child process.

This is the causal-LM counterpart of timing and scoring one encoder artifact: `autotune measure-lm` and
`bench/llm_operators.py` call it for the teacher in fp32 and for each compressed variant, so every row of a
comparison is built, scored and timed the same way. Exports are cached by what they depend on (the model's
weights, the weight-only scheme, the versions of the builder and ONNX Runtime), so a second run reuses them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autotune.caches import cache_root, cached_dir, key_of
from autotune.runtime.genai import CALIBRATED, LMArtifact, WeightOnly, export_causal_lm
from autotune.tasks.data import DataError
from autotune.tasks.lm_quality import LMScore, score_lm
from profilers.generation import GenerationRequest, GenerationStats, measure_generation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMShape:
    """The lengths a causal LM is measured at: a prompt of `prompt_len` tokens for TTFT, decode at a context of
    `context_len`, perplexity over windows of `window` tokens."""

    prompt_len: int = 128
    context_len: int = 256
    window: int = 256

    def check(self, max_positions: int) -> "LMShape":
        """This shape, or a DataError (one sentence, exit 2) when it cannot run on a model of `max_positions`."""
        for name in ("prompt_len", "context_len", "window"):
            if getattr(self, name) < 2:
                raise DataError(f"{name} must be at least 2 tokens, got {getattr(self, name)}")
        if self.prompt_len > self.context_len:
            raise DataError(f"the prompt ({self.prompt_len} tokens) is longer than the context ({self.context_len} "
                            "tokens): decode is timed after the prompt, so prompt_len must be <= context_len")
        longest = max(self.context_len + 32, self.window)
        if longest > max_positions:
            raise DataError(f"the model takes at most {max_positions} positions, but context_len + 32 decoded tokens "
                            f"or the window needs {longest}")
        return self


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


def weights_identity(hf_dir: Path) -> list[Any]:
    """What an export of `hf_dir` depends on: its config and each weight file's name, size and modification time
    (hashing hundreds of MB on every call would cost more than the cache saves)."""
    files = sorted(hf_dir.glob("*.safetensors"))
    return [(hf_dir / "config.json").read_text(encoding="utf-8"),
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def cached_export(hf_dir: Path, weights: WeightOnly | None, calibration: np.ndarray | None = None,
                  cache_dir: Path | None = None) -> LMArtifact:
    """The GenAI export of `hf_dir` at `weights` (GPTQ calibrated on `calibration`), built once per machine under
    `<cache root>/lm-exports`."""
    import hashlib

    import onnxruntime
    import onnxruntime_genai

    hf_dir = Path(hf_dir).resolve()
    calibrated = weights is not None and weights.method in CALIBRATED
    text = hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest() if calibrated else None
    key = key_of("lm-export", str(hf_dir), weights_identity(hf_dir), weights and weights.name,
                 weights and weights.accuracy_level, text, onnxruntime.__version__, onnxruntime_genai.__version__)
    final = (cache_dir or cache_root() / "lm-exports") / key
    hit = cached_dir(final, "genai_config.json",
                     lambda staging: export_causal_lm(hf_dir, staging, weights, calibration if calibrated else None))
    log.info("%s export of %s %s", weights.name if weights else "fp32", hf_dir, "reused" if hit else "built")
    return LMArtifact(final, weights)


def max_positions(hf_dir: Path) -> int:
    """The longest sequence the model was built for (config.json's max_position_embeddings)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 2048)


def measure_artifact(name: str, artifact: LMArtifact, windows: np.ndarray, shape: LMShape, threads: int,
                     vocab_size: int, reference: np.ndarray | None = None, runs: int = 10) -> LMMeasurement:
    """Score `artifact` on `windows` (agreement against `reference`, a teacher's predictions) and time it in a
    child process at `shape`."""
    score = score_lm(artifact.directory, windows, reference=reference, threads=threads)
    request = GenerationRequest(str(artifact.directory), prompt_len=shape.prompt_len, context_len=shape.context_len,
                                threads=threads, vocab_size=vocab_size, runs=runs)
    return LMMeasurement(name, score, measure_generation(request), artifact.size_bytes)


def accuracy_level_here() -> int:
    """MatMulNBits' compute type on this CPU, as the hardware recipe says (int8 activations where int8 dot
    products exist, fp32 otherwise)."""
    from profilers.cpu import probe_cpu
    from profilers.recipes import recipe_for

    return recipe_for(probe_cpu().flags).int4_accuracy_level


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
    import dataclasses

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
    weights = dataclasses.replace(weights, accuracy_level=accuracy_level_here())
    progress(f"exporting {weights.name} (accuracy level {weights.accuracy_level})")
    variant = measure_artifact(weights.name, cached_export(hf_dir, weights, calibration), data, shape, threads,
                               vocab_size, reference=teacher.score.predictions)
    return [teacher, variant]


def save_causal_lm(model: Any, teacher_dir: Path, out_dir: Path) -> Path:
    """A compressed model as a Hugging Face directory the builder exports: safetensors weights, its config, and
    the teacher's tokenizer files (a student reads text exactly as its teacher)."""
    import shutil

    from autotune.tasks.lm_models import TOKENIZER_FILES

    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "chat_template.jinja"):
        if (teacher_dir / name).exists():
            shutil.copy(teacher_dir / name, out_dir / name)
    return out_dir


def cached_causal_lm(teacher_dir: Path, key_parts: tuple[Any, ...], make, cache_dir: Path | None = None) -> Path:
    """The Hugging Face directory of `make()` (a model built from the teacher), saved once per machine under
    `<cache root>/lm-students`, keyed by the teacher's weights and `key_parts` (the operator and its settings)."""
    teacher_dir = Path(teacher_dir).resolve()
    final = (cache_dir or cache_root() / "lm-students") / key_of("lm-student", weights_identity(teacher_dir), *key_parts)
    cached_dir(final, "config.json", lambda staging: save_causal_lm(make(), teacher_dir, staging))
    return final
