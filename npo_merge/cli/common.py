"""Pieces every subcommand shares: --debug/--quiet anywhere on the line, dtypes, --delta/--scale pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from npo_merge.progress import tqdm_progress
from npo_merge.steps import DTYPES, Context, DeltaRef


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    parent.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parent


def dtype_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=help)


class _DeltaAction(argparse.Action):
    """--delta PATH appends a DeltaRef; --scale/--weight sets the weight of the last one."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[override]
        items = list(getattr(namespace, self.dest, None) or [])
        if self.const == "weight":
            if not items:
                parser.error(f"{option_string} must follow the --delta it scales")
            ref, weighted = items[-1]
            if weighted:
                parser.error(f"{option_string} given twice for --delta {ref.path}")
            items[-1] = (DeltaRef(ref.path, value), True)
        else:
            items.append((DeltaRef(value), False))
        setattr(namespace, self.dest, items)


def delta_options(parser: argparse.ArgumentParser, weight_flags: tuple[str, ...], weight_help: str) -> None:
    """--delta D [--scale S] [--delta D2 --scale S2 ...] (the weight applies to the delta before it)."""
    parser.add_argument("--delta", dest="deltas", action=_DeltaAction, required=True, metavar="PATH",
                        help="a delta or LoRA file/folder (repeatable)")
    parser.add_argument(*weight_flags, dest="deltas", action=_DeltaAction, const="weight", type=float,
                        metavar="X", help=weight_help)


def delta_refs(args: argparse.Namespace) -> list[DeltaRef]:
    return [ref for ref, _ in args.deltas]


def context(args: argparse.Namespace) -> Context:
    """The step context for a command line: tqdm bars unless --quiet, models resolved as targets."""
    quiet = getattr(args, "quiet", False)
    return Context(resolve_model=lambda spec: _resolve_model(spec, quiet), progress=tqdm_progress(quiet))


def _resolve_model(spec: str, quiet: bool) -> Path:
    """A model name/Hub repo -> local path; the Hub client is imported only when a name needs it."""
    from npo_merge.targets import resolve_target

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return resolve_target(spec).path


def print_lines(lines: list[str]) -> int:
    for line in lines:
        print(line)
    return 0
