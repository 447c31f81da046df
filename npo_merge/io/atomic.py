"""Outputs appear whole or not at all: write to a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from npo_merge.errors import InputError


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
            os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; an output folder should not be
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


def check_output_path(out: str | os.PathLike[str], inputs: Iterable[Path]) -> None:
    """Refuse an output that would overwrite or sit inside one of the inputs (checked before any work)."""
    out = Path(out)
    resolved = out.resolve()
    for path in inputs:
        source = path.resolve()
        if resolved == source or (source.is_dir() and source in resolved.parents) or (
            out.exists() and source.exists() and os.path.samefile(out, source)
        ):
            raise InputError(f"output {out} would overwrite or sit inside input {path}; choose another --out")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output folder does not exist")
