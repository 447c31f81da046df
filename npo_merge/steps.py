"""The three delta jobs as option objects: one definition serves the CLI, recipes and library callers.

Each step is a dataclass of plain options (what a YAML recipe or argparse produces) with a `run`
that opens the inputs, checks everything, and writes its output. `Context` carries what is not an
option: how to resolve a model name, progress bars, and extra provenance metadata.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from npo_merge.apply import Term, apply_plan, plan_apply
from npo_merge.branch import BranchOptions, build_branch, write_companion_lora
from npo_merge.delta.combine import CombineOptions, combine
from npo_merge.delta.extract import extract
from npo_merge.delta.files import open_delta
from npo_merge.delta.types import BaseFingerprint
from npo_merge.errors import UsageError
from npo_merge.io.atomic import check_output_path
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.hashing import fingerprint
from npo_merge.progress import ProgressFactory, no_progress

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _local(spec: str) -> Path:
    return Path(spec)


@dataclass
class Context:
    """Everything a step needs besides its options."""

    resolve_model: Callable[[str], Path] = _local  # a model name/path -> local file or folder
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths are relative to this
    progress: ProgressFactory = no_progress
    metadata: dict[str, str] = field(default_factory=dict)  # extra provenance for every output
    notes: Callable[[str], None] = lambda line: print(line, file=sys.stderr)

    def path(self, spec: str) -> Path:
        path = Path(spec).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def model(self, spec: str) -> Path:
        local = self.path(spec)
        return local if local.exists() else self.resolve_model(spec)


def _dtype(name: str | None, default: torch.dtype | None) -> torch.dtype | None:
    if name is None:
        return default
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class DeltaRef:
    """A delta file and its weight (scale) in a sum."""

    path: str
    weight: float = 1.0


@dataclass
class ExtractStep:
    base: str
    tuned: str
    out: str
    role: str = "positive"
    rank: int | None = None
    energy: float | None = None
    conv_rank: int | None = None
    svd: str = "randomized"
    device: str | None = None
    layout: str = "kohya"
    components: list[str] | None = None
    dtype: str | None = None

    @property
    def lowrank(self) -> bool:
        return self.rank is not None or self.energy is not None

    def validate(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise UsageError("give rank or energy, not both")
        if self.conv_rank is not None and self.rank is None:
            raise UsageError("conv_rank needs rank")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise UsageError("energy must be in (0, 1]")

    def inputs(self, ctx: Context) -> list[Path]:
        return [ctx.model(self.base), ctx.model(self.tuned)]

    def run(self, ctx: Context) -> list[str]:
        self.validate()
        base_path, tuned_path = self.inputs(ctx)
        out = ctx.path(self.out)
        check_output_path(out, [base_path, tuned_path])
        dtype = _dtype(self.dtype, torch.float16 if self.lowrank else torch.float32)
        with open_checkpoint(base_path) as base, open_checkpoint(tuned_path) as tuned:
            report = extract(
                base, tuned, out, role=self.role, rank=self.rank, energy=self.energy, conv_rank=self.conv_rank,
                method=self.svd, device=self.device, dtype=dtype, layout=self.layout, components=self.components,
                base_fingerprint=BaseFingerprint(base.architecture, fingerprint(base_path), base_path.name),
                metadata={"tuned_name": tuned_path.name, "tuned_sha256": fingerprint(tuned_path), **ctx.metadata},
                progress=ctx.progress,
            )
        return [*report.summary(), f"wrote {out}"]


@dataclass
class CombineStep:
    deltas: list[DeltaRef]
    out: str
    method: str = "sum"
    density: float = 0.2
    drop_rate: float = 0.9
    seed: int = 0
    sign: str = "mass"
    rank: int | None = None
    energy: float | None = None
    role: str | None = None
    layout: str = "kohya"
    dtype: str | None = None

    def inputs(self, ctx: Context) -> list[Path]:
        return [ctx.path(ref.path) for ref in self.deltas]

    def run(self, ctx: Context) -> list[str]:
        paths = self.inputs(ctx)
        out = ctx.path(self.out)
        check_output_path(out, paths)
        options = CombineOptions(self.method, self.density, self.drop_rate, self.seed, self.sign)  # type: ignore[arg-type]
        with ExitStack() as stack:
            deltas = [stack.enter_context(open_delta(path)) for path in paths]
            lowrank = self.rank is not None or self.energy is not None or (
                all(d.kind == "lowrank" for d in deltas) and self.method == "sum")
            report = combine(
                deltas, [ref.weight for ref in self.deltas], out, options=options, rank=self.rank, energy=self.energy,
                role=self.role, dtype=_dtype(self.dtype, torch.float16 if lowrank else torch.float32),  # type: ignore[arg-type]
                layout=self.layout, metadata=dict(ctx.metadata), progress=ctx.progress,
            )
        return [*report.summary(), f"wrote {out}"]


@dataclass
class ApplyStep:
    """target + deltas. Positive deltas are baked into theta_c; negative (NPO) deltas become the
    uncond branch of a dual-branch checkpoint unless `bake` (then they are baked like the rest)."""

    target: str
    deltas: list[DeltaRef]
    out: str | None = None
    dtype: str | None = None
    allow_partial: bool = False
    role: str | None = None
    link: bool = False
    bake: bool = False
    layout: str = "single"  # "single": one dual-branch file; "separate": theta_c + a companion LoRA
    eta: float = 1.0
    beta: float = 0.0
    base: str | None = None
    branch_rank: int | None = None
    branch_energy: float | None = None
    guidance_scale: float | None = None

    def inputs(self, ctx: Context) -> list[Path]:
        extra = [ctx.model(self.base)] if self.base else []
        return [ctx.model(self.target), *(ctx.path(ref.path) for ref in self.deltas), *extra]

    def output(self, ctx: Context, target: Path) -> Path:
        if self.out:
            return ctx.path(self.out)
        stem = target.name[: -len(target.suffix)] if target.is_file() and target.suffix else target.name
        return ctx.base_dir / (f"{stem}-merged{target.suffix}" if target.is_file() else f"{stem}-merged")

    def run(self, ctx: Context) -> list[str]:
        if self.layout not in ("single", "separate"):
            raise UsageError(f"layout must be 'single' or 'separate', not {self.layout!r}")
        target_path, *delta_paths = self.inputs(ctx)[: 1 + len(self.deltas)]
        out = self.output(ctx, target_path)
        lines: list[str] = []
        with ExitStack() as stack:
            target = stack.enter_context(open_checkpoint(target_path))
            terms = [Term(stack.enter_context(open_delta(path, role=self.role)), ref.weight)  # type: ignore[arg-type]
                     for path, ref in zip(delta_paths, self.deltas)]
            checked = plan_apply(target, terms, allow_partial=self.allow_partial)
            for index, missing in checked.unmatched.items():
                ctx.notes(f"note: {terms[index].delta.path}: {len(missing)} tensor(s) not in the target were skipped, "
                          f"e.g. {missing[0]}")
            negatives = [t for t in terms if t.delta.role == "negative" and not self.bake]
            positives = [t for t in terms if t not in negatives]
            if not negatives and (self.eta != 1.0 or self.beta or self.base):
                raise UsageError("eta, beta and base shape the uncond branch: give a negative (NPO) delta without --bake")
            for term in positives:
                if term.delta.role == "negative":
                    ctx.notes(f"note: {term.delta.path} is a negative (NPO) delta baked into both CFG branches (--bake)")
            plan = plan_apply(target, positives, allow_partial=self.allow_partial, allow_empty=True)
            branch = None
            if negatives:
                base = stack.enter_context(open_checkpoint(ctx.model(self.base))) if self.base else None
                options = BranchOptions(self.eta, self.beta, self.branch_rank, self.branch_energy, self.guidance_scale)
                branch, report = build_branch(plan, negatives, options, base=base, progress=ctx.progress)
                lines += report.summary()
            dtype = _dtype(self.dtype, None)
            if branch and self.layout == "separate":
                companion = out.with_name(f"{out.name.split('.')[0]}.npo-uncond.safetensors")
                check_output_path(companion, [target_path, *delta_paths])
                write_companion_lora(companion, branch, target.architecture)
                branch = None
                lines.append(f"wrote {companion} (uncond-branch LoRA, role negative)")
            apply_plan(plan, out, dtype=dtype, progress=ctx.progress, link_untouched=self.link,
                       extra_metadata=dict(ctx.metadata), branch=branch)
        kind = "dual-branch checkpoint" if branch else "checkpoint"
        lines.append(f"wrote {out} ({kind}; {len(plan.touched)} tensors changed by {len(positives)} baked delta(s))")
        return lines


STEPS = {"extract": ExtractStep, "combine": CombineStep, "apply": ApplyStep}
