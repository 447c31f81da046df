"""The architectures we know, as data: components, single-file prefixes, extras, kohya naming.

Adding a family means adding a row here (and, if its blocks differ, a UNetSpec), not new code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Literal

from npo_merge.io.keymap.links import KeyLink
from npo_merge.io.keymap.text import clip_links, openclip_links
from npo_merge.io.keymap.unet import UNET_SPECS, UNetSpec, unet_key_pairs
from npo_merge.io.keymap.vae import vae_links

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")

# Native keys in LDM/SGM single files that hold no model weight we map (scheduler buffers, EMA
# copies, CLIP's position_ids buffer, OpenCLIP's logit scale). They are kept as they are on apply.
LDM_EXTRAS_COMMON = (
    r"model_ema\..*",
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|lvlb_weights|model\.diffusion_model\.logvar)",
    r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",
    r"conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.position_ids",
)
# Keys in diffusers component files with no canonical counterpart (older transformers saved this buffer).
DIFFUSERS_EXTRAS = (r"text_encoder(_2)?\.text_model\.embeddings\.position_ids",)


def _unet_links(spec: UNetSpec) -> Iterable[KeyLink]:
    for canonical, native in unet_key_pairs(spec):
        yield KeyLink(native, (canonical,))


@dataclass(frozen=True)
class Component:
    """One model inside a checkpoint: canonical name, LDM/SGM prefix, and its tensor links."""

    name: str
    ldm_prefix: str
    links: Callable[[], Iterable[KeyLink]]


@dataclass(frozen=True)
class Architecture:
    name: str
    label: str
    unet: UNetSpec
    components: tuple[Component, ...]
    ldm_extras: tuple[str, ...] = LDM_EXTRAS_COMMON
    # kohya names UNet modules by diffusers paths for SD1/SD2 and by SGM paths for SDXL
    kohya_unet_naming: Literal["diffusers", "ldm"] = "diffusers"
    kohya_text_prefixes: dict[str, str] = field(default_factory=dict)
    cross_attention_dim: int = 0  # of the real model; reported and used to tell SD1 from SD2

    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(name)


_VAE = Component("vae", "first_stage_model.", vae_links)

ARCHITECTURES: dict[str, Architecture] = {
    "sd1": Architecture(
        "sd1",
        "Stable Diffusion 1.x",
        UNET_SPECS["sd1"],
        (
            Component("unet", "model.diffusion_model.", partial(_unet_links, UNET_SPECS["sd1"])),
            Component("text_encoder", "cond_stage_model.transformer.", partial(clip_links, 12, False)),
            _VAE,
        ),
        kohya_text_prefixes={"lora_te_": "text_encoder"},
        cross_attention_dim=768,
    ),
    "sd2": Architecture(
        "sd2",
        "Stable Diffusion 2.x",
        UNET_SPECS["sd2"],
        (
            Component("unet", "model.diffusion_model.", partial(_unet_links, UNET_SPECS["sd2"])),
            Component("text_encoder", "cond_stage_model.model.", partial(openclip_links, 23, False)),
            _VAE,
        ),
        ldm_extras=LDM_EXTRAS_COMMON
        + (r"cond_stage_model\.model\.(transformer\.resblocks\.23\..*|text_projection|logit_scale)",),
        kohya_text_prefixes={"lora_te_": "text_encoder"},
        cross_attention_dim=1024,
    ),
    "sdxl": Architecture(
        "sdxl",
        "Stable Diffusion XL",
        UNET_SPECS["sdxl"],
        (
            Component("unet", "model.diffusion_model.", partial(_unet_links, UNET_SPECS["sdxl"])),
            Component("text_encoder", "conditioner.embedders.0.transformer.", partial(clip_links, 12, False)),
            Component("text_encoder_2", "conditioner.embedders.1.model.", partial(openclip_links, 32, True)),
            _VAE,
        ),
        ldm_extras=LDM_EXTRAS_COMMON + (r"conditioner\.embedders\.1\.model\.logit_scale",),
        kohya_unet_naming="ldm",
        kohya_text_prefixes={"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"},
        cross_attention_dim=2048,
    ),
}
