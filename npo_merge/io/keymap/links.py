"""A KeyLink ties one tensor in a native layout to its canonical tensor(s), with an exact inverse.

Most links are renames. Three reshape: LDM stores the VAE mid-block attention projections as 1x1
convs (diffusers: linear), OpenCLIP packs q/k/v into one in_proj tensor (diffusers: three), and
OpenCLIP's text_projection is the transpose of diffusers' text_projection.weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Transform = Literal["same", "squeeze", "split3", "transpose"]


@dataclass(frozen=True)
class KeyLink:
    """native tensor <-> canonical tensor(s); `transform` says how the values move between them."""

    native: str
    canonical: tuple[str, ...]
    transform: Transform = "same"

    def __post_init__(self) -> None:
        expected = 3 if self.transform == "split3" else 1
        if len(self.canonical) != expected:
            raise ValueError(f"{self.transform} link for {self.native!r} needs {expected} canonical keys")

    def canonical_shapes(self, native_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Shapes of the canonical tensors given the native tensor's shape."""
        shape = tuple(native_shape)
        if self.transform == "same":
            return [shape]
        if self.transform == "squeeze":
            return [shape[:2] if len(shape) > 2 else shape]
        if self.transform == "transpose":
            return [shape[::-1]]
        part = (shape[0] // 3, *shape[1:])
        return [part, part, part]

    def to_canonical(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Native tensor -> canonical tensors (views where possible)."""
        if self.transform == "same":
            return [tensor]
        if self.transform == "squeeze":
            return [tensor.reshape(tensor.shape[:2]) if tensor.dim() > 2 else tensor]
        if self.transform == "transpose":
            return [tensor.t().contiguous()]
        return list(tensor.chunk(3, dim=0))

    def to_native(self, tensors: Sequence[torch.Tensor], native_shape: Sequence[int]) -> torch.Tensor:
        """Canonical tensors -> the native tensor of `native_shape` (exact inverse of to_canonical)."""
        if self.transform == "split3":
            out = torch.cat(list(tensors), dim=0)
        elif self.transform == "transpose":
            out = tensors[0].t().contiguous()
        else:
            out = tensors[0]
        return out.reshape(tuple(native_shape))
