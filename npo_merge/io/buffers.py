"""Reusable scratch buffers, so streaming loops do not fault in fresh memory for every chunk."""

from __future__ import annotations

import torch


class Buffers:
    """Named flat buffers that grow on demand; `get` returns a view valid until the next `get` of that name."""

    def __init__(self) -> None:
        self._raw: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat `numel`-element tensor of `dtype` (uninitialised) backed by the buffer `name`."""
        nbytes = numel * dtype.itemsize
        raw = self._raw.get(name)
        if raw is None or raw.numel() < nbytes:
            raw = self._raw[name] = torch.empty(nbytes, dtype=torch.uint8)
        return raw[:nbytes].view(dtype)
