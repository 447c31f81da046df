"""The published component configs of SD1.5, SD2.1 and SDXL base, as data.

Used to build real-size models with random weights (benchmarks) or on the meta device (shapes and
key sets) without downloading anything. Values are those of the released config.json files.
"""

from __future__ import annotations

from typing import Any

UNET: dict[str, dict[str, Any]] = {
    "sd1": dict(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sd2": dict(
        sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    ),
    "sdxl": dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}

# transformers CLIPTextConfig kwargs per text encoder; the bool says "with projection".
TEXT_ENCODERS: dict[str, list[tuple[dict[str, Any], bool]]] = {
    "sd1": [(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768), False)],
    "sd2": [(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512), False)],
    "sdxl": [
        (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768), False),
        (dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280), True),
    ],
}

VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
)


def build_unet(architecture: str, **overrides: Any):
    """A diffusers UNet2DConditionModel of the real config (create under torch.device('meta') for shapes only)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET[architecture], **overrides})


def build_text_encoders(architecture: str) -> list:
    """The transformers text encoder(s) of the real configs, vocab 49408, 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for kwargs, projection in TEXT_ENCODERS[architecture]:
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kwargs)
        out.append((CLIPTextModelWithProjection if projection else CLIPTextModel)(config))
    return out


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE)
