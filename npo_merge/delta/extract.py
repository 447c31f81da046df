"""Extract "tuned - base" over every tensor two checkpoints share, as a full or a low-rank delta.

Streamed: one tensor pair in memory at a time. Nothing is dropped silently: tensors only one side
has, components whose delta is zero, and (for low-rank output) tensors a LoRA cannot hold (biases,
norms, embeddings) are all counted in the report, with their share of the delta's energy.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from npo_merge.delta.files import FULL, LOWRANK, fidelity_metadata, lora_representable, provenance
from npo_merge.delta.lowrank import Fidelity, Method, factorize, overall
from npo_merge.delta.types import BaseFingerprint, LowRank, Role
from npo_merge.errors import CompatibilityError, UsageError
from npo_merge.io.checkpoint import Checkpoint
from npo_merge.io.lora_writer import write_lora
from npo_merge.io.safetensors_stream import SpooledWriter
from npo_merge.progress import ProgressFactory, no_progress

@dataclass
class ComponentReport:
    tensors: int = 0
    changed: int = 0
    norm_sq: float = 0.0

    @property
    def zero(self) -> bool:
        return self.changed == 0


@dataclass
class ExtractReport:
    """What extract found and kept; `summary()` is what the CLI prints."""

    kind: Literal["full", "lowrank"]
    components: dict[str, ComponentReport] = field(default_factory=dict)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    layers: dict[str, Fidelity] = field(default_factory=dict)
    not_representable: dict[str, float] = field(default_factory=dict)  # key -> ||delta||^2

    @property
    def total_norm_sq(self) -> float:
        return sum(c.norm_sq for c in self.components.values())

    def fidelity(self) -> dict[str, float]:
        """Overall retained fraction and relative error of the LoRA-representable part."""
        retained, error = overall(self.layers.values())
        return {"retained": retained, "rel_error": error}

    def summary(self) -> list[str]:
        lines = []
        for name, comp in self.components.items():
            state = "zero delta (identical)" if comp.zero else f"{comp.changed}/{comp.tensors} tensors changed, ||delta|| {math.sqrt(comp.norm_sq):.4g}"
            lines.append(f"{name}: {state}")
        for label, keys in (("only in base", self.only_in_base), ("only in tuned", self.only_in_tuned)):
            if keys:
                lines.append(f"{label} (not extracted): {len(keys)} tensors, e.g. {keys[0]}")
        if self.kind == "lowrank" and self.layers:
            fid = self.fidelity()
            worst = min(self.layers.items(), key=lambda kv: kv[1].retained)
            lines.append(f"low-rank fidelity: {len(self.layers)} layers, retained {fid['retained']:.4f} of the norm "
                         f"(relative error {fid['rel_error']:.4f}); worst {worst[0]} {worst[1].retained:.4f} at rank {worst[1].rank}")
        if self.not_representable:
            share = sum(self.not_representable.values()) / self.total_norm_sq if self.total_norm_sq else 0.0
            lines.append(f"not representable as LoRA (biases, norms, embeddings): {len(self.not_representable)} changed "
                         f"tensors, {share:.2%} of the delta energy; extract without --rank/--energy to keep them")
        return lines


def _shared_keys(base: Checkpoint, tuned: Checkpoint, components: list[str] | None, report: ExtractReport) -> list[str]:
    if base.architecture != tuned.architecture:
        raise CompatibilityError(f"base {base.path} is {base.architecture}, tuned {tuned.path} is {tuned.architecture}")
    wanted = (lambda key: key.split(".", 1)[0] in components) if components else (lambda key: True)
    report.only_in_base = sorted(k for k in base.keys() if k not in tuned and wanted(k))
    report.only_in_tuned = sorted(k for k in tuned.keys() if k not in base and wanted(k))
    keys = [k for k in tuned.keys() if k in base and wanted(k)]
    if not keys:
        raise CompatibilityError(f"base {base.path} and tuned {tuned.path} share no tensors")
    mismatched = [k for k in keys if base.shape(k) != tuned.shape(k)]
    if mismatched:
        k = mismatched[0]
        raise CompatibilityError(
            f"shape mismatch for {len(mismatched)} tensor(s), e.g. {k}: base {base.shape(k)}, tuned {tuned.shape(k)}"
        )
    return keys


def extract(
    base: Checkpoint,
    tuned: Checkpoint,
    out: str | os.PathLike[str],
    *,
    role: Role = "positive",
    rank: int | None = None,
    energy: float | None = None,
    conv_rank: int | None = None,
    method: Method = "randomized",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "kohya",
    components: list[str] | None = None,
    base_fingerprint: BaseFingerprint | None = None,
    metadata: dict[str, str] | None = None,
    progress: ProgressFactory = no_progress,
) -> ExtractReport:
    """Write tuned - base to `out`: a full delta, or a LoRA when `rank` or `energy` is given.

    Full deltas keep every changed tensor (cast to `dtype` on write; fp32 default keeps the
    extraction exact). Low-rank deltas compress each linear/conv weight with `factorize`
    (`conv_rank` for 3x3 convs, default `rank`) and report the fidelity per layer and overall.
    """
    if rank is not None and energy is not None:
        raise UsageError("give --rank or --energy, not both")
    lowrank = rank is not None or energy is not None
    report = ExtractReport("lowrank" if lowrank else "full")
    keys = _shared_keys(base, tuned, components, report)
    fingerprint = base_fingerprint or BaseFingerprint(base.architecture, name=str(base.path))
    meta = provenance(LOWRANK if lowrank else FULL, role, fingerprint, metadata)
    modules: list[tuple[str, LowRank]] = []
    bar = progress(len(keys), "extract")
    writer = None if lowrank else SpooledWriter(out, meta)
    try:
        for key in keys:
            diff = tuned.tensor(key).float() - base.tensor(key).float()
            comp = report.components.setdefault(key.split(".", 1)[0], ComponentReport())
            comp.tensors += 1
            norm_sq = float(diff.double().square().sum())
            if norm_sq > 0:
                comp.changed += 1
                comp.norm_sq += norm_sq
                if writer is not None:
                    writer.write(key, diff.to(dtype))
                elif lora_representable(key, tuple(diff.shape)):
                    is_conv = diff.dim() == 4 and diff.shape[-1] * diff.shape[-2] > 1
                    layer_rank = conv_rank if is_conv and conv_rank is not None else rank
                    factors, fidelity = factorize(diff, rank=layer_rank, energy=energy if layer_rank is None else None,
                                                  method=method, device=device)
                    module = key[: -len(".weight")]
                    modules.append((module, factors))
                    report.layers[module] = fidelity
                else:
                    report.not_representable[key] = norm_sq
            bar.update()
        if writer is not None:
            writer.close()
        else:
            meta["npo_merge.fidelity"] = fidelity_metadata(
                report.fidelity(), {m: (f.rank, f.retained) for m, f in report.layers.items()})
            meta["npo_merge.not_representable"] = json.dumps(sorted(report.not_representable))
            write_lora(out, modules, layout=layout, architecture=base.architecture, metadata=meta, dtype=dtype)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    return report
