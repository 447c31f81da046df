"""Low-rank deltas: SVD factorization of a dense delta into LoRA factors, and exact LoRA algebra.

Why this module exists: extracting a LoRA from "tuned - base" (kohya-style) needs a fast SVD and
an honest fidelity report, and combining LoRAs needs exact arithmetic (rank concatenation, not
factor-wise sums with wrong cross terms) followed by re-compression that never forms the dense
matrix. All functions are pure: tensors in, `LowRank` / `Fidelity` out, computed in fp32.

Conventions (see `LowRank`): delta_W = (alpha / rank) * up @ down over flattened conv dims; conv
factors are down (r, in, kh, kw), up (out, r, 1, 1). Fidelity is always relative to the matrix
that was approximated, in the Frobenius norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from npo_merge.delta.types import LowRank

Method = Literal["randomized", "exact"]

# Randomized SVD defaults (Halko, Martinsson & Tropp 2011). Oversampling p = 8 extra sketch
# columns makes a poor range estimate vanishingly unlikely (their failure bound decays like
# p^-p) for p/r = 12 % more work at r = 64. Each power iteration sharpens the sketch by a factor
# (s_{r+1} / s_j)^2, which matters for the slowly decaying spectra of fine-tune deltas (low rank
# plus a noise floor). Measured on SD1.5-shaped synthetic deltas at rank 64 (noise 0.25 to 1.0 of
# the signal norm), the error against the optimal (exact) one is 1.004-1.021x with niter = 2 and
# 1.001-1.011x with niter = 3, which still runs many times faster than a full SVD
# (benchmarks/extract_svd.py); so niter = 3.
DEFAULT_OVERSAMPLE = 8
DEFAULT_NITER = 3
# When the sketch would span more than this fraction of the smaller matrix side, a full SVD is as
# cheap (measured, 1 thread, niter 3: a sketch of half the side costs 1.0x a full SVD for square
# matrices, 1.7x for 640 x 5760) and exact, so `method="randomized"` uses it.
_SKETCH_FRACTION_FOR_EXACT = 0.4
# Energy mode with randomized SVD starts from this rank and doubles it until the target is met.
_ENERGY_START_RANK = 32


@dataclass(frozen=True)
class Fidelity:
    """How well a rank-r approximation D_r represents D (Frobenius norms).

    retained: ||D_r|| / ||D||, the fraction of the norm kept (1.0 for a zero D).
    rel_error: ||D - D_r|| / ||D|| (0.0 for a zero D). For an orthogonal projection (every
        SVD truncation here) retained^2 + rel_error^2 = 1. From a randomized sketch it is
        sqrt(1 - retained^2), exact in theory but resolved by fp32 singular values only to about
        3e-4 absolute (irrelevant unless the approximation is nearly lossless).
    rank: r, the rank of the returned factors.
    norm: ||D||, to weigh layers when summarizing (see `overall`).
    """

    retained: float
    rel_error: float
    rank: int
    norm: float


def overall(fidelities: Iterable[Fidelity]) -> tuple[float, float]:
    """Model-wide fidelity: (retained, rel_error) of all layers taken as one concatenated vector.

    Args:
        fidelities: one per layer.

    Returns:
        (sqrt(sum ||D_r||^2) / sqrt(sum ||D||^2), sqrt(sum ||D - D_r||^2) / sqrt(sum ||D||^2)),
        (1.0, 0.0) when every layer is zero.
    """
    kept = err = total = 0.0
    for f in fidelities:
        kept += (f.retained * f.norm) ** 2
        err += (f.rel_error * f.norm) ** 2
        total += f.norm**2
    if total == 0.0:
        return 1.0, 0.0
    return math.sqrt(kept / total), math.sqrt(err / total)


# -- helpers -----------------------------------------------------------------------------------


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """(out, in) or (out, in, kh, kw) -> fp32 (out, in*kh*kw); rejects other shapes and non-finite values."""
    if delta.dim() not in (2, 4):
        raise ValueError(
            f"only linear (out, in) or conv (out, in, kh, kw) weights can be factorized, got shape {tuple(delta.shape)}"
        )
    matrix = delta.reshape(delta.shape[0], -1).float()
    if not torch.isfinite(matrix).all():
        raise ValueError("delta contains NaN or Inf values: fix or drop that tensor before factorizing")
    return matrix


def _check_target(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (a fixed rank) or energy (a fraction of the norm to keep)")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1] (fraction of the Frobenius norm kept), got {energy}")


def _energies(s: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Squared singular values in fp64, those below the numerical-rank threshold set to zero."""
    s = s.double()
    if s.numel() == 0:
        return s
    threshold = s[0] * max(shape) * torch.finfo(torch.float32).eps
    return torch.where(s > threshold, s * s, torch.zeros_like(s))


def _smallest_rank(cumulative: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest r with cumulative[r-1] >= energy^2 * total, or None if no r reaches it."""
    reached = torch.nonzero(cumulative >= (energy * energy) * total)
    return int(reached[0]) + 1 if reached.numel() else None


def _squared_norm(x: torch.Tensor) -> float:
    """||x||_F^2 via torch.sum's cascade summation: fp32 torch.linalg.vector_norm on the CPU is off by
    0.3 % on a 1280 x 23040 matrix (measured, torch 2.13), which would skew every fidelity."""
    return float(x.square().sum())


def _fidelity(kept: float, discarded: float, total: float, rank: int) -> Fidelity:
    """Fidelity from squared norms: kept ||D_r||^2, discarded ||D - D_r||^2, total ||D||^2."""
    if total <= 0.0:
        return Fidelity(retained=1.0, rel_error=0.0, rank=rank, norm=0.0)
    return Fidelity(
        retained=min(1.0, math.sqrt(max(kept, 0.0) / total)),
        rel_error=min(1.0, math.sqrt(max(discarded, 0.0) / total)),
        rank=rank,
        norm=math.sqrt(total),
    )


def _factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, alpha: float | None, weight_shape: tuple[int, ...]
) -> LowRank:
    """Split U diag(S) Vh into LoRA factors with sqrt(S) on each side, scaled so that
    (alpha / r) * up @ down == U diag(S) Vh, reshaped for linear or conv weights."""
    r = s.numel()
    alpha = float(r if alpha is None else alpha)
    root = torch.sqrt(s) * math.sqrt(r / alpha)
    up = u * root
    down = root[:, None] * vh
    if len(weight_shape) == 4:
        return LowRank(down=down.reshape(r, *weight_shape[1:]), up=up.reshape(weight_shape[0], r, 1, 1), alpha=alpha)
    return LowRank(down=down, up=up, alpha=alpha)


def _zero(weight_shape: tuple[int, ...], alpha: float | None, device: torch.device) -> tuple[LowRank, Fidelity]:
    """A zero delta becomes a rank-1 pair of zeros (a rank-0 LoRA is not representable: alpha / 0)."""
    out, inner = weight_shape[0], math.prod(weight_shape[1:])
    zeros = torch.zeros(1, device=device)
    lowrank = _factors(torch.zeros(out, 1, device=device), zeros, torch.zeros(1, inner, device=device), alpha, weight_shape)
    return lowrank, Fidelity(retained=1.0, rel_error=0.0, rank=1, norm=0.0)


def _clamp(lowrank: LowRank, quantile: float) -> LowRank:
    """kohya-style clamp: limit both factors' entries to the given quantile of their magnitudes."""
    if not (0.0 < quantile <= 1.0):
        raise ValueError(f"clamp_quantile must be in (0, 1], got {quantile}")
    magnitudes = torch.cat([lowrank.up.reshape(-1), lowrank.down.reshape(-1)]).abs()
    limit = float(torch.quantile(magnitudes, quantile))
    return LowRank(down=lowrank.down.clamp(-limit, limit), up=lowrank.up.clamp(-limit, limit), alpha=lowrank.alpha)


def _measured_fidelity(matrix: torch.Tensor, lowrank: LowRank) -> Fidelity:
    """Fidelity computed from the dense reconstruction (used when factors were altered after SVD)."""
    approx = lowrank.to_dense().reshape(matrix.shape).to(matrix.device)
    return _fidelity(_squared_norm(approx), _squared_norm(matrix - approx), _squared_norm(matrix), lowrank.rank)


def _exact_truncation(
    matrix: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Fidelity]:
    """Best rank-r approximation by full SVD (Eckart-Young); fidelity from the singular values.

    Wide matrices (conv deltas: out < in*kh*kw) are decomposed transposed: LAPACK's gesdd is
    several times faster on the tall orientation (1280 x 5760: 1.6 s instead of 5.7 s, 1 thread).
    """
    if matrix.shape[0] < matrix.shape[1]:
        v, s, uh = torch.linalg.svd(matrix.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energies = _energies(s, tuple(matrix.shape))
    cumulative = torch.cumsum(energies, dim=0)
    total = float(cumulative[-1])
    r = min(rank, s.numel()) if rank is not None else _smallest_rank(cumulative, total, energy)
    kept = float(cumulative[r - 1])
    discarded = float(energies[r:].sum())
    return u[:, :r], s[:r], vh[:r], _fidelity(kept, discarded, total, r)


def _sketch(matrix: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank with a fixed seed, leaving the global RNG state untouched."""
    devices = [matrix.device] if matrix.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=matrix.device.type if devices else None):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u, s, v.mT


def _randomized_truncation(
    matrix: torch.Tensor, rank: int | None, energy: float | None, oversample: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Fidelity]:
    """Rank-r approximation from a randomized sketch, falling back to the exact SVD when the sketch
    would cover most of the matrix. The result is D_r = U_r U_r^T D (an orthogonal projection of
    D), so ||D - D_r||^2 = ||D||^2 - sum_{i<=r} s_i^2 exactly: the fidelity is exact, and in energy
    mode the sketch grows until the target is met (never a silently lower fidelity)."""
    smaller = min(matrix.shape)
    total = _squared_norm(matrix)
    target = rank if rank is not None else min(_ENERGY_START_RANK, smaller)
    while True:
        q = min(smaller, target + oversample)
        if q > _SKETCH_FRACTION_FOR_EXACT * smaller:
            return _exact_truncation(matrix, rank, energy)
        u, s, vh = _sketch(matrix, q, niter, seed)
        cumulative = torch.cumsum(s.double() ** 2, dim=0)
        r = target if rank is not None else _smallest_rank(cumulative, total, energy)
        if r is not None:
            kept = float(cumulative[r - 1])
            return u[:, :r], s[:r], vh[:r], _fidelity(kept, total - kept, total, r)
        target *= 2


# -- public API --------------------------------------------------------------------------------


def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    method: Method = "randomized",
    oversample: int = DEFAULT_OVERSAMPLE,
    niter: int = DEFAULT_NITER,
    alpha: float | None = None,
    device: torch.device | str | None = None,
    clamp_quantile: float | None = None,
    seed: int = 0,
) -> tuple[LowRank, Fidelity]:
    """Compress one dense weight delta to LoRA factors by truncated SVD, with its fidelity.

    Args:
        delta: (out, in) linear or (out, in, kh, kw) conv delta, any float dtype (computed in fp32).
        rank: fixed rank r, capped at min(out, in*kh*kw) (a capped rank is exact). Give exactly
            one of `rank` and `energy`.
        energy: fraction F in (0, 1]: the smallest rank with ||D_r||_F / ||D||_F >= F.
        method: "randomized" (torch.svd_lowrank with `oversample` extra sketch columns and
            `niter` power iterations; it switches to the exact SVD where the sketch would span more
            than 40 % of the smaller side, and in energy mode doubles the sketch until F is
            reached) or "exact" (torch.linalg.svd, the kohya / peft / ComfyUI method).
        oversample: extra sketch columns beyond the rank (randomized only), default 8.
        niter: power (subspace) iterations (randomized only), default 3.
        alpha: LoRA alpha of the result; default the rank (scale 1). Factors are scaled so that
            (alpha / r) * up @ down is the approximation whatever alpha is.
        device: where to compute (e.g. "cuda"); default the delta's device. Factors are returned
            on the delta's device.
        clamp_quantile: opt-in kohya clamp of both factors' entries to this quantile of their
            magnitudes (kohya uses 0.99; it degrades LoRAs, so it is off by default). With it the
            fidelity is measured on the dense reconstruction.
        seed: seed of the random sketch (results are reproducible; the global RNG is untouched).

    Returns:
        (LowRank in fp32 with sqrt(S) split between up and down, Fidelity). A zero delta gives a
        rank-1 pair of zeros with Fidelity(retained=1.0, rel_error=0.0, rank=1, norm=0.0).
    """
    _check_target(rank, energy)
    if method not in ("randomized", "exact"):
        raise ValueError(f"unknown SVD method {method!r}: use 'randomized' or 'exact'")
    if oversample < 0 or niter < 0:
        raise ValueError(f"oversample and niter must be >= 0, got {oversample} and {niter}")
    home = delta.device
    weight_shape = tuple(delta.shape)
    matrix = _as_matrix(delta.to(device) if device is not None else delta)
    if not bool(matrix.any()):
        return _zero(weight_shape, alpha, home)
    if method == "exact":
        u, s, vh, fidelity = _exact_truncation(matrix, rank, energy)
    else:
        u, s, vh, fidelity = _randomized_truncation(matrix, rank, energy, oversample, niter, seed)
    lowrank = _factors(u, s, vh, alpha, weight_shape)
    if clamp_quantile is not None:
        lowrank = _clamp(lowrank, clamp_quantile)
        fidelity = _measured_fidelity(matrix, lowrank)
    return LowRank(down=lowrank.down.to(home), up=lowrank.up.to(home), alpha=lowrank.alpha), fidelity


def concat(terms: Sequence[tuple[LowRank, float]]) -> LowRank:
    """The exact sum of scaled LoRAs as one LoRA, by concatenating their ranks.

    sum_k w_k * (alpha_k / r_k) * B_k @ A_k == [c_1 B_1, ..., c_K B_K] @ [c_1 A_1; ...; c_K A_K]
    with c_k = sqrt(|w_k alpha_k / r_k|) (the sign goes on B_k): no cross terms, no loss.

    Args:
        terms: (lowrank, weight) pairs for the same module (equal weight shapes; all linear or
            all conv).

    Returns:
        LowRank of rank sum(r_k) and alpha = that rank (scale 1), fp32.
    """
    if len(terms) == 0:
        raise ValueError("no LoRAs to concatenate: pass at least one (lowrank, weight) pair")
    first = terms[0][0]
    for i, (lowrank, weight) in enumerate(terms):
        if lowrank.weight_shape != first.weight_shape or lowrank.up.dim() != first.up.dim():
            raise ValueError(
                f"LoRA #{i} has weight shape {lowrank.weight_shape} ({lowrank.up.dim()}-D up), "
                f"#0 has {first.weight_shape} ({first.up.dim()}-D up): only LoRAs of one module can be added"
            )
        if not math.isfinite(float(weight)):
            raise ValueError(f"weight of LoRA #{i} must be finite, got {weight}")
    ups, downs = [], []
    for lowrank, weight in terms:
        coefficient = float(weight) * lowrank.scale
        root = math.sqrt(abs(coefficient))
        ups.append(lowrank.up.float() * math.copysign(root, coefficient))
        downs.append(lowrank.down.float() * root)
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return LowRank(down=down, up=up, alpha=float(down.shape[0]))


def recompress(
    lowrank: LowRank, rank: int | None = None, energy: float | None = None, *, alpha: float | None = None
) -> tuple[LowRank, Fidelity]:
    """Re-compress a LoRA (e.g. a `concat` sum) to a lower rank, exactly and without the dense matrix.

    With up = Q_u R_u and down^T = Q_d R_d (thin QR), (alpha/r) up @ down = Q_u C Q_d^T with the
    small core C = (alpha/r) R_u R_d^T; the SVD of C gives the SVD of the dense delta, so the
    result is the best rank-r approximation of it (Eckart-Young) at O((out + in) r^2) cost.

    Args:
        lowrank: the LoRA to compress (linear or conv).
        rank: target rank, capped at the LoRA's own rank and matrix size; or
        energy: fraction F in (0, 1] of the Frobenius norm to keep (smallest such rank).
        alpha: alpha of the result; default its rank (scale 1).

    Returns:
        (LowRank fp32, Fidelity relative to the dense delta of `lowrank`). A zero LoRA gives a
        rank-1 pair of zeros with perfect fidelity.
    """
    _check_target(rank, energy)
    weight_shape = lowrank.weight_shape
    up = lowrank.up.reshape(weight_shape[0], lowrank.rank).float()
    down = lowrank.down.reshape(lowrank.rank, -1).float()
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ValueError("LoRA factors contain NaN or Inf values: fix the LoRA before re-compressing")
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.mT)
    core = (r_up @ r_down.mT) * lowrank.scale
    if not bool(core.any()):
        return _zero(weight_shape, alpha, up.device)
    u, s, vh, fidelity = _exact_truncation(core, rank, energy)
    return _factors(q_up @ u, s, vh @ q_down.mT, alpha, weight_shape), fidelity
