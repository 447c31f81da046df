"""Covered layers whose branch update is applied in an elementwise pass the model runs on their output anyway.

diffusers passes that read a layer's whole output right after its GEMM or convolution, in plain CFG too:
- the attention processor's `to_out[0](x) / attn.rescale_output_factor`;
- GEGLU's `a * gelu(g)` over the two halves of its projection (the feed-forward's input projection);
- a BasicTransformerBlock's `ff(norm3(h)) + h` after the feed-forward's output projection;
- a ResnetBlock2D's `conv1(h) + temb` and `(shortcut + conv2(h)) / output_scale_factor`;
- a Transformer2DModel's `proj_out(h) + residual` where proj_out is a 1x1 convolution (SD1.x, SD2).
Where such a layer is a low-rank dual-branch layer stored as [W; down], one cuBLAS GEMM (cuDNN convolution)
yields its output and the shrink together, and a Triton store (`kernels.expand_store`) does the expand
inside that pass: the update costs no pass of its own, where the layer's own paths need one (H100, SDXL,
attention rank 8 under CUDA graphs: `to_out` was most of what NPO cost over plain CFG).

`NpoAttnProcessor` replaces diffusers' AttnProcessor2_0; `NpoGEGLU`, `NpoTransformerBlock` and `NpoResnetBlock`
replace GEGLU, BasicTransformerBlock and ResnetBlock2D; `NpoProjOut` is set as a Transformer2DModel's output
method (`enable_npo(..., fused_out=True)`, the default). Every other call (other inputs,
torch.compile, autograd, training mode, a shape where the usual code timed faster) runs the original code.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npo_merge.guidance.dual_branch import (
    DualBranchConv2d,
    DualBranchLayer,
    DualBranchLinear,
    _capturing,
    _fastest_on_gpu,
    replace_submodule,
    uncond_rows,
)

__all__ = ["ChannelStore", "NpoAttentionCall", "NpoAttnProcessor", "NpoGEGLU", "NpoProjOut", "NpoResnetBlock",
           "NpoTransformerBlock", "OutputStore", "install_output_stores", "remove_output_stores"]


def _store_kernels() -> tuple | None:
    """(the kernels.expand_store module, interpreted) or None without triton."""
    try:
        from npo_merge.guidance.kernels import expand_store
        from npo_merge.guidance.kernels.dual_linear_triton import INTERPRETED
    except ImportError:
        return None
    return expand_store, INTERPRETED


def servable(layer: nn.Module) -> bool:
    """Whether `layer` is a joint low-rank dual-branch layer that a store can serve (a linear on backend 'auto',
    outside input groups; or a conv)."""
    if isinstance(layer, DualBranchLinear):
        return (layer.joint_weight is not None and layer.backend == "auto" and layer.bias_diff is None
                and layer.group is None)
    return isinstance(layer, DualBranchConv2d) and layer.joint_weight is not None and layer.bias_diff is None


class OutputStore:
    """One linear site's store: per call shape, bound once (and on CUDA timed against the site's usual code)."""

    def __init__(self, gated: bool = False) -> None:
        self.gated = gated
        self._launches: dict[tuple, Any] = {}

    def __call__(self, layer: DualBranchLayer, x: torch.Tensor, usual: Callable[[], torch.Tensor], factor: float = 1.0,
                 add: torch.Tensor | None = None) -> torch.Tensor | None:
        """The site's output for x from the joint GEMM (convolution) and one kernel; None where this call takes
        the usual code."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad)):
            return None
        n_uncond = uncond_rows(x.shape[0], layer.mode)
        if n_uncond == 0:
            return None
        key = (x.shape, x.stride(), x.dtype, x.get_device(), n_uncond, factor, layer.joint_weight.dtype,
               None if add is None else (add.shape, add.stride()))
        launch = self._launches.get(key, self)
        if launch is self:  # not bound yet: binding compiles, launches and times, which a capture cannot hold
            if _capturing(x):
                return None
            launch = self._launches[key] = self._bind(layer, x, n_uncond, factor, add, usual)
        return None if launch is None else self._run(launch, layer, x, add, factor)

    def output(self, layer: nn.Module, x: torch.Tensor, usual: Callable[[], torch.Tensor], factor: float = 1.0,
               add: torch.Tensor | None = None) -> torch.Tensor:
        """The store's result where it serves this call, else `usual()`."""
        y = self(layer, x, usual, factor, add) if servable(layer) else None
        return y if y is not None else usual()

    def _bind(self, layer: DualBranchLayer, x: torch.Tensor, n_uncond: int, factor: float, add: torch.Tensor | None,
              usual: Callable[[], torch.Tensor]) -> Any:
        """The bound store for calls like this one, or None where the usual code serves them: no kernels, an
        unsupported input, or (on CUDA) the usual code timed faster."""
        kernels = _store_kernels()
        if (kernels is None or not (x.is_cuda or kernels[1]) or x.dtype == torch.float64 or not x.is_contiguous()
                or layer.weight.dtype != x.dtype or not layer.up.is_contiguous()):
            return None
        launch = self._first_launch(kernels[0], layer, x, n_uncond, factor, add)
        if launch is None or (x.is_cuda and _fastest_on_gpu([lambda: self._run(launch, layer, x, add, factor), usual],
                                                             x.device) != 0):
            return None
        return launch

    def _first_launch(self, kernels: Any, layer: DualBranchLayer, x: torch.Tensor, n_uncond: int, factor: float,
                      add: torch.Tensor | None) -> Any:
        y = F.linear(x, layer.joint_weight, layer.joint_bias).view(-1, layer.joint_weight.shape[0])
        rows = n_uncond * (y.shape[0] // x.shape[0])
        n_out = layer.out_features // 2 if self.gated else layer.out_features
        out = y.new_empty((y.shape[0], n_out))
        if add is not None and (not add.is_contiguous() or add.numel() != out.numel()):
            return None
        flat_add = None if add is None else add.view(-1, n_out)
        direct = kernels.expand_store(y, layer.up, flat_add, layer.scale, rows, factor, self.gated, out)
        return kernels.ExpandStoreLaunch(y, layer.up, flat_add, n_out, rows, self.gated, direct)

    def _run(self, launch: Any, layer: DualBranchLayer, x: torch.Tensor, add: torch.Tensor | None,
             factor: float) -> torch.Tensor:
        y = F.linear(x, layer.joint_weight, layer.joint_bias)
        flat_add = None if add is None else add.view(-1, add.shape[-1])
        out = launch(y.view(-1, y.shape[-1]), layer.up, flat_add, layer.scale, factor)
        return out.view(*x.shape[:-1], out.shape[-1])


class ChannelStore(OutputStore):
    """One convolution site's store: the joint convolution, then (y + update + add) / factor in one kernel."""

    def _first_launch(self, kernels: Any, layer: DualBranchLayer, x: torch.Tensor, n_uncond: int, factor: float,
                      add: torch.Tensor | None) -> Any:
        y = _joint_conv(layer, x)
        out_shape = (y.shape[0], layer.out_channels, *y.shape[2:])
        if not y.is_contiguous() or kernels.add_strides(add, out_shape) is None:
            return None  # channels-last and other layouts: the usual code
        out = y.new_empty(out_shape)
        direct = kernels.channel_store(y, layer.up, add, layer.scale, n_uncond, factor, out)
        return kernels.ChannelStoreLaunch(y, layer.up, add, n_uncond, direct)

    def _run(self, launch: Any, layer: DualBranchLayer, x: torch.Tensor, add: torch.Tensor | None,
             factor: float) -> torch.Tensor:
        return launch(_joint_conv(layer, x), layer.up, add, layer.scale, factor)


def _joint_conv(layer: DualBranchConv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, layer.joint_weight, layer.joint_bias, layer.stride, layer.padding, layer.dilation)


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

        return self.store.output(layer, x, usual, factor)


class NpoAttentionCall:
    """An attention's `forward` (instance attribute) while it runs an `NpoAttnProcessor`: the processor is called
    at once. diffusers' Attention.forward takes `inspect.signature` of the processor on every call to filter
    `cross_attention_kwargs`, host time that eager sampling (host-bound) pays 140 times a step on SDXL; calls
    with such kwargs, or after the processor was changed, still go through it."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **cross_attention_kwargs: Any) -> torch.Tensor:
        attn = self.attn
        if cross_attention_kwargs or type(attn.processor) is not NpoAttnProcessor:
            return type(attn).forward(attn, hidden_states, encoder_hidden_states, attention_mask,
                                      **cross_attention_kwargs)
        return attn.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask)


class _StandIn(nn.Module):
    """A module standing in for a diffusers one: the same child modules (so the same state_dict), the original kept
    unregistered for what the stand-in does not serve and for remove_output_stores. train()/eval() reach the
    stand-in and the children, not `original`, so the stand-in's own `training` is the one to read."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)
        self.training = original.training
        for name, child in original.named_children():
            self.add_module(name, child)


class NpoGEGLU(_StandIn):
    """diffusers' GEGLU (same `proj`, same state_dict) whose gate pass also applies the projection's branch update."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__(original)
        self.store = OutputStore(gated=True)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return self.original(hidden_states, *args, **kwargs)
        return self.store.output(self.proj, hidden_states, lambda: self.original(hidden_states))


class NpoResnetBlock(_StandIn):
    """diffusers' ResnetBlock2D (the same submodules, so the same state_dict) whose conv1 update is applied in the
    pass that adds the time embedding and whose conv2 update in the pass that adds the shortcut."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__(original)
        self.stores = (ChannelStore(), ChannelStore())

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        block = self.original
        if args or kwargs or self.training:
            return block(input_tensor, temb, *args, **kwargs)
        h = block.nonlinearity(block.norm1(input_tensor))
        if block.time_emb_proj is not None:
            if not block.skip_time_act:
                temb = block.nonlinearity(temb)
            temb = block.time_emb_proj(temb)[:, :, None, None]
        conv1, conv2 = block.conv1, block.conv2

        def first() -> torch.Tensor:
            y = conv1(h)
            return y if temb is None else y + temb

        h = self.stores[0].output(conv1, h, first, 1.0, temb)
        h = block.dropout(block.nonlinearity(block.norm2(h)))
        shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
        factor = block.output_scale_factor
        return self.stores[1].output(conv2, h, lambda: (shortcut + conv2(h)) / factor, factor, shortcut)


class NpoTransformerBlock(_StandIn):
    """diffusers' BasicTransformerBlock (the same submodules, so the same state_dict) whose feed-forward output
    projection's update is applied in the pass that adds the residual. Serves the layer-norm blocks of SD1.x, SD2
    and SDXL UNets called without cross_attention_kwargs; other calls run the original block."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__(original)
        self.store = OutputStore()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                timestep: Any = None, cross_attention_kwargs: dict | None = None, class_labels: Any = None,
                added_cond_kwargs: dict | None = None) -> torch.Tensor:
        block = self.original
        if cross_attention_kwargs or self.training or block._chunk_size is not None:
            return block(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                         cross_attention_kwargs, class_labels, added_cond_kwargs)
        h = block.attn1(block.norm1(hidden_states), encoder_hidden_states=None, attention_mask=attention_mask)
        h = _squeezed(h + hidden_states)
        if block.attn2 is not None:
            h = block.attn2(block.norm2(h), encoder_hidden_states=encoder_hidden_states,
                            attention_mask=encoder_attention_mask) + h
        net = block.ff.net
        inner = net[1](net[0](block.norm3(h)))
        tail = net[3] if len(net) == 4 else nn.Identity()  # FeedForward's final_dropout

        def usual() -> torch.Tensor:
            return tail(net[2](inner)) + h

        return _squeezed(self.store.output(net[2], inner, usual, 1.0, h))


def _squeezed(h: torch.Tensor) -> torch.Tensor:
    return h.squeeze(1) if h.ndim == 4 else h


def _plain_block(module: nn.Module) -> bool:
    """A layer-norm BasicTransformerBlock with a FeedForward whose output projection a store can serve."""
    net = getattr(getattr(module, "ff", None), "net", None)
    return (module.norm_type == "layer_norm" and module.pos_embed is None and not module.only_cross_attention
            and isinstance(net, nn.ModuleList) and len(net) in (3, 4) and servable(net[2]))


class NpoProjOut:
    """Transformer2DModel._get_output_for_continuous_inputs for a 1x1-conv `proj_out` (SD1.x/SD2 UNets), set on the
    model instance: the projection's update applied in the pass that adds the residual."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.store = ChannelStore()

    def __call__(self, hidden_states: torch.Tensor, residual: torch.Tensor, batch_size: int, height: int, width: int,
                 inner_dim: int) -> torch.Tensor:
        proj = self.model.proj_out
        x = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()

        def usual() -> torch.Tensor:
            return proj(x) + residual

        return self.store.output(proj, x, usual, 1.0, residual)


def _plain_resnet(module: nn.Module) -> bool:
    """A ResnetBlock2D without the variants NpoResnetBlock leaves to the original (resampling, scale-shift norm)."""
    return (module.upsample is None and module.downsample is None and module.time_embedding_norm == "default"
            and (servable(module.conv1) or servable(module.conv2)))


_PROJ_OUT = "_get_output_for_continuous_inputs"


def install_output_stores(unet: nn.Module) -> dict[str, int]:
    """Swap in an `NpoAttnProcessor` for each attention running diffusers' AttnProcessor2_0, an `NpoGEGLU`,
    `NpoTransformerBlock` or `NpoResnetBlock` for each GEGLU, layer-norm BasicTransformerBlock or plain
    ResnetBlock2D, and an `NpoProjOut` for each Transformer2DModel with a 1x1-conv proj_out, where a store can
    serve their layers; returns how many of each. Other processors and modules are left alone."""
    try:
        from diffusers.models.activations import GEGLU
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
    except ImportError:
        return {}
    counts = {"NpoAttnProcessor": 0, "NpoGEGLU": 0, "NpoResnetBlock": 0, "NpoTransformerBlock": 0, "NpoProjOut": 0}
    for name, module in list(unet.named_modules()):
        to_out = getattr(module, "to_out", None)
        if (type(getattr(module, "processor", None)) is AttnProcessor2_0 and isinstance(to_out, nn.ModuleList)
                and len(to_out) == 2 and servable(to_out[0])):
            module.set_processor(NpoAttnProcessor(module.processor))
            if "forward" not in module.__dict__:  # e.g. accelerate's offload hook has its own there: keep it
                module.__dict__["forward"] = NpoAttentionCall(module)
            counts["NpoAttnProcessor"] += 1
        elif type(module) is GEGLU and servable(module.proj) and module.proj.out_features % 2 == 0:
            replace_submodule(unet, name, NpoGEGLU(module))
            counts["NpoGEGLU"] += 1
        elif type(module) is ResnetBlock2D and _plain_resnet(module):
            replace_submodule(unet, name, NpoResnetBlock(module))
            counts["NpoResnetBlock"] += 1
        elif type(module) is BasicTransformerBlock and _plain_block(module):
            replace_submodule(unet, name, NpoTransformerBlock(module))
            counts["NpoTransformerBlock"] += 1
        elif (type(module) is Transformer2DModel and getattr(module, "is_input_continuous", False)
              and not module.use_linear_projection and servable(module.proj_out)):
            module.__dict__[_PROJ_OUT] = NpoProjOut(module)  # an instance attribute: the class method stays
            counts["NpoProjOut"] += 1
    return {kind: n for kind, n in counts.items() if n}


def remove_output_stores(unet: nn.Module) -> None:
    """Undo `install_output_stores`: the original processors, modules and methods (before the layers are released)."""
    for name, module in list(unet.named_modules()):
        processor = getattr(module, "processor", None)
        if isinstance(processor, NpoAttnProcessor):
            module.set_processor(processor.original)
            if isinstance(module.__dict__.get("forward"), NpoAttentionCall):
                del module.__dict__["forward"]
        elif isinstance(module, (NpoGEGLU, NpoResnetBlock, NpoTransformerBlock)):
            replace_submodule(unet, name, module.original.train(module.training))
        elif isinstance(module.__dict__.get(_PROJ_OUT), NpoProjOut):
            del module.__dict__[_PROJ_OUT]

