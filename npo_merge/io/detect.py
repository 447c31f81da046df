"""What is at a path: a model checkpoint, a LoRA, or a delta written by npo-merge."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from npo_merge.errors import InputError
from npo_merge.io.checkpoint import is_diffusers_folder
from npo_merge.io.lora import DIFFUSERS_WEIGHTS, PEFT_WEIGHTS, lora_layout_of
from npo_merge.io.sources import open_source

Kind = Literal["model", "lora", "delta"]
DELTA_FORMAT_KEY = "npo_merge.format"


def detect_kind(path: str | os.PathLike[str]) -> Kind:
    """Classify a path by its contents (never by its name): model, lora or delta."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_diffusers_folder(path) or (path / "config.json").is_file():
            return "model"
        if any((path / name).is_file() for name in PEFT_WEIGHTS + DIFFUSERS_WEIGHTS):
            return "lora"
        raise InputError(f"{path}: folder holds no model or LoRA (no model_index.json, unet/, adapter_model.* or pytorch_lora_weights.*)")
    source = open_source(path)
    try:
        if source.metadata.get(DELTA_FORMAT_KEY, "").startswith("delta"):
            return "delta"
        if lora_layout_of(list(source)) is not None:
            return "lora"
        return "model"
    finally:
        source.close()
