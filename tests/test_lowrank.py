"""Numeric tests for SVD factorization and exact LoRA algebra (npo_merge.delta.lowrank).

Matrices are built with known singular values (D = U diag(s) V^T, U and V orthonormal), so every
expected error is a sum of the singular values we chose to discard.
"""

from __future__ import annotations

import math

import pytest
import torch

from npo_merge.delta.lowrank import Fidelity, concat, factorize, overall, recompress
from npo_merge.delta.types import LowRank


def with_spectrum(rows: int, cols: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    """A (rows, cols) fp32 matrix whose singular values are exactly `singular_values` (descending)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64)).Q
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def rel_error(delta: torch.Tensor, lowrank: LowRank) -> float:
    """||D - dense(lowrank)|| / ||D||, measured on the dense reconstruction."""
    return float(torch.linalg.vector_norm(delta.float() - lowrank.to_dense()) / torch.linalg.vector_norm(delta.float()))


def rel_error64(delta: torch.Tensor, lowrank: LowRank) -> float:
    """rel_error computed in fp64, for comparisons finer than fp32 rounding."""
    residual = delta.double() - lowrank.to_dense(torch.float64)
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(delta.double()))


def random_lora(out: int, inner: tuple[int, ...], rank: int, alpha: float, seed: int) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    if len(inner) == 1:
        return LowRank(down=torch.randn(rank, *inner, generator=g), up=torch.randn(out, rank, generator=g), alpha=alpha)
    return LowRank(down=torch.randn(rank, *inner, generator=g), up=torch.randn(out, rank, 1, 1, generator=g), alpha=alpha)


# -- factorize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_error_equals_norm_of_discarded_singular_values(method: str) -> None:
    s = [10.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    delta = with_spectrum(40, 30, s).float()
    lowrank, fid = factorize(delta, rank=3, method=method)
    # kept 10, 6, 3; discarded 2, 1, 0.5, 0.25
    total = math.sqrt(sum(x * x for x in s))
    assert fid.rank == lowrank.rank == 3
    assert fid.rel_error == pytest.approx(math.sqrt(4 + 1 + 0.25 + 0.0625) / total, rel=1e-4)
    assert fid.retained == pytest.approx(math.sqrt(100 + 36 + 9) / total, rel=1e-5)
    assert fid.norm == pytest.approx(total, rel=1e-5)
    assert rel_error(delta, lowrank) == pytest.approx(fid.rel_error, rel=1e-4)
    # sqrt(S) split: column i of up and row i of down both have norm sqrt(s_i)
    assert torch.allclose(lowrank.up.norm(dim=0), torch.tensor([10.0, 6.0, 3.0]).sqrt(), rtol=1e-4)
    assert torch.allclose(lowrank.down.norm(dim=1), torch.tensor([10.0, 6.0, 3.0]).sqrt(), rtol=1e-4)
    assert lowrank.alpha == 3.0 and lowrank.up.dtype == torch.float32


def test_randomized_fidelity_formula_matches_the_reconstruction() -> None:
    # randomized D_r = U_r U_r^T D, so ||D - D_r||^2 = ||D||^2 - sum s_i^2; check against the dense error
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(300, 12, generator=g) @ torch.randn(12, 200, generator=g) + 0.3 * torch.randn(300, 200, generator=g)
    lowrank, fid = factorize(delta, rank=16, method="randomized", niter=0)
    measured = rel_error(delta, lowrank)
    assert fid.rel_error == pytest.approx(measured, rel=1e-3)
    assert fid.retained**2 + fid.rel_error**2 == pytest.approx(1.0, abs=1e-5)


def test_fidelity_stays_exact_on_a_large_matrix() -> None:
    # 4 M entries: a plain fp32 torch.linalg.vector_norm is off by ~2e-4 here, enough to skew the
    # reported error by ~5e-4 relative; the fidelity must match an fp64 measurement far closer
    g = torch.Generator().manual_seed(13)
    delta = torch.randn(1024, 8, generator=g) @ torch.randn(8, 4096, generator=g) / 64 + 0.01 * torch.randn(1024, 4096, generator=g)
    lowrank, fid = factorize(delta, rank=8)
    assert fid.rel_error == pytest.approx(rel_error64(delta, lowrank), rel=5e-5)


def test_randomized_agrees_with_exact_on_a_decaying_spectrum() -> None:
    s = [0.85**i for i in range(150)]
    delta = with_spectrum(256, 180, s, seed=4).float()
    fast, fast_fid = factorize(delta, rank=24, method="randomized")
    best, best_fid = factorize(delta, rank=24, method="exact")
    optimum = math.sqrt(sum(x * x for x in s[24:]) / sum(x * x for x in s))
    assert best_fid.rel_error == pytest.approx(optimum, rel=1e-3)
    # measured in fp64 (at a 2 % error, fp32 singular values resolve the randomized error only to
    # ~1e-4 relative): never below the optimum (Eckart-Young), at most 1 % above it
    fast_err, best_err = rel_error64(delta, fast), rel_error64(delta, best)
    assert best_err * (1 - 1e-6) <= fast_err <= 1.01 * best_err
    assert fast_fid.rel_error == pytest.approx(fast_err, rel=1e-3)
    assert torch.allclose(fast.to_dense(), best.to_dense(), atol=1e-3 * s[0])


def test_energy_picks_the_smallest_rank_that_keeps_the_fraction() -> None:
    # s = 4, 2, 1, 1, 0.5: ||D||^2 = 22.25; kept fraction by rank = 0.848, 0.948, 0.972, 0.994, 1
    delta = with_spectrum(12, 9, [4.0, 2.0, 1.0, 1.0, 0.5]).float()
    for energy, rank in [(0.8, 1), (0.9, 2), (0.95, 3), (0.99, 4), (0.995, 5), (1.0, 5)]:
        lowrank, fid = factorize(delta, energy=energy, method="exact")
        assert lowrank.rank == fid.rank == rank, energy
        assert fid.retained >= energy - 1e-7


def test_randomized_energy_grows_the_sketch_and_never_returns_less() -> None:
    # geometric decay 0.93^i: keeping 99.9 % of the norm needs rank 43, more than the first
    # sketch spans (rank 32 + oversample 8 = 40 columns), so the sketch must grow
    s = [0.93**i for i in range(200)]
    delta = with_spectrum(400, 300, s, seed=5).float()
    exact, exact_fid = factorize(delta, energy=0.999, method="exact")
    fast, fast_fid = factorize(delta, energy=0.999, method="randomized")
    assert exact_fid.rank == 43
    assert fast_fid.retained >= 0.999
    assert exact_fid.rank <= fast_fid.rank <= exact_fid.rank + 1
    assert rel_error(delta, fast) == pytest.approx(fast_fid.rel_error, rel=1e-2)


def test_rank_is_capped_at_the_matrix_size() -> None:
    delta = torch.randn(10, 6, generator=torch.Generator().manual_seed(6))
    lowrank, fid = factorize(delta, rank=100)
    assert lowrank.rank == fid.rank == 6
    assert torch.allclose(lowrank.to_dense(), delta, atol=1e-5)
    assert fid.rel_error < 1e-5


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (16, 8, 1, 1)])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_conv_shapes_round_trip(shape: tuple[int, ...], method: str) -> None:
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    full = min(shape[0], math.prod(shape[1:]))
    lowrank, fid = factorize(delta, rank=full, method=method)
    assert lowrank.down.shape == (full, *shape[1:])
    assert lowrank.up.shape == (shape[0], full, 1, 1)
    assert lowrank.weight_shape == shape
    assert torch.allclose(lowrank.to_dense(), delta, atol=1e-5)
    truncated, fid = factorize(delta, rank=2, method=method)
    assert truncated.down.shape == (2, *shape[1:]) and truncated.up.shape == (shape[0], 2, 1, 1)
    assert rel_error(delta, truncated) == pytest.approx(fid.rel_error, rel=1e-4)


def test_alpha_changes_factors_not_the_delta() -> None:
    delta = with_spectrum(20, 16, [5.0, 3.0, 1.0, 0.5]).float()
    plain, _ = factorize(delta, rank=3)
    scaled, _ = factorize(delta, rank=3, alpha=1.0)
    assert scaled.alpha == 1.0 and plain.alpha == 3.0
    assert torch.allclose(scaled.to_dense(), plain.to_dense(), atol=1e-5)


def test_half_precision_input_gives_fp32_factors() -> None:
    delta = with_spectrum(20, 16, [5.0, 3.0, 1.0]).to(torch.float16)
    lowrank, fid = factorize(delta, rank=3)
    assert lowrank.up.dtype == lowrank.down.dtype == torch.float32
    assert fid.rel_error < 1e-3  # rank-3 matrix, only fp16 rounding remains


def test_zero_delta_gives_a_rank_one_zero_pair_with_perfect_fidelity() -> None:
    lowrank, fid = factorize(torch.zeros(6, 4, 3, 3), rank=8)
    assert fid == Fidelity(retained=1.0, rel_error=0.0, rank=1, norm=0.0)
    assert lowrank.down.shape == (1, 4, 3, 3) and lowrank.up.shape == (6, 1, 1, 1)
    assert not lowrank.to_dense().any()


def test_clamp_is_opt_in_and_its_fidelity_is_measured() -> None:
    g = torch.Generator().manual_seed(8)
    delta = torch.randn(64, 48, generator=g)
    delta[0, 0] = 40.0  # an outlier the clamp will cut
    plain, plain_fid = factorize(delta, rank=8, method="exact")
    clamped, clamped_fid = factorize(delta, rank=8, method="exact", clamp_quantile=0.99)
    assert clamped_fid.rel_error > plain_fid.rel_error
    assert clamped_fid.rel_error == pytest.approx(rel_error(delta, clamped), rel=1e-4)
    assert clamped.up.abs().max() < plain.up.abs().max()


def test_randomized_is_seeded_and_leaves_the_global_rng_alone() -> None:
    delta = torch.randn(200, 150, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = factorize(delta, rank=10)
    assert torch.equal(torch.rand(3), expected_next)
    b, _ = factorize(delta, rank=10)
    assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)


def test_device_argument_computes_there_and_returns_on_the_input_device() -> None:
    delta = with_spectrum(30, 20, [3.0, 2.0, 1.0]).float()
    lowrank, fid = factorize(delta, rank=2, device="cpu")
    assert lowrank.up.device == delta.device and fid.rank == 2
    assert fid.rel_error == pytest.approx(1.0 / math.sqrt(14.0), rel=1e-4)


def test_bad_arguments_are_refused() -> None:
    delta = torch.randn(8, 6)
    with pytest.raises(ValueError, match="exactly one of rank"):
        factorize(delta)
    with pytest.raises(ValueError, match="exactly one of rank"):
        factorize(delta, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="energy must be in"):
        factorize(delta, energy=1.5)
    with pytest.raises(ValueError, match="positive integer"):
        factorize(delta, rank=0)
    with pytest.raises(ValueError, match="only linear"):
        factorize(torch.randn(8), rank=2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        factorize(torch.full((4, 4), float("nan")), rank=2)
    with pytest.raises(ValueError, match="unknown SVD method"):
        factorize(delta, rank=2, method="lanczos")


# -- concat (exact LoRA + LoRA) ----------------------------------------------------------------


@pytest.mark.parametrize("inner", [(12,), (3, 3, 3)])
def test_concat_is_the_exact_sum(inner: tuple[int, ...]) -> None:
    a = random_lora(10, inner, rank=4, alpha=8.0, seed=10)
    b = random_lora(10, inner, rank=2, alpha=1.0, seed=11)
    c = random_lora(10, inner, rank=3, alpha=3.0, seed=12)
    total = concat([(a, 0.7), (b, -1.5), (c, 2.0)])
    expected = 0.7 * a.to_dense() - 1.5 * b.to_dense() + 2.0 * c.to_dense()
    assert total.rank == 9 and total.alpha == 9.0
    assert total.weight_shape == a.weight_shape
    assert torch.allclose(total.to_dense(), expected, atol=1e-5)


def test_concat_refuses_different_modules() -> None:
    a = random_lora(10, (12,), rank=4, alpha=4.0, seed=13)
    b = random_lora(10, (11,), rank=4, alpha=4.0, seed=14)
    with pytest.raises(ValueError, match="only LoRAs of one module"):
        concat([(a, 1.0), (b, 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        concat([])


# -- recompress --------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [(40,), (4, 3, 3)])
def test_recompress_equals_truncated_svd_of_the_dense_sum(inner: tuple[int, ...]) -> None:
    a = random_lora(30, inner, rank=8, alpha=8.0, seed=15)
    b = random_lora(30, inner, rank=6, alpha=3.0, seed=16)
    summed = concat([(a, 1.0), (b, 0.5)])
    dense = summed.to_dense()
    lowrank, fid = recompress(summed, rank=5)
    best, best_fid = factorize(dense, rank=5, method="exact")
    assert lowrank.rank == 5 and lowrank.weight_shape == dense.shape
    assert torch.allclose(lowrank.to_dense(), best.to_dense(), atol=1e-4 * float(dense.abs().max()))
    assert fid.rel_error == pytest.approx(best_fid.rel_error, rel=1e-4)
    assert fid.norm == pytest.approx(float(dense.norm()), rel=1e-5)
    assert rel_error(dense, lowrank) == pytest.approx(fid.rel_error, rel=1e-3)


def test_recompress_at_full_rank_and_by_energy() -> None:
    a = random_lora(20, (15,), rank=4, alpha=4.0, seed=17)
    b = random_lora(20, (15,), rank=4, alpha=4.0, seed=18)
    summed = concat([(a, 1.0), (b, 1.0)])
    same, fid = recompress(summed, rank=100)
    assert same.rank == 8 and fid.rel_error < 1e-5
    assert torch.allclose(same.to_dense(), summed.to_dense(), atol=1e-4)
    by_energy, fid = recompress(summed, energy=0.9)
    _, best_fid = factorize(summed.to_dense(), energy=0.9, method="exact")
    assert by_energy.rank == best_fid.rank and fid.retained >= 0.9


def test_recompress_when_the_rank_exceeds_the_matrix_size() -> None:
    # a rank-8 LoRA on a 5 x 6 weight: the dense delta has rank <= 5
    lora = random_lora(5, (6,), rank=8, alpha=8.0, seed=19)
    lowrank, fid = recompress(lora, rank=8)
    assert lowrank.rank == 5
    assert torch.allclose(lowrank.to_dense(), lora.to_dense(), atol=1e-4)


def test_recompress_of_a_zero_lora() -> None:
    zero = LowRank(down=torch.zeros(3, 4), up=torch.zeros(5, 3), alpha=3.0)
    lowrank, fid = recompress(zero, rank=2)
    assert lowrank.rank == 1 and fid.retained == 1.0 and not lowrank.to_dense().any()


# -- overall -----------------------------------------------------------------------------------


def test_overall_weighs_layers_by_their_norm() -> None:
    # layer 1: norm 3, retained 0.6, error 0.8; layer 2: norm 4, perfect -> kept^2 = 3.24 + 16
    got = overall([Fidelity(0.6, 0.8, 4, 3.0), Fidelity(1.0, 0.0, 4, 4.0), Fidelity(1.0, 0.0, 1, 0.0)])
    assert got == pytest.approx((math.sqrt(19.24 / 25), math.sqrt(5.76 / 25)))
    assert overall([]) == (1.0, 0.0)
