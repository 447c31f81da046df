"""diffusers pipelines that serve both CFG branches from one UNet: load a dual-branch checkpoint,
or turn NPO on for a pipeline the user already has.

    pipe = npo_merge.load_pipeline("dreamshaper8-npo.safetensors", torch_dtype=torch.float16).to("cuda")
    image = pipe("a cat", negative_prompt="blurry").images[0]     # one batched UNet forward per step

    npo_merge.enable_npo(my_pipe, "npo.safetensors", eta=1.0)     # any NPO LoRA / delta / dual-branch file
    npo_merge.disable_npo(my_pipe)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from npo_merge.delta.files import open_delta
from npo_merge.errors import CompatibilityError, InputError
from npo_merge.guidance.dual_branch import BranchDelta
from npo_merge.guidance.install import NpoHandle
from npo_merge.guidance.install import enable_npo as _install
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.detect import detect_kind
from npo_merge.io.dual_checkpoint import Branch, load_branch

_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def branch_deltas(branch: Branch) -> dict[str, BranchDelta]:
    """A stored uncond branch as enable_npo input: UNet module path -> BranchDelta."""
    deltas: dict[str, BranchDelta] = {}
    for module in branch.modules:
        if not module.startswith("unet."):
            raise CompatibilityError(f"uncond-branch module {module!r} is not a UNet module")
        weight = branch.weights.get(module)
        bias = branch.biases.get(module)
        if weight is None:  # a bias-only difference
            raise CompatibilityError(f"uncond-branch module {module!r} has a bias difference but no weight difference")
        deltas[module] = BranchDelta(weight, bias)
    return deltas


def read_npo_deltas(source: str | os.PathLike[str]) -> tuple[dict[str, BranchDelta], float]:
    """Deltas for enable_npo from a file or folder: a dual-branch checkpoint's uncond branch (with
    the eta it was written with), or any LoRA / delta file (its UNet modules; eta 1)."""
    path = Path(source)
    if detect_kind(path) == "model":
        branch = load_branch(path)
        if not branch:
            raise InputError(f"{path}: a model without a dual-branch difference; give an NPO LoRA or delta")
        return branch_deltas(branch), branch.eta
    with open_delta(path) as delta:
        unet_keys = [k for k in delta.keys if k.startswith("unet.") and k.endswith(".weight")]
        if not unet_keys:
            raise CompatibilityError(f"{path}: has no UNet weights; NPO guidance acts on the UNet")
        if delta.kind == "lowrank":
            return {k[: -len(".weight")]: BranchDelta(delta.lowrank(k[: -len(".weight")])) for k in unet_keys}, 1.0
        out = {}
        for key in unet_keys:
            bias_key = key[: -len(".weight")] + ".bias"
            out[key[: -len(".weight")]] = BranchDelta(delta.dense(key), delta.dense(bias_key) if bias_key in delta.keys else None)
        return out, 1.0


def enable_npo(pipe_or_unet: Any, delta: str | os.PathLike[str] | Mapping[str, Any], eta: float = 1.0, **options: Any) -> NpoHandle:
    """Serve both CFG branches from the pipeline's UNet: theta_c + eta * delta on the uncond half.

    `delta` is a path (NPO LoRA in any layout, an npo-merge delta, or a dual-branch checkpoint,
    whose stored difference already includes its eta: `eta` then scales it further) or a mapping
    UNet module -> BranchDelta / LowRank / tensor. Options go to the installer (mode, path, backend).
    Turn it off with `npo_merge.disable_npo(pipe)`.
    """
    if isinstance(delta, Mapping):
        return _install(pipe_or_unet, delta, eta, **options)
    deltas, _ = read_npo_deltas(delta)
    return _install(pipe_or_unet, deltas, eta, **options)


def _pipeline_class(architecture: str) -> Any:
    import diffusers

    if architecture not in _PIPELINES:
        raise InputError(f"cannot build a pipeline for architecture {architecture!r}; SD1.x, SD2.x and SDXL are supported")
    return getattr(diffusers, _PIPELINES[architecture])


def load_pipeline(
    model: str | os.PathLike[str],
    *,
    eta: float | None = None,
    config: str | None = None,
    npo: str | os.PathLike[str] | None = None,
    torch_dtype: torch.dtype | None = None,
    path: str = "lowrank",
    backend: str = "auto",
    **components: Any,
) -> Any:
    """A StableDiffusion(XL)Pipeline whose UNet serves both CFG branches in one forward per step.

    model: a dual-branch checkpoint (file or diffusers folder), a plain checkpoint with `npo=` (an
        NPO LoRA/delta, e.g. the companion file of `--layout separate`), a Hub repo or a target name.
    eta: NPO strength. None uses the file as written; a value rescales the stored difference by
        eta / (the eta it was written with), so eta means the same here as at `apply` (for beta 0).
    config: for single files, the diffusers repo id or local folder with the pipeline's configs
        and tokenizers (what `from_single_file(config=...)` takes); by default diffusers picks one.
    components: the user's own pipeline parts (text_encoder=..., vae=..., scheduler=...), used
        where the file has none or to override it.
    """
    from npo_merge.targets import resolve_target

    local = resolve_target(str(model)).path
    with open_checkpoint(local) as checkpoint:
        architecture, layout = checkpoint.architecture, checkpoint.layout
    cls = _pipeline_class(architecture)
    kwargs: dict[str, Any] = dict(components)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if layout == "diffusers":
        pipe = cls.from_pretrained(str(local), **kwargs)
    elif layout == "single-file":
        pipe = cls.from_single_file(str(local), config=config, **kwargs) if config else cls.from_single_file(str(local), **kwargs)
    else:
        raise InputError(f"{local}: a bare UNet file; load it with the rest of a pipeline (unet=...) and use enable_npo")
    if npo is not None:
        deltas, written_eta = read_npo_deltas(npo)
    else:
        branch = load_branch(local)
        if not branch:
            raise InputError(f"{local}: no dual-branch data; pass npo= (an NPO LoRA or delta), or write one with `npo-merge apply`")
        deltas, written_eta = branch_deltas(branch), branch.eta
    factor = 1.0 if eta is None else (float(eta) / written_eta if written_eta else float(eta))
    _install(pipe, deltas, factor, path=path, backend=backend)  # type: ignore[arg-type]
    return pipe
