"""The `autotune` command line. Each subcommand parses and validates its arguments, then calls the same
functions the Python API exposes; user errors become one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from autotune import __version__

EXIT_OK = 0
EXIT_USAGE = 2


class UsageError(Exception):
    """A user-facing problem with the command line: printed as one sentence, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one sentence (no usage dump, no traceback) and exits 2."""

    def error(self, message: str) -> NoReturn:
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
    return path


def build_parser() -> Parser:
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
    profile.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    profile.add_argument("-o", "--output", type=writable_file, default=None, metavar="FILE", help="write the profile as JSON to FILE (for `autotune plan --hardware`)")
    profile.set_defaults(handler=run_profile)
    return parser


def run_profile(args: argparse.Namespace) -> int:
    from autotune.display import profile_table
    from profilers import collect_profile

    from rich.console import Console

    console = Console(stderr=True)
    with console.status("Profiling this machine (microbenchmarks running)..."):
        profile = collect_profile(args.threads, quick=args.quick)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as exc:
        sys.stderr.write(f"autotune {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("autotune: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
