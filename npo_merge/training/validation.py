"""Validation samples during training, drawn with the same machinery users sample with.

Negative offsets (dpo-npo, self-npo): the current LoRA factors go into `npo_merge.enable_npo` on the
training pipeline, attached to the peft layers' own base layers while the adapter is off, so the
images come from the dual-branch sampler exactly as a user would get them from the written file
(one batched UNet forward per step, theta + delta on the unconditional half). `generate(compare=True)`
draws plain CFG and CFG + NPO from the same seeds and `save_samples` writes the PNGs and the grid.

Positive offsets (dpo): the base and the base + LoRA (the adapter on, both branches), same seeds,
written as NNN-base.png / NNN-lora.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from npo_merge.guidance.pipeline import enable_npo
from npo_merge.guidance.sampling import generate, save_samples
from npo_merge.training.config import ValidationOptions
from npo_merge.training.lora import lora_factors
from npo_merge.training.reference import adapters_disabled


def _pipeline_images(pipe: Any, options: ValidationOptions, size: tuple[int, int]) -> list[Any]:
    images = []
    for index, prompt in enumerate(options.prompts):
        generator = torch.Generator(device="cpu").manual_seed(options.seed + index)
        result = pipe(prompt, negative_prompt=options.negative_prompt, guidance_scale=options.guidance,
                      num_inference_steps=options.steps, generator=generator, height=size[0], width=size[1])
        images.append(result.images[0])
    return images


@torch.no_grad()
def write_validation_samples(pipe: Any, unet: nn.Module, role: str, options: ValidationOptions,
                             size: tuple[int, int], out: Path) -> list[Path]:
    """Sample `options.prompts` with and without the current adapter of `unet` (= pipe.unet, unwrapped) into `out`."""
    pipe.set_progress_bar_config(disable=True)
    if role == "negative":
        deltas = {f"{name}.base_layer": factors for name, factors in lora_factors(unet, prefix="")}
        with adapters_disabled(unet), enable_npo(pipe, deltas):
            samples = generate(pipe, options.prompts, negative_prompt=options.negative_prompt,
                               guidance_scale=options.guidance, steps=options.steps, seed=options.seed, compare=True,
                               height=size[0], width=size[1])
        return save_samples(samples, out)
    with adapters_disabled(unet):
        base = _pipeline_images(pipe, options, size)
    tuned = _pipeline_images(pipe, options, size)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (before, after) in enumerate(zip(base, tuned)):
        for tag, image in (("base", before), ("lora", after)):
            path = out / f"{index:03d}-{tag}.png"
            image.save(path)
            written.append(path)
    return written
