"""The training set of a run: which dataset an objective reads, in which order, optionally through the encoding cache.

The order of each epoch is a pure function of (seed, epoch) (`EpochSampler`), identical on every rank
(accelerate shards it into per-rank batches) and after a resume, which is what lets a resumed run skip
exactly the batches it has seen (accelerate's `skip_first_batches`, which skips indices without
loading them). Parquet data is visited one row group at a time (`blockwise_order`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset, Sampler

from npo_merge.errors import InputError
from npo_merge.training.config import TrainOptions
from npo_merge.training.datasets import CaptionedImageFolder, ImageItemDataset, PairDataset, blockwise_order, read_captions
from npo_merge.training.encoding_cache import CachedDataset, EncodingCache, fill_cache
from npo_merge.training.objectives import Objective, tie_winner
from npo_merge.training.pair_sources import open_pair_jsonl, open_pickapic


class EpochSampler(Sampler[int]):
    """Item indices in a per-epoch shuffled order that depends only on (seed, epoch)."""

    def __init__(self, size: int, seed: int, block_ids: Sequence[int] | None = None):
        self.size, self.seed, self.epoch = size, seed, 0
        self.block_ids = list(block_ids) if block_ids is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.block_ids is not None:
            return iter(blockwise_order(self.block_ids, self.seed, self.epoch))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


def set_epoch(loader: Any, epoch: int, sampler: EpochSampler, dataset: Dataset) -> None:
    """Select `epoch`'s order and random flips for an accelerate-prepared loader.

    accelerate's DataLoaderShard.set_epoch reaches the sampler, but once the loader is sharded over
    several processes (BatchSamplerShard) it no longer calls the dataset's set_epoch, so the flips
    would stay those of epoch 0 and a resumed run would see other flips than an uninterrupted one.
    The sampler and the dataset are therefore told directly.
    """
    loader.set_epoch(epoch)
    sampler.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


class CaptionDataset(Dataset):
    """Captions without images (image-free Self-NPO): items {"index", "caption"}."""

    def __init__(self, captions: list[str]):
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "caption": self.captions[index]}


def open_dataset(options: TrainOptions, objective: Objective, path: Callable[[str], Path]) -> tuple[Dataset, list[str], dict[str, str]]:
    """The pixel (or caption) dataset `objective` trains on, one-line notes about it, and provenance entries."""
    data = options.data
    if objective.data == "pairs":
        source_path = path(data.pairs)  # type: ignore[arg-type]
        if not source_path.exists():
            raise InputError(f"data.pairs: {source_path} does not exist")
        source = open_pair_jsonl(source_path) if source_path.suffix == ".jsonl" else open_pickapic(source_path, data.split)
        dataset = PairDataset(source, data.resolution, ties=tie_winner(objective, data.keep_ties),
                              random_flip=data.random_flip, seed=options.seed)
        meta = {"train_pairs": str(len(dataset)), "train_ties": str(dataset.num_ties),
                "train_ties_dropped": str(dataset.ties_dropped), "train_data": source_path.name}
        return dataset, [dataset.summary()], meta
    if data.images:
        folder = path(data.images)
        images = CaptionedImageFolder(folder, data.resolution, random_flip=data.random_flip, seed=options.seed)
        return images, [f"{folder}: {len(images)} captioned images"], {"train_images": str(len(images)), "train_data": folder.name}
    captions_path = path(data.captions)  # type: ignore[arg-type]
    if not captions_path.exists():
        raise InputError(f"data.captions: {captions_path} does not exist")
    captions = read_captions(captions_path)
    return CaptionDataset(captions), [f"{captions_path}: {len(captions)} captions (no images)"], {
        "train_captions": str(len(captions)), "train_data": captions_path.name}


def _block_ids(dataset: Dataset) -> list[int] | None:
    return dataset.block_ids() if isinstance(dataset, PairDataset) else None


def _index_path(cache: EncodingCache, dataset: ImageItemDataset, description: str) -> Path:
    blob = json.dumps({"encoder": cache.encoder_id, "data": description, "items": len(dataset), "size": list(dataset.size),
                       "flip": dataset.random_flip, "seed": dataset.seed, "roles": list(dataset.roles)}, sort_keys=True)
    return cache.root / f"index-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


def cached_dataset(
    dataset: ImageItemDataset,
    cache: EncodingCache,
    description: str,
    *,
    encode_images: Callable[[Any], Any],
    encode_captions: Callable[[list[str]], Any],
    is_main: bool,
    barrier: Callable[[], None],
    progress: Callable[[int], None] | None = None,
) -> tuple[CachedDataset, str]:
    """The dataset served from `cache`: filled by the main process (other ranks wait), indexed for later runs.

    `description` names the data (path, split, tie policy) so that an index is reused only for the same
    data; a reused index means no image is read or hashed again.
    """
    index = _index_path(cache, dataset, description)
    note = f"encoding cache {cache.root}: reused {index.name}"
    if is_main and not index.is_file():
        filled = fill_cache(dataset, cache, encode_images=encode_images, encode_captions=encode_captions, progress=progress)
        filled.save_index(index)
        note = f"encoding cache {cache.root}: {len(filled)} items encoded or found, index {index.name}"
    barrier()
    return CachedDataset.load_index(index, cache), note
