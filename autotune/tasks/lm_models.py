"""Causal language models as local Hugging Face directories (safetensors weights, config.json, tokenizer files).

`prepare_causal_lm` accepts a directory (checked, returned as is), a `.gguf` file, or `builtin:SmolLM2-135M-Instruct`
(the GGUF that `autotune fetch` caches). A GGUF is converted once: transformers dequantizes its weights to fp32,
they are copied into a fresh model of the same class (the GGUF-loaded one refuses `save_pretrained`) and saved with
safetensors, together with the tokenizer, into `<cache>/models/<sha256 prefix of the file>-hf/`, published by one
rename; later calls return that directory.

Supported architectures are those the ONNX Runtime GenAI builder exports through one code path (its
`create_model` dispatches llama, mistral and qwen2 to the same base builder). GPT-2 is not in its list, so it is not
here either.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from autotune.builtin import PREFIX, resolve_model
from autotune.caches import cache_root, cached_dir, file_hash
from autotune.models import ModelError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
#: `general.architecture` of a GGUF file -> the transformers class it loads as.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: `tokenizer.ggml.pre` values whose original Hugging Face tokenizer splits digits one by one before its byte-level
#: step, a step transformers' GGUF tokenizer drops (checked for SmolLM2; other families stay as transformers reads them).
DIGIT_SPLITTING_PRE = ("smollm",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def prepare_causal_lm(path: str | Path, cache_dir: Path | None = None) -> Path:
    """A local causal-LM directory for `path`: a checked directory as is, a GGUF (or builtin name) converted once into
    `cache_dir` (default `<cache root>/models`)."""
    if str(path).startswith(PREFIX):
        path = resolve_model(str(path))
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_dir():
        return check_causal_lm_dir(path)
    if path.suffix.lower() != ".gguf":
        raise ModelError(f"model path {path} must be a Hugging Face model directory or a .gguf file")
    return convert_gguf(path, cache_dir or cache_root() / "models")


def check_causal_lm_dir(directory: Path) -> Path:
    """`directory` when it holds a supported causal LM with safetensors weights and a tokenizer, else ModelError."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise ModelError(f"{directory} has no config.json, so it is not a Hugging Face model directory")
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (ValueError, AttributeError):
        raise ModelError(f"{config_file} is not a JSON object") from None
    if not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES:
        found = architectures[0] if architectures else "none"
        raise ModelError(f"{directory} holds architecture {found}; causal LMs supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if not any(directory.glob("*.safetensors")):
        pickles = sorted(file.name for file in directory.glob("*.bin"))
        held = f"only pickle weights ({', '.join(pickles)}), which are not loaded" if pickles else "no weights"
        raise ModelError(f"{directory} has {held}; save the model with safetensors (save_pretrained(..., safe_serialization=True))")
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model")
    return directory


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF file's `general.architecture` and `tokenizer.ggml.pre` (None when absent), read from its header."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
    except Exception as err:  # the reader raises ValueError, struct.error, OSError... on a file that is not GGUF
        raise ModelError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    return {"architecture": value("general.architecture"), "pre": value("tokenizer.ggml.pre")}


def check_gguf_architecture(path: Path, architecture: Any) -> str:
    """The transformers class name for a GGUF's architecture, or ModelError naming it and the supported ones."""
    if architecture not in GGUF_ARCHITECTURES:
        supported = ", ".join(f"{name} ({cls})" for name, cls in GGUF_ARCHITECTURES.items())
        raise ModelError(f"{path} holds architecture {architecture or 'none'}; GGUF causal LMs supported: {supported}")
    return GGUF_ARCHITECTURES[architecture]


def convert_gguf(path: Path, cache_dir: Path) -> Path:
    """The cached Hugging Face directory of a GGUF file, converted (once) when absent. A cache hit costs one sha256
    pass over the file (0.1 s for SmolLM2); otherwise the header is read (3 s: the reader parses the whole vocabulary)
    and the architecture checked before the slow load."""
    final = cache_dir / f"{file_hash(path)[:16]}-hf"
    if (final / "config.json").exists():
        return final
    meta = gguf_metadata(path)
    check_gguf_architecture(path, meta["architecture"])

    def build(staging: Path) -> None:
        started = time.perf_counter()
        log.info("converting %s to a safetensors model in %s (once)", path.name, final)
        save_gguf_as_hf(path, staging, split_digits=meta["pre"] in DIGIT_SPLITTING_PRE)
        for item in [staging, *staging.iterdir()]:  # temporary files are private; the cache is shared by the machine's users
            item.chmod(0o755 if item.is_dir() else 0o644)
        log.info("converted %s in %.1f s", path.name, time.perf_counter() - started)

    cached_dir(final, "config.json", build)
    return final


def save_gguf_as_hf(path: Path, out: Path, split_digits: bool = False) -> None:
    """Dequantize a GGUF to fp32 and save it (safetensors) with its tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as err:
        raise ModelError(f"{path} could not be loaded by transformers ({type(err).__name__}: {err})") from None
    model = unquantized_copy(loaded)
    if split_digits:
        restore_digit_splitting(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def unquantized_copy(loaded: Any) -> Any:
    """A fresh model of `loaded`'s class and config, minus its `quantization_config`, holding the same weights."""
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model.eval()


def restore_digit_splitting(tokenizer: Any) -> bool:
    """Put `Digits(individual_digits=True)` in front of a fast tokenizer's pre-tokenizer, as the original SmolLM
    tokenizer has it; False (unchanged) when it already splits digits. Only non-ASCII digits (`²`, `١`, `①`) tokenize
    differently without it: SmolLM2's vocabulary has no token with an ASCII digit beside another character."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    current = backend.pre_tokenizer
    if current is not None and "Digits(individual_digits=True)" in repr(current):
        return False
    steps = [pre_tokenizers.Digits(individual_digits=True)] + ([current] if current is not None else [])
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return True
