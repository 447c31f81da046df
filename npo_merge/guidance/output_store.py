"""Covered layers whose branch update is applied in an elementwise pass the model runs on their output anyway.

Two diffusers passes read a projection's whole output right after its GEMM, in plain CFG too:
- the attention processor's `to_out[0](x) / attn.rescale_output_factor`;
- GEGLU's `a * gelu(g)` over the two halves of its projection (the feed-forward's input projection).
Where such a projection is a low-rank dual-branch linear stored as [W; down], one cuBLAS GEMM yields its
output and the shrink together, and a Triton store (`kernels.expand_store`) does the expand inside that
pass: the update costs no pass of its own, where the layer's own paths need one (H100, SDXL, attention rank
8 under CUDA graphs: `to_out` was most of what NPO cost over plain CFG).

`NpoAttnProcessor` replaces diffusers' AttnProcessor2_0 and `NpoGEGLU` replaces GEGLU
(`enable_npo(..., fused_out=True)`, the default). Every other call (other inputs, torch.compile, autograd,
dropout in training, a shape where the usual path timed faster) runs the original code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npo_merge.guidance.dual_branch import (
    DualBranchLinear,
    _capturing,
    _fastest_on_gpu,
    replace_submodule,
    uncond_rows,
)

__all__ = ["NpoAttnProcessor", "NpoGEGLU", "OutputStore", "install_output_stores", "remove_output_stores"]


def _store_kernels() -> tuple | None:
    """(ExpandStoreLaunch, expand_store, interpreted) from the kernels package, or None without triton."""
    try:
        from npo_merge.guidance.kernels.dual_linear_triton import INTERPRETED
        from npo_merge.guidance.kernels.expand_store import ExpandStoreLaunch, expand_store
    except ImportError:
        return None
    return ExpandStoreLaunch, expand_store, INTERPRETED


def servable(layer: nn.Module) -> bool:
    """Whether `layer` is a joint low-rank dual-branch linear on backend 'auto' that a store can serve."""
    return (isinstance(layer, DualBranchLinear) and layer.joint_weight is not None and layer.backend == "auto"
            and layer.bias_diff is None and layer.group is None)


class OutputStore:
    """One site's store: per call shape, bound once (and on CUDA timed against the site's usual code)."""

    def __init__(self, gated: bool) -> None:
        self.gated = gated
        self._launches: dict[tuple, Any] = {}

    def __call__(self, layer: DualBranchLinear, x: torch.Tensor, usual: Callable[[], torch.Tensor],
                 factor: float = 1.0) -> torch.Tensor | None:
        """The site's output for x from the joint GEMM and one kernel; None where this call takes the usual code."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad)):
            return None
        n_uncond = uncond_rows(x.shape[0], layer.mode)
        if n_uncond == 0:
            return None
        key = (x.shape, x.dtype, x.get_device(), n_uncond, factor, layer.joint_weight.dtype)
        launch = self._launches.get(key, self)
        if launch is self:  # not bound yet: binding compiles, launches and times, which a capture cannot hold
            if _capturing(x):
                return None
            launch = self._launches[key] = self._bind(layer, x, n_uncond, factor, usual)
        if launch is None:
            return None
        y = F.linear(x, layer.joint_weight, layer.joint_bias)
        out = launch(y.view(-1, y.shape[-1]), layer.up, layer.scale, factor)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _bind(self, layer: DualBranchLinear, x: torch.Tensor, n_uncond: int, factor: float,
              usual: Callable[[], torch.Tensor]) -> Any:
        """The bound store for calls like this one, or None where the usual code serves them: no kernels, an
        unsupported input, or (on CUDA) the usual code timed faster."""
        kernels = _store_kernels()
        if (kernels is None or not (x.is_cuda or kernels[2]) or x.dtype == torch.float64 or not x.is_contiguous()
                or layer.weight.dtype != x.dtype or not layer.up.is_contiguous()):
            return None
        launch_class, first_launch, _ = kernels
        joint, bias, up, scale = layer.joint_weight, layer.joint_bias, layer.up, layer.scale
        y = F.linear(x, joint, bias).view(-1, joint.shape[0])
        rows = n_uncond * (y.shape[0] // x.shape[0])
        n_out = layer.out_features // 2 if self.gated else layer.out_features
        out = y.new_empty((y.shape[0], n_out))
        launch = launch_class(y, up, n_out, rows, self.gated,
                              first_launch(y, up, scale, rows, factor, self.gated, out))
        if x.is_cuda:
            calls = [lambda: launch(F.linear(x, joint, bias).view(-1, joint.shape[0]), up, scale, factor), usual]
            if _fastest_on_gpu(calls, x.device) != 0:
                return None
        return launch


def _attend(attn: nn.Module, h: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """The attention's heads joined, before `to_out`, for 3-D hidden states with no group or spatial norm:
    what AttnProcessor2_0 computes up to there (q/k/v are called in the same order, on the same tensors)."""
    batch, tokens = (h if context is None else context).shape[:2]
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, tokens, batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])  # (batch, heads, queries, keys) for SDPA
    query = attn.to_q(h)
    if context is None:
        context = h
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class NpoAttnProcessor:
    """AttnProcessor2_0's result, with `to_out[0]`'s branch update applied in the output's rescale pass."""

    def __init__(self, original: Any) -> None:
        self.original = original  # what remove_output_stores puts back, and what serves every other call
        self.store = OutputStore(gated=False)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        layer, dropout = attn.to_out[0], attn.to_out[1]
        if (args or kwargs or hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.residual_connection or (dropout.training and dropout.p > 0) or not servable(layer)):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        x = _attend(attn, hidden_states, encoder_hidden_states, attention_mask)
        factor = attn.rescale_output_factor

        def usual() -> torch.Tensor:
            return dropout(layer(x)) / factor

        y = self.store(layer, x, usual, factor)
        return y if y is not None else usual()


class NpoGEGLU(nn.Module):
    """diffusers' GEGLU (same `proj`, same state_dict) whose gate pass also applies the projection's branch update."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)  # unregistered: what remove_output_stores puts back
        self.proj = original.proj
        self.store = OutputStore(gated=True)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs and servable(self.proj):
            y = self.store(self.proj, hidden_states, lambda: self.original(hidden_states))
            if y is not None:
                return y
        return self.original(hidden_states, *args, **kwargs)


def install_output_stores(unet: nn.Module) -> dict[str, int]:
    """Swap in an `NpoAttnProcessor` for each attention running diffusers' AttnProcessor2_0, and an `NpoGEGLU`
    for each GEGLU, whose projection a store can serve; returns how many of each. Other processors and
    activations are left alone."""
    try:
        from diffusers.models.activations import GEGLU
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError:
        return {}
    counts = {"NpoAttnProcessor": 0, "NpoGEGLU": 0}
    for name, module in list(unet.named_modules()):
        to_out = getattr(module, "to_out", None)
        if (type(getattr(module, "processor", None)) is AttnProcessor2_0 and isinstance(to_out, nn.ModuleList)
                and len(to_out) == 2 and servable(to_out[0])):
            module.set_processor(NpoAttnProcessor(module.processor))
            counts["NpoAttnProcessor"] += 1
        elif type(module) is GEGLU and servable(module.proj) and module.proj.out_features % 2 == 0:
            replace_submodule(unet, name, NpoGEGLU(module))
            counts["NpoGEGLU"] += 1
    return {kind: n for kind, n in counts.items() if n}


def remove_output_stores(unet: nn.Module) -> None:
    """Put back the processors and GEGLUs `install_output_stores` replaced (before the layers are released)."""
    for name, module in list(unet.named_modules()):
        processor = getattr(module, "processor", None)
        if isinstance(processor, NpoAttnProcessor):
            module.set_processor(processor.original)
        elif isinstance(module, NpoGEGLU):
            replace_submodule(unet, name, module.original)

