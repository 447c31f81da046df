"""Training losses for NPO offsets as pure tensor functions, importable by any trainer.

Two objectives live here, each as small functions of tensors (no models, no I/O):

* **Diffusion-DPO** (Wallace et al. 2023) and its reversal, **DPO-NPO** (Wang et al., ICLR 2025).
  For a pair (x_w preferred over x_l) noised with the same noise and timestep, with per-sample
  errors e = mean_CHW (pred - target)^2 of the trained model and of the frozen reference:

      model_diff = e_model(x_w) - e_model(x_l)
      ref_diff   = e_ref(x_w)   - e_ref(x_l)
      margin     = ref_diff - model_diff          (> 0: the model favours x_w more than the reference)
      sigmoid:  loss = -logsigmoid(k * margin)
      hinge:    loss = relu(1 - k * margin)

  The multiplier k depends on how beta is written, and the two public codebases differ:

  - ``convention="diffusers"`` (diffusers' research_projects/diffusion_dpo script, and the official
    NPO SD1.5 script built on it): ``logits = ref_diff - model_diff; -logsigmoid(beta * logits)``,
    so **k = beta**. NPO SD1.5 used beta = 500 here.
  - ``convention="official"`` (the Diffusion-DPO authors' train.py and the NPO SDXL script):
    ``inside = -0.5 * beta * (model_diff - ref_diff); -logsigmoid(inside)``, so **k = beta / 2**.
    NPO SDXL used beta = 2000 here.

  Hence beta_diffusers = beta_official / 2: diffusers 500 == official 1000 (see `convert_beta`).
  ``reverse=True`` (NPO) optimises the same loss with winner and loser swapped, i.e. margin -> -margin;
  it is bit-for-bit the loss of the swapped pairs because IEEE negation and a - b = -(b - a) are exact.

* **Self-NPO** (arXiv 2505.11777): no preference data. A teacher (EMA of the student) starts from a
  noised real latent at a DDIM timestep, runs a few DDIM steps with anti-guidance, and its final x0
  prediction is the target; the student sees the teacher's end point re-noised to a later timestep
  and is trained to predict that x0 with a pseudo-Huber loss (c = 0.001). One training step:

      idx = randint(0, N); t0 = ddim_timesteps(T, N)[idx]; x = add_noise(x0, noise, a[t0])
      teacher = self_npo_teacher_target(ema_unet_fn, x, idx, cond, uncond, a, w=w)
      x_s, s = self_npo_student_input(teacher, a, randn_like(x))
      loss = self_npo_loss(student_fn(x_s, s, cond), x_s, alpha_bar_at(a, s, 4), teacher.x0)
      ... backward, optimizer step, then EMA-update the teacher (decay 0.999 in the official code)

  Guidance form: the official Self-NPO code (like LCM) writes guidance as
  ``out = out_c + w * (out_c - out_u)`` with w = -1 (SD1.5) and w = -5 (SDXL). In diffusers' form
  ``out_u + s * (out_c - out_u)`` that is s = 1 + w: SD1.5's teacher is the plain unconditional
  prediction (s = 0) and SDXL's is s = -4. `anti_guided_output` uses the official w.

DDIM math (eta = 0) on ``alphas_cumprod`` (a_t), for predictions of type epsilon / v / sample:

    x_t  = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    x0   = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)            (epsilon)
    x0   = sqrt(a_t) x_t - sqrt(1 - a_t) v                  (v_prediction)
    eps  = sqrt(1 - a_t) x_t + sqrt(a_t) v                  (v_prediction)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

BetaConvention = Literal["diffusers", "official"]
LossType = Literal["sigmoid", "hinge"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]

# model_fn(x_t, t, cond) -> raw model output (epsilon, v or x0 according to prediction_type).
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

BETA_CONVENTIONS: tuple[BetaConvention, ...] = ("diffusers", "official")
_BETA_MULTIPLIER = {"diffusers": 1.0, "official": 0.5}


# --------------------------------------------------------------------------------------------
# Diffusion-DPO / DPO-NPO
# --------------------------------------------------------------------------------------------


def beta_multiplier(beta: float, convention: BetaConvention) -> float:
    """The factor k in -logsigmoid(k * (ref_diff - model_diff)) for `beta` written in `convention`."""
    if convention not in _BETA_MULTIPLIER:
        raise ValueError(f"unknown beta convention {convention!r}; use one of {BETA_CONVENTIONS}")
    return float(beta) * _BETA_MULTIPLIER[convention]


def convert_beta(beta: float, from_convention: BetaConvention, to_convention: BetaConvention) -> float:
    """Rewrite a DPO beta from one convention to the other (diffusers 500 <-> official 1000)."""
    return beta_multiplier(beta, from_convention) / _BETA_MULTIPLIER[to_convention]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every dim but the first (C, H, W): shape (B,), computed in fp32."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()).pow(2)
    return err.mean(dim=tuple(range(1, err.dim()))) if err.dim() > 1 else err


@dataclass(frozen=True)
class PreferenceStats:
    """Detached diagnostics of one DPO batch, always about the pairs as given (never reversed).

    implicit_accuracy: fraction of pairs where the model favours the winner more than the
        reference does (margin > 0), exact ties counting 1/2 (as the diffusers script does), so a
        fresh LoRA (model == reference) reads 0.5. A DPO run drives it above 0.5, an NPO run below.
    margin: (B,) ref_diff - model_diff.
    model_diff, ref_diff: (B,) error(winner) - error(loser) of the model / of the reference.
    model_mse, ref_mse: scalars, mean error over winners and losers.
    """

    implicit_accuracy: torch.Tensor
    margin: torch.Tensor
    model_diff: torch.Tensor
    ref_diff: torch.Tensor
    model_mse: torch.Tensor
    ref_mse: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Plain floats for a progress bar or a tracker."""
        return {
            "implicit_acc": float(self.implicit_accuracy),
            "margin": float(self.margin.mean()),
            "model_diff": float(self.model_diff.mean()),
            "ref_diff": float(self.ref_diff.mean()),
            "model_mse": float(self.model_mse),
            "ref_mse": float(self.ref_mse),
        }


def implicit_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Fraction of positive margins, ties counting one half."""
    margin = margin.detach()
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


def dpo_loss_from_errors(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    *,
    convention: BetaConvention = "diffusers",
    reverse: bool = False,
    loss_type: LossType = "sigmoid",
) -> tuple[torch.Tensor, PreferenceStats]:
    """Diffusion-DPO loss (mean over the batch) from per-sample errors; reverse=True is NPO.

    Args:
        model_err_w, model_err_l: (B,) errors of the trained model on winners / losers (with grad).
        ref_err_w, ref_err_l: (B,) errors of the frozen reference on the same inputs.
        beta: strength, written in `convention` (see the module docstring).
        reverse: optimise the reversed preference (DPO-NPO); stats still describe the given pairs.
        loss_type: "sigmoid" (-logsigmoid(k m)) or "hinge" (relu(1 - k m)).

    Returns:
        (loss, stats): a scalar loss and detached `PreferenceStats`.
    """
    k = beta_multiplier(beta, convention)
    model_diff = model_err_w.float() - model_err_l.float()
    ref_diff = (ref_err_w.float() - ref_err_l.float()).detach()
    margin = ref_diff - model_diff
    logits = k * (-margin if reverse else margin)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(logits).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - logits).mean()
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; use 'sigmoid' or 'hinge'")
    stats = PreferenceStats(
        implicit_accuracy=implicit_accuracy(margin),
        margin=margin.detach(),
        model_diff=model_diff.detach(),
        ref_diff=ref_diff,
        model_mse=0.5 * (model_err_w.detach().float().mean() + model_err_l.detach().float().mean()),
        ref_mse=0.5 * (ref_err_w.detach().float().mean() + ref_err_l.detach().float().mean()),
    )
    return loss, stats


def diffusion_dpo_loss(
    model_pred_w: torch.Tensor,
    model_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    beta: float,
    *,
    convention: BetaConvention = "diffusers",
    reverse: bool = False,
    loss_type: LossType = "sigmoid",
) -> tuple[torch.Tensor, PreferenceStats]:
    """Diffusion-DPO loss from model and reference predictions on winners and losers (B, C, H, W).

    The targets are what the model is trained to predict (the noise for epsilon models, the
    velocity for v-prediction models); winner and loser share noise and timestep.
    """
    return dpo_loss_from_errors(
        per_sample_mse(model_pred_w, target_w),
        per_sample_mse(model_pred_l, target_l),
        per_sample_mse(ref_pred_w.detach(), target_w),
        per_sample_mse(ref_pred_l.detach(), target_l),
        beta,
        convention=convention,
        reverse=reverse,
        loss_type=loss_type,
    )


def diffusion_dpo_loss_stacked(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    *,
    convention: BetaConvention = "diffusers",
    reverse: bool = False,
    loss_type: LossType = "sigmoid",
) -> tuple[torch.Tensor, PreferenceStats]:
    """Same loss for a batch laid out as [winners; losers] (2B, ...), as the diffusers script feeds the UNet."""
    if model_pred.shape[0] % 2:
        raise ValueError(f"a [winners; losers] batch needs an even size, got {model_pred.shape[0]}")
    model_err_w, model_err_l = per_sample_mse(model_pred, target).chunk(2)
    ref_err_w, ref_err_l = per_sample_mse(ref_pred.detach(), target).chunk(2)
    return dpo_loss_from_errors(
        model_err_w, model_err_l, ref_err_w, ref_err_l, beta,
        convention=convention, reverse=reverse, loss_type=loss_type,
    )


# --------------------------------------------------------------------------------------------
# DDIM math on alphas_cumprod
# --------------------------------------------------------------------------------------------


def alpha_bar_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """a_t for each sample, shaped (B, 1, ..., 1) to broadcast against an `ndim`-dim batch."""
    a = alphas_cumprod.to(timesteps.device)[timesteps.long()]
    return a.reshape(-1, *([1] * (ndim - 1))).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: sqrt(a) x0 + sqrt(1 - a) noise (diffusers' scheduler.add_noise)."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def renoise(x_t: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Diffuse a sample further, from a_t to a_s <= a_t: sqrt(a_s/a_t) x_t + sqrt(1 - a_s/a_t) noise."""
    ratio = alpha_bar_s / alpha_bar_t
    return ratio.sqrt() * x_t + (1 - ratio).clamp(min=0).sqrt() * noise


def x0_from_prediction(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: PredictionType = "epsilon"
) -> torch.Tensor:
    """The clean-sample estimate implied by a model output at x_t."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def eps_from_prediction(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: PredictionType = "epsilon"
) -> torch.Tensor:
    """The noise estimate implied by a model output at x_t."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * output
    if prediction_type == "sample":
        return (x_t - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0) to the previous timestep: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps


def ddim_timesteps(num_train_timesteps: int, num_ddim_steps: int) -> torch.Tensor:
    """DDIM timesteps with "trailing" spacing, ascending: (1..N) * (T // N) - 1, e.g. 39, 79, ..., 999."""
    ratio = num_train_timesteps // num_ddim_steps
    return torch.arange(1, num_ddim_steps + 1, dtype=torch.long) * ratio - 1


# --------------------------------------------------------------------------------------------
# Self-NPO
# --------------------------------------------------------------------------------------------


def guidance_scale_from_w(w: float) -> float:
    """Self-NPO/LCM w (out_c + w (out_c - out_u)) as diffusers' guidance scale s = 1 + w."""
    return 1.0 + w


def anti_guided_output(cond_out: torch.Tensor, uncond_out: torch.Tensor, w: float) -> torch.Tensor:
    """Guided output in the official Self-NPO form out_c + w (out_c - out_u); w < 0 is anti-guidance."""
    return cond_out + w * (cond_out - uncond_out)


def guided_model_output(
    model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, w: float
) -> torch.Tensor:
    """Call `model_fn` on the conditional and the unconditional input and combine with `anti_guided_output`."""
    return anti_guided_output(model_fn(x_t, t, cond), model_fn(x_t, t, uncond), w)


@dataclass(frozen=True)
class TeacherTarget:
    """The Self-NPO teacher's result: its x0 target, the point it ended at, and that point's timestep."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor


@torch.no_grad()
def self_npo_teacher_target(
    model_fn: ModelFn,
    x_start: torch.Tensor,
    start_index: torch.Tensor,
    cond: Any,
    uncond: Any,
    alphas_cumprod: torch.Tensor,
    *,
    w: float,
    num_ddim_steps: int = 25,
    teacher_steps: int = 5,
    prediction_type: PredictionType = "epsilon",
) -> TeacherTarget:
    """Run the anti-guided teacher a few DDIM steps and return its final x0 prediction.

    Args:
        model_fn: the teacher, `model_fn(x_t, t, cond) -> output` (typically the EMA UNet).
        x_start: (B, C, H, W) noised latents at timesteps `ddim_timesteps(T, N)[start_index]`.
        start_index: (B,) DDIM step indices in [0, num_ddim_steps).
        cond, uncond: conditioning passed through to `model_fn` (caption / empty-prompt embeddings).
        alphas_cumprod: (T,) the scheduler's cumulative alphas.
        w: guidance weight in the official form (-1 for SD1.5, -5 for SDXL).
        teacher_steps: DDIM steps before the final x0 prediction (5 in the official code); a sample
            that reaches t = 0 earlier stays there.

    Returns:
        TeacherTarget(x0, x_t, t): the anti-guided x0 at the end point x_t, reached at timestep t.
    """
    num_train = alphas_cumprod.shape[0]
    schedule = ddim_timesteps(num_train, num_ddim_steps).to(x_start.device)
    ratio = num_train // num_ddim_steps
    index = start_index.to(x_start.device).long()
    if index.min() < 0 or index.max() >= num_ddim_steps:
        raise ValueError(f"start_index must lie in [0, {num_ddim_steps}), got {index.tolist()}")
    a_all = alphas_cumprod.to(x_start.device).float()
    t = schedule[index]
    x = x_start
    active = torch.ones_like(index, dtype=torch.bool)
    nd = x.dim()
    for _ in range(teacher_steps):
        a_t = alpha_bar_at(a_all, t, nd)
        out = guided_model_output(model_fn, x, t, cond, uncond, w).float()
        x0 = x0_from_prediction(out, x, a_t, prediction_type)
        eps = eps_from_prediction(out, x, a_t, prediction_type)
        t_prev = torch.where(index > 0, schedule[(index - 1).clamp(min=0)], torch.zeros_like(t))
        x_next = ddim_step(x0, eps, alpha_bar_at(a_all, t_prev, nd))
        x = torch.where(active.reshape(-1, *([1] * (nd - 1))), x_next.to(x.dtype), x)
        index = index - 1
        active = active & (index >= 0)
        index = index.clamp(min=0)
        t = (t - ratio).clamp(min=0)
        if not bool(active.any()):
            break
    a_t = alpha_bar_at(a_all, t, nd)
    out = guided_model_output(model_fn, x, t, cond, uncond, w).float()
    return TeacherTarget(x0=x0_from_prediction(out, x, a_t, prediction_type), x_t=x, t=t)


def sample_student_timesteps(
    teacher_t: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform timesteps s in [t + 1, T - 1] per sample, strictly noisier than the teacher's end point."""
    teacher_t = teacher_t.long()
    if int(teacher_t.max()) >= num_train_timesteps - 1:
        raise ValueError("the teacher ended at the last timestep; it must take at least one DDIM step")
    span = (num_train_timesteps - 1 - teacher_t).float()  # number of admissible offsets, >= 1
    u = torch.rand(teacher_t.shape, generator=generator, device="cpu").to(teacher_t.device)
    offset = (u * span).floor().long().clamp(max=(span - 1).long()) + 1
    return teacher_t + offset


def self_npo_student_input(
    teacher: TeacherTarget,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's input: the teacher's end point diffused further to a random later timestep s.

    Returns (x_s, s); `noise` is fresh Gaussian noise shaped like the latents.
    """
    s = sample_student_timesteps(teacher.t, alphas_cumprod.shape[0], generator)
    nd = teacher.x_t.dim()
    a_t, a_s = alpha_bar_at(alphas_cumprod, teacher.t, nd), alpha_bar_at(alphas_cumprod, s, nd)
    return renoise(teacher.x_t.float(), a_t, a_s, noise.float()), s


def pseudo_huber_loss(
    pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3, *, per_element: bool = True
) -> torch.Tensor:
    """Pseudo-Huber loss sqrt(d^2 + c^2) - c, averaged to a scalar; quadratic below c, linear above.

    per_element=True (the official Self-NPO code): d is each element's difference and the loss is the
    mean over all elements. per_element=False: d = ||pred - target||_2 per sample (the consistency-
    model form), averaged over the batch.
    """
    diff = pred.float() - target.float()
    if per_element:
        return (torch.sqrt(diff.pow(2) + c * c) - c).mean()
    sq = diff.pow(2).flatten(1).sum(dim=1)
    return (torch.sqrt(sq + c * c) - c).mean()


def self_npo_loss(
    student_output: torch.Tensor,
    x_s: torch.Tensor,
    alpha_bar_s: torch.Tensor,
    teacher_x0: torch.Tensor,
    *,
    prediction_type: PredictionType = "epsilon",
    huber_c: float = 1e-3,
) -> torch.Tensor:
    """Pseudo-Huber distance between the student's x0 (from its output at x_s) and the teacher's x0."""
    student_x0 = x0_from_prediction(student_output.float(), x_s.float(), alpha_bar_s, prediction_type)
    return pseudo_huber_loss(student_x0, teacher_x0.detach(), huber_c)
