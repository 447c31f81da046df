"""Delta files: what npo-merge writes (full or low-rank, with role and base) and reads back.

A full delta is a safetensors file of canonical tensor names -> tuned - base. A low-rank delta is a
LoRA file in any layout (kohya by default) carrying the same provenance metadata. Any foreign LoRA
(kohya, diffusers, peft, the official NPO release) opens as a low-rank delta too: its role is
whatever the user says (positive unless told otherwise).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from npo_merge import __version__
from npo_merge.delta.types import ROLES, BaseFingerprint, LowRank, Role
from npo_merge.errors import FormatError, InputError, KeyMappingError
from npo_merge.io.buffers import Buffers
from npo_merge.io.detect import DELTA_FORMAT_KEY, detect_kind
from npo_merge.io.keymap.architectures import ARCHITECTURES
from npo_merge.io.keymap.tables import canonical_keys
from npo_merge.io.lora import LoraFile, read_lora
from npo_merge.io.safetensors_stream import SafetensorsReader, read_header

# Tensors a LoRA layer cannot represent even when they are matrices.
_NOT_LORA = ("embeddings.token_embedding", "embeddings.position_embedding")

FULL = "delta/full"
LOWRANK = "delta/lowrank"
PREFIX = "npo_merge."


def provenance(kind: str, role: Role, base: BaseFingerprint, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata every delta file carries (all strings, keys prefixed "npo_merge.")."""
    if role not in ROLES:
        raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    meta = {
        DELTA_FORMAT_KEY: kind,
        f"{PREFIX}version": __version__,
        f"{PREFIX}role": role,
        f"{PREFIX}base_architecture": base.architecture,
    }
    if base.sha256:
        meta[f"{PREFIX}base_sha256"] = base.sha256
    if base.name:
        meta[f"{PREFIX}base_name"] = base.name
    for key, value in (extra or {}).items():
        meta[key if key.startswith(PREFIX) else PREFIX + key] = value
    return meta


@dataclass
class Delta:
    """A delta opened for reading: dense per-tensor access for any kind, factors for low-rank ones.

    `keys` are canonical tensor names ("unet.conv_in.weight") mapped to the shape of the dense
    delta. Use as a context manager.
    """

    path: Path
    kind: str  # "full" | "lowrank"
    role: Role
    architectures: tuple[str, ...]
    keys: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    _reader: SafetensorsReader | None = None
    _lora: LoraFile | None = None
    _last: tuple[str, LowRank] | None = None

    @property
    def architecture(self) -> str:
        return self.architectures[0] if len(self.architectures) == 1 else " or ".join(self.architectures)

    def dense(self, key: str, rows: tuple[int, int] | None = None, *, stored_dtype: bool = False,
              buffers: Buffers | None = None) -> torch.Tensor:
        """The dense fp32 delta of one canonical tensor, or of rows [start, stop) of it.

        `stored_dtype` returns a full delta as stored (e.g. fp16), for callers that add it in one
        fused step computed in fp32 (saves a conversion pass); LoRA deltas are always fp32. With
        `buffers` and `rows`, the result lives in a reused buffer (valid until the next such call).
        """
        if key not in self.keys:
            raise KeyMappingError(f"{self.path}: no delta for {key!r}")
        if self._lora is None:
            assert self._reader is not None
            if buffers is not None and rows is not None and stored_dtype:
                info = self._reader.info(key)
                numel = (rows[1] - rows[0]) * (info.numel // info.shape[0])
                return self._reader.read_into(key, buffers.get("delta", numel, info.dtype), rows)
            stored = self._reader.tensor(key, rows)
            return stored if stored_dtype else stored.float()
        factors = self.lowrank(key.rsplit(".", 1)[0])
        start, stop = rows if rows is not None else (0, factors.weight_shape[0])
        out = None
        if buffers is not None and rows is not None:
            out = buffers.get("delta", math.prod((stop - start, *factors.weight_shape[1:])), torch.float32)
        return factors.dense_rows(start, stop, out)

    def lowrank(self, module: str) -> LowRank:
        """One module's factors (fp32); the last one read is kept, so row-chunked reads load it once."""
        if self._lora is None:
            raise InputError(f"{self.path}: a full delta has no low-rank factors")
        last = self._last  # read once: apply may ask from two threads
        if last is None or last[0] != module:
            last = self._last = (module, self._lora.lowrank(module))
        return last[1]

    @property
    def modules(self) -> list[str]:
        return list(self._lora.modules) if self._lora is not None else []

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._lora is not None:
            self._lora.close()

    def __enter__(self) -> "Delta":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _role(metadata: Mapping[str, str], override: Role | None, where: Path) -> Role:
    if override is not None:
        if override not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}, got {override!r}")
        return override
    role = metadata.get(f"{PREFIX}role", "positive")
    if role not in ROLES:
        raise FormatError(f"{where}: unknown role {role!r} in metadata")
    return role  # type: ignore[return-value]


def _dense_shape(down: tuple[int, ...], up: tuple[int, ...]) -> tuple[int, ...]:
    if len(up) == 4 and len(down) == 2:  # 1x1 conv written with a linear down factor
        return (up[0], down[1], 1, 1)
    return (up[0], *down[1:])


def open_delta(path: str | os.PathLike[str], *, role: Role | None = None) -> Delta:
    """Open a full delta, a low-rank delta or any LoRA file/folder as a Delta."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "model":
        raise InputError(f"{path}: is a model checkpoint, not a delta or LoRA (make one with `npo-merge extract`)")
    if kind == "delta" and read_header(path).metadata.get(DELTA_FORMAT_KEY) == FULL:
        return _open_full(path, role)
    lora = read_lora(path)
    keys = {
        f"{module}.weight": _dense_shape(lora.source.info(ref.down_key).shape, lora.source.info(ref.up_key).shape)
        for module, ref in lora.modules.items()
    }
    return Delta(path, "lowrank", _role(lora.metadata, role, path), lora.architectures, keys, dict(lora.metadata), _lora=lora)


def _open_full(path: Path, role: Role | None) -> Delta:
    reader = SafetensorsReader(path)
    try:
        metadata = dict(reader.metadata)
        architecture = metadata.get(f"{PREFIX}base_architecture", "")
        if architecture not in ARCHITECTURES:
            raise FormatError(f"{path}: full delta without a known base architecture in its metadata")
        known = canonical_keys(architecture)
        unknown = [name for name in reader if name not in known]
        if unknown:
            raise KeyMappingError(f"{path}: tensor {unknown[0]!r} is not a {architecture} tensor")
        keys = {name: reader[name].shape for name in reader}
        return Delta(path, "full", _role(metadata, role, path), (architecture,), keys, metadata, _reader=reader)
    except BaseException:
        reader.close()
        raise


def lora_representable(key: str, shape: tuple[int, ...]) -> bool:
    """Can a LoRA layer hold this tensor's delta? Linear/conv weights yes; biases, norms, embeddings no."""
    return key.endswith(".weight") and len(shape) in (2, 4) and not any(part in key for part in _NOT_LORA)


def fidelity_metadata(overall: Mapping[str, float], layers: Mapping[str, tuple[int, float]]) -> str:
    """JSON for the fidelity report stored in low-rank deltas: overall numbers and per layer (rank, retained)."""
    return json.dumps({"overall": dict(overall), "layers": {k: [r, round(f, 6)] for k, (r, f) in sorted(layers.items())}},
                      separators=(",", ":"))
