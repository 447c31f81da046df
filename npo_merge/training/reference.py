"""The frozen reference of Diffusion-DPO: the same UNet with its LoRA off, served separately or in the policy's batch.

Two ways to get the reference predictions, both exact:

* ``"separate"`` (what the diffusers Diffusion-DPO script does): the policy forward through the
  (possibly DDP-wrapped) model, then a second forward of the UNWRAPPED UNet under no_grad with the
  adapters disabled (`unet.disable_adapters()`; calling it through the DDP wrapper is a known bug).
* ``"batched"``: one forward of [policy rows; reference rows] in which every peft LoRA layer adds
  its update to the first half of the rows only (`lora_on_first_half`). The reference rows never
  touch a LoRA parameter, so they contribute no LoRA gradient by construction, and their outputs
  are detached. The split is two `narrow` views per layer: no index lists, no host syncs.

Cost (frozen base, so backward computes input gradients only): the separate way runs forward(2B rows)
+ backward(2B) + no-grad forward(2B); the batched way runs forward(4B) + backward(4B), whose reference
rows carry zero gradients but are still computed, and whose activations are kept for backward (about
twice the activation memory). Autograd has no per-row requires_grad, so this is inherent to one
batched forward. It can only win where a twice-as-tall batch runs sufficiently more efficiently
(small models, launch-bound steps); benchmarks/train_step.py measures both. "separate" is the
trainer's default for that reason.

With gradient checkpointing the layers are re-run during backward, so the `lora_on_first_half`
context must stay open until backward has finished; `ReferenceForward.context()` is meant to wrap
the forward, the loss and `accelerator.backward(loss)` together.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Literal

import torch
from torch import nn

from npo_merge.errors import CompatibilityError, InputError

RefForward = Literal["batched", "separate"]
REF_FORWARDS: tuple[RefForward, ...] = ("batched", "separate")


@contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """The UNet with its peft adapters off (diffusers' disable_adapters), back on afterwards; pass the unwrapped model."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def _first_half_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA Linear/Conv2d forward that adds the LoRA update to rows [0, N/2) of the batch only."""
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disable_adapters:
        return result
    rows = x.shape[0]
    if rows % 2:
        raise ValueError(f"a [policy; reference] batch needs an even number of rows, got {rows}")
    if layer.merged:
        raise CompatibilityError("LoRA weights are merged into the base layer: unmerge them before a batched reference forward")
    policy_in = x.narrow(0, 0, rows // 2)
    policy_out = result.narrow(0, 0, rows // 2)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in layer.lora_variant:
            raise CompatibilityError(f"LoRA variant {type(layer.lora_variant[name]).__name__} (DoRA, ...) has no batched reference forward")
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        update = lora_b(lora_a(layer.lora_dropout[name](policy_in.to(lora_a.weight.dtype))))
        policy_out.add_(update.to(result.dtype), alpha=layer.scaling[name])
    return result


def _split_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import Conv2d as LoraConv2d
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, (LoraLinear, LoraConv2d)):
                raise CompatibilityError(f"{name}: a {type(module).__name__} LoRA layer has no batched reference forward")
            layers.append(module)
    if not layers:
        raise CompatibilityError("the UNet has no peft LoRA layers: nothing to split")
    return layers


@contextmanager
def lora_on_first_half(unet: nn.Module) -> Iterator[nn.Module]:
    """Within the block, each peft LoRA layer of `unet` applies its update to the first half of the batch only.

    Feed [policy rows; reference rows]: the second half is the frozen base model's prediction. The
    layers' class forward is shadowed by an instance attribute and restored on exit.
    """
    layers = _split_layers(unet)
    for layer in layers:
        layer.forward = functools.partial(_first_half_forward, layer)
    try:
        yield unet
    finally:
        for layer in layers:
            del layer.forward


class ReferenceForward:
    """Policy and reference predictions for one batch, the separate or the batched way.

    model: what the trainer calls (the accelerate-prepared, maybe DDP-wrapped UNet); unet: the
    unwrapped UNet holding the peft layers. `predict(x_t, t, **unet_kwargs)` returns
    (policy prediction with grad, detached reference prediction); call it inside `context()`.
    """

    def __init__(self, mode: RefForward, model: nn.Module, unet: nn.Module):
        if mode not in REF_FORWARDS:
            raise InputError(f"ref_forward must be one of {', '.join(REF_FORWARDS)}, got {mode!r}")
        self.mode, self.model, self.unet = mode, model, unet

    def context(self) -> ContextManager[Any]:
        """Open around forward, loss and backward (see the module docstring)."""
        return lora_on_first_half(self.unet) if self.mode == "batched" else nullcontext()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, **unet_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "batched":
            doubled = {k: _double(v) for k, v in unet_kwargs.items()}
            out = self.model(_double(x_t), _double(t), **doubled).sample
            policy, reference = out.chunk(2)
            return policy, reference.detach()
        policy = self.model(x_t, t, **unet_kwargs).sample
        with torch.no_grad(), adapters_disabled(self.unet):
            reference = self.unet(x_t, t, **unet_kwargs).sample
        return policy, reference.detach()


def _double(value: Any) -> Any:
    """Stack a batch on itself along dim 0 (recursing into dicts such as SDXL's added_cond_kwargs)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value])
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value
