"""Element-wise merge math on delta tensors: scaling, sums, TIES and DARE, as small pure functions.

Every function takes tensors of one module (or one tensor name) and returns a new fp32 tensor;
inputs of other dtypes are computed in fp32 (the caller casts on write) and are never modified
in place. Nothing here reads or writes files, so a caller streams a checkpoint tensor by tensor
and calls these on each.

References for the methods: TIES-merging (Yadav et al., NeurIPS 2023: trim, elect sign, disjoint
merge) and DARE (Yu et al., ICML 2024: drop and rescale).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal

import torch

SignMethod = Literal["mass", "frequency"]
SIGN_METHODS: tuple[SignMethod, ...] = ("mass", "frequency")


# -- argument checks --------------------------------------------------------------------------


def _check_same_shape(deltas: Sequence[torch.Tensor]) -> None:
    if len(deltas) == 0:
        raise ValueError("no deltas given: pass at least one tensor")
    first = tuple(deltas[0].shape)
    for i, d in enumerate(deltas[1:], start=1):
        if tuple(d.shape) != first:
            raise ValueError(f"deltas differ in shape: #0 is {first}, #{i} is {tuple(d.shape)}")


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} deltas: give one weight per delta")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    return weights


def _check_density(density: float) -> None:
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")


def _check_drop_rate(drop_rate: float) -> None:
    if not (0.0 <= drop_rate < 1.0):
        raise ValueError(f"drop rate must be in [0, 1) (the fraction of entries dropped), got {drop_rate}")


# -- linear algebra of deltas ------------------------------------------------------------------


def scale(delta: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply a delta by a scalar.

    Args:
        delta: any-shaped delta tensor.
        factor: the multiplier.

    Returns:
        factor * delta, fp32.
    """
    return delta.float() * float(factor)


def negate(delta: torch.Tensor) -> torch.Tensor:
    """Flip a delta's direction (e.g. turn "NPO - base" into "base - NPO").

    Returns:
        -delta, fp32.
    """
    return -delta.float()


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of two deltas of equal shape.

    Returns:
        a + b, fp32.
    """
    _check_same_shape([a, b])
    return a.float() + b.float()


def subtract(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Difference of two deltas (or of two weights: tuned - base is a delta) of equal shape.

    Returns:
        a - b, fp32.
    """
    _check_same_shape([a, b])
    return a.float() - b.float()


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: sum_i weights[i] * deltas[i], accumulated in fp32 without stacking.

    Args:
        deltas: one or more tensors of equal shape.
        weights: one finite weight per delta.

    Returns:
        the weighted sum, fp32.
    """
    _check_same_shape(deltas)
    weights = _check_weights(weights, len(deltas))
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d, w in zip(deltas, weights):
        total.add_(d.float(), alpha=w)
    return total


# -- TIES: trim, elect sign, disjoint mean -----------------------------------------------------


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the largest-magnitude entries of a delta and zero the rest (TIES step 1).

    Args:
        delta: any-shaped tensor.
        density: fraction of entries kept, in (0, 1]; exactly ceil(density * numel) entries
            survive (at least one), ties at the threshold broken by position.

    Returns:
        the trimmed delta, fp32.
    """
    _check_density(density)
    x = delta.float()
    n = x.numel()
    keep = min(n, max(1, math.ceil(density * n - 1e-9)))  # 1e-9: 0.3 * 10 is 3.0000000000000004
    if keep == n:
        return x.clone()
    flat = x.reshape(-1)
    kept = torch.zeros_like(flat)
    index = torch.topk(flat.abs(), keep, sorted=False).indices
    kept[index] = flat[index]
    return kept.reshape(x.shape)


def elect_sign(stacked: torch.Tensor, method: SignMethod = "mass") -> torch.Tensor:
    """Elect one sign per entry across deltas stacked on dim 0 (TIES step 2).

    Args:
        stacked: (k, ...) tensor, the k deltas to merge (already trimmed and weighted).
        method: "mass" (TIES paper): the sign of the entry's sum over deltas;
            "frequency": the sign held by more deltas, a tie broken by mass.

    Returns:
        tensor of shape stacked.shape[1:] holding +1, -1, or 0 where the vote is a dead tie
        (such entries merge to 0).
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"unknown sign election method {method!r}: use one of {SIGN_METHODS}")
    x = stacked.float()
    mass = torch.sign(x.sum(dim=0))
    if method == "mass":
        return mass
    votes = torch.sign(torch.sign(x).sum(dim=0))
    return torch.where(votes != 0, votes, mass)


def disjoint_mean(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Average, per entry, only the nonzero values that agree with the elected sign (TIES step 3).

    Args:
        stacked: (k, ...) tensor of deltas.
        sign: elected sign, shape stacked.shape[1:], values in {-1, 0, +1}.

    Returns:
        per-entry mean over agreeing nonzero values (0 where none agree), fp32.
    """
    x = stacked.float()
    if tuple(sign.shape) != tuple(x.shape[1:]):
        raise ValueError(f"sign shape {tuple(sign.shape)} does not match deltas {tuple(x.shape[1:])}")
    agree = (torch.sign(x) == sign) & (x != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return torch.where(agree, x, torch.zeros_like(x)).sum(dim=0) / count


def ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float,
    sign_method: SignMethod = "mass",
) -> torch.Tensor:
    """TIES-merge deltas: trim each to `density`, weight, elect signs, then disjoint mean.

    Weights multiply each trimmed delta before the sign vote (so they also weigh the vote), as
    peft and mergekit do; a global strength (the paper's lambda) is a `scale` of the result.

    Args:
        deltas: one or more tensors of equal shape.
        weights: one weight per delta (default all 1).
        density: fraction of each delta's entries kept, in (0, 1].
        sign_method: "mass" (default) or "frequency", see `elect_sign`.

    Returns:
        the merged delta, fp32.
    """
    _check_same_shape(deltas)
    weights = _check_weights(weights, len(deltas))
    _check_density(density)
    stacked = torch.stack([magnitude_trim(d, density) * w for d, w in zip(deltas, weights)])
    return disjoint_mean(stacked, elect_sign(stacked, sign_method))


# -- DARE: drop and rescale --------------------------------------------------------------------


def seeded_generator(seed: int, name: str = "") -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name), so a streamed merge draws the same masks
    whatever order the tensors are visited in.

    Args:
        seed: the user's seed.
        name: the tensor or module name the draws are for.

    Returns:
        a fresh torch.Generator on the CPU.
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare(delta: torch.Tensor, drop_rate: float, *, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry independently with probability `drop_rate`, rescale the survivors by
    1 / (1 - drop_rate) so the expected delta is unchanged.

    Args:
        delta: any-shaped tensor.
        drop_rate: probability p of dropping an entry, in [0, 1); p = 0 returns the delta.
        generator: the source of randomness (see `seeded_generator`); the mask is drawn on the
            generator's device and moved to the delta's.

    Returns:
        the sparsified, rescaled delta, fp32.
    """
    _check_drop_rate(drop_rate)
    x = delta.float()
    draw = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
    keep = draw >= drop_rate
    return torch.where(keep, x / (1.0 - drop_rate), torch.zeros_like(x))


def dare_ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    drop_rate: float,
    generator: torch.Generator,
    sign_method: SignMethod = "mass",
) -> torch.Tensor:
    """DARE + TIES: sparsify each delta by DARE (instead of magnitude trimming), weight, elect
    signs and take the disjoint mean.

    Args:
        deltas: one or more tensors of equal shape.
        weights: one weight per delta (default all 1).
        drop_rate: DARE drop probability, in [0, 1).
        generator: the source of randomness; deltas draw their masks from it in order.
        sign_method: "mass" (default) or "frequency", see `elect_sign`.

    Returns:
        the merged delta, fp32.
    """
    _check_same_shape(deltas)
    weights = _check_weights(weights, len(deltas))
    _check_drop_rate(drop_rate)
    stacked = torch.stack([dare(d, drop_rate, generator=generator) * w for d, w in zip(deltas, weights)])
    return disjoint_mean(stacked, elect_sign(stacked, sign_method))


def all_finite(tensor: torch.Tensor) -> bool:
    """True when `tensor` holds no NaN or Inf.

    One reduction in the tensor's own dtype decides it (a NaN or Inf makes the sum non-finite): on
    the CPU that is 10-30x cheaper than isfinite().all(). A sum that merely overflows (fp16 tops out
    at 65504) is re-checked exactly.
    """
    if math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
