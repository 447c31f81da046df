"""--target resolution through a fake Hugging Face cache laid out as huggingface_hub lays it out.

No network: HF_HUB_OFFLINE=1 throughout. The cache follows the documented layout
(models--org--name/{blobs,snapshots/<commit>,refs/main}); weight blobs are named by their sha256
(LFS), small files by their git blob sha1, and snapshot entries are relative symlinks to blobs.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from npo_merge import tiny
from npo_merge.cli import main
from npo_merge.errors import InputError, UsageError
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.keymap.architectures import ARCHITECTURES
from npo_merge.targets import (
    HubRef,
    cached_sha256,
    folder_patterns,
    is_cached,
    load_registry,
    parse_hub_ref,
    resolve_target,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache in tmp_path, offline. huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE
    once at import, so the constants are patched along with the environment."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _blob_name(data: bytes, lfs: bool) -> str:
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's id of a small file


def cache_file(cache: Path, repo_id: str, relpath: str, data: bytes, commit: str = COMMIT) -> Path:
    """Put one file in the cache the way hf_hub_download leaves it; returns the snapshot path."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / _blob_name(data, lfs=relpath.endswith((".safetensors", ".bin")))
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    pointer = repo / "snapshots" / commit / relpath
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return pointer


def cache_folder(cache: Path, repo_id: str, folder: Path) -> Path:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            cache_file(cache, repo_id, path.relative_to(folder).as_posix(), path.read_bytes())
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# -- registry ---------------------------------------------------------------------------


def test_registry_is_well_formed() -> None:
    rows = json.loads(resources.files("npo_merge").joinpath("data/targets.json").read_text())["targets"]
    fields = {"name", "description", "architecture", "repo_id", "filename", "revision", "license", "homepage"}
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names))
    assert {"dreamshaper", "sd15", "sdxl", "juggernaut-xl"} <= set(names)
    for row in rows:
        assert set(row) == fields, row["name"]
        assert row["architecture"] in ARCHITECTURES
        validate_repo_id(row["repo_id"])
        assert row["filename"] is None or row["filename"].endswith(".safetensors")
        assert row["revision"] and row["license"] and row["description"]
        assert row["homepage"] == f"https://huggingface.co/{row['repo_id']}"
    assert list(load_registry()) == names
    dreamshaper = load_registry()["dreamshaper"]
    assert (dreamshaper.repo_id, dreamshaper.filename, dreamshaper.architecture) == (
        "Lykon/DreamShaper", "DreamShaper_8_pruned.safetensors", "sd1")


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec, ref", [
    ("org/name", HubRef("org/name")),
    ("org/name@v1.0", HubRef("org/name", None, "v1.0")),
    ("Lykon/DreamShaper:DreamShaper_8_pruned.safetensors@main",
     HubRef("Lykon/DreamShaper", "DreamShaper_8_pruned.safetensors", "main")),
    ("org/name:unet/diffusion_pytorch_model.safetensors", HubRef("org/name", "unet/diffusion_pytorch_model.safetensors")),
    ("org/name@refs/pr/3", HubRef("org/name", None, "refs/pr/3")),
    ("hf://org/name/path/to/file.safetensors", HubRef("org/name", "path/to/file.safetensors")),
    ("hf://models/org/name@dev/file.safetensors", HubRef("org/name", "file.safetensors", "dev")),
    ("hf://org/name", HubRef("org/name")),
    ("https://huggingface.co/org/name/blob/main/file.safetensors", HubRef("org/name", "file.safetensors", "main")),
    ("https://huggingface.co/org/name", HubRef("org/name")),
    ("checkpoints/model.safetensors", None),  # a missing path, not a repo called model.safetensors
    ("a/b/c", None),
])
def test_parse_hub_ref(spec: str, ref: HubRef | None) -> None:
    assert parse_hub_ref(spec) == ref


def test_bad_specs_are_clear(hub_cache: Path) -> None:
    with pytest.raises(InputError, match="only model repos"):
        resolve_target("hf://datasets/org/name/file.parquet")
    with pytest.raises(InputError, match="not a valid Hub repo id"):
        resolve_target("org--x/name")
    with pytest.raises(UsageError, match="conflicts"):
        resolve_target("org/name@v1", revision="v2")
    for missing in ("./nope.safetensors", "checkpoints/model.safetensors", "a/b/c", "/no/such/dir"):
        with pytest.raises(InputError, match="no such file or folder"):
            resolve_target(missing)


def test_unknown_name_lists_known_names(hub_cache: Path) -> None:
    with pytest.raises(InputError) as info:
        resolve_target("dreamshapr")
    message = str(info.value)
    assert message.startswith("dreamshapr: no such file or folder, and not a known target name")
    assert all(name in message for name in load_registry())


def test_local_paths_pass_through(single_files: dict[str, Path], diffusers_folders: dict[str, Path]) -> None:
    for path in (single_files["sd1"], diffusers_folders["sdxl"]):
        target = resolve_target(str(path))
        assert (target.path, target.source, target.repo_id, target.sha256) == (path, "local", None, None)


# -- the cache --------------------------------------------------------------------------


def test_cached_single_file_resolves_offline(hub_cache: Path, single_files: dict[str, Path]) -> None:
    data = single_files["sd1"].read_bytes()
    pointer = cache_file(hub_cache, "Lykon/DreamShaper", "DreamShaper_8_pruned.safetensors", data)
    target = resolve_target("dreamshaper")
    assert target.path == pointer and target.path.read_bytes() == data
    assert (target.source, target.name, target.architecture) == ("hub-file", "dreamshaper", "sd1")
    assert (target.repo_id, target.filename, target.revision, target.commit) == (
        "Lykon/DreamShaper", "DreamShaper_8_pruned.safetensors", "main", COMMIT)
    assert target.sha256 == hashlib.sha256(data).hexdigest()
    assert target.describe() == f"dreamshaper = Lykon/DreamShaper:DreamShaper_8_pruned.safetensors @ {COMMIT[:12]} -> {pointer}"
    for spec in ("Lykon/DreamShaper:DreamShaper_8_pruned.safetensors@main",
                 "hf://Lykon/DreamShaper/DreamShaper_8_pruned.safetensors",
                 f"Lykon/DreamShaper:DreamShaper_8_pruned.safetensors@{COMMIT}",
                 "dreamshaper@main"):
        assert resolve_target(spec).path == pointer, spec
    with open_checkpoint(target.path) as checkpoint:  # the real reader takes the resolved file
        assert (checkpoint.layout, checkpoint.architecture) == ("single-file", "sd1")


def test_missing_file_gives_the_download_command(hub_cache: Path) -> None:
    with pytest.raises(InputError) as info:
        resolve_target("dreamshaper")
    assert str(info.value) == (
        f"dreamshaper (Lykon/DreamShaper, DreamShaper_8_pruned.safetensors) is not in the Hugging Face cache "
        f"({hub_cache}) and offline mode is on (HF_HUB_OFFLINE); on a machine with network run: "
        "hf download Lykon/DreamShaper DreamShaper_8_pruned.safetensors")
    with pytest.raises(InputError, match=r"hf download org/name sub/f\.safetensors --revision v2$"):
        resolve_target("org/name:sub/f.safetensors@v2", offline=True)


def test_cached_diffusers_folder_resolves_and_opens(hub_cache: Path, diffusers_folders: dict[str, Path]) -> None:
    snapshot = cache_folder(hub_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", diffusers_folders["sd1"])
    target = resolve_target("sd15-diffusers")
    assert (target.path, target.source, target.commit, target.sha256) == (snapshot, "hub-folder", COMMIT, None)
    assert cached_sha256(snapshot / "unet" / "diffusion_pytorch_model.safetensors") == hashlib.sha256(
        (diffusers_folders["sd1"] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert cached_sha256(snapshot / "unet" / "config.json") is None  # a git sha1, not a sha256
    with open_checkpoint(target.path) as checkpoint:
        assert (checkpoint.layout, checkpoint.architecture) == ("diffusers", "sd1")
        assert checkpoint.components == ["unet", "text_encoder", "vae"]
    assert is_cached(load_registry()["sd15-diffusers"]) and not is_cached(load_registry()["sd15"])
    with pytest.raises(InputError, match=r"--include 'unet/\*\.fp16\.safetensors'"):
        resolve_target("sd15-diffusers", variant="fp16")  # the cache holds no fp16 weights


def test_partial_folder_in_cache_is_not_enough(hub_cache: Path, diffusers_folders: dict[str, Path]) -> None:
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        cache_file(hub_cache, "RunDiffusion/Juggernaut-XL-v9", name, (diffusers_folders["sdxl"] / name).read_bytes())
    with pytest.raises(InputError) as info:
        resolve_target("juggernaut-xl")
    assert str(info.value).endswith(
        "hf download RunDiffusion/Juggernaut-XL-v9 --include model_index.json --include '*/config.json' "
        "--include 'unet/*.safetensors' --include 'unet/*.safetensors.index.json' "
        "--include 'text_encoder*/*.safetensors' --include 'text_encoder*/*.safetensors.index.json' "
        "--include 'vae/*.safetensors' --include 'vae/*.safetensors.index.json' --exclude '*.*.safetensors'")
    assert not is_cached(load_registry()["juggernaut-xl"])


def test_folder_patterns_pick_one_variant_of_the_model_files(tmp_path: Path, diffusers_folders: dict[str, Path]) -> None:
    """Patterns run over names that diffusers itself writes (plain, sharded fp16) plus the other
    files a real SD repo carries (safety checker, tokenizer, non-EMA and .bin weights, single files)."""
    fp16 = tiny.write_diffusers_folder(tmp_path / "fp16", "sdxl", variant="fp16", shard_unet=True)
    plain = listing(diffusers_folders["sdxl"])
    half = [name for name in listing(fp16) if name not in plain]
    others = ["README.md", "sd_xl_base_1.0.safetensors", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
              "safety_checker/config.json", "safety_checker/model.safetensors", "unet/diffusion_pytorch_model.bin",
              "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/diffusion_pytorch_model.fp16.bin"]
    repo = plain + half + others
    configs = [name for name in repo if name.endswith("/config.json")] + ["model_index.json"]
    assert any("fp16-00001-of-" in name for name in half) and any(name.endswith(".index.fp16.json") for name in half)

    def selected(variant: str | None) -> set[str]:
        allow, ignore = folder_patterns("model", variant)
        return set(filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore or None))

    assert selected(None) == set(plain) | set(configs)
    assert selected("fp16") == set(half) | set(configs)


def test_hub_errors_become_one_line_without_the_token(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    httpx2 = pytest.importorskip("httpx2")
    from huggingface_hub.utils import hf_raise_for_status

    import npo_merge.targets as targets

    secret = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", secret)

    def gated(*args: object, **kwargs: object) -> str:
        url = "https://huggingface.co/org/gated/resolve/main/model.safetensors"
        hf_raise_for_status(httpx2.Response(401, headers={"X-Error-Code": "GatedRepo"},
                                            request=httpx2.Request("GET", url)))
        raise AssertionError("hf_raise_for_status did not raise")

    monkeypatch.setattr(targets.huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(InputError) as info:
        resolve_target("org/gated:model.safetensors", offline=False)
    message = str(info.value)
    assert "gated" in message and "hf auth login" in message and "\n" not in message and secret not in message


# -- CLI --------------------------------------------------------------------------------


def test_targets_command(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_file(hub_cache, "stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", b"weights")
    assert main(["targets", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cache_dir"] == str(hub_cache)
    assert [row["name"] for row in report["targets"]] == list(load_registry())
    assert {row["name"] for row in report["targets"] if row["cached"]} == {"sdxl"}
    sdxl = next(row for row in report["targets"] if row["name"] == "sdxl")
    assert (sdxl["repo_id"], sdxl["filename"], sdxl["architecture"]) == (
        "stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors", "sdxl")
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "arch", "cached", "source"]
    assert next(line for line in lines if line.startswith("sdxl ")).split() == [
        "sdxl", "sdxl", "yes", "stabilityai/stable-diffusion-xl-base-1.0:sd_xl_base_1.0.safetensors"]
