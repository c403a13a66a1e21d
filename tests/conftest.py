"""Shared fixtures: tiny random BERT-family models and synthetic labelled text, all made locally.

Nothing here touches a model hub: tokenizers are built from a vocabulary file written to a temp dir, and
models are initialised from configs (2 layers, hidden 32), so the whole suite stays fast on 2 CPU cores.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POSITIVE_WORDS = ["good", "great", "fine", "superb", "lovely", "fun", "moving", "smart"]
NEGATIVE_WORDS = ["bad", "awful", "dull", "boring", "weak", "messy", "flat", "silly"]
NEUTRAL_WORDS = ["the", "movie", "film", "plot", "story", "was", "a", "and", "cast", "it", "very", "quite"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL_TOKENS + POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS


def write_tokenizer(directory: Path) -> None:
    """A WordPiece tokenizer over the tiny vocabulary, saved as a fast tokenizer."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores vocab_file= on the fast tokenizer (every word would become [UNK]); pass the mapping.
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)


def tiny_config(family: str = "bert", num_labels: int = 2):
    """A 2-layer, hidden-32 config of the given family with 4 heads and FFN 64."""
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    common = dict(vocab_size=len(VOCAB), num_labels=num_labels, max_position_embeddings=128)
    if family == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **common)
    if family == "roberta":
        return RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, **common,
        )
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, pad_token_id=0, **common)
    raise ValueError(family)


def save_tiny_model(directory: Path, family: str = "bert", num_labels: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny classifier (safetensors) plus tokenizer into `directory`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels))
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    return directory


def save_headless_bert(directory: Path) -> Path:
    """A tiny BertModel saved without a classification head, so a run must fine-tune (and cache) a teacher first."""
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tiny_config("bert")).save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    return directory


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Short sentences whose label is carried by the sentiment words they contain (learnable, not trivial)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        cue = POSITIVE_WORDS if label == 1 else NEGATIVE_WORDS
        words = rng.sample(NEUTRAL_WORDS, rng.randint(2, 8)) + rng.sample(cue, rng.randint(1, 2))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]], text_column: str = "text", label_column: str = "label") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([text_column, label_column])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny saved classifier per supported family."""
    return {f: save_tiny_model(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in ("bert", "roberta", "distilbert")}


@pytest.fixture(scope="session")
def machine_profiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This machine's quick profile at every thread count the suite tunes at, in the folder $AUTOTUNE_PROFILE names
    for the whole session: each run then reads it instead of measuring the machine again (seconds a run). The slow
    tests that tune use it (`usefixtures`), so the fast tier never measures; the tests of the measured path unset
    the variable."""
    from profilers.cpu import probe_cpu
    from profilers.hardware import PROFILE_ENV, collect_profile, default_threads

    folder = tmp_path_factory.mktemp("profiles")
    for threads in sorted({1, default_threads(probe_cpu())}):
        (folder / f"threads-{threads}.json").write_text(collect_profile(threads, quick=True).to_json(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROFILE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", synthetic_rows(240))


#: Words of the tiny causal-LM corpus: plain lower-case words, so a word-level tokenizer covers every text.
LM_WORDS = ["to", "be", "or", "not", "the", "king", "queen", "night", "day", "love", "death", "sword", "crown",
            "speak", "hear", "my", "lord", "good", "sweet", "fair", "foul", "and", "is", "a", "of", "in", "thou", "art"]
LM_SPECIAL = ["<unk>", "<s>", "</s>"]


def write_lm_tokenizer(directory: Path) -> None:
    """A word-level fast tokenizer over LM_WORDS (<s>/</s> as bos/eos), the shape transformers and the ONNX Runtime
    GenAI builder read from a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(LM_SPECIAL + LM_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)


def tiny_llama_config(layers: int = 2, hidden: int = 32, ffn: int = 64):
    """A llama of `layers` blocks, `hidden` wide in heads of 16 over 1 KV head (grouped-query attention), FFN `ffn`.
    Heads are 16 wide: ONNX Runtime's CPU GroupQueryAttention needs head sizes that are multiples of 16."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(LM_SPECIAL) + len(LM_WORDS), hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=hidden // 16, num_key_value_heads=1,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


def save_tiny_llama(directory: Path, layers: int = 2, seed: int = 0, hidden: int = 32, ffn: int = 64) -> Path:
    """Save a randomly initialised tiny llama (safetensors) plus its tokenizer into `directory`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(layers, hidden, ffn))
    model.save_pretrained(directory, safe_serialization=True)
    write_lm_tokenizer(directory)
    return directory


def synthetic_lines(n: int, seed: int = 0) -> list[str]:
    """Lines of 4-12 words from LM_WORDS with a repeated pattern, so a model can learn something from them."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(LM_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small plain-text 'plays' (one file each), for splitting by document."""
    root = tmp_path_factory.mktemp("tiny-text")
    for index in range(4):
        (root / f"play-{index}.txt").write_text("\n".join(synthetic_lines(60, seed=index)) + "\n", encoding="utf-8")
    return root
