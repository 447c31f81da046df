"""A diffusers attention processor whose output pass also applies `to_out`'s branch update.

diffusers' `AttnProcessor2_0` ends with `to_out[0](x)`, then `/ attn.rescale_output_factor`: an
elementwise pass over the projection's output that plain CFG runs too. `NpoAttnProcessor` computes the
same attention and, where `to_out[0]` is a low-rank dual-branch linear stored as [W; down], runs one
cuBLAS GEMM for the output and the shrink together and does the expand inside that division pass
(`kernels.expand_rescale`). The update then costs no pass of its own, where the layer's own paths need
one (H100: `to_out` was most of what SDXL's attention rank 8 cost over plain CFG under CUDA graphs).

Every other call (other processors' inputs, torch.compile, autograd, dropout in training, a shape
where the layer's own path timed faster) runs the original processor or the layer as usual.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npo_merge.guidance.dual_branch import DualBranchLinear, _capturing, _fastest_on_gpu, uncond_rows

__all__ = ["NpoAttnProcessor", "install_processors", "remove_processors"]


def _store_kernels() -> tuple | None:
    """(ExpandRescaleLaunch, expand_rescale, interpreted) from the kernels package, or None without triton."""
    try:
        from npo_merge.guidance.kernels.dual_linear_triton import INTERPRETED
        from npo_merge.guidance.kernels.expand_rescale import ExpandRescaleLaunch, expand_rescale
    except ImportError:
        return None
    return ExpandRescaleLaunch, expand_rescale, INTERPRETED


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
        self.original = original  # what remove_processors puts back, and what serves every other call
        self._launches: dict[tuple, Any] = {}

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        layer, dropout = attn.to_out[0], attn.to_out[1]
        if (args or kwargs or hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.residual_connection or (dropout.training and dropout.p > 0) or torch.compiler.is_compiling()
                or not isinstance(layer, DualBranchLinear) or layer.joint_weight is None or layer.backend != "auto"
                or layer.bias_diff is not None or layer.group is not None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        x = _attend(attn, hidden_states, encoder_hidden_states, attention_mask)
        factor = attn.rescale_output_factor
        y = self._store(layer, x, factor)
        return y if y is not None else dropout(layer(x)) / factor

    def _store(self, layer: DualBranchLinear, x: torch.Tensor, factor: float) -> torch.Tensor | None:
        """(x W^T + b + the update) / factor from the joint GEMM and one kernel; None where this call takes the
        layer's own path."""
        if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
            return None
        n_uncond = uncond_rows(x.shape[0], layer.mode)
        if n_uncond == 0:
            return None
        key = (x.shape, x.dtype, x.get_device(), n_uncond, factor, layer.joint_weight.dtype)
        launch = self._launches.get(key, self)
        if launch is self:  # not bound yet: binding compiles, launches and times, which a capture cannot hold
            if _capturing(x):
                return None
            launch = self._launches[key] = self._bind(layer, x, n_uncond, factor)
        if launch is None:
            return None
        y = F.linear(x, layer.joint_weight, layer.joint_bias)
        out = launch(y.view(-1, y.shape[-1]), layer.up, layer.scale, factor)
        return out.view(*x.shape[:-1], layer.out_features)

    def _bind(self, layer: DualBranchLinear, x: torch.Tensor, n_uncond: int, factor: float) -> Any:
        """The bound store for calls like this one, or None where the layer's own path serves them: no kernels,
        an unsupported input, or (on CUDA) the layer's path plus the division timed faster."""
        kernels = _store_kernels()
        if (kernels is None or not (x.is_cuda or kernels[2]) or x.dtype == torch.float64 or not x.is_contiguous()
                or layer.weight.dtype != x.dtype or not layer.up.is_contiguous()):
            return None
        launch_class, first_launch, _ = kernels
        joint, bias, up = layer.joint_weight, layer.joint_bias, layer.up
        y = F.linear(x, joint, bias).view(-1, joint.shape[0])
        rows = n_uncond * (y.shape[0] // x.shape[0])
        out = y.new_empty((y.shape[0], layer.out_features))
        launch = launch_class(y, up, rows, first_launch(y, up, layer.scale, rows, factor, out))
        if x.is_cuda:
            calls = [lambda: launch(F.linear(x, joint, bias).view(-1, joint.shape[0]), up, layer.scale, factor),
                     lambda: layer(x) / factor]
            if _fastest_on_gpu(calls, x.device) != 0:
                return None
        return launch


def install_processors(unet: nn.Module) -> int:
    """Give each attention that runs diffusers' AttnProcessor2_0 and whose `to_out[0]` is a joint low-rank
    dual-branch linear an `NpoAttnProcessor`; returns how many. Other processors are left alone."""
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError:
        return 0
    installed = 0
    for module in unet.modules():
        to_out = getattr(module, "to_out", None)
        if (type(getattr(module, "processor", None)) is AttnProcessor2_0 and isinstance(to_out, nn.ModuleList)
                and len(to_out) == 2 and isinstance(to_out[0], DualBranchLinear) and to_out[0].joint_weight is not None):
            module.set_processor(NpoAttnProcessor(module.processor))
            installed += 1
    return installed


def remove_processors(unet: nn.Module) -> None:
    """Put back the processors `install_processors` replaced."""
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, NpoAttnProcessor):
            module.set_processor(processor.original)
