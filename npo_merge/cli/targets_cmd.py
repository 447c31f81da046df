"""`npo-merge targets [--json]`: the short target names this tool knows, and which are cached."""

from __future__ import annotations

import argparse
import json

from huggingface_hub import constants as hub_constants

from npo_merge.cli.common import common_options
from npo_merge.targets import RegistryEntry, is_cached, load_registry


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "targets",
        parents=[common_options()],
        help="list the short target names (dreamshaper, sd15, sdxl, ...) and whether they are cached",
        description="Short names accepted by --target, the Hub repo and file each one stands for, and "
        "whether it is already in the local Hugging Face cache (so it resolves offline).",
    )
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    parser.set_defaults(func=run)


def _where(entry: RegistryEntry) -> str:
    return f"{entry.repo_id}:{entry.filename}" if entry.filename else f"{entry.repo_id} (diffusers folder)"


def run(args: argparse.Namespace) -> int:
    rows = [(entry, is_cached(entry)) for entry in load_registry().values()]
    if args.json:
        targets = [{**vars(entry), "cached": cached} for entry, cached in rows]
        print(json.dumps({"cache_dir": str(hub_constants.HF_HUB_CACHE), "targets": targets}, indent=2))
        return 0
    width = max(len(entry.name) for entry, _ in rows)
    print(f"{'name':<{width}}  arch  cached  source")
    for entry, cached in rows:
        print(f"{entry.name:<{width}}  {entry.architecture:<4}  {'yes' if cached else 'no':<6}  {_where(entry)}")
    print(f"\ncache: {hub_constants.HF_HUB_CACHE}  (use a name as --target NAME or NAME@revision)")
    return 0
