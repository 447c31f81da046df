"""Torch datasets of training items: preference pairs (winner, loser) and captioned images, plus caption lists.

`PairDataset` orients each pair of a `PairSource` as (winner, loser) and applies the tie policy;
reversing the preference for NPO is the loss's job (losses.dpo_loss_from_errors(reverse=True)), so
one dataset serves DPO and NPO alike. `CaptionedImageFolder` (photo.png + photo.txt, as kohya reads
them) and `read_captions` feed Self-NPO. `blockwise_order` is a shuffle that respects parquet row
groups.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from npo_merge.errors import InputError
from npo_merge.training.images import IMAGE_EXTENSIONS, as_size, flip_decision, image_to_tensor, read_image_bytes
from npo_merge.training.pair_sources import PairSource

# How a pair labelled 0.5 is resolved: dropped, or kept with the named image as winner.
TieWinner = Literal["drop", "jpg_0", "jpg_1"]


class ImageItemDataset(Dataset):
    """Base of the pixel datasets: named image roles per item, per-item flips, raw bytes for the cache."""

    roles: tuple[str, ...] = ()

    def __init__(self, resolution: int | tuple[int, int], random_flip: bool, seed: int):
        self.size = as_size(resolution)
        self.random_flip, self.seed, self.epoch = random_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips __getitem__ draws (call before each epoch, like DistributedSampler)."""
        self.epoch = epoch

    def flip_for(self, index: int) -> bool:
        """Whether item `index` is mirrored this epoch (a pure function of seed, epoch and index)."""
        return self.random_flip and flip_decision(self.seed, self.epoch, index)

    def caption(self, index: int) -> str:
        raise NotImplementedError

    def role_bytes(self, index: int) -> dict[str, tuple[bytes, str]]:
        """{role: (encoded image bytes, where)} for item `index`."""
        raise NotImplementedError

    def item(self, index: int, flip: bool) -> dict[str, Any]:
        """Item `index` decoded with the given flip: caption, index, flip, and per role the pixels,
        `<role>_sha256`, `<role>_original_size` and `<role>_crop_top_left`."""
        out: dict[str, Any] = {"index": index, "caption": self.caption(index), "flip": flip}
        for role, (data, where) in self.role_bytes(index).items():
            pixels, orig, crop = image_to_tensor(data, self.size, flip=flip, where=where)
            out[role] = pixels
            out[f"{role}_sha256"] = hashlib.sha256(data).hexdigest()
            out[f"{role}_original_size"] = torch.tensor(orig)
            out[f"{role}_crop_top_left"] = torch.tensor(crop)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.item(index, self.flip_for(index))


class PairDataset(ImageItemDataset):
    """Preference pairs as (caption, winner, loser) items; ties dropped unless told otherwise.

    Items: {"index", "caption", "flip", "winner", "loser" ((3, H, W) in [-1, 1]), "winner_sha256",
    "loser_sha256", "winner_original_size", "winner_crop_top_left", "loser_..."}.
    `num_rows`, `num_ties` and `ties_dropped` say what the tie policy did; `summary()` says it in words.
    """

    roles = ("winner", "loser")

    def __init__(
        self,
        source: PairSource,
        resolution: int | tuple[int, int] = 512,
        *,
        ties: TieWinner = "drop",
        random_flip: bool = False,
        seed: int = 0,
    ):
        super().__init__(resolution, random_flip, seed)
        if ties not in ("drop", "jpg_0", "jpg_1"):
            raise InputError(f"ties must be 'drop', 'jpg_0' or 'jpg_1', got {ties!r}")
        self.source, self.ties = source, ties
        self.rows: list[tuple[int, int]] = []  # (source row, index of the winning image)
        self.num_ties = 0
        for row, label in enumerate(source.labels):
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 1:
                raise InputError(
                    f"{source.where(row)}: label_0 must be a number in [0, 1] (1: jpg_0 preferred, 0: jpg_1,"
                    f" 0.5: tie), got {label!r}"
                )
            if label == 0.5:
                self.num_ties += 1
                if ties == "drop":
                    continue
                self.rows.append((row, 0 if ties == "jpg_0" else 1))
            else:
                self.rows.append((row, 0 if label > 0.5 else 1))
        self.num_rows = len(source)
        self.ties_dropped = self.num_ties if ties == "drop" else 0
        if not self.rows:
            why = f"all {self.num_rows} are ties (keep them with ties='jpg_0')" if self.num_rows else "it is empty"
            raise InputError(f"{source.name}: no usable preference pairs: {why}")

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        """One line on what was loaded, e.g. "1000 rows: 880 pairs, 120 ties dropped"."""
        tie_part = (
            f"{self.ties_dropped} ties dropped" if self.ties == "drop"
            else f"{self.num_ties} ties kept with {self.ties} as winner"
        )
        return f"{self.source.name}: {self.num_rows} rows: {len(self)} pairs, {tie_part}"

    def caption(self, index: int) -> str:
        return self.source.captions[self.rows[index][0]]

    def block_ids(self) -> list[int]:
        """Per item, the storage block (parquet row group) it lives in, for `blockwise_order`."""
        ids = self.source.block_ids()
        return [int(ids[row]) for row, _ in self.rows]

    def role_bytes(self, index: int) -> dict[str, tuple[bytes, str]]:
        row, win = self.rows[index]
        where = self.source.where(row)
        return {
            "winner": (read_image_bytes(self.source.image(row, win), f"{where} jpg_{win}"), f"{where} jpg_{win}"),
            "loser": (read_image_bytes(self.source.image(row, 1 - win), f"{where} jpg_{1 - win}"), f"{where} jpg_{1 - win}"),
        }


class CaptionedImageFolder(ImageItemDataset):
    """Images with a caption file beside each (a.png + a.txt, searched recursively), for Self-NPO.

    Items: {"index", "caption", "flip", "image", "image_sha256", "image_original_size", "image_crop_top_left"}.
    Images without a caption file are an error unless missing_captions="skip" (then counted in `num_skipped`).
    """

    roles = ("image",)

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int | tuple[int, int] = 512,
        *,
        caption_extension: str = ".txt",
        missing_captions: Literal["error", "skip"] = "error",
        random_flip: bool = False,
        seed: int = 0,
    ):
        super().__init__(resolution, random_flip, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such folder")
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.images = [p for p in images if p.with_suffix(caption_extension).is_file()]
        lacking = [p for p in images if not p.with_suffix(caption_extension).is_file()]
        if lacking and missing_captions == "error":
            raise InputError(
                f"{len(lacking)} image(s) in {self.root} have no {caption_extension} caption, e.g."
                f" {lacking[0].relative_to(self.root)}; add captions or pass missing_captions='skip'"
            )
        self.num_skipped = len(lacking)
        self.caption_extension = caption_extension
        if not self.images:
            raise InputError(f"{self.root}: no captioned images ({', '.join(IMAGE_EXTENSIONS)} + {caption_extension})")

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int) -> str:
        return self.images[index].with_suffix(self.caption_extension).read_text(encoding="utf-8").strip()

    def role_bytes(self, index: int) -> dict[str, tuple[bytes, str]]:
        path = self.images[index]
        where = str(path.relative_to(self.root))
        return {"image": (read_image_bytes(path, where), where)}


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """Captions for image-free Self-NPO: a .txt file (one per line) or a .jsonl file with a "caption" field."""
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.suffix == ".jsonl":
        try:
            lines = [str(json.loads(ln)["caption"]) for ln in lines]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}: every line must be a JSON object with a \"caption\" field") from None
    if not lines:
        raise InputError(f"{path}: no captions")
    return lines


def blockwise_order(block_ids: Sequence[int], seed: int, epoch: int = 0) -> list[int]:
    """A shuffled order of item indices that visits one storage block at a time (blocks and items within shuffled).

    Parquet is read a row group at a time, so a plain random order reads a whole row group per item:
    with 100-row groups of 300 KB images that measured 54 ms per pair against 1.4 ms in order
    (2-core CPU, warm page cache). Use this order as a sampler, or encode once into the cache.
    """
    rng = np.random.default_rng([seed, epoch])
    ids = np.asarray(block_ids)
    by_block = np.argsort(ids, kind="stable")
    starts = np.unique(ids[by_block], return_index=True)[1]
    groups = np.split(by_block, starts[1:])
    order: list[int] = []
    for g in rng.permutation(len(groups)):
        order.extend(rng.permutation(groups[g]).tolist())
    return order
