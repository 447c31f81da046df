"""sha256 fingerprints of inputs, computed in background threads while the main work streams.

hashlib releases the GIL on large updates, so hashing a checkpoint alongside an apply costs little
wall time on a multi-core machine, and digests of unchanged files come from a cache (hash_cache). A
folder's fingerprint is the sha256 of its weight files' names and digests, so it does not depend on
configs, tokenizers or file order on disk.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from npo_merge.io.hash_cache import cached_sha256, store_sha256

_CHUNK = 8 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, from the digest cache when the file is unchanged since it was hashed."""
    path = Path(path)
    with open(path, "rb") as fh:
        stat = os.fstat(fh.fileno())
        if (known := cached_sha256(path, stat)) is not None:
            return known
        digest = hashlib.sha256()
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    store_sha256(path, stat, digest.hexdigest())
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a folder's weight files (relative name and digest per line)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [
        f"{file.relative_to(path).as_posix()} {sha256_file(file)}\n"
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.name.endswith(_WEIGHT_SUFFIXES)
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class BackgroundHashes:
    """Start fingerprinting paths now; `result(path)` waits for that one."""

    def __init__(self, paths: list[Path]):
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(2, len(paths))), thread_name_prefix="sha256")
        self._futures: dict[Path, Future[str]] = {Path(p): self._pool.submit(fingerprint, p) for p in paths}

    def result(self, path: Path) -> str:
        return self._futures[Path(path)].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BackgroundHashes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
