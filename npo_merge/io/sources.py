"""Tensor files of every kind behind one small interface: names, dtype/shape, one tensor at a time.

safetensors files stream through the memory-mapped reader; sharded safetensors (an index.json
naming the shard of each tensor) open one reader per shard; pickles (.ckpt/.pt/.pth/.bin) are read
only with torch.load(weights_only=True), memory-mapped when the file allows, and refused with an
explanation when they need full unpickling.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Protocol

import torch

from npo_merge.errors import FormatError, InputError
from npo_merge.io.safetensors_stream import SafetensorsReader, TensorInfo

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class TensorSource(Protocol):
    """What every tensor file offers; implemented by SafetensorsReader, ShardedSource, PickleSource."""

    path: Path

    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: object) -> bool: ...
    def info(self, name: str) -> TensorInfo: ...
    def tensor(self, name: str) -> torch.Tensor: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    def close(self) -> None: ...


class ShardedSource:
    """A model split over several safetensors shards, named by a `*.safetensors.index[.variant].json`."""

    def __init__(self, index_path: str | os.PathLike[str]):
        self.path = Path(index_path)
        try:
            index = json.loads(self.path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{self.path}: not a valid shard index ({exc})") from None
        self._readers: dict[str, SafetensorsReader] = {}
        self._where: dict[str, SafetensorsReader] = {}
        try:
            for name, shard in weight_map.items():
                shard_path = self.path.parent / shard
                if not shard_path.is_file():
                    raise InputError(f"{self.path}: shard {shard!r} named in the index is missing")
                reader = self._readers.get(shard) or self._readers.setdefault(shard, SafetensorsReader(shard_path))
                if name not in reader:
                    raise FormatError(f"{self.path}: index places {name!r} in {shard!r}, which does not hold it")
                self._where[name] = reader
        except BaseException:
            self.close()
            raise
        self._metadata = {k: str(v) for k, v in (index.get("metadata") or {}).items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._reader(name).info(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._reader(name).tensor(name)

    def _reader(self, name: str) -> SafetensorsReader:
        try:
            return self._where[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    @property
    def files(self) -> list[Path]:
        return [reader.path for reader in self._readers.values()]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


class PickleSource:
    """A PyTorch pickle read with weights_only=True; nested {"state_dict": ...} is unwrapped."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        loaded = _safe_torch_load(self.path)
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise FormatError(f"{self.path}: holds a {type(loaded).__name__}, not a dict of tensors")
        self._tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if not self._tensors:
            raise FormatError(f"{self.path}: holds no tensors")

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        tensor = self._get(name)
        nbytes = tensor.numel() * tensor.element_size()
        return TensorInfo(name, tensor.dtype, tuple(tensor.shape), 0, nbytes)

    def tensor(self, name: str) -> torch.Tensor:
        return self._get(name).clone()

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self._tensors = {}


def _safe_torch_load(path: Path) -> object:
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: the file is empty")
    mmap = zipfile.is_zipfile(path)  # only the zip format (torch >= 1.6) can be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = str(exc).splitlines()
        reason = next((line.strip() for line in detail if "Unsupported global" in line or "GLOBAL" in line), "")
        raise FormatError(
            f"{path}: refused: this pickle needs full unpickling, which can run arbitrary code"
            f"{' (' + reason + ')' if reason else ''}; convert it to safetensors with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def open_source(path: str | os.PathLike[str]) -> TensorSource:
    """Open one tensor file by its name: .safetensors, a shard index (*.safetensors.index[.fp16].json), or a pickle."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".json") and ".safetensors.index" in name:
        return ShardedSource(path)
    if name.endswith(".safetensors"):
        return SafetensorsReader(path)
    if name.endswith(PICKLE_SUFFIXES):
        return PickleSource(path)
    raise InputError(f"{path}: unknown file type; expected .safetensors, .ckpt, .pt, .pth or .bin")
