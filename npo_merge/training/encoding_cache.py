"""An on-disk cache of VAE latents and text embeddings, so epochs after the first do no encoding.

`EncodingCache` stores encoder outputs as safetensors files keyed by content hash, resolution,
flip and encoder identity; `fill_cache` encodes whatever a pixel dataset's items lack, and
`CachedDataset` then serves items with no image decoding and no encoding at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from npo_merge.errors import InputError
from npo_merge.training.datasets import ImageItemDataset
from npo_merge.training.images import flip_decision, image_geometry, image_to_tensor


class EncodingCache:
    """Encoder outputs on disk, one safetensors file per key, so later epochs skip the VAE and text encoder.

    Keys hash the content (image bytes sha256 or caption), the preprocessing (size, flip) and
    `encoder_id`, a string naming the encoders and their dtype (e.g. a base fingerprint + "fp16"):
    change the encoder and the old entries are simply never hit. Files are written atomically
    (temporary file + rename), so several ranks may fill one cache. Store the VAE's latent
    distribution (mean, logvar) rather than one sample to keep sampling per step.
    """

    def __init__(self, root: str | os.PathLike[str], encoder_id: str):
        if not encoder_id:
            raise InputError("an encoding cache needs a non-empty encoder_id (which VAE/text encoder made it)")
        self.root, self.encoder_id = Path(root), encoder_id
        self.root.mkdir(parents=True, exist_ok=True)

    def _key(self, **parts: Any) -> str:
        blob = json.dumps({"encoder": self.encoder_id, **parts}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def image_key(self, sha256: str, size: tuple[int, int], flip: bool) -> str:
        """Key of an image's encoding: its bytes' sha256, the crop size and the flip."""
        return self._key(kind="image", sha256=sha256, size=list(size), flip=bool(flip))

    def text_key(self, caption: str) -> str:
        """Key of a caption's encoding."""
        return self._key(kind="text", caption=caption)

    def path(self, key: str) -> Path:
        """The file of `key`, fanned out over 256 subfolders."""
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under `key`, or None."""
        from safetensors.torch import load_file

        path = self.path(key)
        return load_file(path) if path.is_file() else None

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store `tensors` under `key` (atomically; an existing entry is replaced)."""
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"encoder_id": self.encoder_id})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _split_batch(out: Mapping[str, torch.Tensor], n: int, what: str) -> list[dict[str, torch.Tensor]]:
    for name, t in out.items():
        if t.shape[0] != n:
            raise ValueError(f"{what} returned {name!r} with batch size {t.shape[0]}, expected {n}")
    return [{k: v[i] for k, v in out.items()} for i in range(n)]


def fill_cache(
    dataset: ImageItemDataset,
    cache: EncodingCache,
    *,
    encode_images: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    encode_captions: Callable[[list[str]], Mapping[str, torch.Tensor]],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> "CachedDataset":
    """Encode whatever `dataset` items the cache lacks and return a dataset that reads only the cache.

    encode_images: (N, 3, H, W) pixels in [-1, 1] -> {name: (N, ...)} (e.g. VAE mean and logvar).
    encode_captions: N captions -> {name: (N, ...)} (e.g. prompt embeddings, pooled embeddings).
    With random_flip on, both orientations are encoded. Cached entries are neither decoded nor
    re-encoded (their bytes are only hashed), so an interrupted fill resumes where it stopped.
    `progress(n)` is called after each item.
    """
    flips = (False, True) if dataset.random_flip else (False,)
    entries: list[dict[str, Any]] = []
    images: dict[str, torch.Tensor] = {}
    texts: dict[str, str] = {}

    def flush(pending: dict[str, Any], encode: Callable[[Any], Mapping[str, torch.Tensor]], what: str, stack: bool) -> None:
        if pending:
            batch = torch.stack(list(pending.values())) if stack else list(pending.values())
            with torch.no_grad():
                out = encode(batch)
            for key, tensors in zip(pending, _split_batch(out, len(pending), what)):
                cache.put(key, tensors)
            pending.clear()

    for index in range(len(dataset)):
        caption = dataset.caption(index)
        entry: dict[str, Any] = {"caption": caption, "text": cache.text_key(caption)}
        if entry["text"] not in cache:
            texts[entry["text"]] = caption
        for role, (data, where) in dataset.role_bytes(index).items():
            sha = hashlib.sha256(data).hexdigest()
            slot: dict[str, Any] = {"keys": [], "crop_top_left": []}
            for flip in flips:
                key = cache.image_key(sha, dataset.size, flip)
                slot["original_size"], crop = image_geometry(data, dataset.size, flip=flip, where=where)
                slot["keys"].append(key)
                slot["crop_top_left"].append(list(crop))
                if key not in cache and key not in images:
                    images[key] = image_to_tensor(data, dataset.size, flip=flip, where=where)[0]
            slot["original_size"] = list(slot["original_size"])
            entry[role] = slot
        entries.append(entry)
        if len(images) >= batch_size:
            flush(images, encode_images, "encode_images", True)
        if len(texts) >= batch_size:
            flush(texts, encode_captions, "encode_captions", False)
        if progress is not None:
            progress(index + 1)
    flush(images, encode_images, "encode_images", True)
    flush(texts, encode_captions, "encode_captions", False)
    return CachedDataset(cache, entries, dataset.roles, random_flip=dataset.random_flip, seed=dataset.seed)


class CachedDataset(Dataset):
    """Items served from an `EncodingCache`: encoded tensors instead of pixels, nothing decoded or encoded.

    Items: {"index", "caption", "flip", "text": {...}, and per role "<role>": {...},
    "<role>_original_size", "<role>_crop_top_left"}; flips follow the same (seed, epoch, index)
    rule as the pixel datasets.
    """

    def __init__(
        self,
        cache: EncodingCache,
        entries: list[dict[str, Any]],
        roles: Sequence[str],
        *,
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.cache, self.entries, self.roles = cache, entries, tuple(roles)
        self.random_flip, self.seed, self.epoch = random_flip, seed, 0
        if not entries:
            raise InputError("the cached data set is empty")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips __getitem__ draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        tensors = self.cache.get(key)
        if tensors is None:
            raise InputError(f"encoding cache {self.cache.root} lacks entry {key}: run fill_cache again")
        return tensors

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        flip = self.random_flip and flip_decision(self.seed, self.epoch, index)
        out: dict[str, Any] = {"index": index, "caption": entry["caption"], "flip": flip,
                               "text": self._load(entry["text"])}
        for role in self.roles:
            slot = entry[role]
            out[role] = self._load(slot["keys"][int(flip)])
            out[f"{role}_original_size"] = torch.tensor(slot["original_size"])
            out[f"{role}_crop_top_left"] = torch.tensor(slot["crop_top_left"][int(flip)])
        return out

    def save_index(self, path: str | os.PathLike[str]) -> None:
        """Write the entry list as JSON, so a later run can reopen the cache without hashing any image."""
        blob = {"encoder_id": self.cache.encoder_id, "roles": list(self.roles), "random_flip": self.random_flip,
                "seed": self.seed, "entries": self.entries}
        Path(path).write_text(json.dumps(blob), encoding="utf-8")

    @classmethod
    def load_index(cls, path: str | os.PathLike[str], cache: EncodingCache) -> "CachedDataset":
        """Reopen a cache from `save_index` output; refuses an index made with another encoder."""
        blob = json.loads(Path(path).read_text(encoding="utf-8"))
        if blob["encoder_id"] != cache.encoder_id:
            raise InputError(
                f"{path} indexes encodings by {blob['encoder_id']!r}, not {cache.encoder_id!r}: run fill_cache again"
            )
        return cls(cache, blob["entries"], blob["roles"], random_flip=blob["random_flip"], seed=blob["seed"])
