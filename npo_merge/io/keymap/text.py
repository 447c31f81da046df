"""Text-encoder tensor names: transformers CLIP (diffusers) <-> the layouts single files use.

SD1 and SDXL's first encoder store transformers' own CLIP names under a prefix. SD2 and SDXL's
second encoder store OpenCLIP names: q/k/v packed into one in_proj tensor and the projection
transposed. SD2 keeps all 24 OpenCLIP blocks while diffusers' SD2 text encoder has 23 (it uses
the penultimate layer), so block 23 has no canonical counterpart.
"""

from __future__ import annotations

from typing import Iterator

from npo_merge.io.keymap.links import KeyLink

_PARAMS = ("weight", "bias")
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
_OPENCLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_keys(layers: int, projection: bool) -> Iterator[str]:
    """Tensor names of a transformers CLIPTextModel(WithProjection) state dict."""
    yield "text_model.embeddings.token_embedding.weight"
    yield "text_model.embeddings.position_embedding.weight"
    for layer in range(layers):
        for part in _LAYER_PARTS:
            for param in _PARAMS:
                yield f"text_model.encoder.layers.{layer}.{part}.{param}"
    yield "text_model.final_layer_norm.weight"
    yield "text_model.final_layer_norm.bias"
    if projection:
        yield "text_projection.weight"


def clip_links(layers: int, projection: bool) -> Iterator[KeyLink]:
    """transformers CLIP stored under a prefix: names are identical."""
    for key in clip_keys(layers, projection):
        yield KeyLink(key, (key,))


def openclip_links(layers: int, projection: bool) -> Iterator[KeyLink]:
    """OpenCLIP text tower names <-> transformers CLIP names."""
    yield KeyLink("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",))
    yield KeyLink("positional_embedding", ("text_model.embeddings.position_embedding.weight",))
    for param in _PARAMS:
        yield KeyLink(f"ln_final.{param}", (f"text_model.final_layer_norm.{param}",))
    if projection:
        yield KeyLink("text_projection", ("text_projection.weight",), "transpose")
    for layer in range(layers):
        native = f"transformer.resblocks.{layer}"
        canonical = f"text_model.encoder.layers.{layer}"
        for param in _PARAMS:
            suffix = "weight" if param == "weight" else "bias"
            yield KeyLink(
                f"{native}.attn.in_proj_{suffix}",
                tuple(f"{canonical}.self_attn.{p}_proj.{param}" for p in "qkv"),
                "split3",
            )
            for diffusers_part, openclip_part in _OPENCLIP_PARTS.items():
                yield KeyLink(f"{native}.{openclip_part}.{param}", (f"{canonical}.{diffusers_part}.{param}",))
