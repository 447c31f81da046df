"""The trained adapter: peft LoRA added to a diffusers UNet, its trainable state, and its export as LowRank factors.

The adapter is added the way the diffusers training scripts do it (`unet.add_adapter(LoraConfig(...))`,
then `cast_training_params` so the LoRA parameters are fp32 under bf16/fp16 mixed precision), so a
UNet prepared here behaves like any diffusers LoRA training UNet. Targets are module-name suffixes
as peft matches them ("to_q" matches every `...attn1.to_q`); linear and conv layers both work.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from npo_merge.delta.types import LowRank
from npo_merge.errors import CompatibilityError, InputError
from npo_merge.training.config import LoraOptions

ADAPTER = "default"


def add_lora(unet: nn.Module, options: LoraOptions) -> None:
    """Freeze `unet` and add a trainable peft LoRA on the modules named by `options.targets` (params in fp32)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, init_lora_weights=True if options.init == "default" else "gaussian",
                        target_modules=list(options.targets))
    try:
        unet.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise InputError(f"lora.targets {list(options.targets)}: {str(exc).splitlines()[0]}") from None
    unsupported = [name for name, module in lora_layers(unet) if not isinstance(module.base_layer, (nn.Linear, nn.Conv2d))]
    if unsupported:
        raise InputError(f"lora.targets reach layers that are neither Linear nor Conv2d, e.g. {unsupported[0]}")
    cast_training_params(unet, dtype=torch.float32)


def lora_layers(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path, peft LoRA layer) for every layer that holds the trained adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (LoRA A and B of every adapted layer), in module order."""
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise CompatibilityError("the UNet has no trainable LoRA parameters: call add_lora first")
    return params


def lora_factors(unet: nn.Module, prefix: str = "unet.") -> list[tuple[str, LowRank]]:
    """The adapter as (canonical module name, LowRank) pairs, fp32 copies, ready for `write_lora` or `enable_npo`.

    alpha is written so that LowRank.scale equals peft's scaling (lora_alpha / r).
    """
    out = []
    for name, layer in lora_layers(unet):
        down = layer.lora_A[ADAPTER].weight.detach().float().clone()
        up = layer.lora_B[ADAPTER].weight.detach().float().clone()
        rank = down.shape[0]
        out.append((prefix + name, LowRank(down, up, float(layer.scaling[ADAPTER]) * rank)))
    if not out:
        raise CompatibilityError("the UNet holds no LoRA adapter to export")
    return out


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft names them (for exact checkpoints; fp32 as trained)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by `lora_state_dict` back into the adapter; refuses missing or extra keys."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CompatibilityError(f"checkpoint LoRA does not match this adapter ({what}): were lora.targets or rank changed?")
