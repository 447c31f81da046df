"""`npo-merge apply --target T --delta D [--scale S] ... [--out O]`: bake deltas into a checkpoint."""

from __future__ import annotations

import argparse

from npo_merge.cli.common import common_options, context, delta_options, delta_refs, dtype_option, print_lines
from npo_merge.steps import ApplyStep


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply", parents=[common_options()], help="apply deltas/LoRAs to a checkpoint, written in its own layout",
        description="target + sum of scaled deltas. A single file stays a single file with its own names; a "
        "diffusers folder stays a folder. Compatibility (architecture, modules, shapes) is checked before "
        "anything is written.",
    )
    parser.add_argument("--target", required=True,
                        help="checkpoint file, diffusers folder, Hub repo (org/name[:file][@rev]) or a name from `npo-merge targets`")
    delta_options(parser, ("--scale",), "scale of the preceding --delta (default 1)")
    parser.add_argument("--out", help="output file or folder (default: <target name>-merged in the current folder)")
    dtype_option(parser, "dtype of the written floating-point tensors (default: the target's)")
    parser.add_argument("--allow-partial", action="store_true", help="apply what matches the target and report the rest")
    parser.add_argument("--role", choices=["positive", "negative"], help="treat every delta as this role (default: their metadata, else positive)")
    parser.add_argument("--link", action="store_true", help="hard-link untouched files of a diffusers folder instead of copying")
    npo = parser.add_argument_group(
        "negative (NPO) deltas",
        "A negative delta becomes the unconditional branch of a dual-branch checkpoint: one file that serves both "
        "CFG branches (theta_c for the prompt, theta_u for the negative prompt); positive deltas go into theta_c.",
    )
    npo.add_argument("--bake", action="store_true", help="bake negative deltas into the weights like positive ones")
    npo.add_argument("--layout", choices=["single", "separate"], default="single",
                     help="single: one dual-branch file (default); separate: the theta_c checkpoint plus a companion LoRA")
    npo.add_argument("--eta", type=float, default=1.0, help="scale of the NPO offset in the uncond branch (default 1)")
    npo.add_argument("--beta", type=float, default=0.0, help="mix the uncond branch back toward --base (default 0)")
    npo.add_argument("--base", help="the base the NPO delta was trained on (needed for --beta)")
    npo.add_argument("--branch-rank", type=int, help="compress the uncond-branch difference to this rank")
    npo.add_argument("--branch-energy", type=float, help="... or keep this fraction of each layer's norm")
    npo.add_argument("--guidance-scale", type=float, help="default CFG scale stored for samplers")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    step = ApplyStep(args.target, delta_refs(args), args.out, args.dtype, args.allow_partial, args.role, args.link,
                     args.bake, args.layout, args.eta, args.beta, args.base, args.branch_rank, args.branch_energy,
                     args.guidance_scale)
    return print_lines(step.run(context(args)))
