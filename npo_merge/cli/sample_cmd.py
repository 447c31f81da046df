"""`npo-merge sample --model M --prompt P ... --out DIR [--compare]`: images with NPO guidance."""

from __future__ import annotations

import argparse
from pathlib import Path

from npo_merge.cli.common import common_options, print_lines
from npo_merge.errors import InputError, UsageError
from npo_merge.progress import tqdm_progress
from npo_merge.steps import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample", parents=[common_options()], help="sample images from a dual-branch checkpoint (CFG + NPO)",
        description="One batched UNet forward per step serves both branches. --compare adds plain CFG with the "
        "same seeds and writes a side-by-side grid.",
    )
    parser.add_argument("--model", required=True, help="dual-branch checkpoint (file/folder), Hub repo or target name")
    parser.add_argument("--npo", help="an NPO LoRA/delta for a plain --model (e.g. the companion of --layout separate)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--eta", type=float, help="NPO strength (default: as written in the checkpoint)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint's, else 7.5)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; the next ones count up")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--compare", action="store_true", help="also plain CFG with the same seeds, and a grid")
    parser.add_argument("--config", help="diffusers repo or folder with configs/tokenizers for single files")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    parser.add_argument("--out", required=True, type=Path)
    parser.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            prompts += [line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise InputError(f"{args.prompt_file}: cannot read prompts ({exc.strerror})") from None
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompt-file")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from npo_merge.guidance.pipeline import load_pipeline
    from npo_merge.guidance.sampling import generate, save_samples
    from npo_merge.io.dual_checkpoint import load_branch
    from npo_merge.targets import resolve_target

    prompts = _prompts(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    quiet = getattr(args, "quiet", False)
    pipe = load_pipeline(args.model, eta=args.eta, config=args.config, npo=args.npo, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=quiet, leave=False)
    stored = load_branch(resolve_target(args.model).path).guidance_scale if args.npo is None else None
    guidance = args.guidance or stored or 7.5
    samples = generate(pipe, prompts, negative_prompt=args.negative_prompt, guidance_scale=guidance, steps=args.steps,
                       seed=args.seed, compare=args.compare, height=args.height, width=args.width,
                       progress=tqdm_progress(quiet, unit="image"))
    written = save_samples(samples, args.out, eta=args.eta)
    return print_lines([f"wrote {len(written)} images to {args.out} (guidance {guidance:g})"])
