"""Outputs appear whole or not at all: write to a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class AtomicTarget:
    """A temporary path beside `final`; `commit()` renames it into place, `discard()` removes it.

    The temporary lives in the destination folder so the final rename never crosses filesystems.
    Works for files and for folders (a folder replaces an existing folder of the same name).
    """

    def __init__(self, final: str | os.PathLike[str], *, directory: bool = False):
        self.final = Path(final)
        parent = self.final.parent
        if not parent.is_dir():
            raise FileNotFoundError(2, "output folder does not exist", str(parent))
        prefix = f".{self.final.name}."
        if directory:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
            os.close(fd)
            self.tmp = Path(name)
        self._done = False

    def commit(self) -> Path:
        if self._done:
            raise RuntimeError(f"{self.final}: already committed or discarded")
        self._done = True
        if self.tmp.is_dir():
            if self.final.is_dir():
                old = self.final.with_name(f".{self.final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
        else:
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.final)
        return self.final

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output(final: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on normal exit it becomes `final`, on any exception it vanishes."""
    target = AtomicTarget(final, directory=directory)
    try:
        yield target.tmp
    except BaseException:
        target.discard()
        raise
    target.commit()
