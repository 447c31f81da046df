"""Tell SD1 / SD2 / SDXL apart from sentinel keys and shapes (widths never matter, only structure).

The rows below are the facts: SDXL's UNet has an added text/time embedding (LDM label_emb,
diffusers add_embedding) and OpenCLIP-G as a second encoder; SD2 uses linear proj_in/proj_out in
its transformers and OpenCLIP-H; SD1 uses 1x1-conv proj_in and transformers' CLIP-L.
"""

from __future__ import annotations

from typing import Callable, Mapping

# A view of a file's tensors: name -> shape.
Shapes = Mapping[str, tuple[int, ...]]

UNKNOWN = "unknown"


def _ndim(shapes: Shapes, key: str) -> int | None:
    shape = shapes.get(key)
    return None if shape is None else len(shape)


def _single_file(shapes: Shapes) -> str:
    unet = "model.diffusion_model."
    if f"{unet}label_emb.0.0.weight" in shapes or "conditioner.embedders.1.model.positional_embedding" in shapes:
        if "conditioner.embedders.0.model.positional_embedding" in shapes:
            return UNKNOWN  # SDXL refiner: OpenCLIP-G alone, not a base we support
        return "sdxl" if f"{unet}input_blocks.9.0.in_layers.0.weight" not in shapes else UNKNOWN
    proj_in = _ndim(shapes, f"{unet}input_blocks.1.1.proj_in.weight")
    if proj_in == 4 or "cond_stage_model.transformer.text_model.final_layer_norm.weight" in shapes:
        return "sd1"
    if proj_in == 2 or "cond_stage_model.model.ln_final.weight" in shapes:
        return "sd2"
    return UNKNOWN


def _diffusers_unet(shapes: Shapes, prefix: str = "") -> str:
    if f"{prefix}add_embedding.linear_1.weight" in shapes:
        return "sdxl"
    proj_in = _ndim(shapes, f"{prefix}down_blocks.0.attentions.0.proj_in.weight")
    if proj_in == 4:
        return "sd1"
    if proj_in == 2:
        return "sd2"
    return UNKNOWN


SENTINELS: dict[str, Callable[[Shapes], str]] = {
    "single-file": _single_file,
    "diffusers-unet": _diffusers_unet,
}


def detect_architecture(layout: str, shapes: Shapes) -> str:
    """sd1 / sd2 / sdxl / unknown for a model layout, from its tensor names and shapes."""
    return SENTINELS[layout](shapes)


def architecture_from_unet_config(config: Mapping[str, object]) -> str:
    """sd1 / sd2 / sdxl / unknown from a diffusers unet/config.json."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return UNKNOWN
    down = config.get("down_block_types") or ()
    if len(down) != 4:
        return UNKNOWN
    return "sd2" if config.get("use_linear_projection") else "sd1"


def architecture_from_cross_attention_dim(dim: int) -> str | None:
    """The architecture whose real cross-attention width is `dim` (768 SD1, 1024 SD2, 2048 SDXL)."""
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(dim)
