"""`npo-merge merge RECIPE.yaml [--dry-run]`: run a recipe of extract/combine/apply steps."""

from __future__ import annotations

import argparse

from npo_merge.cli.common import common_options, context, print_lines
from npo_merge.recipes import load_recipe, plan, run as run_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", parents=[common_options()], help="run a YAML recipe of extract/combine/apply steps",
        description="Steps run in order; paths are relative to the recipe. --dry-run prints the plan, the keys each "
        "step touches and the memory it needs, and writes nothing. Outputs embed the recipe and the sha256 of their inputs.",
    )
    parser.add_argument("recipe", help="the recipe file (see recipes/ for examples)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    ctx = context(args)
    ctx.base_dir = recipe.path.resolve().parent
    return print_lines(plan(recipe, ctx) if args.dry_run else run_recipe(recipe, ctx))
