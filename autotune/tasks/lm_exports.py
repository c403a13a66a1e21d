"""A causal LM's exports and saved models, cached per machine: the lengths it is measured at (checked against the
model), the builder's ONNX Runtime GenAI export of a Hugging Face directory at a weight-only scheme, and a
compressed model saved beside its teacher's tokenizer for the builder to read.

Exports are cached by what they depend on (the model's weights, the weight-only scheme, the versions of the
builder and ONNX Runtime, the source of autotune's own rewrites of the builder's graph), so a second run, or `autotune measure-lm` after a tuning run, reuses them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autotune.caches import cache_root, cached_dir, key_of, source_identity
from autotune.runtime.genai import CALIBRATED, LMArtifact, WeightOnly, export_causal_lm
from autotune.tasks.data import DataError

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


def weights_identity(hf_dir: Path) -> list[Any]:
    """What an export of `hf_dir` depends on: its config and each weight file's name, size and modification time
    (hashing hundreds of MB on every call would cost more than the cache saves)."""
    files = sorted(hf_dir.glob("*.safetensors"))
    return [(hf_dir / "config.json").read_text(encoding="utf-8"),
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def cached_export(hf_dir: Path, weights: WeightOnly | None, calibration: np.ndarray | None = None,
                  cache_dir: Path | None = None, last_logits_only: bool = False) -> LMArtifact:
    """The GenAI export of `hf_dir` at `weights` (GPTQ calibrated on `calibration`; the prompt's LM head on its last
    token alone with `last_logits_only`, see `export_causal_lm`), built once per machine under
    `<cache root>/lm-exports`."""
    import hashlib

    import onnxruntime
    import onnxruntime_genai

    from autotune.runtime import genai, offset_grid

    hf_dir = Path(hf_dir).resolve()
    calibrated = weights is not None and weights.method in CALIBRATED
    text = hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest() if calibrated else None
    key = key_of("lm-export", str(hf_dir), weights_identity(hf_dir), weights and weights.name,
                 weights and weights.accuracy_level, text, onnxruntime.__version__, onnxruntime_genai.__version__,
                 source_identity(genai, offset_grid), last_logits_only)
    final = (cache_dir or cache_root() / "lm-exports") / key
    hit = cached_dir(final, "genai_config.json", lambda staging: export_causal_lm(
        hf_dir, staging, weights, calibration if calibrated else None, last_logits_only=last_logits_only))
    log.info("%s export of %s %s", weights.name if weights else "fp32", hf_dir, "reused" if hit else "built")
    return LMArtifact(final, weights)


def max_positions(hf_dir: Path) -> int:
    """The longest sequence the model was built for (config.json's max_position_embeddings)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 2048)


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
