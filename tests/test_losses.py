"""Losses for NPO training: hand-computed DPO values, the reverse/swap identity, beta conventions,
DDIM math checked against diffusers' DDIMScheduler, and the Self-NPO pieces."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from npo_merge.training import losses as L


def _pred(*rows: list[float]) -> torch.Tensor:
    """Rows of two values as a (B, 1, 1, 2) prediction batch."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 1, 2)


# Two pairs, target 0 everywhere, so each error is the mean of squares:
#   pair 0: model w [.1,.1] -> .01, model l [.2,.2] -> .04, model_diff -.03; ref w .04, ref l .04, ref_diff 0
#           margin = ref_diff - model_diff = +.03
#   pair 1: model w [.3,.1] -> .05, model l [.1,.1] -> .01, model_diff +.04; ref w [.2,.2] .04, ref l [.2,0] .02,
#           ref_diff .02, margin = -.02
MODEL_W, MODEL_L = _pred([0.1, 0.1], [0.3, 0.1]), _pred([0.2, 0.2], [0.1, 0.1])
REF_W, REF_L = _pred([0.2, 0.2], [0.2, 0.2]), _pred([0.2, 0.2], [0.2, 0.0])
ZERO = torch.zeros(2, 1, 1, 2)


def _loss(beta: float = 100.0, **kw):
    return L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, ZERO, ZERO, beta, **kw)


def test_per_sample_mse_means_over_chw():
    pred = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 0.0]]]])
    # (1 + 9) / 2 = 5 and (4 + 0) / 2 = 2
    assert torch.equal(L.per_sample_mse(pred, torch.zeros_like(pred)), torch.tensor([5.0, 2.0]))


def test_sigmoid_loss_hand_computed():
    loss, stats = _loss(100.0)
    # diffusers form, k = beta = 100: logits 100 * [.03, -.02] = [3, -2]
    # loss = (log(1 + e^-3) + log(1 + e^2)) / 2 = (0.0485874 + 2.1269280) / 2 = 1.0877577
    assert loss.item() == pytest.approx(1.0877577, rel=1e-5)
    assert stats.margin.tolist() == pytest.approx([0.03, -0.02], abs=1e-7)
    assert stats.model_diff.tolist() == pytest.approx([-0.03, 0.04], abs=1e-7)
    assert stats.ref_diff.tolist() == pytest.approx([0.0, 0.02], abs=1e-7)
    assert stats.implicit_accuracy.item() == 0.5  # one positive margin out of two
    # model mse: (mean(.01, .05) + mean(.04, .01)) / 2 = (.03 + .025) / 2 = .0275
    assert stats.model_mse.item() == pytest.approx(0.0275, abs=1e-7)
    assert stats.as_dict()["implicit_acc"] == 0.5


def test_hinge_loss_hand_computed():
    loss, _ = _loss(100.0, loss_type="hinge")
    # relu(1 - 3) = 0, relu(1 + 2) = 3 -> mean 1.5
    assert loss.item() == pytest.approx(1.5, rel=1e-5)
    reversed_loss, _ = _loss(100.0, loss_type="hinge", reverse=True)
    # relu(1 + 3) = 4, relu(1 - 2) = 0 -> mean 2
    assert reversed_loss.item() == pytest.approx(2.0, rel=1e-5)


def test_reverse_sigmoid_hand_computed():
    loss, stats = _loss(100.0, reverse=True)
    # logits [-3, 2]: (log(1 + e^3) + log(1 + e^-2)) / 2 = (3.0485874 + 0.1269280) / 2 = 1.5877577
    assert loss.item() == pytest.approx(1.5877577, rel=1e-5)
    assert stats.implicit_accuracy.item() == 0.5  # stats describe the pairs as given, not the reversal


def test_official_convention_matches_its_own_formula():
    torch.manual_seed(0)
    mw, ml, rw, rl, tw, tl = (torch.randn(4, 4, 8, 8) for _ in range(6))
    loss, _ = L.diffusion_dpo_loss(mw, ml, rw, rl, tw, tl, 2000.0, convention="official")
    # the Diffusion-DPO authors' code: inside = -0.5 * beta * (model_diff - ref_diff)
    model_diff = (mw - tw).pow(2).mean(dim=[1, 2, 3]) - (ml - tl).pow(2).mean(dim=[1, 2, 3])
    ref_diff = (rw - tw).pow(2).mean(dim=[1, 2, 3]) - (rl - tl).pow(2).mean(dim=[1, 2, 3])
    expected = -torch.nn.functional.logsigmoid(-0.5 * 2000.0 * (model_diff - ref_diff)).mean()
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_beta_conversion_between_conventions():
    assert L.convert_beta(500, "diffusers", "official") == 1000
    assert L.convert_beta(2000, "official", "diffusers") == 1000
    assert L.beta_multiplier(1000, "official") == L.beta_multiplier(500, "diffusers") == 500
    a, _ = _loss(50.0, convention="diffusers")
    b, _ = _loss(100.0, convention="official")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="convention"):
        L.beta_multiplier(1.0, "paper")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_reverse_is_exactly_the_swapped_pairs(loss_type):
    torch.manual_seed(1)
    mw, ml = (torch.randn(6, 4, 8, 8, requires_grad=True) for _ in range(2))
    rw, rl, tw, tl = (torch.randn(6, 4, 8, 8) for _ in range(4))
    rev, _ = L.diffusion_dpo_loss(mw, ml, rw, rl, tw, tl, 500.0, reverse=True, loss_type=loss_type)
    (g_rev_w, g_rev_l) = torch.autograd.grad(rev, (mw, ml))
    swapped, _ = L.diffusion_dpo_loss(ml, mw, rl, rw, tl, tw, 500.0, loss_type=loss_type)
    (g_sw_w, g_sw_l) = torch.autograd.grad(swapped, (mw, ml))
    assert torch.equal(rev, swapped)
    assert torch.equal(g_rev_w, g_sw_w) and torch.equal(g_rev_l, g_sw_l)


def test_stacked_layout_equals_separate_tensors():
    torch.manual_seed(2)
    mw, ml, rw, rl, tw, tl = (torch.randn(3, 4, 8, 8) for _ in range(6))
    sep, sep_stats = L.diffusion_dpo_loss(mw, ml, rw, rl, tw, tl, 500.0, reverse=True)
    stk, stk_stats = L.diffusion_dpo_loss_stacked(
        torch.cat([mw, ml]), torch.cat([rw, rl]), torch.cat([tw, tl]), 500.0, reverse=True
    )
    assert torch.equal(sep, stk)
    assert torch.equal(sep_stats.margin, stk_stats.margin)
    with pytest.raises(ValueError, match="even"):
        L.diffusion_dpo_loss_stacked(mw, rw, tw, 500.0)


def test_fresh_lora_reads_half_accuracy_and_log2_loss():
    torch.manual_seed(3)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    # model == reference (a zero-initialised LoRA): every margin is exactly 0
    loss, stats = L.diffusion_dpo_loss_stacked(pred, pred, target, 500.0)
    assert stats.implicit_accuracy.item() == 0.5
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_implicit_accuracy_moves_with_the_model():
    # margins > 0 mean the model favours the winner more than the reference does
    assert L.implicit_accuracy(torch.tensor([0.1, 0.2, -0.1, 0.0])).item() == pytest.approx(0.625)  # (2 + .5) / 4


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss type"):
        _loss(loss_type="ipo")


# --------------------------------------------------------------------------------------------
# DDIM math
# --------------------------------------------------------------------------------------------


def _sd_alphas() -> torch.Tensor:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def _ddim(prediction_type: str = "epsilon") -> DDIMScheduler:
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, timestep_spacing="trailing", prediction_type=prediction_type,
    )
    sched.set_timesteps(25)
    return sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_invert_forward_diffusion(prediction_type):
    torch.manual_seed(4)
    x0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    a = L.alpha_bar_at(_sd_alphas().double(), torch.tensor([10, 500, 990]), 4).double()
    x_t = L.add_noise(x0, eps, a)
    output = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    assert torch.allclose(L.x0_from_prediction(output, x_t, a, prediction_type), x0, atol=1e-9)
    assert torch.allclose(L.eps_from_prediction(output, x_t, a, prediction_type), eps, atol=1e-9)
    # a DDIM "step" to the same timestep with the true x0 and eps lands back on x_t
    assert torch.allclose(L.ddim_step(x0, eps, a), x_t, atol=1e-12)


def test_ddim_step_matches_diffusers():
    sched = _ddim()
    torch.manual_seed(5)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = sched.alphas_cumprod
    expected = sched.step(out, 439, x).prev_sample
    x0 = L.x0_from_prediction(out, x, a[439])
    assert torch.allclose(L.ddim_step(x0, out, a[399]), expected, atol=1e-5)


def test_ddim_timesteps_are_trailing():
    ts = L.ddim_timesteps(1000, 25)
    assert ts[:3].tolist() == [39, 79, 119] and ts[-1].item() == 999
    assert sorted(_ddim().timesteps.tolist()) == ts.tolist()


def test_renoise_matches_the_official_noise_to_signal_form():
    a = _sd_alphas()
    t, s = torch.tensor([239]), torch.tensor([700])
    at, as_ = L.alpha_bar_at(a, t, 4), L.alpha_bar_at(a, s, 4)
    torch.manual_seed(6)
    x_t, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    # official Self-NPO: (x_t / alpha_t + sqrt(nsr_s^2 - nsr_t^2) * noise) * alpha_s, alpha = sqrt(a), nsr = sigma / alpha
    nsr = lambda ab: ((1 - ab) / ab).sqrt()  # noqa: E731
    official = (x_t / at.sqrt() + (nsr(as_) ** 2 - nsr(at) ** 2).sqrt() * noise) * as_.sqrt()
    assert torch.allclose(L.renoise(x_t, at, as_, noise), official, atol=1e-5)
    # the total noise variance after re-noising is 1 - a_s
    var = as_ / at * (1 - at) + (1 - as_ / at)
    assert var.item() == pytest.approx((1 - as_).item(), abs=1e-6)


# --------------------------------------------------------------------------------------------
# Self-NPO
# --------------------------------------------------------------------------------------------


def _toy_model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + cond + 1e-3 * t.float().reshape(-1, 1, 1, 1)


def test_anti_guidance_forms():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5])
    # official w = -1: c - (c - u) = u, the plain unconditional output (diffusers scale 0)
    assert torch.allclose(L.anti_guided_output(c, u, -1.0), u)
    # w = -5: c - 5 (c - u) = 5u - 4c = [-5.5, 6.5]
    assert L.anti_guided_output(c, u, -5.0).tolist() == [-5.5, 6.5]
    assert L.guidance_scale_from_w(-5.0) == -4.0
    s = L.guidance_scale_from_w(-5.0)
    assert torch.allclose(u + s * (c - u), L.anti_guided_output(c, u, -5.0))


def _scheduler_teacher(sched, x, t, cond, uncond, w, steps):
    """Reference: the same teacher run through diffusers' DDIMScheduler, one sample at a time."""
    def guided(x, t):
        tt = torch.tensor([t])
        return L.anti_guided_output(_toy_model(x, tt, cond), _toy_model(x, tt, uncond), w)

    for _ in range(steps):
        x = sched.step(guided(x, t), t, x).prev_sample
        t -= 40
        if t < 0:
            t = 0
            break
    return sched.step(guided(x, t), t, x).pred_original_sample, x, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_target_matches_diffusers_ddim(prediction_type):
    sched = _ddim(prediction_type)
    torch.manual_seed(7)
    x = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 4, 8, 8) * 0.1, torch.zeros(2, 4, 8, 8)
    start = torch.tensor([1, 10])  # t = 79 (reaches t = 0 after two steps) and t = 439
    got = L.self_npo_teacher_target(
        _toy_model, x, start, cond, uncond, sched.alphas_cumprod, w=-5.0, prediction_type=prediction_type
    )
    assert got.t.tolist() == [0, 239]
    for i, t0 in enumerate([79, 439]):
        x0, x_end, t_end = _scheduler_teacher(sched, x[i : i + 1], t0, cond[i : i + 1], uncond[i : i + 1], -5.0, 5)
        assert t_end == got.t[i].item()
        assert torch.allclose(got.x_t[i : i + 1], x_end, atol=1e-4)
        assert torch.allclose(got.x0[i : i + 1], x0, atol=1e-4)


def test_teacher_rejects_out_of_range_start():
    with pytest.raises(ValueError, match="start_index"):
        L.self_npo_teacher_target(
            _toy_model, torch.zeros(1, 4, 2, 2), torch.tensor([25]), 0.0, 0.0, _sd_alphas(), w=-1.0
        )


def test_student_timesteps_lie_after_the_teacher():
    t = torch.tensor([0, 239, 997, 998] * 50)
    s = L.sample_student_timesteps(t, 1000, torch.Generator().manual_seed(0))
    assert bool((s > t).all()) and bool((s <= 999).all())
    assert bool((s[3::4] == 999).all())  # from 998 only 999 is admissible
    assert len(set(s[::4].tolist())) > 20  # spread over [1, 999]
    with pytest.raises(ValueError, match="at least one DDIM step"):
        L.sample_student_timesteps(torch.tensor([999]), 1000)


def test_pseudo_huber_hand_computed():
    pred, target = torch.tensor([[0.003, 0.004]]), torch.zeros(1, 2)
    # per element: (sqrt(9e-6 + 1e-6) - 1e-3 + sqrt(1.6e-5 + 1e-6) - 1e-3) / 2 = (0.00216228 + 0.00312311) / 2
    assert L.pseudo_huber_loss(pred, target, 1e-3).item() == pytest.approx(0.00264269, rel=1e-4)
    # per sample: ||d|| = 0.005 -> sqrt(2.5e-5 + 1e-6) - 1e-3 = 0.00409902
    assert L.pseudo_huber_loss(pred, target, 1e-3, per_element=False).item() == pytest.approx(0.00409902, rel=1e-4)
    # quadratic regime: d << c gives about d^2 / (2c)
    small = torch.tensor([[1e-5]])
    assert L.pseudo_huber_loss(small, torch.zeros(1, 1), 1e-3).item() == pytest.approx(1e-10 / 2e-3, rel=1e-2)


def test_self_npo_loss_vanishes_for_a_perfect_student_and_has_gradient():
    a = _sd_alphas()
    torch.manual_seed(8)
    target, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a_s = L.alpha_bar_at(a, torch.tensor([500, 800]), 4)
    x_s = L.add_noise(target, noise, a_s)
    assert L.self_npo_loss(noise, x_s, a_s, target).item() == pytest.approx(0.0, abs=1e-5)
    wrong = (noise + 0.1).requires_grad_(True)
    loss = L.self_npo_loss(wrong, x_s, a_s, target)
    loss.backward()
    assert loss.item() > 1e-3 and wrong.grad.abs().sum() > 0


def test_student_input_is_the_teacher_point_diffused_further():
    a = _sd_alphas()
    teacher = L.TeacherTarget(x0=torch.zeros(2, 4, 4, 4), x_t=torch.ones(2, 4, 4, 4), t=torch.tensor([0, 239]))
    x_s, s = L.self_npo_student_input(teacher, a, torch.zeros(2, 4, 4, 4), torch.Generator().manual_seed(0))
    assert bool((s > teacher.t).all())
    # with zero noise only the signal scaling sqrt(a_s / a_t) remains
    expected = (a[s] / a[teacher.t]).sqrt().reshape(2, 1, 1, 1).expand(2, 4, 4, 4)
    assert torch.allclose(x_s, expected, atol=1e-6)
