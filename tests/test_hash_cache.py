"""The sha256 cache: hits only for unchanged files, misses after any change, survives damage."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from npo_merge.io import hash_cache
from npo_merge.io.hashing import sha256_file


@pytest.fixture(autouse=True)
def _no_settle_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by a test are seconds old; let them count as settled (but see the test below)."""
    monkeypatch.setattr(hash_cache, "_SETTLE_S", 0.0)


def _settled(path: Path, data: bytes) -> Path:
    time.sleep(0.05)  # past the filesystem's timestamp tick, so a rewrite gets a new ctime
    path.write_bytes(data)
    return path


def test_digest_is_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _settled(tmp_path / "a.bin", b"hello")
    assert sha256_file(path) == hashlib.sha256(b"hello").hexdigest()
    assert (hash_cache.cache_dir() / "sha256.json").is_file()
    monkeypatch.setattr(hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert sha256_file(path) == hashlib.new("sha256", b"hello").hexdigest()


def test_changed_file_misses(tmp_path: Path) -> None:
    path = _settled(tmp_path / "a.bin", b"hello")
    sha256_file(path)
    stat = path.stat()
    time.sleep(0.05)
    path.write_bytes(b"jello")  # same size, new content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime: ctime differs
    assert sha256_file(path) == hashlib.sha256(b"jello").hexdigest()
    _settled(path, b"longer content")
    assert sha256_file(path) == hashlib.sha256(b"longer content").hexdigest()


def test_young_files_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hash_cache, "_SETTLE_S", 5.0)
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"just written")
    assert sha256_file(path) == hashlib.sha256(b"just written").hexdigest()
    assert not (hash_cache.cache_dir() / "sha256.json").exists()


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"x": {"stat": [1], "sha256": "short"}}', b"\xff\xfe"])
def test_damaged_cache_is_ignored_and_replaced(tmp_path: Path, damage: bytes) -> None:
    hash_cache.cache_dir().mkdir(parents=True, exist_ok=True)
    (hash_cache.cache_dir() / "sha256.json").write_bytes(damage)
    path = _settled(tmp_path / "a.bin", b"hello")
    assert sha256_file(path) == hashlib.sha256(b"hello").hexdigest()
    assert hash_cache.cached_sha256(path, path.stat()) == hashlib.sha256(b"hello").hexdigest()


def test_wrong_cached_digest_for_other_stat_is_not_trusted(tmp_path: Path) -> None:
    path = _settled(tmp_path / "a.bin", b"hello")
    sha256_file(path)
    other = _settled(tmp_path / "b.bin", b"world")
    assert hash_cache.cached_sha256(path, other.stat()) is None


def test_unwritable_cache_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv("NPO_MERGE_CACHE", str(blocker / "cache"))
    path = _settled(tmp_path / "a.bin", b"hello")
    assert sha256_file(path) == hashlib.sha256(b"hello").hexdigest()


def test_cache_location_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NPO_MERGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hash_cache.cache_dir() == tmp_path / "xdg" / "npo_merge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hash_cache.cache_dir() == tmp_path / "home" / ".cache" / "npo_merge"
