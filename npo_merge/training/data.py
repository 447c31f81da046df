"""Training data in one import: sources, datasets, image preprocessing and the encoding cache.

The pieces live in modules with one job each; this module re-exports their public names so that
`from npo_merge.training import data` keeps working:

* `images`: decode, cover-resize, center-crop, flip, scale to [-1, 1] (and SDXL crop geometry).
* `pair_sources`: Pick-a-Pic parquet/arrow files and JSONL pairs (captions and labels up front,
  image bytes on demand).
* `datasets`: `PairDataset` (winner/loser, tie policy), `CaptionedImageFolder` and `read_captions`
  for Self-NPO, `blockwise_order`.
* `encoding_cache`: `EncodingCache`, `fill_cache`, `CachedDataset`.
"""

from __future__ import annotations

from npo_merge.training.datasets import (
    CaptionedImageFolder,
    ImageItemDataset,
    PairDataset,
    TieWinner,
    blockwise_order,
    read_captions,
)
from npo_merge.training.encoding_cache import CachedDataset, EncodingCache, fill_cache
from npo_merge.training.images import IMAGE_EXTENSIONS, image_geometry, image_to_tensor
from npo_merge.training.pair_sources import (
    PICKAPIC_COLUMNS,
    PairSource,
    open_pair_jsonl,
    open_pickapic,
    pickapic_files,
)

__all__ = [
    "IMAGE_EXTENSIONS", "PICKAPIC_COLUMNS", "CachedDataset", "CaptionedImageFolder", "EncodingCache",
    "ImageItemDataset", "PairDataset", "PairSource", "TieWinner", "blockwise_order", "fill_cache",
    "image_geometry", "image_to_tensor", "open_pair_jsonl", "open_pickapic", "pickapic_files", "read_captions",
]
