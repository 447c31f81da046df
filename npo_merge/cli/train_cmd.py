"""`npo-merge train RECIPE.yaml [--set key=value ...]`: train an NPO/DPO/Self-NPO LoRA offset.

One GPU: `npo-merge train recipe.yaml`. Several: `accelerate launch -m npo_merge train recipe.yaml`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from npo_merge.cli.common import common_options, print_lines


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", parents=[common_options()], help="train an NPO (or DPO / Self-NPO) LoRA offset from a train recipe",
        description="Train a LoRA offset on a base model from preference pairs (dpo, dpo-npo) or captioned images / "
        "captions (self-npo), as a train recipe (YAML with a top-level 'train:' section) describes. Many GPUs: "
        "accelerate launch -m npo_merge train RECIPE.yaml.",
    )
    parser.add_argument("recipe", type=Path, help="a train recipe (see recipes/sd15-dpo-npo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe option, dotted for sections: --set updates=100 --set dpo.beta=1000 (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from npo_merge.training.config import load_train_recipe
    from npo_merge.training.trainer import train

    recipe = load_train_recipe(args.recipe, args.overrides)
    quiet = getattr(args, "quiet", False)
    if quiet:
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import disable_progress_bars

        diffusers_logging.disable_progress_bar()
        disable_progress_bars()
    result = train(recipe.options, base_dir=recipe.base_dir, recipe_text=recipe.text, quiet=quiet)
    return print_lines(result.lines)
