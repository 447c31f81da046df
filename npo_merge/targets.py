"""Turn what a user types after --target into files on disk, through the Hugging Face cache.

A target spec is one of:

- a local file or folder, returned as it is;
- a Hub repo id ``org/name``, optionally with ``:path/in/repo`` (one file) and/or ``@revision``,
  e.g. ``Lykon/DreamShaper:DreamShaper_8_pruned.safetensors@main``;
- an ``hf://[models/]org/name[@revision][/path/in/repo]`` URI or a ``https://huggingface.co/...``
  file/folder URL copied from the browser;
- a short name from the registry shipped in ``npo_merge/data/targets.json`` (``npo-merge targets``
  lists it), optionally with ``@revision``.

Hub files go through ``hf_hub_download``; repos without a file name are diffusers folders fetched
with ``snapshot_download`` restricted to what a model needs (model_index.json, the component
configs, and the UNet / text encoder / VAE weights in safetensors, or in the chosen variant).
Offline (HF_HUB_OFFLINE=1 or no network) the cache answers, or the error says which command
downloads what is missing. Tokens for gated or private repos come from huggingface_hub's usual
places (HF_TOKEN, ``hf auth login``); this module never reads, prints or logs one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Literal, TypeVar

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from npo_merge.errors import FormatError, InputError, UsageError

Kind = Literal["model", "any"]
Source = Literal["local", "hub-file", "hub-folder"]
T = TypeVar("T")

# Component folders of a diffusers model whose weights we fetch ("text_encoder*" covers _2).
MODEL_COMPONENTS = ("unet", "text_encoder*", "vae")
_COMPONENT_DIRS = ("unet", "text_encoder", "text_encoder_2", "vae")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_REGISTRY_FIELDS = ("name", "description", "architecture", "repo_id", "filename", "revision", "license", "homepage")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_SPEC = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<file>[^@]+))?(?:@(?P<rev>.+))?")
_HF_URL = re.compile(r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[\w.-]+/[\w.-]+)"
                     r"(?:/(?:blob|resolve|tree)/(?P<rev>[^/]+)(?:/(?P<file>.+))?)?/?")


@dataclass(frozen=True)
class HubRef:
    """A place on the Hub: a model repo, optionally one file in it, optionally a revision."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class RegistryEntry:
    """One row of the shipped registry: a short name for a model on the Hub."""

    name: str
    description: str
    architecture: str
    repo_id: str
    filename: str | None
    revision: str
    license: str
    homepage: str

    @property
    def ref(self) -> HubRef:
        return HubRef(self.repo_id, self.filename, self.revision)


@dataclass(frozen=True)
class ResolvedTarget:
    """Where a target spec landed on disk and how it got there."""

    spec: str
    path: Path
    source: Source
    repo_id: str | None = None
    filename: str | None = None  # the file in the repo for hub-file targets
    revision: str | None = None  # as asked (branch, tag or commit)
    commit: str | None = None  # the cached snapshot's commit hash
    sha256: str | None = None  # of a single file, when the cache names its blob by it
    name: str | None = None  # registry short name
    architecture: str | None = None  # what the registry says; the file itself is the authority

    def describe(self) -> str:
        """One line: what was asked and what it resolved to."""
        if self.source == "local":
            return f"{self.path} (local)"
        where = f"{self.repo_id}:{self.filename}" if self.filename else f"{self.repo_id} (diffusers folder)"
        at = f" @ {self.commit[:12]}" if self.commit else ""
        label = f"{self.name} = " if self.name else ""
        return f"{label}{where}{at} -> {self.path}"


# -- registry ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_registry() -> dict[str, RegistryEntry]:
    """The shipped short-name registry (npo_merge/data/targets.json), checked row by row."""
    from npo_merge.io.keymap.architectures import ARCHITECTURES  # torch-heavy; only when names are used

    text = resources.files("npo_merge").joinpath("data/targets.json").read_text(encoding="utf-8")
    try:
        rows = json.loads(text)["targets"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FormatError(f"npo_merge/data/targets.json: not a target registry ({exc})") from None
    registry: dict[str, RegistryEntry] = {}
    for row in rows:
        missing = [field for field in _REGISTRY_FIELDS if field not in row]
        if missing:
            raise FormatError(f"npo_merge/data/targets.json: row {row.get('name')!r} lacks {', '.join(missing)}")
        entry = RegistryEntry(**{field: row[field] for field in _REGISTRY_FIELDS})
        if entry.architecture not in ARCHITECTURES:
            raise FormatError(f"npo_merge/data/targets.json: {entry.name}: unknown architecture {entry.architecture!r}")
        if entry.name in registry:
            raise FormatError(f"npo_merge/data/targets.json: name {entry.name!r} appears twice")
        registry[entry.name] = entry
    return registry


# -- parsing ----------------------------------------------------------------------------


def _checked_repo(repo_id: str, spec: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InputError(f"{spec}: no such file or folder, and {repo_id!r} is not a valid Hub repo id ({exc})") from None
    return repo_id


def _parse_hf_uri(spec: str) -> HubRef:
    """hf://[models/]org/name[@revision][/path/in/repo] (the huggingface_hub URI grammar)."""
    rest = spec[len("hf://"):]
    kind, _, after = rest.partition("/")
    if kind in ("datasets", "spaces", "buckets", "kernels"):
        raise InputError(f"{spec}: only model repos can be targets, not {kind}")
    if kind == "models":
        rest = after
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise InputError(f"{spec}: expected hf://org/name[@revision][/path/in/repo]")
    name, _, revision = parts[1].partition("@")
    repo_id = _checked_repo(f"{parts[0]}/{name}", spec)
    filename = parts[2] if len(parts) == 3 and parts[2] else None
    return HubRef(repo_id, filename, revision or None)


def parse_hub_ref(spec: str) -> HubRef | None:
    """The Hub place a spec names, or None when it is not Hub syntax (a name or a path)."""
    if spec.startswith("hf://"):
        return _parse_hf_uri(spec)
    url = _HF_URL.fullmatch(spec)
    if url:
        return HubRef(_checked_repo(url["repo"], spec), url["file"] or None, url["rev"] or None)
    match = _REPO_SPEC.fullmatch(spec)
    if match is None or (match["file"] is None and spec.lower().endswith(_WEIGHT_SUFFIXES)):
        return None  # "dir/model.safetensors" is a path that does not exist, not a repo
    return HubRef(_checked_repo(match["repo"], spec), match["file"], match["rev"])


def _merge_revision(spec: str, in_spec: str | None, given: str | None) -> str | None:
    if in_spec and given and in_spec != given:
        raise UsageError(f"{spec}: revision @{in_spec} in the target conflicts with revision {given!r}")
    return given or in_spec


# -- Hub access -------------------------------------------------------------------------


def _hub_cli() -> str:
    """The name of huggingface_hub's command-line tool: `hf` since 0.34, `huggingface-cli` before."""
    major, minor = (int(part) for part in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    return "hf" if (major, minor) >= (0, 34) else "huggingface-cli"


def weight_patterns(variant: str | None, fmt: str = "safetensors",
                    components: tuple[str, ...] = MODEL_COMPONENTS) -> tuple[list[str], list[str]]:
    """allow/ignore globs selecting one weight format (and variant) of diffusers components.

    Names follow diffusers: ``model.safetensors``, shards ``model-00001-of-00002.safetensors`` with
    ``model.safetensors.index.json``; a variant adds ``.fp16`` before the suffix, in shard names
    (``model.fp16-00001-of-00002.safetensors``) and before ``.json`` in the index.
    """
    if variant:
        allow = [p for c in components for p in (f"{c}/*.{variant}.{fmt}", f"{c}/*.{variant}-*.{fmt}",
                                                  f"{c}/*.{fmt}.index.{variant}.json")]
        return allow, []
    allow = [p for c in components for p in (f"{c}/*.{fmt}", f"{c}/*.{fmt}.index.json")]
    return allow, [f"*.*.{fmt}"]  # other variants (fp16, non_ema...) carry a second dot


def folder_patterns(kind: Kind, variant: str | None) -> tuple[list[str], list[str]]:
    """What a diffusers-folder target fetches: configs plus the weights a model needs."""
    if kind == "any":
        return ["*.json", "*.safetensors"], []
    allow, ignore = weight_patterns(variant)
    return ["model_index.json", "*/config.json", *allow], ignore


def _download_command(ref: HubRef, allow: list[str], ignore: list[str]) -> str:
    words = [_hub_cli(), "download", ref.repo_id]
    if ref.filename:
        words.append(ref.filename)
    if ref.revision and ref.revision != "main":
        words += ["--revision", ref.revision]
    if not ref.filename:
        words += [w for pattern in allow for w in ("--include", pattern)]
        words += [w for pattern in ignore for w in ("--exclude", pattern)]
    return shlex.join(words)


@dataclass(frozen=True)
class _Fetch:
    """One Hub request and how to talk about it in errors."""

    ref: HubRef
    label: str
    offline: bool
    allow: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def what(self) -> str:
        parts = [self.ref.repo_id, self.ref.filename or "diffusers folder"]
        if self.ref.revision and self.ref.revision != "main":
            parts.append(f"revision {self.ref.revision}")
        return f"{self.label} ({', '.join(parts)})"

    def not_cached(self) -> InputError:
        why = "offline mode is on (HF_HUB_OFFLINE)" if self.offline else "the Hub is unreachable"
        command = _download_command(self.ref, list(self.allow), list(self.ignore))
        return InputError(f"{self.what()} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) "
                          f"and {why}; on a machine with network run: {command}")

    def call(self, fn: Callable[[], T]) -> T:
        """Run a huggingface_hub call, turning its errors into one-line InputErrors."""
        repo = self.ref.repo_id
        try:
            return fn()
        except (LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
            # huggingface_hub turns a failed connection into LocalEntryNotFoundError when the cache
            # lacks the file (IncompleteSnapshotError is one); OfflineModeIsEnabled is a ConnectionError
            raise self.not_cached() from exc
        except GatedRepoError:
            raise InputError(f"{self.what()}: the repo is gated; accept its terms at https://huggingface.co/{repo} "
                             f"and log in ({_hub_cli()} auth login) or set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise InputError(f"{self.what()}: no such repo on the Hub, or it is private; check the id, or log in "
                             f"({_hub_cli()} auth login) / set HF_TOKEN if you have access") from None
        except RevisionNotFoundError:
            raise InputError(f"{self.what()}: the repo has no revision {self.ref.revision!r}") from None
        except EntryNotFoundError:
            raise InputError(f"{self.what()}: the repo has no file {self.ref.filename!r} at this revision") from None
        except HfHubHTTPError as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{self.what()}: the Hub refused the request ({first_line})") from None


def cached_sha256(path: str | os.PathLike[str]) -> str | None:
    """sha256 of a file in the Hub cache, read from its blob's name; None when not known cheaply.

    A snapshot entry links to ``blobs/<etag>``; for LFS files (every weight file) the etag is the
    content's sha256, for small git files it is a 40-hex git hash, and without symlinks
    (HF_HUB_DISABLE_SYMLINKS, some Windows setups) there is no blob name to read.
    """
    try:
        link = Path(os.readlink(path))
    except OSError:
        return None
    return link.name if link.parent.name == "blobs" and _SHA256.fullmatch(link.name) else None


def _snapshot_commit(path: Path) -> str | None:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _weights_present(folder: Path, component: str, variant: str | None, fmt: str) -> bool:
    if not (folder / component).is_dir():
        return False
    allow, ignore = weight_patterns(variant, fmt, (component,))
    names = [f"{component}/{p.name}" for p in (folder / component).iterdir() if p.is_file()]
    return any(True for _ in filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore or None))


def _missing_weights(folder: Path, variant: str | None, fmt: str) -> list[str]:
    return [c for c in _COMPONENT_DIRS
            if (folder / c / "config.json").is_file() and not _weights_present(folder, c, variant, fmt)]


def _fetch_folder(fetch: _Fetch, kind: Kind, variant: str | None) -> Path:
    def snapshot(allow: list[str], ignore: list[str]) -> Path:
        return Path(fetch.call(lambda: huggingface_hub.snapshot_download(
            fetch.ref.repo_id, revision=fetch.ref.revision, allow_patterns=allow,
            ignore_patterns=ignore or None, local_files_only=fetch.offline)))

    folder = snapshot(list(fetch.allow), list(fetch.ignore))
    if kind == "any":
        return folder
    missing = _missing_weights(folder, variant, "safetensors")
    if missing:  # older repos hold only pickled .bin weights for some components
        folder = snapshot(*weight_patterns(variant, "bin", tuple(missing)))
        missing = [c for c in missing if not _weights_present(folder, c, variant, "bin")]
    if not (folder / "unet" / "config.json").is_file() or missing:
        if fetch.offline:
            raise fetch.not_cached()
        if not (folder / "unet" / "config.json").is_file():
            raise InputError(f"{fetch.what()}: the repo holds no diffusers model (no unet/config.json); "
                             f"name a file in it: {fetch.ref.repo_id}:FILE")
        flavour = f"{variant} " if variant else ""
        raise InputError(f"{fetch.what()}: no {flavour}weights (safetensors or .bin) in "
                         f"{', '.join(c + '/' for c in missing)}" + ("; drop the variant" if variant else ""))
    return folder


# -- resolution -------------------------------------------------------------------------


def _unknown_name(spec: str) -> InputError:
    names = sorted(load_registry())
    return InputError(f"{spec}: no such file or folder, and not a known target name "
                      f"(known: {', '.join(names)}; or give a Hub repo id org/name[:file][@revision])")


def _parse_spec(spec: str, revision: str | None) -> tuple[HubRef, RegistryEntry | None]:
    """The Hub place a spec that is not an existing path names, with its registry row if any."""
    if spec.startswith((".", "/", "~", "\\")) or "\\" in spec:
        raise InputError(f"{spec}: no such file or folder")
    name, _, name_revision = spec.partition("@")
    if "/" not in name and ":" not in name:
        entry = load_registry().get(name)
        if entry is None:
            raise _unknown_name(spec)
        return HubRef(entry.repo_id, entry.filename,
                      _merge_revision(spec, name_revision or None, revision) or entry.revision), entry
    ref = parse_hub_ref(spec)
    if ref is None:
        raise InputError(f"{spec}: no such file or folder (and not a Hub repo id org/name[:file][@revision])")
    return HubRef(ref.repo_id, ref.filename, _merge_revision(spec, ref.revision, revision)), None


def _resolve_ref(spec: str, ref: HubRef, entry: RegistryEntry | None, *, offline: bool, kind: Kind,
                 variant: str | None) -> ResolvedTarget:
    label = entry.name if entry else spec
    if ref.filename:
        fetch = _Fetch(ref, label, offline)
        path = Path(fetch.call(lambda: huggingface_hub.hf_hub_download(
            ref.repo_id, ref.filename, revision=ref.revision, local_files_only=offline)))
        source: Source = "hub-file"
    else:
        allow, ignore = folder_patterns(kind, variant)
        fetch = _Fetch(ref, label, offline, tuple(allow), tuple(ignore))
        path = _fetch_folder(fetch, kind, variant)
        source = "hub-folder"
    return ResolvedTarget(
        spec, path, source, repo_id=ref.repo_id, filename=ref.filename, revision=ref.revision,
        commit=_snapshot_commit(path), sha256=cached_sha256(path) if ref.filename else None,
        name=entry.name if entry else None, architecture=entry.architecture if entry else None)


def resolve_target(spec: str, *, revision: str | None = None, offline: bool | None = None,
                   kind: Kind = "model", variant: str | None = None) -> ResolvedTarget:
    """Resolve a --target spec to a path on disk (see the module docstring for the forms).

    An existing path wins over every other reading. `offline=None` follows HF_HUB_OFFLINE;
    `offline=True` never touches the network. `kind="model"` fetches only what a diffusers model
    needs from folder repos (`variant`, e.g. "fp16", picks those weight files); `kind="any"`
    fetches every .json and .safetensors file of a folder repo.
    """
    if kind not in ("model", "any"):
        raise UsageError(f"kind must be 'model' or 'any', not {kind!r}")
    spec = spec.strip()
    if not spec:
        raise InputError("empty target: give a file, a folder, a Hub repo id or a target name")
    local = Path(spec).expanduser()
    if local.exists():
        return ResolvedTarget(spec, local, "local", sha256=cached_sha256(local), commit=_snapshot_commit(local))
    ref, entry = _parse_spec(spec, revision)
    offline = bool(hub_constants.HF_HUB_OFFLINE) if offline is None else offline
    return _resolve_ref(spec, ref, entry, offline=offline, kind=kind, variant=variant)


def is_cached(entry: RegistryEntry, *, variant: str | None = None) -> bool:
    """Whether a registry target resolves from the local cache alone (no network, nothing written)."""
    if entry.filename:
        found = huggingface_hub.try_to_load_from_cache(entry.repo_id, entry.filename, revision=entry.revision)
        return isinstance(found, str)
    try:
        _resolve_ref(entry.name, entry.ref, entry, offline=True, kind="model", variant=variant)
    except InputError:
        return False
    return True
