"""The model a run trains against: any local file/folder, Hub repo or registry name, loaded as a diffusers pipeline.

The architecture comes from the checkpoint itself (`open_checkpoint`), so SD1.x, SD2.x and SDXL bases
and their fine-tunes (diffusers folders or single files) all work; the pipeline supplies the UNet,
VAE, text encoder(s), tokenizer(s) and scheduler config a training run needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from npo_merge.errors import InputError
from npo_merge.io.checkpoint import open_checkpoint

_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@dataclass
class BaseModel:
    """The loaded base: its pipeline (fp32, on the CPU), architecture, and where it came from."""

    pipe: Any
    architecture: str
    path: Path
    spec: str


def load_base_model(
    spec: str,
    resolve: Callable[[str], Path],
    *,
    vae: str | None = None,
    pipeline_config: str | None = None,
) -> BaseModel:
    """Load `spec` (resolved to a local path by `resolve`) as a StableDiffusion(XL)Pipeline.

    vae: a replacement VAE (diffusers folder or Hub repo), e.g. an fp16-safe SDXL VAE.
    pipeline_config: for single files, the diffusers folder/repo with configs and tokenizers.
    """
    import diffusers

    local = resolve(spec)
    with open_checkpoint(local) as checkpoint:
        architecture, layout = checkpoint.architecture, checkpoint.layout
    if architecture not in _PIPELINES:
        raise InputError(f"{local}: cannot train on a {architecture!r} model; SD1.x, SD2.x and SDXL are supported")
    cls = getattr(diffusers, _PIPELINES[architecture])
    kwargs: dict[str, Any] = {}
    if architecture != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if layout == "diffusers":
        pipe = cls.from_pretrained(str(local), **kwargs)
    elif layout == "single-file":
        if pipeline_config:
            kwargs["config"] = str(resolve(pipeline_config)) if Path(pipeline_config).exists() else pipeline_config
        pipe = cls.from_single_file(str(local), **kwargs)
    else:
        raise InputError(f"{local}: a bare UNet file; train from a full pipeline (diffusers folder or single file)")
    if vae:
        pipe.vae = diffusers.AutoencoderKL.from_pretrained(str(resolve(vae)))
    return BaseModel(pipe, architecture, Path(local), spec)
