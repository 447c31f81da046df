"""Tiny SD1.5- and SDXL-structure diffusers models built in-process (no Hub), plus random LoRA deltas.

The block structure follows the real configs (block types, layers per block, linear vs conv
projections, SDXL text_time embedding), so module names are the real ones; only widths, depths of
the SDXL transformer stacks and the text encoders are shrunk. Every builder is seeded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

# Tiny models are overhead-bound, and on a shared 2-core machine OpenMP threads waiting on each other
# made one tiny UNet call 20-50x slower (measured: 0.15 s -> 5 s): tests run them on one thread.
from npo_merge.apply import single_threaded_torch as one_torch_thread  # noqa: F401
from npo_merge.delta.types import LowRank

TOKENIZER_MAX_LENGTH = 16
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) imported as a module, for its --smoke test."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sd15_unet(seed: int = 0) -> nn.Module:
    """UNet2DConditionModel with SD1.5's block structure (CrossAttnDownBlock2D x3 + DownBlock2D, conv proj_in)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    ).eval()


def tiny_sdxl_unet(seed: int = 0) -> nn.Module:
    """UNet2DConditionModel with SDXL's structure (DownBlock2D + CrossAttnDownBlock2D x2, text_time, linear proj)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=32,
    ).eval()


def tiny_unet_inputs(unet: nn.Module, batch: int = 2, seed: int = 1) -> dict:
    """Random UNet call arguments for `batch` rows (sample, timestep, text states, SDXL added conditions)."""
    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    size = config.sample_size
    inputs = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 8, config.cross_attention_dim, generator=gen),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=gen),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1),
        }
    return inputs


# ---------------------------------------------------------------------------------------------
# LoRA deltas with real module names
# ---------------------------------------------------------------------------------------------


def attention_projection_names(unet: nn.Module) -> list[str]:
    """Module paths of to_q/to_k/to_v/to_out.0 of every attention (what the official NPO LoRA covers)."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and any(name.endswith(f".{p}") for p in ATTENTION_PROJECTIONS)
    ]


def linear_and_conv_names(unet: nn.Module) -> list[str]:
    """Module paths of every Linear and Conv2d layer (a LoCon-style all-layer LoRA)."""
    return [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


def random_lora(unet: nn.Module, names: list[str], rank: int, seed: int = 0, strength: float = 0.2) -> dict[str, LowRank]:
    """Random LoRA factors per module (alpha = rank / 2), delta entries ~ strength / sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in names:
        weight = unet.get_submodule(name).weight
        out_dim, fan_in = weight.shape[0], weight[0].numel()
        down = torch.randn(rank, *weight.shape[1:], generator=gen) / fan_in**0.5
        up = torch.randn(out_dim, rank, *([1, 1] if weight.dim() == 4 else []), generator=gen) * (2 * strength / rank**0.5)
        deltas[name] = LowRank(down=down, up=up, alpha=rank / 2)
    return deltas


# ---------------------------------------------------------------------------------------------
# Text encoders, tokenizer, VAE, pipelines
# ---------------------------------------------------------------------------------------------


def tiny_clip_tokenizer(directory: Path):
    """A real CLIPTokenizer over a tiny byte-level vocabulary (npo_merge.tiny), max length 16."""
    from npo_merge.tiny import tiny_tokenizer

    return tiny_tokenizer(Path(directory), max_length=TOKENIZER_MAX_LENGTH)


def _clip_text_config(tokenizer, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_text_encoder(tokenizer, seed: int = 0) -> nn.Module:
    """CLIPTextModel (SD1.5's and SDXL's first text encoder), hidden size 32."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_clip_text_config(tokenizer)).eval()


def tiny_text_encoder_with_projection(tokenizer, seed: int = 0) -> nn.Module:
    """CLIPTextModelWithProjection (SDXL's second text encoder), hidden and projection size 32."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_text_config(tokenizer)).eval()


def tiny_vae(seed: int = 0) -> nn.Module:
    """AutoencoderKL with 2 blocks (scale factor 2) and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    ).eval()


def _sd_scheduler_config() -> dict:
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def tiny_sd15_pipeline(tmp_path: Path, seed: int = 0):
    """StableDiffusionPipeline of tiny parts (DDIM scheduler, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer(Path(tmp_path) / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=tiny_sd15_unet(seed),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(tmp_path: Path, seed: int = 0):
    """StableDiffusionXLPipeline of tiny parts (two CLIP text encoders, Euler scheduler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tiny_clip_tokenizer(Path(tmp_path) / "tokenizer")
    tokenizer_2 = tiny_clip_tokenizer(Path(tmp_path) / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(tokenizer, seed),
        text_encoder_2=tiny_text_encoder_with_projection(tokenizer_2, seed + 1),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(**_sd_scheduler_config()),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
