"""report.html and report.md from result.json alone.

The report's content is built once as a list of sections (paragraphs and tables of plain strings), then
rendered twice: Markdown (plot as a PNG file next to it) and one self-contained HTML file (plot inlined as a
data URI, CSS inline, no script, no CDN). Every string that came from the spec, the model or the data is
escaped by the HTML renderer, so a run named `<script>` shows up as text.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from autotune.records import closest_measured, with_final_latencies
from autotune.report import summary
from autotune.report.predicted import predicted_sections
from autotune.report.sections import Report, Section, Table
from autotune.report.plot import accuracy_latency_png

PLOT_FILE = "accuracy_latency.png"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _hardware_section(result: dict[str, Any]) -> Section:
    hw = result["hardware"]
    cpu, bench = hw["cpu"], hw.get("microbench") or {}
    rows = (
        ("fingerprint", hw["fingerprint"]),
        ("CPU", f"{cpu['model_name']} ({cpu['architecture']}), {cpu['physical_cores']} physical / {cpu['logical_cores']} logical cores"),
        ("ISA flags", " ".join(cpu["flags"])),
        ("memory", f"{hw['memory']['total_bytes'] / 2**30:.1f} GiB total, {hw['memory']['available_bytes'] / 2**30:.1f} GiB available"),
        ("GPUs", ", ".join(g["name"] for g in hw["gpus"]) or (hw.get("gpu_unavailable_reason") or "none")),
        ("measured throughput", f"fp32 GEMM {bench.get('fp32_gemm_gflops', '-')} GFLOP/s, int8 GEMM {bench.get('int8_gemm_gops', '-')} GOP/s, "
                                f"memory {bench.get('memory_bandwidth_gbps', '-')} GB/s; at batch 1 x 64 tokens (GEMM chains): "
                                f"fp32 {bench.get('fp32_chain_gflops') or '-'} GFLOP/s, int8 {bench.get('int8_chain_gops') or '-'} GOP/s, "
                                f"int4 {bench.get('int4_chain_gflops') or '-'} GFLOP/s; one small operator "
                                f"{bench.get('small_op_us') or '-'} us; activations {bench.get('elementwise_gbps') or '-'} GB/s"),
        ("software", f"onnxruntime {hw['software']['onnxruntime']}, torch {hw['software']['torch']}, optuna {hw['software']['optuna']}"),
        ("quantization recipe", _recipe_text(result)),
        ("fp32 reference", summary.fp32_reference_text(result)),
        ("measurement", _measurement_text(result)),
    )
    return Section("Hardware and measurement settings", table=Table(("", ""), rows))


def _recipe_text(result: dict[str, Any]) -> str:
    """How the run's int8 and int4 were built, and why."""
    if summary.is_causal_lm(result):
        return ("weight-only int8/int4 (MatMulNBits) computing with int8 activations (accuracy level 4) on every CPU: "
                "decode is matrix-vector products, and the fp32-compute path dequantizes every block on every call")
    return "; ".join((result.get("recipe") or {}).get("reasons") or ["not recorded (an older result)"])


def _measurement_text(result: dict[str, Any]) -> str:
    """How every latency of the run was measured, in one sentence."""
    target, pct = result["target"], summary.percentile_name(result)
    if summary.is_causal_lm(result):
        return (f"{pct} per-token decode at a context of {target['seq_len']} tokens and {pct} time to first token of a "
                f"{target.get('prompt_len')}-token prompt, batch 1, {target['threads']} threads, ONNX Runtime GenAI on "
                f"{target['device']}; each artifact generating in a fresh process, and the searched latency is "
                f"{summary.latency_label(result)}")
    return (f"{pct} latency at batch {target['batch_size']}, sequence length {target['seq_len']}, {target['threads']} "
            f"threads, {summary.engines_of(result)} on {target['device']}; each figure timed in a fresh process until the median's "
            "95% interval is within 2% (or a 3 s cap)")


def _other_hardware_section(result: dict[str, Any]) -> Section | None:
    """Trials that workers on other hardware ran (--allow-mixed-hardware): counted per fingerprint, never
    compared with this machine's latencies, nor plotted, nor recommended."""
    others = result.get("other_hardware_trials") or []
    if not others:
        return None
    by_fingerprint: dict[str, list[dict[str, Any]]] = {}
    for trial in others:
        by_fingerprint.setdefault(str(trial.get("hardware_fingerprint")), []).append(trial)
    rows = tuple((fp, str(len(trials)), _ms(min((t["latency_ms"] for t in trials if t["latency_ms"] is not None), default=None)))
                 for fp, trials in sorted(by_fingerprint.items()))
    return Section("Trials measured on other hardware (kept apart)", (
        f"These trials ran on machines other than {result['hardware']['fingerprint']}; their latencies hold for their "
        "own hardware only, so they are neither compared nor recommended here.",),
        Table(("hardware fingerprint", "trials", "fastest latency ms"), rows))


def _lm_pareto_table(result: dict[str, Any]) -> Table:
    """A causal LM's front: configuration, perplexity, decode and TTFT, size and peak memory, speedup."""
    pct = summary.percentile_name(result)
    rows = tuple(
        (str(t["number"]), summary.describe(t["candidate"]), _ms(summary.trial_perplexity(t)), _ms(figures.get("decode_ms")),
         _ms(figures.get("ttft_ms")), f"{t['size_mb']:.0f}", f"{figures.get('peak_mb') or 0:.0f}",
         f"{summary.speedup(result, t):.2f}x")
        for t in summary.pareto_trials(result) for figures in (t.get("extras") or {},))
    return Table(("trial", "configuration", "val. perplexity", f"decode {pct} ms/token", f"TTFT {pct} ms", "size MB",
                  "peak MB", f"{summary.latency_label(result)} speedup"), rows)


def _encoder_pareto_table(result: dict[str, Any]) -> Table:
    """An encoder's front: architecture, sparsity, bits, the objective, p50 and target-percentile latency, size, speedup,
    and how close to the machine's GEMM peak each runs (roofline)."""
    pct = summary.percentile_name(result)
    rows = tuple(
        (str(t["number"]), summary.architecture(t["candidate"]), summary.sparsity_text(t["candidate"]),
         str(t["candidate"]["bits"]), _acc(t["accuracy"]), _ms(t["latency"]["p50_ms"]), _ms(t["latency"][f"{pct}_ms"]),
         f"{t['size_mb']:.1f}", f"{summary.speedup(result, t):.2f}x",
         "-" if roofline is None else f"{roofline:.0f}%")
        for t in summary.pareto_trials(result) for roofline in (summary.roofline_pct(result, t),)
    )
    return Table(("trial", "architecture", "sparsity", "bits", f"val. {summary.metric_name(result)}", "p50 ms", f"{pct} ms",
                  "size MB", "speedup", "roofline (of the GEMM peak)"), rows)


def _pareto_section(result: dict[str, Any]) -> Section:
    lm = summary.is_causal_lm(result)
    table = _lm_pareto_table(result) if lm else _encoder_pareto_table(result)
    note = () if table.rows else ("No evaluated trial met the target, so the feasible Pareto front is empty.",)
    return Section(f"Pareto front (feasible, {'perplexity down' if lm else 'accuracy up'}, latency down)", note, table)


def _refined_section(result: dict[str, Any]) -> Section | None:
    refined = result.get("refined") or []
    if not refined:
        return None
    by_number = {t["number"]: t for t in result["trials"]}
    pct = summary.percentile_name(result)
    rows = tuple((str(r["number"]), summary.describe(r["candidate"]), str(r["epochs"]), _acc(by_number[r["number"]]["accuracy"]),
                  _acc(r["accuracy"]), _ms(r["latency_ms"])) for r in refined)
    return Section(
        "Finalists trained further",
        ("The search ranks students after a short distillation; the most accurate feasible ones were then distilled "
         "further and evaluated again (validation split), and the recommendation is chosen among all of them.",),
        Table(("trial", "configuration", "epochs in all", f"val. {summary.metric_name(result)} in the search",
               f"val. {summary.metric_name(result)} refined", f"{pct} ms"), rows),
    )


def _use_section(result: dict[str, Any]) -> Section | None:
    """What to do next with the recommended model: the exact command and the Python three lines."""
    rec = result["recommended"]
    if rec is None:
        return None
    model = rec["artifact"]
    if summary.is_causal_lm(result):
        code = ("import onnxruntime_genai as og\n"
                f'model = og.Model("{model}")\ntokenizer = og.Tokenizer(model)\n'
                "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=256)\n"
                "generator = og.Generator(model, params)\n"
                'generator.append_tokens(tokenizer.encode("To be, or not to be"))\n'
                "while not generator.is_done():\n    generator.generate_next_token()\n"
                "print(tokenizer.decode(generator.get_sequence(0)))")
        return Section("Use the model", (
            f"{model} is an ONNX Runtime GenAI model (model.onnx with its KV cache, genai_config.json, the tokenizer) "
            "and artifact.json (bits and the figures it was measured at). Its logits are the last position's only "
            "(the prompt's LM head runs on its last token, which is all generation samples from): running model.onnx "
            "yourself gives logits [batch, 1, vocab]. Generate with onnxruntime-genai:",), code=code)
    code = (f'autotune predict {model} "a gripping, funny film"\n\n'
            f'from autotune import load_model\nmodel = load_model("{model}")\n'
            'print(model.predict(["a gripping, funny film"]))')
    holds = ("model.xml and model.bin (an OpenVINO IR: OpenVINO runs it, `pip install openvino`)"
             if rec.get("engine") == "openvino" else "model.onnx")
    return Section("Use the model", (
        f"{model} holds {holds}, the tokenizer, config.json (with the label names) and artifact.json (engine, bits, "
        "recipe, input shape, and the latency it was measured at).", *_fixed_shape_note(rec.get("fixed_shape")),
        "Label texts from the command line, or from Python:"), code=code)


def _fixed_shape_note(shape: list[int] | None) -> tuple[str, ...]:
    """What a model fixed to one input shape asks of whoever runs it outside autotune."""
    if not shape:
        return ()
    batch, length = shape
    return (f"Its inputs are fixed to batch {batch} x {length} tokens, the target's shape (OpenVINO compiles a fixed "
            f"shape faster): `load_model` pads shorter inputs and cuts batches to it. Running the IR yourself, pad every "
            f"input (the attention mask too) with zeros to {length} tokens and feed {batch} row(s) per call.",)


def _samples_section(result: dict[str, Any]) -> Section | None:
    """The teacher's and the recommendation's outputs for one prompt side by side, so a reader sees what the quality
    figure means (a causal LM's greedy continuations of a test-split prompt)."""
    samples = result.get("samples")
    if not samples:
        return None
    def one_line(text: str) -> str:  # a table cell holds one line: line breaks shown as " / "
        return " / ".join(line.strip() for line in text.splitlines() if line.strip())

    rows = tuple((name, one_line(text)) for name, text in samples["outputs"].items())
    return Section("Sample generations (greedy, same prompt)", (
        "A prompt from the test split, continued greedily by the fp32 teacher and by the recommended model (line "
        "breaks shown as /).", f"Prompt: {one_line(samples['prompt'])}"), Table(("model", "continuation"), rows))


def _passed_over_section(result: dict[str, Any]) -> Section | None:
    """Every candidate more accurate than the recommendation that was not recommended, and why: a user who saw it
    trained should see why it was not chosen."""
    passed = result.get("passed_over") or []
    if not passed:
        return None
    pct = summary.percentile_name(result)
    rows = tuple((str(p["number"]), p["stage"], _acc(p["accuracy"]), _ms(p["latency_ms"]), _ms(p.get("latency_upper_ms")),
                  p["reason"]) for p in passed)
    return Section("Passed over", ("More accurate candidates that were not recommended. Latencies are from the final "
                                   "measurement, alternating with the teacher, where they were re-measured.",),
                   Table(("trial", "stage", f"val. {summary.metric_name(result)}", f"{pct} ms", f"{pct} upper bound ms",
                          "why"), rows))


def _targets_section(result: dict[str, Any]) -> Section:
    rows = []
    for option in summary.changed_targets(result):
        trial = option.trial
        rows.append((f"{option.scale:g}x = {option.target_ms:.2f} ms",
                     summary.describe(trial["candidate"]) if trial else "nothing measured fits",
                     _acc(trial["accuracy"]) if trial else "-", _ms(trial["latency_ms"]) if trial else "-"))
    teacher = f"The teacher alone (fused fp32) meets any target of {summary.teacher_needs_ms(result):.2f} ms or more."
    return Section("Planning for a changed target (from the trials run)", (teacher,),
                   Table(("target", "best configuration", f"val. {summary.metric_name(result)}", "latency ms"), tuple(rows)))


def _capacity_section(result: dict[str, Any]) -> Section:
    rows = []
    for trial in summary.pareto_trials(result):
        cap = summary.capacity(result, trial)
        rows.append((str(trial["number"]), summary.describe(trial["candidate"]),
                     f"{cap.throughput_per_instance:.0f}", f"{cap.memory_per_instance_mb:.0f}",
                     f"{cap.instances} ({cap.limited_by})", f"{cap.requests_per_s:.0f}"))
    threads = result["target"]["threads"]
    lm = summary.is_causal_lm(result)
    memory = "peak resident memory measured while generating" if lm else "model file + peak resident growth measured while serving"
    return Section(
        "Capacity of this machine",
        (f"Each instance runs with {threads} threads; instances are limited by physical cores and available memory "
         f"({memory}).",),
        Table(("trial", "configuration", "tokens/s per instance (decode)" if lm else "items/s per instance",
               "MB per instance", "instances", "tokens/s in all" if lm else "requests/s at target"), tuple(rows)),
    )


def _cost_section(result: dict[str, Any]) -> Section:
    costs = summary.cost_breakdown(result)
    counts = summary.stage_counts(result)
    importances = result.get("importances") or {}
    rows = tuple((objective, ", ".join(f"{k} {v:.2f}" for k, v in values.items())) for objective, values in importances.items())
    paragraphs = (
        f"Trials by outcome: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}. Time spent: latency gate "
        f"{costs['gate']:.0f} s, training {costs['train']:.0f} s, evaluation {costs['evaluate']:.0f} s, refining "
        f"finalists {costs['refine']:.0f} s (whole run {result['seconds']:.0f} s).",
        "Which knobs mattered (Optuna parameter importances per objective):" if rows else "Parameter importances need at least two evaluated trials.",
    )
    return Section("Which knobs mattered, and what the search cost", paragraphs, Table(("objective", "importance"), rows) if rows else None)


def build_report(result: dict[str, Any]) -> Report:
    """The report's content from result.json alone, built once so the Markdown and HTML renderings cannot disagree; when
    nothing met the target, that comes first, with the nearest misses."""
    sections = [
        _use_section(result),
        _hardware_section(result),
        _samples_section(result),
        Section(f"Perplexity vs {summary.latency_label(result)} latency" if summary.is_causal_lm(result) else "Accuracy vs latency", (
            "Every evaluated trial; the Pareto front; trials rejected by the latency gate (never trained) on the floor "
            "at their measured latency; the dashed line is the target.",), plot=True),
        _pareto_section(result),
        _refined_section(result),
        _passed_over_section(result),
        _targets_section(result),
        _capacity_section(result),
        _cost_section(result),
        _other_hardware_section(result),
    ]
    sections = [section for section in sections if section is not None]
    if result["recommended"] is None:
        closest = closest_measured(with_final_latencies(result["trials"], result.get("passed_over") or []))
        rows = tuple((str(t["number"]), summary.describe(t["candidate"]), _ms(t["latency_ms"]),
                      f"{t['latency_ms'] / result['target']['latency_ms'] - 1:+.0%}") for t in closest)
        fastest = closest[0]["latency_ms"] if closest else None
        advice = (f"A target of {fastest:.2f} ms or more would be met by the fastest candidate measured; or widen the "
                  "space (fewer layers, narrower hidden, lower bits)." if fastest else "No trial finished.")
        sections.insert(0, Section("No configuration met the target", (result["reason"] or "", advice),
                                   Table(("trial", "configuration", "latency ms", "over target"), rows)))

    sections += predicted_sections(result)
    if result.get("command"):
        sections.append(Section("Reproduce this run", code=result["command"]))
    return Report(f"autotune report: {result['name']}", summary.one_line_answer(result), tuple(sections))


def to_markdown(report: Report) -> str:
    """The report as Markdown, to read in a repository or a terminal; the plot is the PNG file beside it."""
    lines = [f"# {report.title}", "", f"**{report.answer}**", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.plot:
            lines += [f"![accuracy vs latency]({PLOT_FILE})", ""]
        if section.table is not None and section.table.rows:
            lines.append("| " + " | ".join(section.table.headers) + " |")
            lines.append("|" + "---|" * len(section.table.headers))
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in section.table.rows]
            lines.append("")
        if section.code:
            lines += ["```", section.code, "```", ""]
    return "\n".join(lines)


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}"
    ".answer{background:#eef6ee;border-left:4px solid #2ca02c;padding:.8em 1em;font-weight:600}"
    "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}"
    "th{background:#f4f4f4}img{max-width:100%}pre{background:#f4f4f4;padding:.6em;overflow-x:auto}"
)


def to_html(report: Report, plot_png: bytes) -> str:
    """The report as one self-contained HTML file (plot inlined, CSS inline, no script) with every string escaped, so it
    opens offline and a hostile run name shows as text."""
    esc = html.escape
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(report.title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{esc(report.title)}</h1>", f"<p class=\"answer\">{esc(report.answer)}</p>"]
    image = base64.b64encode(plot_png).decode()
    for section in report.sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        parts += [f"<p>{esc(p)}</p>" for p in section.paragraphs]
        if section.plot:
            parts.append(f"<img alt=\"accuracy vs latency\" src=\"data:image/png;base64,{image}\">")
        if section.table is not None and section.table.rows:
            head = "".join(f"<th>{esc(h)}</th>" for h in section.table.headers)
            thead = f"<thead><tr>{head}</tr></thead>" if any(section.table.headers) else ""
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in section.table.rows)
            parts.append(f"<table>{thead}<tbody>{body}</tbody></table>")
        if section.code:
            parts.append(f"<pre>{esc(section.code)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: dict[str, Any], run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html, report.md and the plot PNG into `run_dir`; returns (html, md) paths."""
    run_dir = Path(run_dir)
    report = build_report(result)
    png = accuracy_latency_png(result)
    (run_dir / PLOT_FILE).write_bytes(png)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text(to_markdown(report), encoding="utf-8")
    html_path.write_text(to_html(report, png), encoding="utf-8")
    return html_path, md_path
