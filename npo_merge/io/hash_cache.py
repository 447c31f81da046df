"""A small on-disk cache of file sha256 digests, so repeated runs on the same inputs skip hashing.

Entries are keyed by resolved path and only trusted while the file's size, mtime, ctime, inode and
device are unchanged. A file changed in the last few seconds is not cached (its timestamps could
still repeat after a same-size rewrite), a damaged cache reads as empty, and the cache file is
replaced atomically. $NPO_MERGE_CACHE, else $XDG_CACHE_HOME/npo_merge, else ~/.cache/npo_merge.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from npo_merge.io.atomic import AtomicTarget

_FILE = "sha256.json"
_MAX_ENTRIES = 1000
_SETTLE_S = 5.0  # files younger than this are hashed but not cached
_LOCK = threading.Lock()  # hashing threads of one process update the file one at a time


def cache_dir() -> Path:
    """Where npo_merge keeps its caches."""
    if os.environ.get("NPO_MERGE_CACHE"):
        return Path(os.environ["NPO_MERGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "npo_merge"


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _load() -> dict[str, dict[str, object]]:
    try:
        entries = json.loads((cache_dir() / _FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def cached_sha256(path: Path, stat: os.stat_result) -> str | None:
    """The cached digest of `path` if its entry matches `stat` exactly, else None."""
    entry = _load().get(str(path.resolve()))
    if not isinstance(entry, dict) or entry.get("stat") != _identity(stat):
        return None
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def store_sha256(path: Path, stat: os.stat_result, digest: str) -> None:
    """Remember `digest` for `path` as it was at `stat`, if the file is settled and still unchanged.
    Best effort: a cache that cannot be written is skipped silently."""
    try:
        if _identity(path.stat()) != _identity(stat) or time.time() - max(stat.st_mtime, stat.st_ctime) < _SETTLE_S:
            return
        with _LOCK:
            _store(path, stat, digest)
    except OSError:
        pass


def _store(path: Path, stat: os.stat_result, digest: str) -> None:
    entries = _load()
    entries.pop(str(path.resolve()), None)
    entries[str(path.resolve())] = {"stat": _identity(stat), "sha256": digest}
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = AtomicTarget(folder / _FILE)
    try:
        target.tmp.write_text(json.dumps(dict(list(entries.items())[-_MAX_ENTRIES:])), encoding="utf-8")
        target.commit()
    finally:
        target.discard()
