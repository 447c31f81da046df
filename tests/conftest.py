"""Shared fixtures: tiny checkpoints in every layout, built once per test session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["NPO_MERGE_CACHE"] = tempfile.mkdtemp(prefix="npo_merge-test-cache-")  # never the user's sha256 cache
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from npo_merge import tiny  # noqa: E402

# Tiny models gain nothing from threads, and on a loaded 2-core machine oversubscribed threads make
# a 0.2 s pipeline call take seconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty sha256 cache of its own."""
    monkeypatch.setenv("NPO_MERGE_CACHE", str(tmp_path_factory.mktemp("npo_merge-cache")))


@pytest.fixture(scope="session")
def single_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> a tiny single-file (LDM/SGM) checkpoint with text encoders, VAE and extras."""
    folder = tmp_path_factory.mktemp("single")
    return {arch: tiny.write_single_file(folder / f"{arch}.safetensors", arch) for arch in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def diffusers_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> a tiny diffusers folder written by diffusers/transformers save_pretrained."""
    folder = tmp_path_factory.mktemp("diffusers")
    return {arch: tiny.write_diffusers_folder(folder / arch, arch) for arch in ("sd1", "sdxl")}
