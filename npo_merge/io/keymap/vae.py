"""VAE tensor names: diffusers AutoencoderKL <-> LDM `first_stage_model.*` (same for SD1/SD2/SDXL).

LDM keeps the mid-block attention projections as 1x1 convs; diffusers uses linears, so those
links squeeze/unsqueeze (see links.py).
"""

from __future__ import annotations

from typing import Iterator

from npo_merge.io.keymap.links import KeyLink

LEVELS = 4
ENCODER_RESNETS = 2
DECODER_RESNETS = 3
_PARAMS = ("weight", "bias")
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _pairs(canonical: str, native: str, parts: dict[str, str]) -> Iterator[tuple[str, str]]:
    for diffusers_part, ldm_part in parts.items():
        for param in _PARAMS:
            yield f"{canonical}.{diffusers_part}.{param}", f"{native}.{ldm_part}.{param}"


def vae_links() -> Iterator[KeyLink]:
    """Every VAE tensor link, names relative to the VAE."""
    plain: list[tuple[str, str]] = []
    for side in ("encoder", "decoder"):
        plain += _pairs(side, side, {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"})
        for block in (0, 1):
            plain += _pairs(f"{side}.mid_block.resnets.{block}", f"{side}.mid.block_{block + 1}", _RESNET_PARTS)
        for param in _PARAMS:
            yield KeyLink(f"{side}.mid.attn_1.norm.{param}", (f"{side}.mid_block.attentions.0.group_norm.{param}",))
            for diffusers_part, ldm_part in list(_ATTENTION_PARTS.items())[1:]:
                transform = "squeeze" if param == "weight" else "same"
                yield KeyLink(
                    f"{side}.mid.attn_1.{ldm_part}.{param}",
                    (f"{side}.mid_block.attentions.0.{diffusers_part}.{param}",),
                    transform,
                )
    plain += _pairs("", "", {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"})
    for level in range(LEVELS):
        for block in range(ENCODER_RESNETS):
            plain += _pairs(f"encoder.down_blocks.{level}.resnets.{block}", f"encoder.down.{level}.block.{block}", _RESNET_PARTS)
        if level < LEVELS - 1:
            plain += _pairs(f"encoder.down_blocks.{level}.downsamplers.0", f"encoder.down.{level}.downsample", {"conv": "conv"})
        native_level = LEVELS - 1 - level  # LDM numbers decoder levels from the bottom
        for block in range(DECODER_RESNETS):
            plain += _pairs(f"decoder.up_blocks.{level}.resnets.{block}", f"decoder.up.{native_level}.block.{block}", _RESNET_PARTS)
        if level < LEVELS - 1:
            plain += _pairs(f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.up.{native_level}.upsample", {"conv": "conv"})
    for canonical, native in plain:
        yield KeyLink(native.lstrip("."), (canonical.lstrip("."),))


# Names written by diffusers before 0.14 for the mid-block attention; read as their modern names.
LEGACY_DIFFUSERS_VAE = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
