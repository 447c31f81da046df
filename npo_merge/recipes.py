"""YAML recipes: a list of extract / combine / apply steps run in order, or planned without writing.

    version: 1
    steps:
      - extract: {base: sd15, tuned: dpo-sd15.safetensors, rank: 64, out: dpo-r64.safetensors}
      - apply:
          target: dreamshaper
          deltas: [{path: dpo-r64.safetensors, weight: 0.8}]
          out: dreamshaper-dpo.safetensors

Relative paths are relative to the recipe file. A later step may use an earlier step's output.
Every output carries the recipe text, the tool version and the sha256 of each of its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from npo_merge import __version__
from npo_merge.apply import Term, plan_apply
from npo_merge.delta.files import open_delta
from npo_merge.errors import InputError, NpoMergeError
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.hashing import fingerprint
from npo_merge.steps import STEPS, ApplyStep, CombineStep, Context, DeltaRef, ExtractStep

Step = Union[ExtractStep, CombineStep, ApplyStep]
RECIPE_VERSION = 1


@dataclass
class Recipe:
    path: Path
    text: str
    steps: list[Step]


def _step(kind: str, options: Any, where: str) -> Step:
    if kind not in STEPS:
        raise InputError(f"{where}: unknown step {kind!r}; steps are {', '.join(STEPS)}")
    if not isinstance(options, dict):
        raise InputError(f"{where}: {kind} needs a mapping of options")
    cls = STEPS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"{where}: {kind} has no option {unknown[0]!r}; options are {', '.join(sorted(known))}")
    options = dict(options)
    if "deltas" in options:
        options["deltas"] = [_delta_ref(item, f"{where}.deltas") for item in options["deltas"] or []]
    try:
        return cls(**options)
    except TypeError as exc:
        raise InputError(f"{where}: {kind}: {exc}") from None


def _delta_ref(item: Any, where: str) -> DeltaRef:
    if isinstance(item, str):
        return DeltaRef(item)
    if isinstance(item, dict) and "path" in item and set(item) <= {"path", "weight", "scale"}:
        return DeltaRef(str(item["path"]), float(item.get("weight", item.get("scale", 1.0))))
    raise InputError(f"{where}: each delta is a path or {{path: ..., weight: ...}}, got {item!r}")


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Parse and validate a recipe file (no input is opened yet)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise InputError(f"{path}: a recipe is a mapping with a non-empty 'steps' list")
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise InputError(f"{path}: recipe version {data.get('version')!r} is not supported (this tool reads {RECIPE_VERSION})")
    steps = []
    for index, entry in enumerate(data["steps"], 1):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise InputError(f"{path}: step {index} must be one of {', '.join(STEPS)} with its options")
        (kind, options), = entry.items()
        steps.append(_step(kind, options, f"{path}: step {index}"))
    return Recipe(path, text, steps)


def _outputs(step: Step, ctx: Context) -> list[Path]:
    if isinstance(step, ApplyStep) and not step.out:
        raise InputError("apply steps in a recipe need an 'out'")
    return [ctx.path(step.out)]  # type: ignore[arg-type]


def _inputs(step: Step, ctx: Context, produced: dict[Path, int]) -> list[tuple[str, Path | None, int | None]]:
    """(spec, local path or None when it must be resolved, producing step or None) per input."""
    specs: list[str] = []
    if isinstance(step, ExtractStep):
        specs = [step.base, step.tuned]
    elif isinstance(step, CombineStep):
        specs = [ref.path for ref in step.deltas]
    else:
        specs = [step.target, *(ref.path for ref in step.deltas)]
    out = []
    for spec in specs:
        local = ctx.path(spec)
        out.append((spec, local if local.exists() or local in produced else None, produced.get(local)))
    return out


def plan(recipe: Recipe, ctx: Context) -> list[str]:
    """The dry run: what each step reads, writes and touches, and the memory it needs. Writes nothing."""
    lines = [f"recipe {recipe.path} ({len(recipe.steps)} steps)"]
    produced: dict[Path, int] = {}
    for number, step in enumerate(recipe.steps, 1):
        kind = type(step).__name__.removesuffix("Step").lower()
        lines.append(f"step {number}: {kind}")
        for spec, local, source in _inputs(step, ctx, produced):
            where = f"output of step {source}" if source else (str(local) if local else "resolved from the Hub cache / registry")
            lines.append(f"  in   {spec}  [{where}]")
        for output in _outputs(step, ctx):
            lines.append(f"  out  {output}" + ("  (exists; will be replaced)" if output.exists() else ""))
            produced[output] = number
        lines.extend(f"  {line}" for line in _estimate(step, ctx, produced))
    return lines


def _estimate(step: Step, ctx: Context, produced: dict[Path, int]) -> list[str]:
    """Keys touched and peak memory, for steps whose inputs exist now."""
    inputs = _inputs(step, ctx, produced)
    if any(source is not None for _, _, source in inputs):
        return ["keys and memory: known once the earlier step has run"]
    try:
        with ExitStack() as stack:
            if isinstance(step, ApplyStep):
                target = stack.enter_context(open_checkpoint(ctx.model(step.target)))
                terms = [Term(stack.enter_context(open_delta(ctx.path(r.path), role=step.role)), r.weight) for r in step.deltas]  # type: ignore[arg-type]
                applied = plan_apply(target, terms, allow_partial=step.allow_partial)
                keys = sorted(applied.touched)
                largest = max(target.native_info(k).numel for k in target.keys())
                return [f"touches {len(keys)} of {len(target)} tensors, e.g. {', '.join(keys[:3])}",
                        f"peak memory about {_mib(largest * 16)} (largest tensor in fp32, its delta and the write buffer)"]
            if isinstance(step, ExtractStep):
                base = stack.enter_context(open_checkpoint(ctx.model(step.base)))
                tuned = stack.enter_context(open_checkpoint(ctx.model(step.tuned)))
                shared = [k for k in tuned.keys() if k in base]
                largest = max(base.native_info(k).numel for k in shared)
                return [f"reads {len(shared)} shared tensors", f"peak memory about {_mib(largest * 24)} (two tensors, their fp32 difference and the SVD)"]
            deltas = [stack.enter_context(open_delta(ctx.path(r.path))) for r in step.deltas]
            keys = sorted({k for d in deltas for k in d.keys})
            largest = max(math.prod(d.keys[k]) for d in deltas for k in d.keys)
            return [f"combines {len(keys)} tensors", f"peak memory about {_mib(largest * 4 * (len(deltas) + 2))}"]
    except NpoMergeError as exc:
        return [f"problem: {exc}"]


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def run(recipe: Recipe, ctx: Context) -> list[str]:
    """Run every step in order; each output embeds the recipe, tool version and its inputs' sha256."""
    lines = []
    for number, step in enumerate(recipe.steps, 1):
        paths = step.inputs(ctx)
        inputs = {str(path): fingerprint(path) for path in paths}
        step_ctx = dataclasses.replace(ctx, metadata={
            **ctx.metadata,
            "npo_merge.recipe": recipe.text,
            "npo_merge.recipe_step": str(number),
            "npo_merge.version": __version__,
            "npo_merge.inputs": json.dumps(inputs, sort_keys=True),
        })
        lines.append(f"step {number}: {type(step).__name__.removesuffix('Step').lower()}")
        lines.extend(f"  {line}" for line in step.run(step_ctx))
    return lines
