"""`npo-merge apply --target T --delta D [--scale S] ... [--out O]`: bake deltas into a checkpoint."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from npo_merge.apply import Term, apply_plan, plan_apply
from npo_merge.cli.common import common_options, delta_options, delta_pairs, dtype_option, parse_dtype
from npo_merge.delta.files import open_delta
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.progress import tqdm_progress


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply", parents=[common_options()], help="apply deltas/LoRAs to a checkpoint, written in its own layout",
        description="target + sum of scaled deltas. A single file stays a single file with its own names; a "
        "diffusers folder stays a folder. Compatibility (architecture, modules, shapes) is checked before "
        "anything is written.",
    )
    parser.add_argument("--target", required=True, help="checkpoint file or diffusers folder to apply to")
    delta_options(parser, ("--scale",), "scale of the preceding --delta (default 1)")
    parser.add_argument("--out", type=Path, help="output file or folder (default: <target name>-merged beside the current folder)")
    dtype_option(parser, "dtype of the written floating-point tensors (default: the target's)")
    parser.add_argument("--allow-partial", action="store_true", help="apply what matches the target and report the rest")
    parser.add_argument("--role", choices=["positive", "negative"], help="treat every delta as this role (default: their metadata, else positive)")
    parser.add_argument("--link", action="store_true", help="hard-link untouched files of a diffusers folder instead of copying")
    parser.set_defaults(func=run)


def default_output(target: Path) -> Path:
    name = target.name[: -len(target.suffix)] if target.is_file() and target.suffix else target.name
    return Path.cwd() / (f"{name}-merged{target.suffix}" if target.is_file() else f"{name}-merged")


def run(args: argparse.Namespace) -> int:
    target_path = Path(args.target)
    out = args.out or default_output(target_path)
    with ExitStack() as stack:
        target = stack.enter_context(open_checkpoint(target_path))
        terms = [Term(stack.enter_context(open_delta(path, role=args.role)), scale) for path, scale in delta_pairs(args)]
        plan = plan_apply(target, terms, allow_partial=args.allow_partial)
        for index, missing in plan.unmatched.items():
            print(f"note: {terms[index].delta.path}: {len(missing)} tensor(s) not in the target were skipped, "
                  f"e.g. {missing[0]}", file=sys.stderr)
        for term in terms:
            if term.delta.role == "negative":
                print(f"note: {term.delta.path} is a negative (NPO) delta; baking it changes both CFG branches",
                      file=sys.stderr)
        apply_plan(plan, out, dtype=parse_dtype(args.dtype, None), progress=tqdm_progress(getattr(args, "quiet", False)),
                   link_untouched=args.link)
    print(f"wrote {out} ({len(plan.touched)} tensors changed by {len(terms)} delta(s))")
    return 0
