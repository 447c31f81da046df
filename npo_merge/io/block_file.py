"""Write a file front to back from large page-aligned blocks, with O_DIRECT where the filesystem allows.

Why: pushing gigabytes through the page cache costs the kernel more CPU than the work that made the
bytes on a machine short of cores. On the 2-core dev machine, `cp` of a 6.9 GB checkpoint spent nearly
all of its 6 to 18 s in the kernel; the same bytes written with O_DIRECT from aligned blocks, two writes
in flight, took 4.8 to 11 s with under 2.1 s of kernel time (BENCHMARKS.md, "Apply"). The bytes
then go straight to the disk and leave the page cache (and the inputs in it) alone.

Callers fill blocks in place (`view` + `advance`), copy bytes in (`append`) or name a range of another
file (`append_from`, read by the writer threads just before its block is written). Where O_DIRECT is
refused (tmpfs, some network filesystems, other platforms) the same blocks go through ordinary writes.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field

import torch

from npo_merge.errors import InputError

ALIGN = 4096  # O_DIRECT wants buffer addresses, file offsets and lengths in multiples of the block size
# A block is handed to a writer thread once it holds this many bytes. cpu2, 6.9 GB written, two in flight:
# 16 MiB blocks 6.8-11.0 s, 64 MiB 4.8-6.3 s (more bytes in flight keep the disk busier); apply of the
# SDXL full delta 7.9-14.4 s against 8.5-9.7 s, of a rank-64 LoRA 11.4-13.0 s against 11.0-12.2 s.
BLOCK = 64 * 1024 * 1024
_SLACK = 8 * 1024 * 1024  # room past BLOCK for an in-place part that starts below it
_DEPTH = 2  # writes in flight: one alone left the disk idle half the time (16.5 s against 6.8 s for 6.9 GB)
_ENV = "NPO_MERGE_DIRECT_IO"  # "0" turns O_DIRECT off


def direct_io_wanted() -> bool:
    """O_DIRECT unless the environment says NPO_MERGE_DIRECT_IO=0 or the platform has none."""
    return hasattr(os, "O_DIRECT") and os.environ.get(_ENV, "1") != "0"


@dataclass
class _Block:
    """A page-aligned buffer, the file offset it starts at, and ranges of other files to read into it."""

    memory: mmap.mmap
    bytes: torch.Tensor  # uint8 view of `memory`
    offset: int = 0
    reads: list[tuple[int, int, int, int]] = field(default_factory=list)  # (fd, file offset, position, length)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (the single place bytes reach the output file)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    while view:
        count = os.preadv(fd, [view], offset)
        if count == 0:
            raise InputError(f"input ended {len(view)} bytes early while copying; was it changed meanwhile?")
        view, offset = view[count:], offset + count


class BlockFile:
    """Sequential writer of the existing, empty file `path` (see the module docstring).

    Not thread-safe: one caller fills blocks, `_DEPTH` threads write them. A write error is raised at
    the caller's next call. `finish()` writes what is left and trims the file to the bytes appended.
    """

    def __init__(self, path: str | os.PathLike[str], *, direct: bool | None = None):
        self._plain = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        self._direct: int | None = None
        if direct_io_wanted() if direct is None else direct:
            try:
                self._direct = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except (OSError, AttributeError):
                self._direct = None  # refused here: ordinary writes of the same blocks
        self.size = 0  # bytes appended so far
        self._error: BaseException | None = None
        self._free: queue.Queue[_Block] = queue.Queue()
        for _ in range(_DEPTH + 2):  # one being filled, one waiting, `_DEPTH` being written
            memory = mmap.mmap(-1, BLOCK + _SLACK)
            self._free.put(_Block(memory, torch.frombuffer(memory, dtype=torch.uint8)))
        self._jobs: queue.Queue[tuple[_Block, int] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name="block-writer", daemon=True) for _ in range(_DEPTH)]
        for thread in self._threads:
            thread.start()
        self._block: _Block | None = self._free.get()
        self._finished = False

    @property
    def direct(self) -> bool:
        """Whether blocks still go out with O_DIRECT (a refused write switches to ordinary ones)."""
        return self._direct is not None

    # -- caller side ------------------------------------------------------------------------------
    def _check(self) -> _Block:
        if self._error is not None:
            raise self._error
        if self._block is None:
            raise ValueError("the file is already finished")
        return self._block

    def _fill(self) -> int:
        return self.size - self._check().offset

    def view(self, nbytes: int, itemsize: int = 1) -> torch.Tensor | None:
        """The next `nbytes` of the file as a writable uint8 tensor inside the current block, or None
        if they do not fit or would not be aligned to `itemsize`; `advance(nbytes)` once filled."""
        fill = self._fill()
        if fill + nbytes > BLOCK + _SLACK or self.size % itemsize:
            return None
        return self._check().bytes[fill:fill + nbytes]

    def advance(self, nbytes: int) -> None:
        """The `nbytes` after the end, filled through view(), are now part of the file."""
        self.size += nbytes
        if self._fill() >= BLOCK:
            self._submit()

    def append(self, data: memoryview) -> None:
        """Copy `data` to the end of the file."""
        data = memoryview(data).cast("B")
        while data:
            fill = self._fill()
            count = min(len(data), BLOCK - fill)
            self._check().memory[fill:fill + count] = data[:count]
            data = data[count:]
            self.advance(count)

    def append_from(self, fd: int, offset: int, length: int) -> None:
        """Append bytes [offset, offset + length) of the open file `fd`, read by a writer thread just
        before their block is written (`fd` is duplicated, so the caller may close it)."""
        while length:
            block, fill = self._check(), self._fill()
            count = min(length, BLOCK - fill)
            block.reads.append((os.dup(fd), offset, fill, count))
            offset, length = offset + count, length - count
            self.advance(count)

    def _submit(self, last: bool = False) -> None:
        """Hand the current block's whole pages to a writer; the bytes past them start the next block.

        Reads never reach past BLOCK (append_from stops there), so the carried tail is real bytes.
        """
        block = self._check()
        fill = self.size - block.offset
        end = -(-fill // ALIGN) * ALIGN if last else fill // ALIGN * ALIGN
        nxt = None if last else self._free.get()
        if nxt is not None:
            nxt.offset = block.offset + end
            nxt.bytes[:fill - end] = block.bytes[end:fill]
        elif end > fill:
            block.bytes[fill:end] = 0  # padding, trimmed again by finish()
        self._jobs.put((block, end))
        self._block = nxt

    def finish(self) -> None:
        """Write everything appended, wait for the disk, and trim the padding of the last block."""
        if self._finished:
            return
        try:
            if self._fill():
                self._submit(last=True)
            self._block = None
        finally:
            self._finished = True
            self._stop_threads()
        if self._error is not None:
            raise self._error
        os.ftruncate(self._plain, self.size)

    def pwrite(self, data: bytes, offset: int) -> None:
        """Overwrite bytes already written (after finish()), e.g. a header patch."""
        if not self._finished:
            raise ValueError("pwrite() patches a finished file")
        pwrite_all(self._plain, memoryview(data), offset)

    def close(self) -> None:
        """Release the file and the threads; finish() first to keep what was written."""
        self._error = self._error or InputError("closed before finish()")
        if not self._finished:
            self._finished = True
            self._stop_threads()
        for fd in (self._plain, self._direct):
            if fd is not None:
                os.close(fd)
        self._plain = self._direct = None  # type: ignore[assignment]

    def _stop_threads(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    # -- writer threads ---------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            block, length = job
            try:
                if self._error is None:
                    for fd, offset, position, count in block.reads:
                        _read_exactly(fd, memoryview(block.memory)[position:position + count], offset)
                    self._write(memoryview(block.memory)[:length], block.offset)
            except BaseException as exc:  # raised to the caller at its next call
                self._error = self._error or exc
            finally:
                for fd, *_ in block.reads:
                    os.close(fd)
                block.reads.clear()
                self._free.put(block)

    def _write(self, data: memoryview, offset: int) -> None:
        direct = self._direct
        if direct is not None:
            try:
                return pwrite_all(direct, data, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = None  # the filesystem opened O_DIRECT but refuses its writes
        pwrite_all(self._plain, data, offset)
