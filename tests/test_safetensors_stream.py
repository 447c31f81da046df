"""Streaming safetensors: round trips with the reference library, determinism, validation errors."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from npo_merge.errors import FormatError, InputError
from npo_merge.io import block_file
from npo_merge.io.atomic import atomic_output
from npo_merge.io.safetensors_stream import SafetensorsReader, SafetensorsWriter, TensorSpec, read_header, save_tensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 4, generator=gen),
        "a.half": torch.randn(5, generator=gen).half(),
        "c.bf16": torch.randn(2, 2, generator=gen).bfloat16(),
        "d.int": torch.arange(6).reshape(2, 3),
        "e.empty": torch.zeros(0, 3),
        "f.bool": torch.tensor([True, False]),
    }


def test_our_writer_is_read_by_safetensors_and_is_deterministic(tmp_path: Path) -> None:
    tensors = _tensors()
    save_tensors(tmp_path / "one.safetensors", tensors, {"k": "v", "z": "last"})
    save_tensors(tmp_path / "two.safetensors", dict(reversed(list(tensors.items()))), {"z": "last", "k": "v"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    loaded = load_file(tmp_path / "one.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert read_header(tmp_path / "one.safetensors").metadata == {"k": "v", "z": "last"}


def test_reader_reads_reference_writer_files_one_tensor_at_a_time(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    with SafetensorsReader(tmp_path / "ref.safetensors") as reader:
        assert reader.metadata == {"format": "pt"}
        assert set(reader) == set(tensors)
        assert reader["b.weight"].shape == (3, 4) and reader["b.weight"].dtype == torch.float32
        for name, tensor in tensors.items():
            out = reader.tensor(name)
            assert out.dtype == tensor.dtype and torch.equal(out, tensor)
            out.zero_()  # a private copy: writing it must not touch the file or the map
        assert torch.equal(reader.tensor("b.weight"), tensors["b.weight"])
    with pytest.raises(InputError, match="no tensor named 'missing'"):
        SafetensorsReader(tmp_path / "ref.safetensors").tensor("missing")


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")  # pytest's own filters replace the library's
def test_read_into_a_buffer_of_another_dtype_converts(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, path)
    before = path.read_bytes()
    with SafetensorsReader(path) as reader:
        for name, rows, dtype in [("a.half", (1, 4), torch.float32), ("c.bf16", None, torch.float32),
                                  ("b.weight", (1, 3), torch.float64), ("a.half", (2, 2), torch.float32)]:
            out = torch.full((16,), float("nan"), dtype=dtype)
            part = reader.read_into(name, out, rows)
            expected = tensors[name] if rows is None else tensors[name][rows[0]:rows[1]]
            assert part.dtype == dtype and part.shape == expected.shape
            assert torch.equal(part, expected.to(dtype))
            assert (part.numel() == 0 or part.data_ptr() == out.data_ptr()) and out[expected.numel():].isnan().all()
        with pytest.raises(ValueError, match="cannot hold 'b.weight'"):
            reader.read_into("b.weight", torch.empty(11, dtype=torch.float64))
    assert path.read_bytes() == before


def test_converting_read_does_not_warn_about_the_read_only_map(tmp_path: Path) -> None:
    # torch warns once per process about a tensor over read-only memory, hence a fresh process
    save_file({"a": torch.ones(2, 2).half()}, tmp_path / "x.safetensors")
    code = ("import sys, torch; from npo_merge.io.safetensors_stream import SafetensorsReader; "
            "print(SafetensorsReader(sys.argv[1]).read_into('a', torch.empty(4)).sum().item())")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "4.0", done.stderr


def test_writer_enforces_declared_order_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous contents")
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float16, (3,))]
    with pytest.raises(InputError, match="declared"):
        with SafetensorsWriter(target, specs) as writer:
            writer.write("a", torch.ones(2))
            writer.write("b", torch.ones(4, dtype=torch.float16))
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left behind
    with pytest.raises(InputError, match="never written"):
        with SafetensorsWriter(target, specs) as writer:
            writer.write("a", torch.ones(2))
    assert target.read_bytes() == b"previous contents"
    with SafetensorsWriter(target, specs, {"m": "1"}) as writer:
        writer.write("a", torch.ones(2))
        writer.write("b", torch.ones(3, dtype=torch.float16))
    assert torch.equal(load_file(target)["b"], torch.ones(3, dtype=torch.float16))


def test_atomic_output_interrupted_leaves_destination_untouched(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half written")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def _raw_file(path: Path, header: object, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_FILES = {
    "zero-byte": (lambda p: _bytes(p, b""), "empty or truncated"),
    "truncated": (lambda p: _bytes(p, b"\x10\x00\x00"), "empty or truncated"),
    "header longer than file": (lambda p: _raw_file(p, {}, b"", length=4096), "runs past the end"),
    "invalid json": (lambda p: _raw_file(p, b"{not json", b""), "not valid JSON"),
    "unknown dtype": (
        lambda p: _raw_file(p, {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype 'F7'"),
    "out of range": (
        lambda p: _raw_file(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "outside"),
    "overlapping": (
        lambda p: _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
    "shape vs bytes": (
        lambda p: _raw_file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12"),
    "huge header": (lambda p: _raw_file(p, {}, b"", length=2**40), "not plausible"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_headers_are_rejected_with_a_clear_message(tmp_path: Path, case: str) -> None:
    make, message = BAD_FILES[case]
    path = make(tmp_path / "bad.safetensors")
    with pytest.raises(FormatError, match=message):
        read_header(path)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of two pages, so a small file crosses many of them (and parts straddle their ends)."""
    monkeypatch.setattr(block_file, "BLOCK", 2 * block_file.ALIGN)
    monkeypatch.setattr(block_file, "_SLACK", block_file.ALIGN)


def _many_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    many = {f"g{i}.weight": torch.randn(37 + 11 * i, 29, generator=gen).half() for i in range(12)}
    many["h.wide"] = torch.randn(7, 3001, generator=gen)  # a row part longer than a block
    many["i.odd"] = torch.randn(3, generator=gen).half()  # leaves the next tensor's start unaligned
    many["j.f32"] = torch.randn(50, 9, generator=gen)
    return {**_tensors(), **many}


def test_a_failing_background_write_surfaces_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                small_blocks: None) -> None:
    original, calls = block_file.pwrite_all, {"n": 0}

    def disk_full(fd, data, offset):  # two blocks fit, then the disk is full
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(fd, data, offset)

    monkeypatch.setattr(block_file, "pwrite_all", disk_full)
    specs = [TensorSpec(f"t{i}", torch.float32, (1024,)) for i in range(6)]
    with pytest.raises(OSError, match="No space left"):
        with SafetensorsWriter(tmp_path / "out.safetensors", specs) as writer:
            for spec in specs:
                writer.write(spec.name, torch.ones(1024))
    assert calls["n"] > 2 and list(tmp_path.iterdir()) == []


def _copy_and_parts(source: Path, out: Path) -> None:
    """Rewrite `source`: its first two tensors (in file order) copied as bytes, the rest in row parts."""
    with SafetensorsReader(source) as reader:
        names = sorted(reader, key=lambda n: reader[n].start)
        specs = [TensorSpec(n, reader[n].dtype, reader[n].shape) for n in names]
        with SafetensorsWriter(out, specs, reader.metadata) as writer:
            writer.copy(names[:2], reader.fileno(), reader[names[0]].start)
            for name in names[2:]:
                info = reader[name]
                if not info.numel:
                    writer.write(name, reader.tensor(name))
                    continue
                for start in range(info.shape[0]):
                    part = writer.staging(info.numel // info.shape[0], info.dtype)
                    reader.read_into(name, part, (start, start + 1))
                    writer.write_part(name, part)


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


@pytest.mark.parametrize("way", ["direct", "buffered", "direct open refused", "direct writes refused"])
def test_byte_copies_and_parts_write_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks: None,
                                                  way: str) -> None:
    original, used = block_file.pwrite_all, {"direct": 0, "plain": 0}

    def recording(fd, data, offset):
        direct = _is_direct(fd)
        if direct and way == "direct writes refused":
            raise OSError(errno.EINVAL, "Invalid argument")
        assert offset % block_file.ALIGN == 0 and (not direct or len(data) % block_file.ALIGN == 0)
        used["direct" if direct else "plain"] += 1
        return original(fd, data, offset)

    monkeypatch.setattr(block_file, "pwrite_all", recording)
    if way == "direct open refused":  # as tmpfs or a network filesystem may
        real_open = os.open

        def refusing_open(path, flags, *args):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setenv("NPO_MERGE_DIRECT_IO", "0" if way == "buffered" else "1")
    save_tensors(tmp_path / "src.safetensors", _many_tensors(), {"k": "v"})
    _copy_and_parts(tmp_path / "src.safetensors", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "src.safetensors").read_bytes()
    assert os.path.getsize(tmp_path / "src.safetensors") > 10 * block_file.BLOCK
    try:  # does this filesystem take O_DIRECT at all?
        os.close(os.open(tmp_path / "src.safetensors", os.O_RDONLY | os.O_DIRECT))
        supported = True
    except (OSError, AttributeError):
        supported = False
    if way == "direct" and supported:
        assert used["direct"] > 10 and used["plain"] == 0
    else:
        assert used["direct"] == 0 and used["plain"] > 10


def test_copy_of_a_shrunken_source_and_oversized_parts_fail_cleanly(tmp_path: Path) -> None:
    save_tensors(tmp_path / "src.safetensors", {"a": torch.ones(100), "b": torch.ones(3)})
    with SafetensorsReader(tmp_path / "src.safetensors") as reader:
        start = reader["a"].start
        os.truncate(tmp_path / "src.safetensors", start + 10)  # changed on disk meanwhile
        with pytest.raises(InputError, match="ended 390 bytes early"):
            with SafetensorsWriter(tmp_path / "out.safetensors", [TensorSpec("a", torch.float32, (100,))]) as writer:
                writer.copy(["a"], reader.fileno(), start)
    spec = TensorSpec("x", torch.float32, (2, 3))
    with pytest.raises(InputError, match="exceed its declared 24 bytes"):
        with SafetensorsWriter(tmp_path / "out.safetensors", [spec]) as writer:
            writer.write_part("x", writer.staging(4, torch.float32).zero_())
            writer.write_part("x", writer.staging(4, torch.float32).zero_())
    with pytest.raises(InputError, match="partly written"):
        with SafetensorsWriter(tmp_path / "out.safetensors", [spec]) as writer:
            writer.write_part("x", writer.staging(3, torch.float32).zero_())
            writer.write("x", torch.zeros(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
