"""Build theta_u - theta_c for a dual-branch checkpoint from negative (NPO) deltas.

    theta_c = target + positive deltas
    theta_u = beta * theta_base + (1 - beta) * theta_c + eta * delta_npo
    theta_u - theta_c = eta * delta_npo - beta * (theta_c - theta_base)

With beta = 0 (the paper's and the default) the difference is the NPO delta itself: a LoRA stays
a LoRA (several are summed exactly by rank concatenation). With beta != 0 every UNet layer that
differs from the base gets a full-rank term, compressed at a stated rank or energy with the
fidelity reported. Only UNet linear and conv layers can serve two branches in one batch; anything
else a negative delta touches (text encoders, norms) is reported, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from npo_merge.apply import ApplyPlan, Term, summed_delta
from npo_merge.delta.files import lora_representable
from npo_merge.delta.ops import all_finite
from npo_merge.delta.lowrank import Fidelity, concat, factorize, overall, recompress
from npo_merge.delta.types import LowRank
from npo_merge.errors import CompatibilityError, InputError, UsageError
from npo_merge.io.checkpoint import Checkpoint
from npo_merge.io.dual_checkpoint import Branch, branch_metadata
from npo_merge.progress import ProgressFactory, no_progress


@dataclass
class BranchOptions:
    eta: float = 1.0
    beta: float = 0.0
    rank: int | None = None  # compress the branch difference to this rank ...
    energy: float | None = None  # ... or keep this fraction of each layer's norm
    guidance_scale: float | None = None

    @property
    def compress(self) -> bool:
        return self.rank is not None or self.energy is not None


@dataclass
class BranchReport:
    modules: int = 0
    lowrank: int = 0
    dense: int = 0
    biases: int = 0
    layers: dict[str, Fidelity] = field(default_factory=dict)
    not_served: list[str] = field(default_factory=list)  # keys a dual-branch layer cannot serve

    def summary(self) -> list[str]:
        lines = [f"uncond branch: {self.modules} UNet modules differ ({self.lowrank} low-rank, {self.dense} dense, "
                 f"{self.biases} bias differences)"]
        if self.layers:
            retained, error = overall(self.layers.values())
            lines.append(f"branch compression: retained {retained:.4f} of the norm (relative error {error:.4f}) "
                         f"over {len(self.layers)} layers")
        if self.not_served:
            lines.append(f"not in the uncond branch: {len(self.not_served)} tensors a dual-branch layer cannot serve "
                         f"(text encoders, norms), e.g. {self.not_served[0]}")
        return lines


def _unet_weight(key: str, shape: tuple[int, ...]) -> bool:
    return key.startswith("unet.") and lora_representable(key, shape)


def _bias_of_layer(key: str, target: Checkpoint) -> bool:
    if not (key.startswith("unet.") and key.endswith(".bias")):
        return False
    weight = key[: -len(".bias")] + ".weight"
    return weight in target and len(target.shape(weight)) in (2, 4)


def _compress(module: str, weight: LowRank | torch.Tensor, options: BranchOptions, report: BranchReport) -> LowRank | torch.Tensor:
    if not options.compress:
        return weight
    if isinstance(weight, LowRank):
        if options.rank is not None and weight.rank <= options.rank:
            return weight
        result, fidelity = recompress(weight, rank=options.rank, energy=options.energy)
    else:
        result, fidelity = factorize(weight, rank=options.rank, energy=options.energy)
    report.layers[module] = fidelity
    return result


def build_branch(
    plan: ApplyPlan,
    negatives: Sequence[Term],
    options: BranchOptions,
    *,
    base: Checkpoint | None = None,
    progress: ProgressFactory = no_progress,
) -> tuple[Branch, BranchReport]:
    """theta_u - theta_c per UNet module, from negative terms on top of `plan` (the positive bake)."""
    if options.beta and base is None:
        raise UsageError("beta != 0 mixes the uncond branch back toward the base: give --base")
    if options.beta and not options.compress:
        raise UsageError("beta != 0 adds a full-rank term to the uncond branch: give --branch-rank or --branch-energy")
    if base is not None and base.architecture != plan.target.architecture:
        raise CompatibilityError(f"base {base.path} is {base.architecture}, target is {plan.target.architecture}")
    target = plan.target
    report = BranchReport()
    lowrank_terms: dict[str, list[tuple[LowRank, float]]] = {}
    dense: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}

    def add_dense(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        store[key] = store[key].add_(value) if key in store else value

    for term in negatives:
        weight = options.eta * term.scale
        for key, shape in term.delta.keys.items():
            if key not in target:
                continue
            module = key.rsplit(".", 1)[0]
            if _unet_weight(key, shape):
                if term.delta.kind == "lowrank":
                    lowrank_terms.setdefault(module, []).append((term.delta.lowrank(module), weight))
                else:
                    add_dense(dense, module, term.delta.dense(key).mul_(weight))
            elif _bias_of_layer(key, target):
                add_dense(biases, module, term.delta.dense(key).mul_(weight))
            else:
                report.not_served.append(key)

    if options.beta:
        _add_beta_terms(plan, base, options.beta, dense, biases, report, progress)  # type: ignore[arg-type]

    branch = Branch()
    for module in sorted(set(lowrank_terms) | set(dense)):
        parts: LowRank | torch.Tensor
        if module in dense:  # a dense term is present: the sum is dense
            total = dense[module]
            for factors, w in lowrank_terms.get(module, []):
                total = total.add_(factors.to_dense(), alpha=w)
            parts = total
        else:
            terms = lowrank_terms[module]
            parts = terms[0][0] if len(terms) == 1 and terms[0][1] == 1.0 else concat(terms)
        parts = _compress(module, parts, options, report)
        if isinstance(parts, torch.Tensor) and not bool(parts.any()):
            continue
        branch.weights[module] = parts
        report.lowrank += isinstance(parts, LowRank)
        report.dense += not isinstance(parts, LowRank)
    for module, bias in sorted(biases.items()):
        if bool(bias.any()):
            branch.biases[module] = bias
    report.biases = len(branch.biases)
    report.modules = len(branch.modules)
    for values in (*branch.weights.values(), *branch.biases.values()):
        tensors = (values.down, values.up) if isinstance(values, LowRank) else (values,)
        if not all(all_finite(t) for t in tensors):
            raise InputError("the uncond-branch difference contains NaN or Inf; check the negative deltas")
    branch.metadata = branch_metadata(eta=options.eta, beta=options.beta, guidance_scale=options.guidance_scale,
                                      modules=report.modules)
    return branch, report


def _add_beta_terms(plan: ApplyPlan, base: Checkpoint, beta: float, dense: dict[str, torch.Tensor],
                    biases: dict[str, torch.Tensor], report: BranchReport, progress: ProgressFactory) -> None:
    """Add -beta * (theta_c - theta_base) for every UNet tensor that differs from the base."""
    target = plan.target
    keys = [k for k in target.keys() if k.startswith("unet.") and k in base]
    bar = progress(len(keys), "branch (beta)")
    try:
        for key in keys:
            theta_c = target.tensor(key).float()
            if key in plan.touched:
                delta, scale = summed_delta(plan, key)
                theta_c.add_(delta, alpha=scale)
            diff = theta_c.sub_(base.tensor(key).float()).mul_(-beta)
            bar.update()
            if not bool(diff.any()):
                continue
            module = key.rsplit(".", 1)[0]
            if _unet_weight(key, tuple(diff.shape)):
                dense[module] = dense[module].add_(diff) if module in dense else diff
            elif _bias_of_layer(key, target):
                biases[module] = biases[module].add_(diff) if module in biases else diff
            else:
                report.not_served.append(key)
    finally:
        bar.close()


def write_companion_lora(path, branch: Branch, architecture: str) -> None:
    """--layout separate: the uncond branch as a kohya LoRA beside the theta_c checkpoint."""
    from npo_merge.delta.files import LOWRANK, provenance
    from npo_merge.delta.types import BaseFingerprint
    from npo_merge.io.lora_writer import write_lora

    dense = [m for m, w in branch.weights.items() if not isinstance(w, LowRank)]
    if dense:
        raise UsageError(f"the uncond branch has {len(dense)} dense layer(s) (e.g. {dense[0]}); a LoRA cannot hold them: "
                         "give --branch-rank or --branch-energy, or use --layout single")
    if branch.biases:
        raise UsageError("the uncond branch has bias differences, which a LoRA cannot hold; use --layout single")
    meta = {**provenance(LOWRANK, "negative", BaseFingerprint(architecture)), **branch.metadata}
    write_lora(path, sorted(branch.weights.items()), layout="kohya", architecture=architecture, metadata=meta)
