"""`npo-merge combine --delta A --weight 1 --delta B --weight -0.5 --method ties --out C`."""

from __future__ import annotations

import argparse

from npo_merge.cli.common import common_options, context, delta_options, delta_refs, dtype_option, print_lines
from npo_merge.delta.combine import METHODS
from npo_merge.io.lora_writer import LAYOUTS
from npo_merge.steps import CombineStep


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "combine", parents=[common_options()], help="scale, negate, add, TIES- or DARE-merge deltas",
        description="Weighted sum (scale/negate/add/subtract with weights), TIES, DARE or DARE-TIES over deltas, "
        "tensor by tensor in fp32. LoRAs summed with --method sum stay an exact LoRA (ranks concatenated); "
        "--rank/--energy re-compresses.",
    )
    delta_options(parser, ("--weight", "--scale"), "weight of the preceding --delta (default 1; -1 negates)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", choices=METHODS, default="sum")
    parser.add_argument("--density", type=float, default=0.2, help="TIES: fraction of entries kept per delta (default 0.2)")
    parser.add_argument("--drop-rate", type=float, default=0.9, help="DARE: drop probability (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="DARE: seed (default 0)")
    parser.add_argument("--sign", choices=["mass", "frequency"], default="mass", help="TIES sign election (default mass)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="write a LoRA of this rank")
    size.add_argument("--energy", type=float, help="write a LoRA keeping this fraction of each layer's norm")
    parser.add_argument("--role", choices=["positive", "negative"], help="role of the result (needed when inputs mix roles)")
    parser.add_argument("--layout", choices=LAYOUTS, default="kohya", help="LoRA layout of a low-rank result")
    dtype_option(parser, "dtype written (default fp32 for full deltas, fp16 for LoRAs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    step = CombineStep(delta_refs(args), args.out, args.method, args.density, args.drop_rate, args.seed, args.sign,
                       args.rank, args.energy, args.role, args.layout, args.dtype)
    return print_lines(step.run(context(args)))
