"""Self-NPO with a LoRA student: the teacher, its EMA weights, and one training step.

The paper (arXiv 2505.11777) fine-tunes the whole UNet and takes the teacher as an EMA of the
student. Our LoRA variant, defined here:

* student = base + LoRA (the trained adapter); the delta it yields is the LoRA, role negative.
* teacher = base + EMA(LoRA) (``teacher: ema``, the default, as the paper: the EMA starts equal to
  the zero-initialised LoRA, so the first targets are the base's own anti-guided predictions, and
  the teacher then follows the student slowly; decay 0.999 per optimizer step), or the frozen base
  with the adapter disabled (``teacher: base``: fixed targets, no EMA copy; the student then distils
  the base model's anti-guided predictions and cannot drift with its own output).
* target: the teacher starts from a noised latent at a random DDIM step, runs `teacher_steps` DDIM
  steps with anti-guidance (w = -1 for SD1.x/SD2.x, -5 for SDXL, in the official form
  out_c + w (out_c - out_u)) and predicts x0; the student sees that end point re-noised to a later
  timestep, conditioned on the caption, and is trained to predict the teacher's x0 (pseudo-Huber,
  c = 0.001). See `npo_merge.training.losses` for the formulas.
* without images (captions only), the teacher starts from pure Gaussian noise at the last DDIM step,
  the way sampling starts; with images, from a real latent noised to a uniformly drawn DDIM step.

With w = -1 the anti-guided output out_c - (out_c - out_u) is out_u, so the teacher is asked for the
unconditional prediction only (half the teacher forwards, exactly the same target).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
from torch import nn

from npo_merge.training.encoding import Encoders, UNetConditioning, UncondKind
from npo_merge.training.losses import (
    add_noise,
    alpha_bar_at,
    ddim_timesteps,
    self_npo_loss,
    self_npo_student_input,
    self_npo_teacher_target,
)
from npo_merge.training.objectives import SelfNpoSettings
from npo_merge.training.reference import adapters_disabled


class EmaLora:
    """An exponential moving average of the LoRA parameters (fp32), checkpointable by accelerate."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.params, self.decay = params, float(decay)
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * param."""
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the LoRA parameters for the block; the trained values are restored after."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], backup)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [t.cpu() for t in self.shadow]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA checkpoint holds a different number of LoRA tensors")
        self.decay = float(state["decay"])
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)


class Teacher:
    """The Self-NPO teacher on the unwrapped UNet: EMA LoRA weights swapped in, or the adapter disabled."""

    def __init__(self, unet: nn.Module, ema: EmaLora | None):
        self.unet, self.ema = unet, ema

    def context(self) -> ContextManager[Any]:
        return self.ema.applied() if self.ema is not None else adapters_disabled(self.unet)

    def model_fn(self) -> Callable[[torch.Tensor, torch.Tensor, UNetConditioning], torch.Tensor]:
        """model_fn(x_t, t, cond) for `self_npo_teacher_target`; a repeated call with the same inputs is served once."""
        last: list[Any] = [None, None, None, None]

        def fn(x: torch.Tensor, t: torch.Tensor, cond: UNetConditioning) -> torch.Tensor:
            if last[0] is x and last[1] is t and last[2] is cond:
                return last[3]
            out = self.unet(x, t, **cond.kwargs()).sample
            last[:] = [x, t, cond, out]
            return out

        return fn


@dataclass
class ImageBatch:
    """Encoded Self-NPO inputs: real latents (None for captions only), caption and unconditional conditioning."""

    latents: torch.Tensor | None
    cond: UNetConditioning
    uncond: UNetConditioning
    rows: int


def image_batch(batch: Mapping[str, Any], encoders: Encoders, size: tuple[int, int], uncond: UncondKind) -> ImageBatch:
    """A collated CaptionedImageFolder / cached / caption-only batch as latents and conditioning."""
    latents = None
    if "image" in batch:
        dist = batch["image"] if isinstance(batch["image"], Mapping) else encoders.latent_dist(batch["image"])
        latents = encoders.sample_latents(dist)
    text = batch["text"] if "text" in batch else encoders.text(batch["caption"])
    rows = next(iter(text.values())).shape[0]
    original, crop = batch.get("image_original_size"), batch.get("image_crop_top_left")
    cond = encoders.conditioning(text, size, original, crop)
    negative = encoders.conditioning(encoders.uncond_text(rows, uncond), size, original, crop)
    return ImageBatch(latents, cond, negative, rows)


def self_npo_step(
    model: nn.Module,
    teacher: Teacher,
    batch: ImageBatch,
    scheduler: Any,
    settings: SelfNpoSettings,
    latent_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Self-NPO loss of one batch (student = `model`, with grad) and detached stats (teacher/student timesteps)."""
    device = batch.cond.encoder_hidden_states.device
    alphas = scheduler.alphas_cumprod.to(device)
    num_train = alphas.shape[0]
    prediction_type = scheduler.config.prediction_type
    steps = settings.num_ddim_steps
    if batch.latents is not None:
        x0 = batch.latents
        index = torch.randint(0, steps, (batch.rows,), device=device)
        t0 = ddim_timesteps(num_train, steps).to(device)[index]
        x_start = add_noise(x0, torch.randn_like(x0), alpha_bar_at(alphas, t0, x0.dim()))
    else:
        x_start = torch.randn((batch.rows, *latent_shape), device=device)
        index = torch.full((batch.rows,), steps - 1, device=device, dtype=torch.long)
    teacher_cond = batch.uncond if settings.w == -1 else batch.cond
    with torch.no_grad(), teacher.context():
        target = self_npo_teacher_target(
            teacher.model_fn(), x_start, index, teacher_cond, batch.uncond, alphas, w=settings.w,
            num_ddim_steps=steps, teacher_steps=settings.teacher_steps, prediction_type=prediction_type,
        )
    x_s, s = self_npo_student_input(target, alphas, torch.randn_like(target.x_t))
    output = model(x_s, s, **batch.cond.kwargs()).sample
    loss = self_npo_loss(output, x_s, alpha_bar_at(alphas, s, x_s.dim()), target.x0,
                         prediction_type=prediction_type, huber_c=settings.huber_c)
    return loss, {"teacher_t": target.t.float().mean(), "student_t": s.float().mean()}
