"""The frozen encoders of the base pipeline during training: captions -> UNet conditioning, pixels -> latents.

Text goes through the pipeline's own `encode_prompt` (so SD1/SD2 get the last hidden state and SDXL
the concatenated penultimate states of both encoders plus the pooled projection, exactly as at
inference). Images are encoded to the VAE's latent distribution (mean, logvar), which is what the
encoding cache stores; a latent is drawn from it each time it is used, as diffusers' training
scripts do with `latent_dist.sample()`, and scaled by the VAE's scaling factor.

SDXL's micro-conditioning (`time_ids` = original size, crop top-left, target size) is built per
image, so the winner and the loser of a pair each carry their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

UncondKind = Literal["empty-prompt", "zeros"]


@dataclass
class UNetConditioning:
    """What a UNet call takes besides x_t and t: text states and, for SDXL, added_cond_kwargs."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for UNet2DConditionModel.forward."""
        out: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            out["added_cond_kwargs"] = self.added_cond_kwargs
        return out

    def cat(self, other: "UNetConditioning") -> "UNetConditioning":
        """Rows of self followed by rows of other."""
        added = None
        if self.added_cond_kwargs is not None and other.added_cond_kwargs is not None:
            added = {k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()}
        return UNetConditioning(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]), added)


class Encoders:
    """The base pipeline's VAE and text encoder(s), frozen, on the training device."""

    def __init__(self, pipe: Any, architecture: str, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype):
        self.pipe, self.architecture, self.device = pipe, architecture, torch.device(device)
        self.dtype, self.vae_dtype = dtype, vae_dtype
        self.is_sdxl = architecture == "sdxl"
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).to(self.device, dtype=dtype)
        pipe.vae.requires_grad_(False).to(self.device, dtype=vae_dtype)
        config = pipe.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self._uncond: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def identity(self) -> str:
        """Part of an encoding-cache key: which kinds of encoders and dtypes produced an entry."""
        return f"{self.architecture}:vae-{str(self.vae_dtype).removeprefix('torch.')}:text-{str(self.dtype).removeprefix('torch.')}"

    @torch.no_grad()
    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (N, 77, D)} and, for SDXL, "pooled_prompt_embeds": (N, P)."""
        encoded = self.pipe.encode_prompt(list(captions), device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        out = {"prompt_embeds": encoded[0]}
        if self.is_sdxl:
            out["pooled_prompt_embeds"] = encoded[2]
        return out

    def uncond_text(self, n: int, kind: UncondKind) -> dict[str, torch.Tensor]:
        """The unconditional branch's text input for n rows: the encoded empty prompt, or zeros (SDXL's default)."""
        if kind not in self._uncond:
            empty = self.text([""])
            self._uncond[kind] = {k: torch.zeros_like(v) for k, v in empty.items()} if kind == "zeros" else empty
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond[kind].items()}

    @torch.no_grad()
    def latent_dist(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"mean", "logvar"} of the VAE posterior for (N, 3, H, W) pixels in [-1, 1]."""
        dist = self.pipe.vae.encode(pixels.to(self.device, dtype=self.vae_dtype)).latent_dist
        return {"mean": dist.mean, "logvar": dist.logvar}

    def sample_latents(self, dist: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A scaled latent drawn from a stored posterior: (mean + std * noise - shift) * scaling_factor, fp32."""
        mean = dist["mean"].to(self.device, torch.float32)
        std = torch.exp(0.5 * dist["logvar"].to(self.device, torch.float32))
        return (mean + std * torch.randn_like(mean) - self.shift_factor) * self.scaling_factor

    def conditioning(
        self,
        text: Mapping[str, torch.Tensor],
        size: tuple[int, int],
        original_size: torch.Tensor | None = None,
        crop_top_left: torch.Tensor | None = None,
    ) -> UNetConditioning:
        """UNet inputs for N rows; SDXL gets time_ids from each row's original size and crop (defaults: size, (0, 0))."""
        states = text["prompt_embeds"].to(self.device, self.dtype)
        if not self.is_sdxl:
            return UNetConditioning(states)
        n = states.shape[0]
        target = torch.tensor([size], device=self.device).expand(n, 2)
        original = target if original_size is None else original_size.to(self.device)
        crop = torch.zeros_like(target) if crop_top_left is None else crop_top_left.to(self.device)
        time_ids = torch.cat([original, crop, target], dim=1).to(self.dtype)
        pooled = text["pooled_prompt_embeds"].to(self.device, self.dtype)
        return UNetConditioning(states, {"text_embeds": pooled, "time_ids": time_ids})
