"""A model checkpoint in any layout, seen through canonical names, one tensor at a time.

Layouts: a diffusers folder (unet/, text_encoder/, text_encoder_2/, vae/, with fp16 variants and
shards), a single file in LDM/SGM naming (A1111/ComfyUI/CivitAI style, e.g. DreamShaper 8), or a
single diffusers component file (a bare UNet's diffusion_pytorch_model.safetensors). Every native
tensor maps to canonical names or is a known extra; anything else is an error that names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from npo_merge.errors import FormatError, InputError, KeyMappingError
from npo_merge.io.architecture import UNKNOWN, architecture_from_unet_config, detect_architecture
from npo_merge.io.keymap.architectures import COMPONENTS
from npo_merge.io.keymap.links import KeyLink
from npo_merge.io.keymap.tables import canonical_keys, is_diffusers_extra, ldm_table
from npo_merge.io.keymap.vae import LEGACY_DIFFUSERS_VAE
from npo_merge.io.lora import BRANCH_PREFIX
from npo_merge.io.safetensors_stream import TensorInfo
from npo_merge.io.sources import TensorSource, open_source

# Weight file names inside a diffusers component folder, most preferred first; "{v}" is ".fp16" etc.
# (diffusers and transformers put a variant before ".json" in shard index names.)
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model{v}.safetensors",
    "diffusion_pytorch_model.safetensors.index{v}.json",
    "model{v}.safetensors",
    "model.safetensors.index{v}.json",
    "diffusion_pytorch_model{v}.bin",
    "pytorch_model{v}.bin",
)


@dataclass(frozen=True)
class Entry:
    """Where one canonical tensor comes from: a source, its link, and which part of the link."""

    source: TensorSource
    link: KeyLink
    part: int = 0


class Checkpoint:
    """Canonical view over the files of one model. Use as a context manager (closes the files)."""

    def __init__(self, path: Path, layout: str, architecture: str, sources: list[TensorSource]):
        self.path = path
        self.layout = layout
        self.architecture = architecture
        self.sources = sources
        self.entries: dict[str, Entry] = {}
        self.extras: list[tuple[TensorSource, str]] = []
        self.branch_names: list[str] = []  # a dual-branch checkpoint's uncond difference (npo_uncond.*)
        self._cache: tuple[str, torch.Tensor] | None = None  # last native tensor read (split3 links)

    # -- canonical access -------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, canonical: object) -> bool:
        return canonical in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, canonical: str) -> Entry:
        try:
            return self.entries[canonical]
        except KeyError:
            raise KeyMappingError(f"{self.path}: has no tensor {canonical!r}") from None

    def native_info(self, canonical: str) -> TensorInfo:
        entry = self.entry(canonical)
        return entry.source.info(entry.link.native)

    def shape(self, canonical: str) -> tuple[int, ...]:
        entry = self.entry(canonical)
        return entry.link.canonical_shapes(entry.source.info(entry.link.native).shape)[entry.part]

    def dtype(self, canonical: str) -> torch.dtype:
        return self.native_info(canonical).dtype

    def tensor(self, canonical: str) -> torch.Tensor:
        """The canonical tensor (read from disk; in the file's dtype)."""
        entry = self.entry(canonical)
        native = entry.link.native
        cache_key = f"{id(entry.source)}:{native}"
        if self._cache is not None and self._cache[0] == cache_key:
            raw = self._cache[1]
        else:
            raw = entry.source.tensor(native)
            self._cache = (cache_key, raw) if len(entry.link.canonical) > 1 else None
        return entry.link.to_canonical(raw)[entry.part].contiguous()

    @property
    def components(self) -> list[str]:
        present = {key.split(".", 1)[0] for key in self.entries}
        return [name for name in COMPONENTS if name in present]

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for source in self.sources:
            merged.update(source.metadata)
        return merged

    @property
    def files(self) -> list[Path]:
        out: list[Path] = []
        for source in self.sources:
            out.extend(getattr(source, "files", [source.path]))
        return out

    def close(self) -> None:
        self._cache = None
        for source in self.sources:
            source.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ---------------------------------------------------------
    def _add(self, canonical: str, entry: Entry) -> None:
        if canonical in self.entries:
            raise FormatError(f"{self.path}: tensor {canonical!r} appears twice")
        self.entries[canonical] = entry


def _shapes(source: TensorSource, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + name: source.info(name).shape for name in source}


def _single_file(path: Path, source: TensorSource) -> Checkpoint:
    architecture = detect_architecture("single-file", _shapes(source))
    checkpoint = Checkpoint(path, "single-file", architecture, [source])
    if architecture == UNKNOWN:
        return checkpoint
    table = ldm_table(architecture)
    for native in source:
        if native.startswith(BRANCH_PREFIX):
            checkpoint.branch_names.append(native)
            continue
        link = table.resolve(native)
        if link is None:
            checkpoint.extras.append((source, native))
            continue
        for part, canonical in enumerate(link.canonical):
            checkpoint._add(canonical, Entry(source, link, part))
    return checkpoint


def _diffusers_key(component: str, key: str) -> str:
    """Canonical name of a key in a diffusers component file.

    Legacy VAE attention names are modernised, and CLIPTextModel files written by transformers 5
    (which drops the "text_model." prefix that every published SD repository has) get it back.
    """
    if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection.")):
        key = f"text_model.{key}"
    if component == "vae":
        head, _, param = key.rpartition(".")
        module, _, leaf = head.rpartition(".")
        if ".mid_block.attentions." in key and leaf in LEGACY_DIFFUSERS_VAE:
            key = f"{module}.{LEGACY_DIFFUSERS_VAE[leaf]}.{param}"
    return f"{component}.{key}"


def _add_component(checkpoint: Checkpoint, component: str, source: TensorSource) -> None:
    known = canonical_keys(checkpoint.architecture) if checkpoint.architecture != UNKNOWN else None
    for native in source:
        if native.startswith(BRANCH_PREFIX):
            checkpoint.branch_names.append(native)
            continue
        canonical = _diffusers_key(component, native)
        if is_diffusers_extra(canonical):
            checkpoint.extras.append((source, native))
            continue
        if known is not None and canonical not in known:
            raise KeyMappingError(
                f"{source.path}: tensor {native!r} is not part of the {checkpoint.architecture} {component}"
            )
        checkpoint._add(canonical, Entry(source, KeyLink(native, (canonical,))))


def _weights_file(folder: Path, variant: str | None) -> Path | None:
    variants = [f".{variant}"] if variant else ["", ".fp16", ".bf16"]
    for v in variants:
        for pattern in _DIFFUSERS_WEIGHTS:
            candidate = folder / pattern.format(v=v)
            if candidate.is_file():
                return candidate
    return None


def _diffusers_folder(path: Path, variant: str | None) -> Checkpoint:
    config_path = path / "unet" / "config.json"
    architecture = UNKNOWN
    if config_path.is_file():
        try:
            architecture = architecture_from_unet_config(json.loads(config_path.read_text()))
        except json.JSONDecodeError as exc:
            raise FormatError(f"{config_path}: not valid JSON ({exc})") from None
    checkpoint = Checkpoint(path, "diffusers", architecture, [])
    try:
        for component in COMPONENTS:
            folder = path / component
            if not folder.is_dir():
                continue
            weights = _weights_file(folder, variant)
            if weights is None:
                if variant:
                    raise InputError(f"{folder}: no {variant} weights; drop the variant or pick another")
                continue
            source = open_source(weights)
            checkpoint.sources.append(source)
            _add_component(checkpoint, component, source)
    except BaseException:
        checkpoint.close()
        raise
    if not checkpoint.sources:
        raise InputError(f"{path}: diffusers folder without weights in unet/, text_encoder/ or vae/")
    return checkpoint


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def is_single_file_model(names: list[str]) -> bool:
    """True when tensor names look like an LDM/SGM single-file checkpoint."""
    return any(name.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for name in names)


def is_diffusers_unet_file(names: list[str]) -> bool:
    return "conv_in.weight" in names and any(name.startswith("down_blocks.") for name in names)


def open_checkpoint(path: str | os.PathLike[str], *, variant: str | None = None) -> Checkpoint:
    """Open a model checkpoint (diffusers folder, single file, diffusers UNet file) by path."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_diffusers_folder(path):
            return _diffusers_folder(path, variant)
        if (path / "config.json").is_file() and _weights_file(path, variant):
            return open_checkpoint(_weights_file(path, variant))  # a component folder, e.g. unet/
        raise InputError(f"{path}: folder holds no model (expected a diffusers folder with model_index.json or unet/)")
    source = open_source(path)
    try:
        names = list(source)
        if is_single_file_model(names):
            return _single_file(path, source)
        if is_diffusers_unet_file(names):
            checkpoint = Checkpoint(path, "diffusers-unet", detect_architecture("diffusers-unet", _shapes(source)), [source])
            _add_component(checkpoint, "unet", source)
            return checkpoint
    except BaseException:
        source.close()
        raise
    source.close()
    raise InputError(f"{path}: not a model checkpoint (no UNet, text encoder or VAE tensors recognised)")
