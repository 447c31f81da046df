"""One Diffusion-DPO / DPO-NPO training step: a pair batch -> noised latents -> policy and reference -> loss.

As in the diffusers Diffusion-DPO script: the winner and the loser of a pair share one noise draw and
one timestep (uniform over the scheduler's training timesteps), the batch is laid out as
[winners; losers], the target is the noise (epsilon models) or the velocity (v-prediction models),
and the loss is `losses.diffusion_dpo_loss_stacked` (reverse=True for NPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from npo_merge.training.config import DpoOptions
from npo_merge.training.encoding import Encoders, UNetConditioning
from npo_merge.training.losses import PreferenceStats, diffusion_dpo_loss_stacked
from npo_merge.training.reference import ReferenceForward


@dataclass
class PairBatch:
    """Encoded pairs: latents (2B, C, h, w) as [winners; losers] and the UNet conditioning of those 2B rows."""

    latents: torch.Tensor
    cond: UNetConditioning

    @property
    def pairs(self) -> int:
        return self.latents.shape[0] // 2


def _stacked_dist(batch: Mapping[str, Any], encoders: Encoders) -> dict[str, torch.Tensor]:
    if isinstance(batch["winner"], Mapping):  # from the encoding cache
        return {k: torch.cat([batch["winner"][k], batch["loser"][k]]) for k in ("mean", "logvar")}
    return encoders.latent_dist(torch.cat([batch["winner"], batch["loser"]]))


def pair_batch(batch: Mapping[str, Any], encoders: Encoders, size: tuple[int, int]) -> PairBatch:
    """A collated PairDataset or cached batch as latents and conditioning (text is encoded unless cached)."""
    latents = encoders.sample_latents(_stacked_dist(batch, encoders))
    text = batch["text"] if "text" in batch else encoders.text(batch["caption"])
    winner = encoders.conditioning(text, size, batch.get("winner_original_size"), batch.get("winner_crop_top_left"))
    loser = encoders.conditioning(text, size, batch.get("loser_original_size"), batch.get("loser_crop_top_left"))
    return PairBatch(latents, winner.cat(loser))


def dpo_step(
    reference: ReferenceForward, batch: PairBatch, scheduler: Any, options: DpoOptions, *, reverse: bool
) -> tuple[torch.Tensor, PreferenceStats]:
    """The DPO (reverse=False) or DPO-NPO (reverse=True) loss of one batch; call inside `reference.context()`.

    scheduler: a diffusers noise scheduler with add_noise/get_velocity (DDPMScheduler of the base).
    Returns the scalar loss (with grad) and detached statistics about the pairs as given.
    """
    latents = batch.latents
    pairs = batch.pairs
    noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), device=latents.device).repeat(2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r} for DPO training")
    policy, ref = reference.predict(noisy, timesteps, **batch.cond.kwargs())
    return diffusion_dpo_loss_stacked(
        policy, ref, target, options.beta, convention=options.convention, reverse=reverse, loss_type=options.loss_type
    )
