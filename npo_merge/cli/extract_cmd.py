"""`npo-merge extract --base A --tuned B --out D [--rank R | --energy F]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from npo_merge.cli.common import common_options, dtype_option, parse_dtype
from npo_merge.delta.extract import extract
from npo_merge.delta.types import BaseFingerprint
from npo_merge.errors import UsageError
from npo_merge.io.atomic import check_output_path
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.hashing import fingerprint
from npo_merge.io.lora_writer import LAYOUTS
from npo_merge.progress import tqdm_progress


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract", parents=[common_options()], help="extract tuned - base as a full delta or a LoRA",
        description="Streams tuned - base over every tensor the two share (UNet and text encoders). With --rank or "
        "--energy, compresses each linear/conv layer to LoRA factors by randomized SVD and reports the fidelity.",
    )
    parser.add_argument("--base", required=True, help="the model the delta is taken against")
    parser.add_argument("--tuned", required=True, help="the fine-tuned (aligned, or NPO-trained) model")
    parser.add_argument("--out", required=True, type=Path)
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
    if args.conv_rank is not None and args.rank is None:
        raise UsageError("--conv-rank needs --rank")
    if args.energy is not None and not 0 < args.energy <= 1:
        raise UsageError("--energy must be in (0, 1]")
    base_path, tuned_path = Path(args.base), Path(args.tuned)
    check_output_path(args.out, [base_path, tuned_path])
    lowrank = args.rank is not None or args.energy is not None
    dtype = parse_dtype(args.dtype, torch.float16 if lowrank else torch.float32)
    with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned:
        report = extract(
            base, tuned, args.out, role=args.role, rank=args.rank, energy=args.energy, conv_rank=args.conv_rank,
            method=args.svd, device=args.device, dtype=dtype, layout=args.layout, components=args.components,
            base_fingerprint=BaseFingerprint(base.architecture, fingerprint(base_path), base_path.name),
            metadata={"tuned_name": tuned_path.name, "tuned_sha256": fingerprint(tuned_path)},
            progress=tqdm_progress(getattr(args, "quiet", False)),
        )
    for line in report.summary():
        print(line)
    print(f"wrote {args.out}")
    return 0
