"""Tiny models with the real SD1.5 / SD2 / SDXL block structure, written in every real layout.

For tests, demos and examples (here and in projects that build on npo_merge): no download needed.
Widths are tiny; names and nesting are real: the UNets follow the real block structure, the text
encoders have the real layer counts (12 CLIP-L, 23 OpenCLIP-H as diffusers keeps it, 32 OpenCLIP-G),
the VAE has the real 4 levels. Diffusers and transformers write the diffusers layouts themselves;
the single-file layouts are produced through our key tables (which the test suite judges against
diffusers' own single-file loader).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from npo_merge.io.keymap.tables import ldm_table
from npo_merge.io.safetensors_stream import save_tensors

TEXT_HIDDEN = 32

UNET_CONFIGS: dict[str, dict] = {
    "sd1": dict(
        sample_size=8, block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8,
    ),
    "sd2": dict(
        sample_size=8, block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True,
    ),
    "sdxl": dict(
        sample_size=8, block_out_channels=(16, 32, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8,
    ),
}

TEXT_LAYERS = {"sd1": [12], "sd2": [23], "sdxl": [12, 32]}


def _clip_config(layers: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN, hidden_act=act,
    )


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter distinct random values (defaults leave many at 0/1, hiding mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return module.eval()


@lru_cache(maxsize=None)
def _models(arch: str, seed: int) -> dict[str, torch.nn.Module]:
    models: dict[str, torch.nn.Module] = {"unet": _seeded(UNet2DConditionModel(**UNET_CONFIGS[arch]), seed)}
    act = "quick_gelu" if arch == "sd1" else "gelu"
    layers = TEXT_LAYERS[arch]
    models["text_encoder"] = _seeded(CLIPTextModel(_clip_config(layers[0], "quick_gelu" if arch != "sd2" else act)), seed + 1)
    if arch == "sdxl":
        models["text_encoder_2"] = _seeded(CLIPTextModelWithProjection(_clip_config(layers[1], "gelu")), seed + 2)
    models["vae"] = _seeded(
        AutoencoderKL(
            block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=8,
        ),
        seed + 3,
    )
    return models


def tiny_models(arch: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """unet / text_encoder(s) / vae of a tiny `arch` model (cached; do not modify in place)."""
    return _models(arch, seed)


def canonical_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """All canonical tensors ("unet.conv_in.weight", ...) of the tiny model."""
    out: dict[str, torch.Tensor] = {}
    for component, model in tiny_models(arch, seed).items():
        for key, value in model.state_dict().items():
            if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection.")):
                key = f"text_model.{key}"  # transformers 5 drops the prefix published files carry
            out[f"{component}.{key}"] = value.detach().clone()
    return out


def to_single_file_state(arch: str, canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors -> LDM/SGM single-file names through our table (inverse links)."""
    table = ldm_table(arch)
    out: dict[str, torch.Tensor] = {}
    for key in canonical:
        link = table.link_for_canonical(key)
        if link.native in out:
            continue
        parts = [canonical[name] for name in link.canonical]
        shape = parts[0].shape
        if link.transform == "split3":
            shape = (3 * shape[0], *shape[1:])
        elif link.transform == "squeeze":
            shape = (*shape, 1, 1)
        elif link.transform == "transpose":
            shape = shape[::-1]
        out[link.native] = link.to_native(parts, shape).clone()
    return out


def single_file_extras(arch: str) -> dict[str, torch.Tensor]:
    """Non-weight tensors real single files carry (scheduler buffers, OpenCLIP extras)."""
    extras = {"alphas_cumprod": torch.linspace(0.99, 0.01, 1000), "betas": torch.linspace(1e-4, 0.02, 1000)}
    if arch == "sd1":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if arch == "sd2":
        gen = torch.Generator().manual_seed(5)
        prefix = "cond_stage_model.model."
        extras[prefix + "text_projection"] = torch.randn(TEXT_HIDDEN, TEXT_HIDDEN, generator=gen)
        extras[prefix + "logit_scale"] = torch.tensor(4.6)
        for part, shape in {
            "attn.in_proj_weight": (3 * TEXT_HIDDEN, TEXT_HIDDEN), "attn.in_proj_bias": (3 * TEXT_HIDDEN,),
            "attn.out_proj.weight": (TEXT_HIDDEN, TEXT_HIDDEN), "attn.out_proj.bias": (TEXT_HIDDEN,),
            "ln_1.weight": (TEXT_HIDDEN,), "ln_1.bias": (TEXT_HIDDEN,), "ln_2.weight": (TEXT_HIDDEN,), "ln_2.bias": (TEXT_HIDDEN,),
            "mlp.c_fc.weight": (64, TEXT_HIDDEN), "mlp.c_fc.bias": (64,), "mlp.c_proj.weight": (TEXT_HIDDEN, 64),
            "mlp.c_proj.bias": (TEXT_HIDDEN,),
        }.items():
            extras[f"{prefix}transformer.resblocks.23.{part}"] = torch.randn(shape, generator=gen)
    if arch == "sdxl":
        extras["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    return extras


def write_single_file(path: Path, arch: str, *, dtype: torch.dtype | None = None, seed: int = 0,
                      components: tuple[str, ...] | None = None) -> Path:
    """A tiny single-file (A1111/ComfyUI style) checkpoint of `arch` at `path`."""
    canonical = canonical_state(arch, seed)
    if components is not None:
        canonical = {k: v for k, v in canonical.items() if k.split(".", 1)[0] in components}
    state = to_single_file_state(arch, canonical)
    if components is None:
        state.update(single_file_extras(arch))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_tensors(path, state, {"format": "pt"})
    return path


def write_diffusers_folder(path: Path, arch: str, *, seed: int = 0, variant: str | None = None,
                           shard_unet: bool = False) -> Path:
    """A tiny diffusers folder written by diffusers/transformers' own save_pretrained."""
    path.mkdir(parents=True, exist_ok=True)
    classes = {}
    for component, model in tiny_models(arch, seed).items():
        kwargs: dict = {"variant": variant} if variant else {}
        if component == "unet" and shard_unet:
            kwargs["max_shard_size"] = "2MB"
        if variant == "fp16":
            model = _half_copy(model)
        model.save_pretrained(path / component, safe_serialization=True, **kwargs)
        classes[component] = ["diffusers" if component in ("unet", "vae") else "transformers", type(model).__name__]
    pipeline = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **classes}, indent=2))
    return path


def _half_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).half()


def tiny_pipeline_folder(path: Path, arch: str, *, seed: int = 0) -> Path:
    """A complete tiny diffusers pipeline folder (tokenizers and scheduler included) saved by diffusers.

    Its UNet, text encoders and VAE are `tiny_models(arch, seed)`, so `write_single_file(.., arch,
    seed=seed)` is the same model as a single file and this folder can serve as its `config=`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    models = tiny_models(arch, seed)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    parts = dict(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tiny_tokenizer(path / "_tok"),
                 unet=models["unet"], scheduler=scheduler)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=models["text_encoder_2"], tokenizer_2=parts["tokenizer"], **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.save_pretrained(path)
    import shutil

    shutil.rmtree(path / "_tok", ignore_errors=True)
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2/CLIP) uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            symbols.append(256 + extra)
            extra += 1
    return [chr(code) for code in symbols]


def tiny_tokenizer(folder: Path, max_length: int = 77):
    """A real CLIPTokenizer over a tiny byte-level vocabulary (a few merges), written to `folder`."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    merges = ["t h", "th e</w>", "c a", "ca t</w>"]
    vocab = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
