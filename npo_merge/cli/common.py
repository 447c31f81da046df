"""Pieces every subcommand shares: --debug/--quiet anywhere on the line, dtypes, --delta/--scale pairs."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    parent.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parent


def dtype_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=help)


def parse_dtype(name: str | None, default: torch.dtype | None) -> torch.dtype | None:
    return DTYPES[name] if name else default


class _DeltaAction(argparse.Action):
    """--delta PATH appends a [path, weight] pair; --scale/--weight sets the weight of the last one."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[override]
        items = list(getattr(namespace, self.dest, None) or [])
        if self.const == "weight":
            if not items:
                parser.error(f"{option_string} must follow the --delta it scales")
            if items[-1][2]:
                parser.error(f"{option_string} given twice for --delta {items[-1][0]}")
            items[-1] = [items[-1][0], value, True]
        else:
            items.append([value, 1.0, False])
        setattr(namespace, self.dest, items)


def delta_options(parser: argparse.ArgumentParser, weight_flags: tuple[str, ...], weight_help: str) -> None:
    """--delta D [--scale S] [--delta D2 --scale S2 ...] (the weight applies to the delta before it)."""
    parser.add_argument("--delta", dest="deltas", action=_DeltaAction, required=True, metavar="PATH",
                        help="a delta or LoRA file/folder (repeatable)")
    parser.add_argument(*weight_flags, dest="deltas", action=_DeltaAction, const="weight", type=float,
                        metavar="X", help=weight_help)


def delta_pairs(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [(path, float(weight)) for path, weight, _ in args.deltas]
