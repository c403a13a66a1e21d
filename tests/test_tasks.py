"""autotune.tasks: reading labelled text, splits, per-batch padding, metrics, and evaluation through a runtime."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_rows

from autotune.tasks import (
    DataError,
    LabeledTexts,
    accuracy,
    encode_batches,
    evaluate,
    load_labeled_texts,
    macro_f1,
    predict,
    predict_logits,
    split,
    subsample,
)


def _write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def reviews(synthetic_csv: Path) -> LabeledTexts:
    return load_labeled_texts(synthetic_csv, num_labels=2)


# --- reading ---------------------------------------------------------------------------------------------


def test_csv_reads_every_row_with_integer_labels(synthetic_csv: Path) -> None:
    data = load_labeled_texts(synthetic_csv, num_labels=2)
    rows = synthetic_rows(240)
    assert data.texts == tuple(t for t, _ in rows)
    assert data.labels == tuple(label for _, label in rows)
    assert data.label_names == ("0", "1")


def test_tsv_keeps_quote_characters_as_text(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.tsv", 'sentence\ty\n"quoted" start, with comma\t1\nplain\t0\n')
    data = load_labeled_texts(path, text_column="sentence", label_column="y")
    assert data.texts == ('"quoted" start, with comma', "plain")
    assert data.labels == (1, 0)


def test_jsonl_with_custom_columns_and_forced_format(tmp_path: Path) -> None:
    lines = [{"review": "great fun", "stars": 1}, {"review": "dull", "stars": 0}]
    path = _write(tmp_path / "d.txt", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = load_labeled_texts(path, text_column="review", label_column="stars", fmt="jsonl")
    assert data.texts == ("great fun", "dull") and data.labels == (1, 0)


def test_string_labels_map_in_sorted_order_and_mapping_is_returned(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\nc,neutral\nd,pos\n")
    data = load_labeled_texts(path)
    assert data.label_names == ("neg", "neutral", "pos")
    assert data.labels == (2, 0, 1, 2)
    assert [data.label_names[i] for i in data.labels] == ["pos", "neg", "neutral", "pos"]


def test_given_label_names_fix_the_mapping_for_a_second_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "eval.csv", "text,label\na,pos\nb,pos\n")
    assert load_labeled_texts(path).labels == (0, 0)
    assert load_labeled_texts(path, label_names=("neg", "pos")).labels == (1, 1)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\ncafé,1\n".encode("utf-8-sig"))
    assert load_labeled_texts(path).texts == ("café",)


def test_empty_texts_are_skipped_with_a_logged_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path / "d.csv", 'text,label\ngood,1\n"",0\n  ,1\nbad,0\n')
    with caplog.at_level(logging.WARNING, logger="autotune.tasks.data"):
        data = load_labeled_texts(path)
    assert data.texts == ("good", "bad")
    assert "skipped 2 rows" in caplog.text and str(path) in caplog.text


BAD_INPUTS = {
    "missing file": (None, {}, ["does not exist"]),
    "empty file": ("", {}, ["is empty"]),
    "header only": ("text,label\n", {}, ["no data rows"]),
    "no text column": ("sentence,label\na,1\n", {}, ["'text'", "'sentence'", "'label'"]),
    "no label column": ("text,y\na,1\n", {}, ["'label'", "'y'"]),
    "label out of range": ("text,label\na,0\nb,2\n", {"num_labels": 2}, ["'label'", "line 3", "0..1"]),
    "negative label": ("text,label\na,-1\n", {}, ["'label'", "-1"]),
    "too many string labels": ("text,label\na,x\nb,y\nc,z\n", {"num_labels": 2}, ["'label'", "3 classes"]),
    "unknown given label": ("text,label\na,x\n", {"label_names": ("y",)}, ["'label'", "'x'"]),
    "empty label": ("text,label\na,\n", {}, ["'label'", "line 2"]),
    "unquoted comma": ("text,label\nthe film, sadly,0\n", {}, ["line 2", "3 fields", "unquoted ','"]),
    "all texts empty": ('text,label\n"",1\n', {}, ["'text'", "empty"]),
    "unknown format": ("text,label\na,1\n", {"fmt": "parquet"}, ["'parquet'", "csv, tsv, jsonl"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_csv_input_names_file_and_field(tmp_path: Path, case: str) -> None:
    content, kwargs, fragments = BAD_INPUTS[case]
    path = tmp_path / "bad.csv"
    if content is not None:
        _write(path, content)
    with pytest.raises(DataError) as err:
        load_labeled_texts(path, **kwargs)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_non_utf8_file_says_so_with_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8: byte 0xe9 at offset 14") as err:
        load_labeled_texts(path)
    assert str(path) in str(err.value)


def test_unknown_extension_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.xlsx", "x")
    with pytest.raises(DataError, match=r"'\.xlsx'") as err:
        load_labeled_texts(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        ('{"text": "a"}', ["line 1", "'label'", "'text'"]),
        ("not json", ["line 1", "not valid JSON"]),
        ('["a", 1]', ["line 1", "not an object"]),
        ('{"text": "a", "label": 1.5}', ["'label'", "1.5"]),
        ('{"text": 3, "label": 1}', ["'text'", "not a string"]),
    ],
)
def test_bad_jsonl_input_names_file_line_and_field(tmp_path: Path, line: str, fragments: list[str]) -> None:
    path = _write(tmp_path / "bad.jsonl", line + "\n")
    with pytest.raises(DataError) as err:
        load_labeled_texts(path)
    assert str(path) in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


# --- splits ----------------------------------------------------------------------------------------------


def _imbalanced(n: int = 300) -> LabeledTexts:
    labels = tuple(i % 10 // 7 for i in range(n))  # 70% class 0, 30% class 1
    return LabeledTexts(texts=tuple(f"t{i}" for i in range(n)), labels=labels, label_names=("0", "1"))


def test_split_is_disjoint_complete_and_sized() -> None:
    data = _imbalanced()
    parts = split(data, validation=0.1, test=0.2, seed=3)
    sets = [set(p.texts) for p in (parts.train, parts.validation, parts.test)]
    assert [len(s) for s in sets] == [210, 30, 60]
    assert set.union(*sets) == set(data.texts)
    assert sum(len(s) for s in sets) == len(data)


def test_split_is_stratified() -> None:
    parts = split(_imbalanced(), validation=0.1, test=0.2, seed=1)
    for part in (parts.train, parts.validation, parts.test):
        share = Counter(part.labels)[1] / len(part)
        assert abs(share - 0.3) <= 1 / len(part)


def test_split_is_deterministic_per_seed_and_differs_across_seeds(reviews: LabeledTexts) -> None:
    assert split(reviews, seed=5) == split(reviews, seed=5)
    assert split(reviews, seed=5).validation.texts != split(reviews, seed=6).validation.texts


def test_split_zero_fraction_means_no_such_split(reviews: LabeledTexts) -> None:
    parts = split(reviews, validation=0.2, test=0.0)
    assert len(parts.test) == 0 and len(parts.train) == 192


@pytest.mark.parametrize(("validation", "test"), [(0.001, 0.1), (0.5, 0.5), (1.2, 0.1), (0.1, -0.1)])
def test_split_refuses_fractions_that_leave_a_split_empty(validation: float, test: float) -> None:
    with pytest.raises(ValueError):
        split(_imbalanced(), validation=validation, test=test)


def test_subsample_is_stratified_seeded_and_in_input_order() -> None:
    data = _imbalanced()
    small = subsample(data, 50, seed=2)
    assert len(small) == 50 and Counter(small.labels) == {0: 35, 1: 15}
    assert small == subsample(data, 50, seed=2) and small != subsample(data, 50, seed=3)
    positions = [data.texts.index(t) for t in small.texts]
    assert positions == sorted(positions)
    assert subsample(data, 10_000) is data


# --- batching --------------------------------------------------------------------------------------------


def test_batches_pad_to_their_longest_member_and_indices_restore_order(tokenizer, reviews: LabeledTexts) -> None:
    texts = reviews.texts[:70]
    batches = encode_batches(tokenizer, texts, batch_size=16, max_length=64)
    assert [len(b) for b in batches] == [16, 16, 16, 16, 6]
    for batch in batches:
        lengths = batch.attention_mask.sum(axis=1)
        assert batch.input_ids.shape == batch.attention_mask.shape == batch.token_type_ids.shape
        assert batch.input_ids.shape[1] == lengths.max()
        assert batch.input_ids.dtype == np.int64
        assert np.all(batch.input_ids[batch.attention_mask == 0] == tokenizer.pad_token_id)
    indices = np.concatenate([b.indices for b in batches])
    assert sorted(indices.tolist()) == list(range(len(texts)))
    for batch in batches:
        for row, mask, index in zip(batch.input_ids, batch.attention_mask, batch.indices):
            expected = tokenizer(texts[index], truncation=True, max_length=64)["input_ids"]
            assert row[: len(expected)].tolist() == expected
            assert mask.sum() == len(expected)


def test_sorting_by_length_pads_less_than_input_order_and_max_length(tokenizer, reviews: LabeledTexts) -> None:
    def padded(batches) -> int:
        return sum(b.input_ids.size for b in batches)

    sorted_cells = padded(encode_batches(tokenizer, reviews.texts, batch_size=16, max_length=64))
    unsorted = encode_batches(tokenizer, reviews.texts, batch_size=16, max_length=64, sort_by_length=False)
    assert np.concatenate([b.indices for b in unsorted]).tolist() == list(range(len(reviews)))
    assert sorted_cells < padded(unsorted) < len(reviews) * 64


def test_truncation_to_max_length(tokenizer) -> None:
    (batch,) = encode_batches(tokenizer, ["good " * 50, "bad"], batch_size=8, max_length=10)
    assert batch.input_ids.shape == (2, 10)


def test_feeds_are_filtered_to_the_runtime_inputs(tokenizer) -> None:
    (batch,) = encode_batches(tokenizer, ["good film"], batch_size=4, max_length=16)
    assert set(batch.feeds()) == {"input_ids", "attention_mask", "token_type_ids"}
    assert set(batch.feeds(["input_ids", "attention_mask"])) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="'pixel_values'"):
        batch.feeds(["input_ids", "pixel_values"])


# --- metrics ---------------------------------------------------------------------------------------------


def test_accuracy_by_hand() -> None:
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_macro_f1_on_an_imbalanced_case_by_hand() -> None:
    labels = [0] * 8 + [1] * 2
    preds = [0] * 8 + [0, 1]
    # class 0: tp 8, fp 1, fn 0 -> 16/17; class 1: tp 1, fp 0, fn 1 -> 2/3
    assert macro_f1(labels, preds, 2) == pytest.approx((16 / 17 + 2 / 3) / 2)
    assert accuracy(labels, preds) == 0.9
    # always predicting the majority: class 1 scores 0, macro-F1 falls while accuracy stays at 0.8
    assert macro_f1(labels, [0] * 10, 2) == pytest.approx((2 * 8 / (2 * 8 + 2)) / 2)


def test_macro_f1_leaves_out_a_class_absent_from_labels_and_predictions() -> None:
    assert macro_f1([0, 1, 1], [0, 1, 0], 3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    # class 2 only predicted: it counts, with F1 0
    assert macro_f1([0, 1], [0, 2], 3) == pytest.approx((1 + 0 + 0) / 3)
    with pytest.raises(ValueError, match="outside 0..1"):
        macro_f1([0, 2], [0, 1], 2)


# --- evaluation ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_bert_dir: Path, tokenizer):
    """The tiny model with weights spread wider and the classifier bias centred, so its predictions differ
    between texts: at the default init (std 0.02) every text gets the same class, and a padding bug could
    not change an accuracy computed from constant predictions."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)
        encoded = tokenizer([t for t, _ in synthetic_rows(64, seed=1)], padding=True, return_tensors="pt")
        logits = model(**encoded).logits
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return model


def _torch_runner(model):
    import torch

    def run(feeds):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()

    return run


def test_evaluate_matches_torch_padded_to_max_length(tiny_model, tokenizer, reviews: LabeledTexts) -> None:
    import torch

    data = reviews.select(range(120))
    encoded = tokenizer(list(data.texts), padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        reference_logits = tiny_model(**encoded).logits.numpy()
    reference_preds = reference_logits.argmax(axis=1)

    result = evaluate(_torch_runner(tiny_model), tokenizer, data, batch_size=16, max_length=64)
    preds = predict(_torch_runner(tiny_model), tokenizer, data.texts, batch_size=16, max_length=64)

    assert 0 < reference_preds.sum() < len(data), "the reference must predict both classes to test anything"
    np.testing.assert_allclose(
        predict_logits(_torch_runner(tiny_model), tokenizer, data.texts, batch_size=16, max_length=64),
        reference_logits,
        atol=1e-5,
    )
    np.testing.assert_array_equal(preds, reference_preds)
    assert result.accuracy == accuracy(data.labels, reference_preds)
    assert result.macro_f1 == macro_f1(data.labels, reference_preds, 2)
    assert result.n == 120 and result.seconds > 0


def test_evaluate_passes_only_the_named_inputs(tokenizer) -> None:
    seen: list[set[str]] = []

    def run(feeds):
        seen.append(set(feeds))
        return np.tile([[0.0, 1.0]], (len(feeds["input_ids"]), 1))

    data = LabeledTexts(texts=("good", "bad film", "fun"), labels=(1, 0, 1), label_names=("0", "1"))
    result = evaluate(run, tokenizer, data, batch_size=2, input_names=("input_ids", "attention_mask"))
    assert seen == [{"input_ids", "attention_mask"}] * 2
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.macro_f1 == pytest.approx((0 + 0.8) / 2)


def test_evaluate_refuses_logits_of_the_wrong_shape(tokenizer) -> None:
    data = LabeledTexts(texts=("good",), labels=(1,), label_names=("0", "1"))
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda feeds: np.zeros(2), tokenizer, data)
    with pytest.raises(ValueError, match="label 1"):
        evaluate(lambda feeds: np.zeros((1, 1)), tokenizer, data)
