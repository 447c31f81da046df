"""Streaming safetensors: validate a header without touching tensor data, read one tensor at a time
through a memory map, and write tensors one at a time into a temporary file renamed into place.

We parse the header ourselves (instead of trusting safetensors.safe_open) so that a damaged or
hostile file gets a precise one-line error, and so that reading a 7 GB checkpoint keeps only the
tensor in hand resident: pages are released from this process after each read.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping

import torch

from npo_merge.errors import FormatError, InputError
from npo_merge.io.atomic import AtomicTarget
from npo_merge.io.block_file import BlockFile

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
_PAGE = mmap.ALLOCATIONGRANULARITY
_COPY_SLICE = 16 * 1024 * 1024

# read_into only reads its torch.frombuffer view of the read-only map, which torch warns about once.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning, module=__name__)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file order, string metadata, data start."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype ("F16", "BF16"...)."""
    try:
        return CODES[dtype]
    except KeyError:
        raise InputError(f"dtype {dtype} cannot be stored in safetensors") from None


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of a safetensors file; no tensor data is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        return _parse_header(fh, size, str(path))


def _parse_header(fh: BinaryIO, size: int, where: str) -> Header:
    if size < 8:
        raise FormatError(f"{where}: not a safetensors file ({size} bytes; the file is empty or truncated)")
    (length,) = struct.unpack("<Q", fh.read(8))
    if length > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: header length {length} bytes is not plausible; the file is corrupt or not safetensors")
    if 8 + length > size:
        raise FormatError(
            f"{where}: header length {length} runs past the end of the {size}-byte file; the file is truncated"
        )
    raw = fh.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{where}: header is not valid JSON ({exc}); the file is corrupt or not safetensors") from None
    if not isinstance(parsed, dict):
        raise FormatError(f"{where}: header must be a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + length
    data_len = size - data_start
    infos: list[TensorInfo] = []
    for name, entry in parsed.items():
        infos.append(_parse_entry(name, entry, data_start, data_len, where))
    infos.sort(key=lambda info: (info.start, info.end))
    position = data_start
    for info in infos:
        if info.start < position:
            raise FormatError(f"{where}: tensor {info.name!r} overlaps the tensor before it; the file is corrupt")
        if info.start > position:
            raise FormatError(f"{where}: unindexed bytes before tensor {info.name!r}; the file is corrupt")
        position = info.end
    if position != size:
        raise FormatError(
            f"{where}: {size - position} bytes after the last tensor are not indexed; the file is corrupt or was appended to"
        )
    return Header({info.name: info for info in infos}, dict(metadata), data_start, size)


def _parse_entry(name: str, entry: object, data_start: int, data_len: int, where: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: header entry {name!r} is not an object")
    code = entry.get("dtype")
    if code not in DTYPES:
        raise FormatError(f"{where}: tensor {name!r} has unknown dtype {code!r}")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise FormatError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)
    ):
        raise FormatError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end or end > data_len:
        raise FormatError(
            f"{where}: tensor {name!r} data_offsets {offsets} lie outside the {data_len}-byte data section; the file is truncated or corrupt"
        )
    dtype = DTYPES[code]
    expected = math.prod(shape) * _itemsize(dtype)
    if end - begin != expected:
        raise FormatError(
            f"{where}: tensor {name!r} is {end - begin} bytes but shape {shape} of {code} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


class SafetensorsReader(Mapping[str, TensorInfo]):
    """Read-only view of one safetensors file: header on open, tensors on demand.

    `reader[name]` gives the TensorInfo; `reader.tensor(name)` loads that tensor (a fresh CPU tensor
    owning its memory) and releases the mapped pages, so iterating a whole file keeps one tensor
    resident at a time. Use as a context manager, or call close().
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self.header = _parse_header(self._file, os.fstat(self._file.fileno()).st_size, str(self.path))
            self._map = (
                mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.header.file_size else None
            )
        except BaseException:
            self._file.close()
            raise

    # Mapping protocol over tensor infos
    def __getitem__(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, name: str) -> TensorInfo:
        """dtype and shape of one tensor, without reading it."""
        try:
            return self.header.tensors[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    def _span(self, name: str, rows: tuple[int, int] | None) -> tuple[TensorInfo, tuple[int, ...], int, int]:
        """(info, shape, first byte, end byte) of one tensor or of rows [start, stop) of it."""
        info = self.info(name)
        if rows is None:
            return info, info.shape, info.start, info.end
        start, stop = rows
        if not (info.shape and 0 <= start <= stop <= info.shape[0]):
            raise InputError(f"{self.path}: rows {rows} out of range for {name!r} of shape {info.shape}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return info, (stop - start, *info.shape[1:]), info.start + start * row_bytes, info.start + stop * row_bytes

    def fileno(self) -> int:
        """The open file's descriptor (for kernel-side copies of byte ranges)."""
        return self._file.fileno()

    def read_into(self, name: str, buffer: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or rows of it) into the front of `buffer`, a contiguous tensor at least its size;
        returns that part of `buffer`, shaped like the tensor. A buffer of the tensor's dtype is read into
        with `preadv`; one of another dtype gets the conversion straight from the memory-mapped file, one
        pass over the bytes instead of a read and then a conversion (less kernel time, BENCHMARKS.md)."""
        info, shape, begin, end = self._span(name, rows)
        numel = math.prod(shape)
        if not buffer.is_contiguous() or buffer.numel() < numel:
            raise ValueError(f"buffer of {buffer.dtype} x {buffer.numel()} cannot hold {name!r} rows {rows}")
        out = buffer.view(-1)[:numel]
        if end == begin:
            return out.view(shape)
        if buffer.dtype != info.dtype:
            assert self._map is not None
            out.copy_(torch.frombuffer(self._map, dtype=info.dtype, count=numel, offset=begin))
            self._release(begin, end)
            return out.view(shape)
        target = memoryview(out.view(torch.uint8).numpy())
        done = 0
        while done < end - begin:
            count = os.preadv(self._file.fileno(), [target[done:]], begin + done)
            if count == 0:
                raise InputError(f"{self.path}: file ended inside tensor {name!r}; was it changed while reading?")
            done += count
        return out.view(shape)

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Load one tensor, or rows [start, stop) of its first dimension (a copy the caller owns)."""
        info, shape, begin, end = self._span(name, rows)
        out = torch.empty(shape, dtype=info.dtype)
        if end == begin:
            return out
        assert self._map is not None
        target = out.view(-1).view(torch.uint8).numpy()
        # Copy in slices and release each slice's mapped pages right away, so the peak is the
        # tensor itself plus one slice, not the tensor twice.
        for offset in range(0, end - begin, _COPY_SLICE):
            start_byte = begin + offset
            stop_byte = min(start_byte + _COPY_SLICE, end)
            view = memoryview(self._map)[start_byte:stop_byte]
            try:
                target[offset : offset + (stop_byte - start_byte)] = view
            finally:
                view.release()
            self._release(start_byte, stop_byte)
        return out

    def _release(self, start: int, end: int) -> None:
        """Drop the mapped pages of [start, end) from this process (they stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        aligned = start - start % _PAGE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """What will be written under one name: dtype and shape, declared before any data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _header_bytes(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    header: dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InputError(f"metadata {key!r} must be a string (safetensors metadata is strings only)")
        header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for spec in specs:
        if spec.name in offsets:
            raise InputError(f"tensor {spec.name!r} would be written twice")
        end = position + spec.nbytes
        header[spec.name] = {"dtype": dtype_code(spec.dtype), "shape": list(spec.shape), "data_offsets": [position, end]}
        offsets[spec.name] = (position, end)
        position = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the order declared up front.

    The header needs every name, dtype and shape before any data, so callers declare `specs` first
    and then `write()` tensors in that order. Output goes to a temporary file in the destination
    folder, renamed into place by `close()`/the context manager only if every tensor was written;
    on any error the temporary file is removed and the destination is untouched. Same inputs give
    byte-identical files.

    Bytes go out through a BlockFile: large aligned blocks written by background threads (O_DIRECT
    where allowed) while the caller makes the next tensor. Besides whole tensors, the writer takes
    byte ranges of another file (`copy()`) and tensors in parts (`staging()` lends a buffer, in
    place in the output block where it fits, `write_part()` takes it back filled).
    """

    def __init__(self, path: str | os.PathLike[str], specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        self._metadata = dict(metadata or {})
        header, _ = _header_bytes(self._specs, self._metadata)
        self._header = header
        self._target = AtomicTarget(self.path)
        self._written = 0  # bytes of the current tensor handed over in parts so far
        self._lent: torch.Tensor | None = None  # the buffer staging() lent, until write_part()
        self._lent_in_place = False
        self._scratch = torch.empty(0, dtype=torch.uint8)  # staging() when the part does not fit in place
        try:
            self._out = BlockFile(self._target.tmp)
        except BaseException:
            self._target.discard()
            raise
        try:
            self._out.append(memoryview(header))
        except BaseException:
            self.abort()
            raise

    def _expect(self, name: str) -> TensorSpec:
        """The declared spec of `name`, which must be the next tensor."""
        if self._next >= len(self._specs):
            raise InputError(f"{self.path}: tensor {name!r} was not declared")
        spec = self._specs[self._next]
        if name != spec.name:
            raise InputError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        return spec

    def copy(self, names: list[str], fd: int, offset: int) -> None:
        """Write the next declared tensors `names` as the bytes that lie back to back from `offset`
        in the open file `fd` (their declared sizes tell how many)."""
        if self._written:
            raise InputError(f"{self.path}: tensor {self._specs[self._next].name!r} is only partly written")
        length = 0
        for name in names:
            length += self._expect(name).nbytes
            self._next += 1
        self._out.append_from(fd, offset, length)

    def staging(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of `numel` elements for the next part of a tensor: fill it, then write_part() it."""
        nbytes = numel * _itemsize(dtype)
        lent = self._out.view(nbytes, _itemsize(dtype))
        self._lent_in_place = lent is not None
        if lent is None:
            if self._scratch.numel() < nbytes:
                self._scratch = torch.empty(nbytes, dtype=torch.uint8)
            lent = self._scratch[:nbytes]
        self._lent = lent
        return lent.view(dtype)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Write the buffer from staging() as the next bytes of tensor `name` (parts in order; the
        tensor counts as written once its declared size is reached)."""
        spec = self._expect(name)
        lent, self._lent = self._lent, None
        if lent is None or part.data_ptr() != lent.data_ptr() or part.dtype != spec.dtype:
            raise ValueError(f"{self.path}: write_part() takes the {spec.dtype} buffer staging() lent")
        nbytes = part.numel() * part.element_size()
        if self._written + nbytes > spec.nbytes:
            raise InputError(f"{self.path}: parts of {name!r} exceed its declared {spec.nbytes} bytes")
        self._written += nbytes
        if self._written == spec.nbytes:
            self._written = 0
            self._next += 1
        if self._lent_in_place:
            self._out.advance(nbytes)
        else:
            self._out.append(lent[:nbytes].numpy().data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor; dtype and shape must match the declaration."""
        spec = self._expect(name)
        if self._written:
            raise InputError(f"{self.path}: tensor {name!r} is only partly written")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise InputError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, declared {spec.dtype} {spec.shape}"
            )
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._out.append(data.view(-1).view(torch.uint8).numpy().data)  # copied into the block now
        self._next += 1

    def patch_metadata(self, key: str, value: str) -> None:
        """Replace a metadata value written in the header by one of the same length, once every
        tensor is written.

        For values known only at the end (e.g. sha256 digests computed while streaming): write a
        placeholder of the final length up front, patch it before close().
        """
        old = self._metadata.get(key)
        if old is None or len(json.dumps(old)) != len(json.dumps(value)):
            raise ValueError(f"metadata {key!r}: the patch must replace an existing value of the same length")
        needle = json.dumps(key).encode() + b":" + json.dumps(old, ensure_ascii=False).encode()
        position = self._header.find(needle)
        if position < 0:
            raise ValueError(f"metadata {key!r} not found in the header")
        replacement = json.dumps(key).encode() + b":" + json.dumps(value, ensure_ascii=False).encode()
        if len(replacement) != len(needle):
            raise ValueError(f"metadata {key!r}: the patch changes the header length")
        self._out.finish()
        self._header = self._header[:position] + replacement + self._header[position + len(needle):]
        self._metadata[key] = value
        self._out.pwrite(replacement, position)

    def close(self) -> None:
        """Finish: check completeness, write out, close, and rename into place."""
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            self.abort()
            raise InputError(f"{self.path}: output incomplete, tensor {missing!r} was never written")
        try:
            self._out.finish()
        except BaseException:
            self.abort()
            raise
        # No fsync, like cp, safetensors and diffusers: the rename makes the output appear whole or
        # not at all for an interrupted run; surviving a power cut is left to the filesystem.
        self._out.close()
        self._target.commit()

    def abort(self) -> None:
        """Discard everything written; the destination stays as it was."""
        self._out.close()
        self._target.discard()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SpooledWriter:
    """Write tensors in any order when their number or shapes are not known up front.

    Tensors are appended to a temporary spool in the destination folder; `close()` writes the
    final file with names sorted (deterministic) and renames it into place. Costs one extra pass
    over the data, so it is meant for outputs like LoRA files, not for whole checkpoints.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._spool_target = AtomicTarget(self.path.with_name(self.path.name + ".spool"))
        self._spool = open(self._spool_target.tmp, "w+b")
        self._entries: dict[str, tuple[TensorSpec, int]] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise InputError(f"{self.path}: tensor {name!r} written twice")
        data = tensor.detach().to("cpu").contiguous()
        self._entries[name] = (TensorSpec(name, data.dtype, tuple(data.shape)), self._spool.tell())
        if data.numel():
            self._spool.write(data.view(-1).view(torch.uint8).numpy().data)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def close(self) -> None:
        names = sorted(self._entries)
        try:
            self._spool.flush()
            with SafetensorsWriter(self.path, [self._entries[n][0] for n in names], self.metadata) as writer:
                for name in names:
                    writer.copy([name], self._spool.fileno(), self._entries[name][1])
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the spool; the destination is left as it was (unless close() finished)."""
        if not self._spool.closed:
            self._spool.close()
        self._spool_target.discard()

    def __enter__(self) -> "SpooledWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write an in-memory dict of (small) tensors, names sorted for deterministic output."""
    names = sorted(tensors)
    specs = [TensorSpec(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name in names:
            writer.write(name, tensors[name])
