"""Write canonical LoRA modules in the layouts other tools load: kohya, diffusers, peft.

kohya: `lora_unet_*` / `lora_te*_*` names (SGM module names for SDXL, as kohya's scripts write),
lora_down/lora_up/alpha per module; loads in A1111, ComfyUI and diffusers.
diffusers: `unet.<module>.lora_A.weight` / `lora_B.weight` with the per-component peft LoraConfig in
the `lora_adapter_metadata` header (what `save_lora_weights` writes), so `load_lora_weights` gets
every module's scale right; per-module ranks/alphas go into rank_pattern/alpha_pattern.
peft: a folder with adapter_model.safetensors (`base_model.model.<module>.lora_A.weight`) and
adapter_config.json; one model per folder, as peft has it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import torch

from npo_merge.delta.types import LowRank
from npo_merge.errors import InputError, UsageError
from npo_merge.io.atomic import atomic_output
from npo_merge.io.lora import kohya_name
from npo_merge.io.safetensors_stream import SpooledWriter

LAYOUTS = ("kohya", "diffusers", "peft")


def _peft_config(modules: Mapping[str, tuple[int, float]]) -> dict[str, object]:
    """A peft LoraConfig dict for modules -> (rank, alpha), patterns only where they differ."""
    (rank, alpha), _ = Counter(modules.values()).most_common(1)[0]
    rank_pattern = {m: r for m, (r, _) in modules.items() if r != rank}
    alpha_pattern = {m: a for m, (_, a) in modules.items() if a != alpha}
    return {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(modules),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False, "use_dora": False,
        "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True, "fan_in_fan_out": False,
    }


def _split(module: str) -> tuple[str, str]:
    component, _, rest = module.partition(".")
    return component, rest


def write_lora(
    path: str | os.PathLike[str],
    modules: Iterable[tuple[str, LowRank]],
    *,
    layout: str,
    architecture: str,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write canonical modules -> LowRank as a LoRA in `layout`; returns the file (or peft folder).

    Factors are cast to `dtype` on write; alpha is kept per module (kohya: .alpha tensors;
    diffusers/peft: LoraConfig with rank/alpha patterns), so every module's scale survives.
    """
    if layout not in LAYOUTS:
        raise UsageError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    path = Path(path)
    if layout == "peft":
        return _write_peft(path, modules, dict(metadata or {}), dtype)
    scales: dict[str, dict[str, tuple[int, float]]] = {}
    with SpooledWriter(path, metadata) as writer:
        for module, factors in modules:
            down, up = factors.down.to(dtype), factors.up.to(dtype)
            if layout == "kohya":
                name = kohya_name(architecture, module)
                writer.write(f"{name}.lora_down.weight", down)
                writer.write(f"{name}.lora_up.weight", up)
                writer.write(f"{name}.alpha", torch.tensor(float(factors.alpha), dtype=torch.float32))
            else:
                writer.write(f"{module}.lora_A.weight", down)
                writer.write(f"{module}.lora_B.weight", up)
                component, rest = _split(module)
                scales.setdefault(component, {})[rest] = (factors.rank, float(factors.alpha))
        if layout == "diffusers":
            config: dict[str, object] = {}
            for component, entries in scales.items():
                for key, value in _peft_config(entries).items():
                    config[f"{component}.{key}"] = value
            writer.metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
            writer.metadata.setdefault("format", "pt")
    return path


def _write_peft(path: Path, modules: Iterable[tuple[str, LowRank]], metadata: dict[str, str], dtype: torch.dtype) -> Path:
    scales: dict[str, tuple[int, float]] = {}
    with atomic_output(path, directory=True) as folder:
        with SpooledWriter(folder / "adapter_model.safetensors", metadata) as writer:
            components = set()
            for module, factors in modules:
                component, rest = _split(module)
                components.add(component)
                if len(components) > 1:
                    raise InputError(
                        f"{path}: a peft folder holds one model, but the LoRA covers {sorted(components)}; "
                        "write it as kohya or diffusers instead"
                    )
                writer.write(f"base_model.model.{rest}.lora_A.weight", factors.down.to(dtype))
                writer.write(f"base_model.model.{rest}.lora_B.weight", factors.up.to(dtype))
                scales[rest] = (factors.rank, float(factors.alpha))
        (folder / "adapter_config.json").write_text(json.dumps(_peft_config(scales), indent=2, sort_keys=True) + "\n")
    return path
