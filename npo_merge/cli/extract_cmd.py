"""`npo-merge extract --base A --tuned B --out D [--rank R | --energy F]`."""

from __future__ import annotations

import argparse

from npo_merge.cli.common import common_options, context, dtype_option, print_lines
from npo_merge.io.lora_writer import LAYOUTS
from npo_merge.steps import ExtractStep


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract", parents=[common_options()], help="extract tuned - base as a full delta or a LoRA",
        description="Streams tuned - base over every tensor the two share (UNet and text encoders). With --rank or "
        "--energy, compresses each linear/conv layer to LoRA factors by randomized SVD and reports the fidelity.",
    )
    parser.add_argument("--base", required=True, help="the model the delta is taken against (path, Hub repo or target name)")
    parser.add_argument("--tuned", required=True, help="the fine-tuned (aligned, or NPO-trained) model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--role", choices=["positive", "negative"], default="positive",
                        help="positive: aligned - base; negative: NPO - base (default positive)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="compress to LoRA of this rank")
    size.add_argument("--energy", type=float, help="compress to LoRA keeping this fraction of each layer's Frobenius norm")
    parser.add_argument("--conv-rank", type=int, help="rank for 3x3 conv layers (default: --rank)")
    parser.add_argument("--svd", choices=["randomized", "exact"], default="randomized", help="SVD method (default randomized)")
    parser.add_argument("--device", default=None, help="where to run the SVD, e.g. cuda (default cpu)")
    parser.add_argument("--layout", choices=LAYOUTS, default="kohya", help="LoRA layout (default kohya)")
    parser.add_argument("--components", nargs="+", choices=["unet", "text_encoder", "text_encoder_2", "vae"],
                        help="only these components (default: all shared)")
    dtype_option(parser, "dtype written (default fp32 for full deltas, fp16 for LoRAs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    step = ExtractStep(args.base, args.tuned, args.out, args.role, args.rank, args.energy, args.conv_rank, args.svd,
                       args.device, args.layout, args.components, args.dtype)
    return print_lines(step.run(context(args)))
