"""`npo-merge inspect PATH [--json]`."""

from __future__ import annotations

import argparse

from npo_merge.cli.common import common_options
from npo_merge.inspect import format_report, inspect_path, report_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        parents=[common_options()],
        help="say what a checkpoint, LoRA or delta file is",
        description="Layout, architecture, components, dtypes, tensor and parameter counts, file size; "
        "for LoRAs the ranks, alphas and covered modules; and the metadata, explained.",
    )
    parser.add_argument("path", help="a checkpoint file or diffusers folder, a LoRA file/folder, or a delta")
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_path(args.path)
    print(report_json(report) if args.json else format_report(report))
    return 0
