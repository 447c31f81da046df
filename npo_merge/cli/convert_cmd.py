"""`npo-merge convert IN OUT --layout kohya|diffusers|peft`: rewrite a LoRA in another layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from npo_merge.cli.common import common_options, dtype_option
from npo_merge.steps import DTYPES
from npo_merge.errors import InputError
from npo_merge.io.atomic import check_output_path
from npo_merge.io.lora import read_lora
from npo_merge.io.lora_writer import LAYOUTS, write_lora


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", parents=[common_options()], help="rewrite a LoRA (or low-rank delta) in another layout",
        description="kohya <-> diffusers <-> peft. Every module's rank and alpha are kept; metadata is carried over.",
    )
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--architecture", choices=["sd1", "sd2", "sdxl"],
                        help="when the input fits several architectures (needed for kohya names)")
    dtype_option(parser, "dtype of the factors (default: the input's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_path(args.output, [args.input])
    with read_lora(args.input) as lora:
        architecture = args.architecture or lora.architectures[0]
        if architecture not in lora.architectures:
            raise InputError(f"{args.input}: is {lora.architecture}, not {architecture}")
        first = next(iter(lora.modules.values()))
        dtype = DTYPES[args.dtype] if args.dtype else lora.source.info(first.down_key).dtype
        metadata = {k: v for k, v in lora.metadata.items() if k != "lora_adapter_metadata"}
        write_lora(args.output, lora.items(), layout=args.layout, architecture=architecture, metadata=metadata, dtype=dtype)
    print(f"wrote {args.output} ({args.layout}, {len(lora.modules)} modules)")
    return 0
