"""The dual-branch checkpoint: theta_c in the target's own layout plus theta_u - theta_c under a prefix.

Format version 1 (all under the reserved prefix `npo_uncond.`, canonical UNet module names):
    npo_uncond.<module>.lora_down   (r, in) or (r, in, kh, kw)     low-rank difference, with
    npo_uncond.<module>.lora_up     (out, r) or (out, r, 1, 1)      alpha: scale = alpha / r
    npo_uncond.<module>.alpha       scalar fp32
    npo_uncond.<module>.diff        dense weight difference (e.g. beta != 0 left uncompressed)
    npo_uncond.<module>.bias_diff   bias difference, when the branches' biases differ
Metadata: npo_merge.dual_branch = "1" (format version), npo_merge.eta, npo_merge.beta,
npo_merge.guidance_scale (the default for sampling), npo_merge.branch_modules, plus provenance.

Tools that do not know the format load theta_c and ignore the extra keys: diffusers'
from_single_file maps only the names it knows (checked in our tests); ComfyUI and A1111 load
state dicts with strict=False (read in their source, not run here), ComfyUI logging the keys as
left over. The branch difference is what the file says: theta_u - theta_c, eta already applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from npo_merge.delta.types import LowRank
from npo_merge.errors import FormatError, InputError
from npo_merge.io.lora import BRANCH_PREFIX
from npo_merge.io.safetensors_stream import SafetensorsReader, TensorSpec

PREFIX = BRANCH_PREFIX
FORMAT_KEY = "npo_merge.dual_branch"
FORMAT_VERSION = "1"
_SUFFIXES = ("lora_down", "lora_up", "alpha", "diff", "bias_diff")
# Where a diffusers-folder output keeps the branch difference (a folder has no single file).
FOLDER_BRANCH_FILE = "npo_uncond.safetensors"


@dataclass
class Branch:
    """theta_u - theta_c per canonical UNet module: weight (LowRank or dense) and optional bias diff."""

    weights: dict[str, LowRank | torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(set(self.weights) | set(self.biases))

    def __bool__(self) -> bool:
        return bool(self.weights or self.biases)

    @property
    def eta(self) -> float:
        return float(self.metadata.get("npo_merge.eta", "1"))

    @property
    def guidance_scale(self) -> float | None:
        value = self.metadata.get("npo_merge.guidance_scale")
        return float(value) if value else None


def branch_tensors(branch: Branch, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors to store, in sorted name order (factors and diffs cast to `dtype`, alpha fp32)."""
    out: dict[str, torch.Tensor] = {}
    for module, weight in branch.weights.items():
        if isinstance(weight, LowRank):
            out[f"{PREFIX}{module}.lora_down"] = weight.down.to(dtype)
            out[f"{PREFIX}{module}.lora_up"] = weight.up.to(dtype)
            out[f"{PREFIX}{module}.alpha"] = torch.tensor(float(weight.alpha), dtype=torch.float32)
        else:
            out[f"{PREFIX}{module}.diff"] = weight.to(dtype)
    for module, bias in branch.biases.items():
        out[f"{PREFIX}{module}.bias_diff"] = bias.to(dtype)
    for name in sorted(out):
        yield name, out[name]


def branch_specs(branch: Branch, dtype: torch.dtype) -> list[TensorSpec]:
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in branch_tensors(branch, dtype)]


def branch_metadata(*, eta: float, beta: float, guidance_scale: float | None, modules: int) -> dict[str, str]:
    meta = {FORMAT_KEY: FORMAT_VERSION, "npo_merge.eta": repr(float(eta)), "npo_merge.beta": repr(float(beta)),
            "npo_merge.branch_modules": str(modules)}
    if guidance_scale is not None:
        meta["npo_merge.guidance_scale"] = repr(float(guidance_scale))
    return meta


def is_branch_key(name: str) -> bool:
    return name.startswith(PREFIX)


def read_branch(reader: SafetensorsReader, metadata: Mapping[str, str] | None = None) -> Branch:
    """The branch difference stored in an open file (empty when the file has none)."""
    metadata = dict(reader.metadata if metadata is None else metadata)
    names = [n for n in reader if is_branch_key(n)]
    if not names:
        return Branch(metadata=metadata)
    version = metadata.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise FormatError(f"{reader.path}: dual-branch format version {version!r} is not supported (this tool reads {FORMAT_VERSION})")
    parts: dict[str, dict[str, str]] = {}
    for name in names:
        module, _, suffix = name[len(PREFIX):].rpartition(".")
        if suffix not in _SUFFIXES:
            raise FormatError(f"{reader.path}: unknown dual-branch tensor {name!r}")
        parts.setdefault(module, {})[suffix] = name
    branch = Branch(metadata=metadata)
    for module, found in parts.items():
        if "diff" in found:
            branch.weights[module] = reader.tensor(found["diff"])
        elif {"lora_down", "lora_up"} <= set(found):
            alpha = float(reader.tensor(found["alpha"]).item()) if "alpha" in found else None
            down, up = reader.tensor(found["lora_down"]), reader.tensor(found["lora_up"])
            branch.weights[module] = LowRank(down, up, alpha if alpha is not None else float(down.shape[0]))
        elif set(found) - {"bias_diff"}:
            raise FormatError(f"{reader.path}: module {module!r} has an incomplete branch difference ({sorted(found)})")
        if "bias_diff" in found:
            branch.biases[module] = reader.tensor(found["bias_diff"])
    return branch


def branch_file(path: str | os.PathLike[str]) -> Path | None:
    """Where the branch difference of a model path lives: the file itself, or a folder's branch file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / FOLDER_BRANCH_FILE
        return candidate if candidate.is_file() else None
    if path.suffix == ".safetensors":
        return path
    return None


def load_branch(path: str | os.PathLike[str]) -> Branch:
    """Read the branch difference of a dual-branch file or folder (empty Branch for a plain model)."""
    where = branch_file(path)
    if where is None:
        return Branch()
    with SafetensorsReader(where) as reader:
        return read_branch(reader)


def require_branch(path: str | os.PathLike[str]) -> Branch:
    branch = load_branch(path)
    if not branch:
        raise InputError(f"{path}: no dual-branch data (npo_uncond.*); write one with `npo-merge apply` and a negative delta")
    return branch
