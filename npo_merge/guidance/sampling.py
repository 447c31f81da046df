"""Sample images with NPO guidance, and side-by-side grids of plain CFG vs CFG+NPO (same seeds)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from npo_merge.guidance.install import set_branch_mode
from npo_merge.progress import ProgressFactory, no_progress


@dataclass
class Sample:
    prompt: str
    seed: int
    npo: Any  # PIL.Image
    cfg: Any | None = None  # plain CFG with the same seed (only with compare)


def generate(pipe: Any, prompts: Sequence[str], *, negative_prompt: str | None = None, guidance_scale: float = 7.5,
             steps: int = 25, seed: int = 0, compare: bool = False, height: int | None = None, width: int | None = None,
             progress: ProgressFactory = no_progress) -> list[Sample]:
    """One image per prompt with NPO (seed, seed+1, ...); with `compare` also plain CFG from the same noise."""
    import torch

    samples = []
    bar = progress(len(prompts) * (2 if compare else 1), "sample")
    try:
        for index, prompt in enumerate(prompts):
            run_seed = seed + index
            images = {}
            for mode in (("auto", "cond") if compare else ("auto",)):
                set_branch_mode(pipe, mode)
                generator = torch.Generator(device="cpu").manual_seed(run_seed)
                result = pipe(prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                              num_inference_steps=steps, generator=generator, height=height, width=width)
                images[mode] = result.images[0]
                bar.update()
            samples.append(Sample(prompt, run_seed, images["auto"], images.get("cond")))
    finally:
        set_branch_mode(pipe, "auto")
        bar.close()
    return samples


def comparison_grid(samples: Sequence[Sample], *, eta: float | None = None) -> Any:
    """A PIL grid: one row per prompt, columns "CFG" and "CFG + NPO", a caption above each column."""
    from PIL import Image, ImageDraw

    if not samples or samples[0].cfg is None:
        raise ValueError("a comparison grid needs samples generated with compare=True")
    width, height = samples[0].npo.size
    caption = 24
    grid = Image.new("RGB", (2 * width, caption + len(samples) * height), "white")
    draw = ImageDraw.Draw(grid)
    labels = ("CFG", "CFG + NPO" + (f" (eta {eta:g})" if eta is not None else ""))
    for column, label in enumerate(labels):
        draw.text((column * width + 6, 6), label, fill="black")
    for row, sample in enumerate(samples):
        grid.paste(sample.cfg, (0, caption + row * height))
        grid.paste(sample.npo, (width, caption + row * height))
    return grid


def save_samples(samples: Sequence[Sample], out: str | os.PathLike[str], *, eta: float | None = None) -> list[Path]:
    """PNGs per sample (NNN-npo.png, NNN-cfg.png) and, for comparisons, compare.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, sample in enumerate(samples):
        for tag, image in (("npo", sample.npo), ("cfg", sample.cfg)):
            if image is not None:
                path = out / f"{index:03d}-{tag}.png"
                image.save(path)
                written.append(path)
    if samples and samples[0].cfg is not None:
        path = out / "compare.png"
        comparison_grid(samples, eta=eta).save(path)
        written.append(path)
    return written
