"""Golden numeric tests for the element-wise delta math (npo_merge.delta.ops)."""

from __future__ import annotations

import pytest
import torch

from npo_merge.delta import ops

# -- scale, negate, add, subtract, weighted sum ------------------------------------------------


def test_scale_negate_add_subtract_by_hand() -> None:
    a = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    b = torch.tensor([[3.0, 1.0], [-1.5, 2.0]])
    assert torch.equal(ops.scale(a, 0.5), torch.tensor([[0.5, -1.0], [0.25, 2.0]]))
    assert torch.equal(ops.negate(a), torch.tensor([[-1.0, 2.0], [-0.5, -4.0]]))
    assert torch.equal(ops.add(a, b), torch.tensor([[4.0, -1.0], [-1.0, 6.0]]))
    assert torch.equal(ops.subtract(a, b), torch.tensor([[-2.0, -3.0], [2.0, 2.0]]))


def test_weighted_sum_by_hand() -> None:
    d1 = torch.tensor([1.0, 2.0, -1.0])
    d2 = torch.tensor([0.0, -4.0, 3.0])
    d3 = torch.tensor([2.0, 2.0, 2.0])
    # 1*d1 + 0.5*d2 - 1*d3 = [1-0-2, 2-2-2, -1+1.5-2]
    got = ops.weighted_sum([d1, d2, d3], [1.0, 0.5, -1.0])
    assert torch.equal(got, torch.tensor([-1.0, -2.0, -1.5]))


def test_half_precision_inputs_are_computed_and_returned_in_fp32() -> None:
    # 2048 + 1 is not representable in fp16 (spacing 2 there): an fp16 sum would give 2048.
    a = torch.tensor([2048.0], dtype=torch.float16)
    b = torch.tensor([1.0], dtype=torch.bfloat16)
    got = ops.add(a, b)
    assert got.dtype == torch.float32 and got.item() == 2049.0
    assert ops.weighted_sum([a, b], [1.0, 1.0]).item() == 2049.0
    assert ops.scale(a, 1.0).dtype == torch.float32


def test_inputs_are_not_modified_in_place() -> None:
    a = torch.tensor([1.0, -2.0, 3.0])
    before = a.clone()
    ops.scale(a, 3.0)
    ops.negate(a)
    ops.magnitude_trim(a, 0.5)
    ops.ties([a, a], density=0.5)
    ops.dare(a, 0.5, generator=ops.seeded_generator(0))
    assert torch.equal(a, before)


def test_shape_and_weight_validation() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ops.add(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="one weight per delta"):
        ops.weighted_sum([torch.zeros(2), torch.zeros(2)], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        ops.weighted_sum([], [])
    with pytest.raises(ValueError, match="finite"):
        ops.weighted_sum([torch.zeros(2)], [float("nan")])


# -- TIES --------------------------------------------------------------------------------------

# A worked example, computed by hand. Three deltas of 8 entries, density 0.5 keeps 4 of each:
#
#   index        0     1     2     3     4     5     6     7
#   d1         1.0  -2.0   3.0   0.5  -1.5   0.2   1.2   0.1
#   d2         2.0   1.0  -0.5  -3.0   2.5  -0.1   1.1   0.3
#   d3        -4.0  -1.5   2.0   1.0   0.3   0.4  -6.0   0.2
#
# Trim (keep the 4 largest |x| of each delta):
#   d1 keeps 3.0@2, 2.0@1, 1.5@4, 1.2@6   -> [ 0, -2,  3,  0, -1.5, 0,  1.2, 0]
#   d2 keeps 3.0@3, 2.5@4, 2.0@0, 1.1@6   -> [ 2,  0,  0, -3,  2.5, 0,  1.1, 0]
#   d3 keeps 6.0@6, 4.0@0, 2.0@2, 1.5@1   -> [-4, -1.5, 2,  0,  0,   0, -6,   0]
#
# Elect sign by mass (sum of trimmed values):
#   sums   -2   -3.5   5   -3   1   0   -3.7   0   -> signs [-, -, +, -, +, 0, -, 0]
# Disjoint mean (mean of the nonzero values that agree):
#   0: -4 | 1: (-2 - 1.5)/2 = -1.75 | 2: (3 + 2)/2 = 2.5 | 3: -3 | 4: 2.5 | 5: 0 | 6: -6 | 7: 0
#
# Elect sign by frequency (count of signs; a tie falls back to mass):
#   0: one +, one - -> tie -> mass - -> -4      4: one -, one + -> tie -> mass + -> 2.5
#   6: two +, one -  -> +  -> (1.2 + 1.1)/2 = 1.15; the rest as by mass.
#
# Weights (1, 1, 0.5) halve d3 before the vote: d3' = [-2, -0.75, 1, 0, 0, 0, -3, 0]
#   sums    0  -2.75   4   -3   1   0   -0.7   0   -> signs [0, -, +, -, +, 0, -, 0]
#   0: dead tie -> 0 | 1: (-2 - 0.75)/2 = -1.375 | 2: (3 + 1)/2 = 2 | 3: -3 | 4: 2.5 | 6: -3
TIES_DELTAS = [
    torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5, 0.2, 1.2, 0.1]),
    torch.tensor([2.0, 1.0, -0.5, -3.0, 2.5, -0.1, 1.1, 0.3]),
    torch.tensor([-4.0, -1.5, 2.0, 1.0, 0.3, 0.4, -6.0, 0.2]),
]


def test_magnitude_trim_by_hand() -> None:
    assert torch.equal(
        ops.magnitude_trim(TIES_DELTAS[0], 0.5), torch.tensor([0.0, -2.0, 3.0, 0.0, -1.5, 0.0, 1.2, 0.0])
    )
    # ceil(0.3 * 10) = 3 entries kept, never rounded up to 4 by float noise
    x = torch.arange(1.0, 11.0)
    assert int((ops.magnitude_trim(x, 0.3) != 0).sum()) == 3
    # at least one entry survives a tiny density; density 1 keeps everything
    assert int((ops.magnitude_trim(x, 1e-6) != 0).sum()) == 1
    assert torch.equal(ops.magnitude_trim(x, 1.0), x)


def test_ties_mass_worked_example() -> None:
    got = ops.ties(TIES_DELTAS, density=0.5)
    assert torch.allclose(got, torch.tensor([-4.0, -1.75, 2.5, -3.0, 2.5, 0.0, -6.0, 0.0]))


def test_ties_frequency_worked_example() -> None:
    got = ops.ties(TIES_DELTAS, density=0.5, sign_method="frequency")
    assert torch.allclose(got, torch.tensor([-4.0, -1.75, 2.5, -3.0, 2.5, 0.0, 1.15, 0.0]))


def test_ties_weights_worked_example() -> None:
    got = ops.ties(TIES_DELTAS, [1.0, 1.0, 0.5], density=0.5)
    assert torch.allclose(got, torch.tensor([0.0, -1.375, 2.0, -3.0, 2.5, 0.0, -3.0, 0.0]))


def test_ties_keeps_shape_of_conv_deltas() -> None:
    deltas = [t.reshape(2, 1, 2, 2) for t in TIES_DELTAS]
    got = ops.ties(deltas, density=0.5)
    assert got.shape == (2, 1, 2, 2)
    assert torch.allclose(got.reshape(-1), ops.ties(TIES_DELTAS, density=0.5))


def test_elect_sign_and_disjoint_mean() -> None:
    stacked = torch.tensor([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [-5.0, 3.0, 0.0]])
    assert torch.equal(ops.elect_sign(stacked, "mass"), torch.tensor([-1.0, 1.0, 0.0]))
    assert torch.equal(ops.elect_sign(stacked, "frequency"), torch.tensor([1.0, -1.0, 0.0]))
    assert torch.equal(ops.disjoint_mean(stacked, torch.tensor([1.0, -1.0, 0.0])), torch.tensor([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="unknown sign election"):
        ops.elect_sign(stacked, "majority")


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_ties_rejects_bad_density(density: float) -> None:
    with pytest.raises(ValueError, match="density must be in"):
        ops.ties(TIES_DELTAS, density=density)


# -- DARE --------------------------------------------------------------------------------------


def test_dare_drops_the_asked_fraction_and_rescales_survivors() -> None:
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(1))
    got = ops.dare(delta, 0.3, generator=ops.seeded_generator(7, "unet.conv_in.weight"))
    kept = got != 0
    # 100000 Bernoulli(0.7) draws: the kept fraction is 0.7 +- 0.0015 (one sigma)
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(got[kept], delta[kept] / 0.7)


def test_dare_is_reproducible_per_seed_and_name() -> None:
    delta = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    first = ops.dare(delta, 0.5, generator=ops.seeded_generator(3, "a"))
    assert torch.equal(first, ops.dare(delta, 0.5, generator=ops.seeded_generator(3, "a")))
    assert not torch.equal(first, ops.dare(delta, 0.5, generator=ops.seeded_generator(3, "b")))
    assert not torch.equal(first, ops.dare(delta, 0.5, generator=ops.seeded_generator(4, "a")))


def test_dare_preserves_the_expectation() -> None:
    delta = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    generator = ops.seeded_generator(11)
    draws = torch.stack([ops.dare(delta, 0.5, generator=generator) for _ in range(4000)])
    # per entry the mean of 4000 draws has std |x| * sqrt(p / (1 - p)) / sqrt(4000) = 1.6 % of |x|
    assert torch.allclose(draws.mean(dim=0), delta, rtol=0.08)
    assert set(torch.unique(draws[:, 0, 0]).tolist()) == {0.0, 2.0}


def test_dare_zero_rate_is_identity_and_bad_rates_fail() -> None:
    delta = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(ops.dare(delta, 0.0, generator=ops.seeded_generator(0)), delta)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="drop rate must be in"):
            ops.dare(delta, bad, generator=ops.seeded_generator(0))


def test_dare_ties_equals_dare_masks_then_sign_election() -> None:
    # dare_ties must be exactly: the same DARE draws (in order), then mass election + disjoint mean
    got = ops.dare_ties(TIES_DELTAS, [1.0, 2.0, 1.0], drop_rate=0.25, generator=ops.seeded_generator(5))
    generator = ops.seeded_generator(5)
    dropped = torch.stack([ops.dare(d, 0.25, generator=generator) * w for d, w in zip(TIES_DELTAS, [1.0, 2.0, 1.0])])
    sign = torch.sign(dropped.sum(dim=0))
    agree = (torch.sign(dropped) == sign) & (dropped != 0)
    expected = (dropped * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    assert torch.allclose(got, expected)
    # with no drop it is the disjoint mean of the raw deltas: by hand for entry 6,
    # sum 1.2 + 1.1 - 6 < 0, so only d3 agrees -> -6; entry 0: 1 + 2 - 4 < 0 -> -4
    plain = ops.dare_ties(TIES_DELTAS, drop_rate=0.0, generator=ops.seeded_generator(0))
    assert plain[6].item() == -6.0 and plain[0].item() == -4.0


def test_all_finite_catches_nan_and_inf_and_survives_overflowing_sums() -> None:
    from npo_merge.delta.ops import all_finite

    assert all_finite(torch.randn(100, 100))
    assert all_finite(torch.full((4,), 3e38))  # the fp32 sum overflows; the values are finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1000)
        x[517] = bad
        assert not all_finite(x) and not all_finite(x.half())
