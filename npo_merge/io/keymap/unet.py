"""UNet tensor names: diffusers module paths <-> LDM/SGM `model.diffusion_model.*` names.

The correspondence is a function of a few architecture facts (levels, layers per block, which
levels carry attention and how deep); `UNET_SPECS` is that table, and `unet_key_pairs` expands it
to every (canonical, native) tensor-name pair. The reverse direction is the same list read the
other way, so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

# Resnet internals: diffusers name -> LDM name.
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_NORM_LINEAR = ("weight", "bias")


@dataclass(frozen=True)
class UNetSpec:
    """Block structure of a UNet, enough to name every tensor (widths don't matter)."""

    levels: int
    layers_per_block: int
    down_attention_depth: tuple[int, ...]  # transformer blocks per attention, per down level (0 = none)
    mid_attention_depth: int
    has_label_emb: bool  # SDXL's added text/time embedding (diffusers add_embedding)

    @property
    def up_attention_depth(self) -> tuple[int, ...]:
        return tuple(reversed(self.down_attention_depth))


UNET_SPECS: dict[str, UNetSpec] = {
    "sd1": UNetSpec(4, 2, (1, 1, 1, 0), 1, False),
    "sd2": UNetSpec(4, 2, (1, 1, 1, 0), 1, False),
    "sdxl": UNetSpec(3, 2, (0, 2, 10), 10, True),
}


def _resnet(canonical: str, native: str) -> Iterator[tuple[str, str]]:
    for diffusers_part, ldm_part in RESNET_PARTS.items():
        for param in _NORM_LINEAR:
            yield f"{canonical}.{diffusers_part}.{param}", f"{native}.{ldm_part}.{param}"


def _transformer(canonical: str, native: str, depth: int) -> Iterator[tuple[str, str]]:
    names = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"]
    for block in range(depth):
        prefix = f"transformer_blocks.{block}"
        for norm in ("norm1", "norm2", "norm3"):
            names += [f"{prefix}.{norm}.weight", f"{prefix}.{norm}.bias"]
        for attn in ("attn1", "attn2"):
            names += [f"{prefix}.{attn}.{proj}.weight" for proj in ("to_q", "to_k", "to_v")]
            names += [f"{prefix}.{attn}.to_out.0.weight", f"{prefix}.{attn}.to_out.0.bias"]
        names += [f"{prefix}.ff.net.0.proj.weight", f"{prefix}.ff.net.0.proj.bias"]
        names += [f"{prefix}.ff.net.2.weight", f"{prefix}.ff.net.2.bias"]
    for name in names:
        yield f"{canonical}.{name}", f"{native}.{name}"


def _leaf(canonical: str, native: str) -> Iterator[tuple[str, str]]:
    for param in _NORM_LINEAR:
        yield f"{canonical}.{param}", f"{native}.{param}"


def unet_key_pairs(spec: UNetSpec) -> Iterator[tuple[str, str]]:
    """Every (diffusers name, LDM name) tensor pair of a UNet, names relative to the UNet.

    Resnets are listed with conv_shortcut everywhere: which ones really have it depends on widths,
    and a pair that never matches a file costs nothing.
    """
    yield from _leaf("time_embedding.linear_1", "time_embed.0")
    yield from _leaf("time_embedding.linear_2", "time_embed.2")
    if spec.has_label_emb:
        yield from _leaf("add_embedding.linear_1", "label_emb.0.0")
        yield from _leaf("add_embedding.linear_2", "label_emb.0.2")
    yield from _leaf("conv_in", "input_blocks.0.0")
    yield from _leaf("conv_norm_out", "out.0")
    yield from _leaf("conv_out", "out.2")

    per_level = spec.layers_per_block + 1
    for level in range(spec.levels):
        depth = spec.down_attention_depth[level]
        for layer in range(spec.layers_per_block):
            index = 1 + level * per_level + layer
            yield from _resnet(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0")
            if depth:
                yield from _transformer(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1", depth)
        if level < spec.levels - 1:
            index = 1 + level * per_level + spec.layers_per_block
            yield from _leaf(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")

    yield from _resnet("mid_block.resnets.0", "middle_block.0")
    yield from _transformer("mid_block.attentions.0", "middle_block.1", spec.mid_attention_depth)
    yield from _resnet("mid_block.resnets.1", "middle_block.2")

    for up in range(spec.levels):
        depth = spec.up_attention_depth[up]
        for layer in range(per_level):
            index = up * per_level + layer
            yield from _resnet(f"up_blocks.{up}.resnets.{layer}", f"output_blocks.{index}.0")
            if depth:
                yield from _transformer(f"up_blocks.{up}.attentions.{layer}", f"output_blocks.{index}.1", depth)
        if up < spec.levels - 1:
            index = up * per_level + spec.layers_per_block
            slot = 2 if depth else 1
            yield from _leaf(f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv")
