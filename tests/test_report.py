"""The deployment report, rendered from a stored result.json of a tiny real run (tests/fixtures)."""

from __future__ import annotations

import copy
import os
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from autotune.cli import main
from autotune.report import build_report, write_report
from autotune.report.summary import (
    architecture, best_under, capacity, changed_targets, fp32_reference_text, one_line_answer, pareto_trials, roofline_pct,
)
from profilers.hardware import HardwareProfile
from profilers.predictor import ModelShape, Workload
from profilers.roofline import roofline

FIXTURE = Path(__file__).parent / "fixtures" / "result_tiny.json"


@pytest.fixture()
def result() -> dict:
    return json.loads(FIXTURE.read_text())


class Collector(HTMLParser):
    """Parses the page strictly enough to fail on broken nesting, and collects what a reader would see."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("meta", "img", "br"):
            self.stack.append(tag)
        attributes = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        for key in ("src", "href"):
            value = attributes.get(key) or ""
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html_text: str) -> Collector:
    collector = Collector()
    collector.feed(html_text)
    collector.close()
    assert not collector.stack, f"unclosed tags {collector.stack}"
    return collector


def test_html_holds_the_answer_and_the_plot_and_needs_nothing_online(result: dict, tmp_path: Path) -> None:
    html_path, md_path = write_report(result, tmp_path)
    page = parse(html_path.read_text())
    text = " ".join(page.text)
    assert one_line_answer(result) in text
    assert page.images and page.images[0].startswith("data:image/png;base64,")
    assert not page.external and page.scripts == 0
    for heading in ("Hardware and measurement settings", "Pareto front", "Planning for a changed target",
                    "Capacity of this machine", "Which knobs mattered", "Reproduce this run"):
        assert heading in text
    assert result["hardware"]["fingerprint"] in text


def test_markdown_references_an_image_that_exists(result: dict, tmp_path: Path) -> None:
    _, md_path = write_report(result, tmp_path)
    markdown = md_path.read_text()
    assert one_line_answer(result) in markdown
    image = markdown.split("](", 1)[1].split(")", 1)[0]
    assert (tmp_path / image).is_file() and (tmp_path / image).read_bytes().startswith(b"\x89PNG")


def test_strings_from_the_spec_are_escaped(result: dict, tmp_path: Path) -> None:
    result["name"] = "<script>alert('x')</script>"
    html_path, _ = write_report(result, tmp_path)
    html_text = html_path.read_text()
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert parse(html_text).scripts == 0


def test_one_line_answer_quotes_measured_figures(result: dict) -> None:
    rec = result["recommended"]
    answer = one_line_answer(result)
    assert f"{rec['latency_ms']:.2f} ms" in answer and f"{result['target']['latency_ms']:.2f} ms" in answer
    assert f"{rec['speedup']:.2f}x" in answer and "kept" in answer and "headroom" in answer


def test_the_answer_names_a_relative_target_moved_by_the_teacher_s_pace(result: dict) -> None:
    rec, resolved = result["recommended"], result["target"]["latency_ms"]
    paced = dict(result, recommended=dict(rec, target_ms=resolved * 1.25))
    answer = one_line_answer(paced)
    assert f"vs target {resolved * 1.25:.2f} ms (the {resolved:.2f} ms target at the teacher's pace beside it, +25%)" in answer
    assert f"({1 - rec['latency_ms'] / (resolved * 1.25):.0%} headroom)" in answer
    assert "teacher's pace" not in one_line_answer(dict(result, recommended=dict(rec, target_ms=resolved)))


def test_planning_figures_follow_from_the_trials(result: dict) -> None:
    options = changed_targets(result)
    assert [o.scale for o in options] == [0.5, 0.75, 1.5, 2.0]
    for option in options:
        if option.trial is not None:
            assert option.trial["latency_ms"] <= option.target_ms
    loosest = options[-1].trial
    assert loosest is not None and loosest == best_under(result, options[-1].target_ms)
    for trial in pareto_trials(result):
        cap = capacity(result, trial)
        assert cap.instances >= 1 and cap.requests_per_s == pytest.approx(cap.instances * cap.throughput_per_instance)


def test_no_feasible_configuration_is_said_first(result: dict, tmp_path: Path) -> None:
    failed = copy.deepcopy(result)
    failed["recommended"] = None
    failed["reason"] = "no candidate met the 0.01 ms target; closest: trial 1 at 0.20 ms (+1900%)"
    failed["pareto"] = []
    report = build_report(failed)
    assert report.sections[0].title == "No configuration met the target"
    assert report.answer.startswith("No configuration met")
    html_path, _ = write_report(failed, tmp_path)
    assert "No configuration met the target" in html_path.read_text()


def test_report_command(result: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file() and one_line_answer(result) in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "result.json").write_text("{nope")
    assert main(["report", str(broken)]) == 2
    assert "cannot be read" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                    reason="Debian's chromium is not installed (.ci/run installs it; under CI=true this test must run)")
def test_browser_renders_the_report_without_errors(result: dict, tmp_path: Path) -> None:
    assert CHROMIUM is not None, "chromium is required under CI=true"
    html_path, _ = write_report(result, tmp_path)
    screenshot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1400", "--enable-logging=stderr", "--v=0"]
    shot = subprocess.run([CHROMIUM, *flags, f"--screenshot={screenshot}", html_path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), shot.stderr[-2000:]
    console_errors = [line for line in shot.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors, console_errors
    from PIL import Image

    image = Image.open(screenshot).convert("L")
    low, high = image.getextrema()
    assert high - low > 100, "the screenshot is blank"
    histogram = image.histogram()
    assert sum(histogram[:200]) > 0.01 * sum(histogram), "almost nothing but background was drawn"



def test_the_front_shows_each_trial_s_roofline_and_the_fp32_reference_its_choice(result: dict) -> None:
    trial = pareto_trials(result)[0]
    c, bench = trial["candidate"], result["hardware"]["microbench"]
    pct = roofline_pct(result, trial)
    assert pct is not None and 0 < pct
    expected = roofline(ModelShape(c["layers"], c["hidden"], c["heads"], c["ffn"], c["bits"]),
                        Workload(result["target"]["batch_size"], result["target"]["seq_len"]), trial["latency"]["p50_ms"],
                        HardwareProfile.from_dict(result["hardware"]).microbench,
                        int4_int8_compute=(result.get("recipe") or {}).get("int4_accuracy_level") == 4)
    assert pct == pytest.approx(expected.pct) and bench["fp32_gemm_gflops"] > 0
    table = next(s.table for s in build_report(result).sections if s.title.startswith("Pareto front"))
    assert table is not None and "roofline (of the GEMM peak)" in table.headers and f"{pct:.0f}%" in table.rows[0]
    assert fp32_reference_text(result) == "the teacher's one fp32 export"  # a result from before the choice
    result["baseline"]["fp32_p50_ms"] = {"fp32 fused": 9.5, "fp32 unfused": 10.25}
    assert fp32_reference_text(result).startswith("fp32 fused (p50 9.50 ms, the fastest measured; fp32 unfused 10.25 ms")
    predicted = copy.deepcopy(trial) | {"latency": trial["latency"] | {"predicted": True}}
    assert roofline_pct(result, predicted) is None


def test_a_student_with_pruned_heads_is_named_and_counted_at_its_attention_s_width(result: dict) -> None:
    trial = copy.deepcopy(pareto_trials(result)[0])
    c = trial["candidate"] = trial["candidate"] | {"hidden": 32, "heads": 4}
    pruned = trial | {"candidate": c | {"heads": 2, "head_dim": 8}}  # 2 of 4 heads, the attention 16 wide
    assert architecture(pruned["candidate"]) == f"{c['layers']}x32 (2h of 8, FFN {c['ffn']})"
    assert "of" not in architecture(c)
    assert roofline_pct(result, pruned) < roofline_pct(result, trial)  # fewer operations in the same milliseconds


def test_a_model_fixed_to_one_input_shape_says_how_to_feed_it(result: dict) -> None:
    def use_section(report_result: dict) -> str:
        section = next(s for s in build_report(report_result).sections if s.title == "Use the model")
        return " ".join(section.paragraphs)

    assert "fixed to" not in use_section(result)  # an ONNX model takes any shape
    result["recommended"] |= {"engine": "openvino", "fixed_shape": [1, 64]}
    text = use_section(result)
    assert "model.xml and model.bin" in text and "fixed to batch 1 x 64 tokens" in text
    assert "with zeros to 64 tokens and feed 1 row(s) per call" in text


def test_the_measurement_sentence_names_every_engine_the_figures_come_from(result: dict) -> None:
    def measurement(report_result: dict) -> str:
        section = next(s for s in build_report(report_result).sections if s.title.startswith("Hardware"))
        assert section.table is not None
        return dict(section.table.rows)["measurement"]

    assert "threads, onnxruntime on cpu" in measurement(result)  # a result from before OpenVINO came
    result["baseline"]["engine"], result["recipe"] = "openvino", {"int8_engine": "openvino"}
    assert "threads, onnxruntime and openvino on cpu" in measurement(result)


def test_the_answer_says_when_its_speedup_comes_from_a_second_confirmation(result: dict) -> None:
    rec = result["recommended"]
    rec |= {"speedup_interval": [2.9, 3.1], "speedup_at_percentile": 3.0,
            "final_measurement": {"speedups": [2.9, 3.0, 3.1], "reconfirmed_after_twin": False}}
    assert "2.90-3.10x over three measurements alternating with the teacher" in one_line_answer(result)
    rec["final_measurement"]["reconfirmed_after_twin"] = True
    assert ("over three measurements, its second confirmation, after its searched twin of the same shape met the "
            "target, alternating") in one_line_answer(result)
