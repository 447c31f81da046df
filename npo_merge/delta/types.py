"""The value types every part of npo_merge passes around: low-rank factors, roles, delta provenance.

Naming: module and tensor names are *canonical* names, i.e. diffusers module paths prefixed by the
component ("unet.down_blocks.0.attentions.0.proj_in", "text_encoder.text_model.encoder.layers.0.
self_attn.q_proj"). A full delta is keyed by tensor name ("<module>.weight"), a low-rank delta by
module name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Role = Literal["positive", "negative"]
ROLES: tuple[Role, ...] = ("positive", "negative")


@dataclass(frozen=True)
class LowRank:
    """One module's low-rank delta: delta_W = (alpha / rank) * up @ down, over flattened conv dims.

    down (LoRA "A"): (rank, in) for linear layers, (rank, in, kh, kw) for conv layers.
    up   (LoRA "B"): (out, rank) for linear layers, (out, rank, 1, 1) for conv layers.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.shape[0] != self.up.shape[1]:
            raise ValueError(
                f"LoRA factors disagree on rank: down {tuple(self.down.shape)}, up {tuple(self.up.shape)}"
            )
        if self.up.dim() == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise ValueError(f"conv LoRA up factor must be (out, rank, 1, 1), got {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor alpha / rank that multiplies up @ down."""
        return float(self.alpha) / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the dense delta this pair expands to (the module's weight shape)."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expand to the dense weight delta (computed in fp32, returned in `dtype`)."""
        return self.dense_rows(0, self.weight_shape[0]).to(dtype)

    def row_factors(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up[start:stop], down) as 2-D fp32 matrices: their product is rows [start, stop) of the delta
        before the scale (conv factors flattened)."""
        return self.up[start:stop].reshape(stop - start, self.rank).float(), self.down.reshape(self.rank, -1).float()

    def dense_rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of the dense fp32 delta, scale * up[start:stop] @ down, as one GEMM with the
        scale as its alpha (no pass of its own over the product). `out`: a flat fp32 buffer to hold it."""
        up, down = self.row_factors(start, stop)
        numel = up.shape[0] * down.shape[1]
        flat = torch.empty(numel, dtype=torch.float32) if out is None else out[:numel]
        product = flat.view(up.shape[0], down.shape[1]).addmm_(up, down, beta=0, alpha=self.scale)
        return product.reshape(stop - start, *self.weight_shape[1:])


@dataclass(frozen=True)
class BaseFingerprint:
    """What a delta was taken against: architecture plus a content fingerprint of the base."""

    architecture: str
    sha256: str | None = None
    name: str | None = None


@dataclass
class DeltaInfo:
    """Provenance of a delta file: role, base, and free-form extra metadata (all strings on disk)."""

    role: Role
    base: BaseFingerprint
    extra: dict[str, str] = field(default_factory=dict)
