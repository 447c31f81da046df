"""Combine deltas tensor by tensor: weighted sum (scale, negate, add, subtract), TIES, DARE, DARE-TIES.

LoRA + LoRA with the plain weighted sum stays exact: ranks are concatenated per module (no
cross terms), then optionally re-compressed to a target rank with `recompress`. Everything else
is computed densely in fp32, one tensor at a time, and written as a full delta, or compressed
per layer to a LoRA when a rank or energy is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from npo_merge.delta import ops
from npo_merge.delta.files import FULL, LOWRANK, Delta, fidelity_metadata, lora_representable, provenance
from npo_merge.delta.lowrank import Fidelity, concat, factorize, overall, recompress
from npo_merge.delta.types import BaseFingerprint, LowRank, Role
from npo_merge.errors import CompatibilityError, InputError, UsageError
from npo_merge.io.lora_writer import write_lora
from npo_merge.io.safetensors_stream import SpooledWriter
from npo_merge.progress import ProgressFactory, no_progress

CombineMethod = Literal["sum", "ties", "dare", "dare-ties"]
METHODS: tuple[str, ...] = ("sum", "ties", "dare", "dare-ties")


@dataclass(frozen=True)
class CombineOptions:
    """How to merge: the method and its knobs (density for TIES, drop rate and seed for DARE)."""

    method: CombineMethod = "sum"
    density: float = 0.2
    drop_rate: float = 0.9
    seed: int = 0
    sign_method: ops.SignMethod = "mass"


@dataclass
class CombineReport:
    kind: Literal["full", "lowrank"]
    tensors: int = 0
    exact_lora: bool = False
    layers: dict[str, Fidelity] = field(default_factory=dict)
    not_representable: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = [f"{self.tensors} tensors combined" + (" (exact LoRA sum by rank concatenation)" if self.exact_lora else "")]
        if self.layers:
            retained, error = overall(self.layers.values())
            lines.append(f"re-compression: retained {retained:.4f} of the norm (relative error {error:.4f}) over {len(self.layers)} layers")
        if self.not_representable:
            lines.append(f"not representable as LoRA and left out: {len(self.not_representable)} changed tensors "
                         f"(biases, norms, embeddings), e.g. {self.not_representable[0]}; combine without --rank to keep them")
        return lines


def combine_tensors(deltas: Sequence[torch.Tensor], weights: Sequence[float], options: CombineOptions, name: str) -> torch.Tensor:
    """One tensor's merge by `options.method` (pure; `name` seeds DARE so streaming order doesn't matter)."""
    if options.method == "sum":
        return ops.weighted_sum(deltas, weights)
    if options.method == "ties":
        return ops.ties(deltas, weights, density=options.density, sign_method=options.sign_method)
    generator = ops.seeded_generator(options.seed, name)
    if options.method == "dare":
        return ops.weighted_sum([ops.dare(d, options.drop_rate, generator=generator) for d in deltas], weights)
    if options.method == "dare-ties":
        return ops.dare_ties(deltas, weights, drop_rate=options.drop_rate, generator=generator, sign_method=options.sign_method)
    raise UsageError(f"unknown merge method {options.method!r}; choose one of {', '.join(METHODS)}")


def _common_architecture(deltas: Sequence[Delta]) -> str:
    common = set(deltas[0].architectures)
    for delta in deltas[1:]:
        common &= set(delta.architectures)
    if not common:
        raise CompatibilityError("deltas are for different architectures: " + ", ".join(f"{d.path} ({d.architecture})" for d in deltas))
    return sorted(common)[0] if len(common) > 1 else next(iter(common))


def _common_role(deltas: Sequence[Delta], role: Role | None) -> Role:
    if role is not None:
        return role
    roles = {d.role for d in deltas}
    if len(roles) > 1:
        raise CompatibilityError("deltas mix positive and negative roles; say which the result is with --role")
    return roles.pop()


def combine(
    deltas: Sequence[Delta],
    weights: Sequence[float],
    out: str | os.PathLike[str],
    *,
    options: CombineOptions = CombineOptions(),
    rank: int | None = None,
    energy: float | None = None,
    role: Role | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "kohya",
    metadata: dict[str, str] | None = None,
    progress: ProgressFactory = no_progress,
) -> CombineReport:
    """Merge `deltas` with `weights` into `out` (full, or LoRA when all are LoRAs or a rank is given)."""
    if not deltas:
        raise UsageError("nothing to combine: give at least one --delta")
    if len(weights) != len(deltas):
        raise UsageError(f"{len(deltas)} deltas but {len(weights)} weights")
    if rank is not None and energy is not None:
        raise UsageError("give --rank or --energy, not both")
    architecture = _common_architecture(deltas)
    result_role = _common_role(deltas, role)
    all_lora = all(d.kind == "lowrank" for d in deltas)
    lowrank_out = rank is not None or energy is not None or (all_lora and options.method == "sum")
    meta = provenance(LOWRANK if lowrank_out else FULL, result_role, BaseFingerprint(architecture), metadata)
    keys = sorted({k for d in deltas for k in d.keys})
    report = CombineReport("lowrank" if lowrank_out else "full", exact_lora=all_lora and options.method == "sum")
    bar = progress(len(keys), "combine")
    try:
        if report.exact_lora:
            modules = _exact_lora_sum(deltas, weights, keys, rank, energy, report, bar)
        else:
            modules = _dense(deltas, weights, keys, options, out, meta, dtype, rank, energy, report, bar)
        if lowrank_out:
            if report.layers:
                retained, error = overall(report.layers.values())
                meta["npo_merge.fidelity"] = fidelity_metadata(
                    {"retained": retained, "rel_error": error}, {m: (f.rank, f.retained) for m, f in report.layers.items()})
            write_lora(out, modules, layout=layout, architecture=architecture, metadata=meta, dtype=dtype)
    finally:
        bar.close()
    report.tensors = len(keys)
    return report


def _exact_lora_sum(deltas: Sequence[Delta], weights: Sequence[float], keys: list[str], rank: int | None,
                    energy: float | None, report: CombineReport, bar) -> list[tuple[str, LowRank]]:
    modules = []
    for key in keys:
        module = key[: -len(".weight")]
        terms = [(d.lowrank(module), w) for d, w in zip(deltas, weights) if key in d.keys]
        summed = concat(terms)
        if rank is not None or energy is not None:
            summed, fidelity = recompress(summed, rank=rank, energy=energy)
            report.layers[module] = fidelity
        modules.append((module, summed))
        bar.update()
    return modules


def _dense(deltas: Sequence[Delta], weights: Sequence[float], keys: list[str], options: CombineOptions, out,
           meta: dict[str, str], dtype: torch.dtype, rank: int | None, energy: float | None,
           report: CombineReport, bar) -> list[tuple[str, LowRank]]:
    lowrank_out = rank is not None or energy is not None
    writer = None if lowrank_out else SpooledWriter(out, meta)
    modules = []
    try:
        for key in keys:
            tensors = [d.dense(key) if key in d.keys else torch.zeros(_shape(deltas, key)) for d in deltas]
            for delta, tensor in zip(deltas, tensors):
                if not ops.all_finite(tensor):
                    raise InputError(f"{delta.path}: delta for {key!r} contains NaN or Inf")
            merged = combine_tensors(tensors, weights, options, key)
            if writer is not None:
                writer.write(key, merged.to(dtype))
            elif bool(merged.any()) and lora_representable(key, tuple(merged.shape)):
                module = key[: -len(".weight")]
                factors, fidelity = factorize(merged, rank=rank, energy=energy)
                modules.append((module, factors))
                report.layers[module] = fidelity
            elif bool(merged.any()):
                report.not_representable.append(key)
            bar.update()
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return modules


def _shape(deltas: Sequence[Delta], key: str) -> tuple[int, ...]:
    """The dense shape of `key` from whichever delta has it."""
    return next(tuple(d.keys[key]) for d in deltas if key in d.keys)
