"""Predicting with a deployed model directory: the API (`load_model`) and `autotune predict`, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotune.cli import main
from autotune.predict import load_model

LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def model_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT exported with label names and quantized to int8, as a tuned model directory is."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from autotune.compress.quantization import quantize_artifact
    from autotune.runtime import export_artifact

    out = tmp_path_factory.mktemp("predict")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    plain = export_artifact(model, AutoTokenizer.from_pretrained(tiny_bert_dir), out / "plain", labels=LABELS)
    return quantize_artifact(plain, out / "model", bits=8).dir


def test_the_directory_is_hugging_face_shaped_with_label_names(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"] == {"negative": 0, "positive": 1}
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 32
    assert json.loads((model_dir / "artifact.json").read_text())["labels"] == list(LABELS)


def test_predictions_name_labels_and_do_not_depend_on_batching(model_dir: Path) -> None:
    model = load_model(model_dir, threads=1)
    texts = [f"the {'good' if i % 2 else 'bad'} movie was {'fun ' * (i % 7)}" for i in range(70)] + [""]
    together = model.predict(texts, batch_size=32)
    alone = [model.predict([text], batch_size=1)[0] for text in texts]
    assert [p.text for p in together] == texts and {p.label for p in together} <= set(LABELS)
    assert [p.label for p in together] == [p.label for p in alone]
    assert [p.score for p in together] == pytest.approx([p.score for p in alone], abs=1e-4)
    assert all(0.5 <= p.score <= 1.0 for p in together)
    assert model.predict([]) == []


def test_the_command_prints_one_line_per_text_and_skips_blank_lines(model_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("a good film\n\n   \na bad film\n", encoding="utf-8")
    assert main(["predict", str(model_dir), "great fun", "--file", str(lines), "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in out] == ["great fun", "a good film", "a bad film"]
    assert all(line.split("\t")[0] in LABELS and 0.5 <= float(line.split("\t")[1]) <= 1 for line in out)


@pytest.mark.parametrize(("args", "fragment"), [
    (["predict", "/nonexistent/model", "text"], "is not a model directory autotune wrote"),
    (["predict", "{model}"], "give texts to label"),
    (["predict", "{model}", "--file", "/nonexistent/texts.txt"], "cannot read --file"),
])
def test_bad_input_is_one_sentence_and_exit_2(model_dir: Path, args: list[str], fragment: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(model=model_dir) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
