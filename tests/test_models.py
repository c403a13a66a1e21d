"""load_classifier: supported families load with a head, everything else fails with one clear sentence."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from autotune.models import FAMILIES, ModelError, family_of, load_classifier, shape_of, state_fingerprint
from conftest import tiny_config, write_tokenizer


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_loads_each_supported_family_in_eval_mode(tiny_model_dirs: dict[str, Path], family: str) -> None:
    model, tokenizer, new_head = load_classifier(tiny_model_dirs[family], num_labels=2)
    assert family_of(model) is FAMILIES[family]
    assert shape_of(model).layers == 2 and shape_of(model).hidden == 32
    assert not model.training
    assert tokenizer is not None and not new_head


def test_headless_checkpoint_gets_a_fresh_head_and_a_log_line(tmp_path: Path, caplog) -> None:
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tiny_config("bert")).save_pretrained(tmp_path, safe_serialization=True)
    write_tokenizer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="autotune.models"):
        model, _, new_head = load_classifier(tmp_path, num_labels=3)
    assert model.classifier.out_features == 3 and new_head
    assert model(input_ids=torch.tensor([[2, 5, 3]])).logits.shape == (1, 3)
    assert any("new head" in record.getMessage() for record in caplog.records)


def test_unsupported_architecture_is_refused_in_one_sentence(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as error:
        load_classifier(tmp_path, num_labels=2)
    message = str(error.value)
    assert "gpt2" in message and "bert, distilbert, roberta" in message
    assert message.endswith(".") and ". " not in message and "\n" not in message


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError, match="nowhere.*does not exist"):
        load_classifier(missing, num_labels=2)


def test_directory_without_config_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_classifier(tmp_path, num_labels=2)


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    model, _, new_head = load_classifier(tiny_model_dirs["bert"], num_labels=2)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    write_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="safetensors"):
        load_classifier(tmp_path, num_labels=2)
    loaded, _, _ = load_classifier(tmp_path, num_labels=2, allow_pickle=True)
    assert state_fingerprint(loaded) == state_fingerprint(model)


def test_trust_remote_code_is_logged(tiny_model_dirs: dict[str, Path], caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="autotune.models"):
        load_classifier(tiny_model_dirs["bert"], num_labels=2, trust_remote_code=True)
    assert any("trust_remote_code" in record.getMessage() for record in caplog.records)
