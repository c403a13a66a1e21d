"""`autotune measure-lm` as a user runs it: a tiny llama measured end to end, and every bad input one sentence on
stderr with exit status 2, before any export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotune.cli import main
from test_lm_models import write_tiny_gguf


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["measure-lm", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_sentence(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("autotune measure-lm: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_measure_lm_prints_fp32_and_int4_rows(tiny_llama_dir: Path, tiny_text_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = run(capsys, str(tiny_llama_dir), "--text", str(tiny_text_dir), "--bits", "4", "--block-size", "16",
                         "--prompt-len", "8", "--context-len", "32", "--window", "32", "--windows", "2", "--threads", "1",
                         "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [row["name"] for row in rows] == ["teacher-fp32", "int4-rtn-b16"]
    assert rows[0]["agreement"] is None and 0.0 <= rows[1]["agreement"] <= 1.0
    assert all(row["ppl"] > 1 and row["ttft_ms"] > 0 and row["decode_ms"] > 0 for row in rows)
    assert rows[1]["size_mb"] < rows[0]["size_mb"]


def test_a_gguf_of_an_unsupported_architecture(tmp_path: Path, tiny_text_dir: Path, capsys: pytest.CaptureFixture) -> None:
    gguf = write_tiny_gguf(tmp_path / "mamba.gguf", architecture="mamba")
    code, _, err = run(capsys, str(gguf), "--text", str(tiny_text_dir))
    assert_one_sentence(code, err, "mamba")


def test_an_empty_text_file(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(capsys, str(tiny_llama_dir), "--text", str(tmp_path / "empty.txt"))
    assert_one_sentence(code, err, "empty.txt")


def test_a_prompt_longer_than_the_context(tiny_llama_dir: Path, tiny_text_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, str(tiny_llama_dir), "--text", str(tiny_text_dir), "--prompt-len", "64", "--context-len", "32")
    assert_one_sentence(code, err, "longer than the context")


def test_a_context_beyond_the_model_s_positions(tiny_llama_dir: Path, tiny_text_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, str(tiny_llama_dir), "--text", str(tiny_text_dir), "--context-len", "4096")
    assert_one_sentence(code, err, "at most 512 positions")


@pytest.mark.parametrize("argv, fragment", [(["--bits", "6"], "--bits"), (["--method", "hqq"], "--method"),
                                            (["--bits", "8", "--method", "hqq"], "4 bits only"),
                                            (["--sensitive-int8"], "--sensitive-int8"),
                                            (["--bits", "8", "--sensitive-int8"], "in an int4 body"),
                                            (["--head-int8-rows", "64"], "--head-int8-rows"),
                                            (["--bits", "4", "--head-int8-rows", "0"], "--head-int8-rows"),
                                            (["--bits", "4", "--head-int8-rows", "64"], "with method 'rtn-offset'")])
def test_quantization_options_that_cannot_run(tiny_llama_dir: Path, tiny_text_dir: Path, capsys: pytest.CaptureFixture,
                                              argv: list[str], fragment: str) -> None:
    try:
        code = main(["measure-lm", str(tiny_llama_dir), "--text", str(tiny_text_dir), *argv])
    except SystemExit as exit_info:  # argparse's own checks (choices) exit directly
        code = exit_info.code
    assert code == 2
    assert fragment in capsys.readouterr().err
