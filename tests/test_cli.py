"""The command line as a user meets it: help, version, JSON output, and one-sentence errors with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune import __version__
from autotune.cli import main
from profilers.hardware import load_profile


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_profile_prints_valid_json_and_writes_a_loadable_file(tmp_path: Path) -> None:
    out = tmp_path / "box.json"
    result = run_cli("profile", "--quick", "--threads", "1", "--json", "-o", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cpu"]["logical_cores"] == os.cpu_count() and data["microbench"]["fp32_gemm_gflops"] > 0
    profile = load_profile(out)
    assert profile.threads == 1 and profile.microbench.threads == 1 and json.loads(profile.to_json()) == data
    assert profile.fingerprint in result.stderr


@pytest.mark.slow
def test_table_output_names_the_sections(machine_profiles: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The table of a measured profile (the session's, so that this test does not measure the machine again)."""
    import profilers

    measured = load_profile(sorted(machine_profiles.glob("*.json"))[0])
    monkeypatch.setattr(profilers, "collect_profile", lambda *args, **kwargs: measured)
    assert main(["profile", "--quick"]) == 0
    out = capsys.readouterr().out
    for fragment in ("Hardware profile", "ISA flags", "fp32_gemm_gflops", "GPUs"):
        assert fragment in out


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--quick", "--threads", "--rounds", "--interval", "--json", "--output"):
        assert option in help_text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["profile", "--threads", "0"], "from 1 to"),
        (["profile", "--threads", "many"], "must be an integer"),
        (["profile", "--threads", str((os.cpu_count() or 1) + 1)], "logical CPUs"),
        (["profile", "-o", "/nonexistent-dir/box.json"], "does not exist"),
        (["profile", "-o", "/"], "is a directory"),
        (["profile", "--bogus"], "unrecognized arguments"),
        (["profile", "--rounds", "0"], "must be a positive integer"),
        (["profile", "--rounds", "3", "--interval", "-5"], "must be a positive number"),
        (["profile", "--rounds", "3", "--interval", "soon"], "must be a positive number"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_unwritable_output_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new files even to root (CI runs as root, for whom os.access says yes to everything): refused
    # before the minutes of measuring, as a usage error of -o.
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--quick", "-o", "/proc/autotune-box.json"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "/proc/autotune-box.json" in err and "writable" in err
    assert "Traceback" not in err and "Profiling" not in err


def test_an_interval_without_rounds_to_wait_between_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--quick", "--interval", "60"]) == 2
    err = capsys.readouterr().err
    assert "--rounds 2 or more" in err and err.count("\n") == 1


def test_bad_input_through_the_console_script_has_no_traceback() -> None:
    result = run_cli("profile", "--threads", "0", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
