"""Command-line entry point: parse, call the library, print; errors become one line and an exit code."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Sequence

from npo_merge import __version__
from npo_merge.errors import NpoMergeError

# Each command lives in its own module exposing `register(subparsers)`; the module's
# parser sets `func` to a callable taking the parsed args and returning an exit code.
COMMANDS = {
    "inspect": "npo_merge.cli.inspect_cmd",
    "extract": "npo_merge.cli.extract_cmd",
    "combine": "npo_merge.cli.combine_cmd",
    "apply": "npo_merge.cli.apply_cmd",
    "convert": "npo_merge.cli.convert_cmd",
    "merge": "npo_merge.cli.merge_cmd",
    "sample": "npo_merge.cli.sample_cmd",
    "targets": "npo_merge.cli.targets_cmd",
    "train": "npo_merge.cli.train_cmd",
}


def _requested(argv: Sequence[str]) -> str | None:
    """The command named on the line (the first word that is not an option), if it is a known one."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with `command`, only that subcommand's module is imported (a faster start)."""
    parser = argparse.ArgumentParser(
        prog="npo-merge",
        description="Weight deltas for diffusion models: inspect, extract, combine, apply, sample, train.",
    )
    parser.add_argument("--version", action="version", version=f"npo-merge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in [command] if command else COMMANDS:
        importlib.import_module(COMMANDS[name]).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser(_requested(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except NpoMergeError as exc:
        if debug:
            traceback.print_exc()
        print(f"npo-merge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("npo-merge: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if debug:
            traceback.print_exc()
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"npo-merge: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
