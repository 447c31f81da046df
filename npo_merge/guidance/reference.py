"""The official Diffusion-NPO inference, kept as the reference: two UNets, two forward passes per step.

The official code holds theta_c and a second, materialized theta_u = theta_c + eta * delta, and runs
each CFG branch through its own UNet. `TwoPassCFG` is a UNet stand-in doing exactly that for a
[uncond; cond] batch, so an unmodified diffusers pipeline samples with it (the pipeline then combines
eps = eps_u + w * (eps_c - eps_u) as usual). Tests check the dual-branch path against it; benchmarks
time it as the baseline. It costs twice the weight memory: do not use it for sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from npo_merge.guidance.dual_branch import BranchMode, uncond_rows
from npo_merge.guidance.install import DeltaValue, resolve_deltas


def uncond_weights(unet: nn.Module, deltas: Mapping[str, DeltaValue], eta: float = 1.0) -> dict[str, torch.Tensor]:
    """theta_u for every covered tensor: {"<module>.weight"/"<module>.bias": theta_c + eta * delta}.

    Summed in fp32 and cast back to the layer's dtype, as a merge tool would write it.
    """
    weights: dict[str, torch.Tensor] = {}
    for name, (layer, delta) in resolve_deltas(unet, deltas).items():
        weight = layer.weight.detach()
        theta_u = weight.float() + eta * delta.dense_weight(weight.shape).to(weight.device)
        weights[f"{name}.weight"] = theta_u.to(weight.dtype)
        if delta.bias is not None:
            bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
            weights[f"{name}.bias"] = (bias + eta * delta.bias.float().to(weight.device)).to(weight.dtype)
    return weights


def uncond_unet(unet: nn.Module, deltas: Mapping[str, DeltaValue], eta: float = 1.0) -> nn.Module:
    """A deep copy of `unet` holding theta_u: the official approach's second UNet."""
    theta_u = uncond_weights(unet, deltas, eta)
    copy_ = copy.deepcopy(unet)
    for key, tensor in theta_u.items():
        module_path, _, attr = key.rpartition(".")
        layer = copy_.get_submodule(module_path)
        if attr == "bias" and layer.bias is None:
            layer.bias = nn.Parameter(tensor, requires_grad=False)
        else:
            getattr(layer, attr).data.copy_(tensor)
    return copy_


def _split(value: Any, batch: int, n_uncond: int) -> tuple[Any, Any]:
    """(uncond part, cond part) of a UNet argument: batch-first tensors are split, the rest shared."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[:n_uncond], value[n_uncond:]
    if isinstance(value, dict):
        pairs = {k: _split(v, batch, n_uncond) for k, v in value.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(value, (list, tuple)):  # e.g. ControlNet residuals
        pairs = [_split(v, batch, n_uncond) for v in value]
        return type(value)(p[0] for p in pairs), type(value)(p[1] for p in pairs)
    return value, value


class TwoPassCFG(nn.Module):
    """UNet stand-in that serves a [uncond; cond] batch with two forward passes, one UNet per branch.

    Everything the pipeline reads besides forward (config, dtype, add_embedding, ...) comes from the
    cond UNet. mode: "cfg" splits the batch in halves; "cond"/"uncond" send the whole batch to one UNet.
    """

    def __init__(self, cond_unet: nn.Module, uncond_unet: nn.Module, mode: BranchMode = "cfg") -> None:
        super().__init__()
        self.cond_unet = cond_unet
        self.uncond_unet = uncond_unet
        self.mode: BranchMode = mode

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            cond = self.__dict__.get("_modules", {}).get("cond_unet")
            if cond is None or name.startswith("__"):
                raise
            return getattr(cond, name)

    def forward(self, sample: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        batch = sample.shape[0]
        n_uncond = uncond_rows(batch, self.mode)
        outputs = []
        for unet, part in ((self.uncond_unet, 0), (self.cond_unet, 1)):
            rows = n_uncond if part == 0 else batch - n_uncond
            if rows == 0:
                continue
            sample_p = _split(sample, batch, n_uncond)[part]
            args_p = [_split(a, batch, n_uncond)[part] for a in args]
            kwargs_p = {k: _split(v, batch, n_uncond)[part] for k, v in kwargs.items()}
            outputs.append(unet(sample_p, *args_p, return_dict=False, **kwargs_p)[0])
        noise = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)


@contextmanager
def two_unet_pipeline(pipe: Any, deltas: Mapping[str, DeltaValue], eta: float = 1.0) -> Iterator[Any]:
    """Within the block, `pipe` samples the official way: theta_u UNet for uncond, theta_c UNet for cond.

    Meant for CFG runs (guidance_scale > 1); with guidance <= 1 the plain pipeline is the reference.
    """
    cond = pipe.unet
    pipe.unet = TwoPassCFG(cond, uncond_unet(cond, deltas, eta))
    try:
        yield pipe
    finally:
        pipe.unet = cond


def cfg_combine(noise: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps_u + w * (eps_c - eps_u) from a [uncond; cond] batch of UNet outputs (what pipelines do per step)."""
    eps_u, eps_c = noise.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)
