"""Image preprocessing for training: decode bytes, cover-resize, center-crop, flip, scale to [-1, 1].

Kept apart from the data sources so the pixel datasets and the encoding cache agree on exactly one
definition of "the tensor this image becomes" (and of its SDXL micro-conditioning geometry).
Flips are decided per (seed, epoch, index), so the result does not depend on worker count and a
resumed run sees the same flips.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npo_merge.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_bytes(source: bytes | Path, where: str) -> bytes:
    """The encoded bytes of an image given as bytes or as a file path (InputError naming `where` if unreadable)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read image file {source}: {exc.strerror or exc}") from None


def _cover_crop(orig_h: int, orig_w: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Resized (w, h) that covers `size`, and the (top, left) of the centered crop."""
    height, width = size
    scale = max(height / orig_h, width / orig_w)
    new_w, new_h = max(width, round(orig_w * scale)), max(height, round(orig_h * scale))
    return new_w, new_h, round((new_h - height) / 2), round((new_w - width) / 2)


def _open_image(data: bytes, where: str) -> Any:
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises several types for corrupt or unknown data
        raise InputError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


def image_geometry(
    data: bytes, size: tuple[int, int], *, flip: bool = False, where: str = "image"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(original_size (h, w), crop_top_left (top, left)) that `image_to_tensor` would report, from the header only."""
    with _open_image(data, where) as img:
        w, h = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
            w, h = h, w
    new_w, _, top, left = _cover_crop(h, w, size)
    return (h, w), (top, new_w - size[1] - left if flip else left)


def image_to_tensor(
    data: bytes, size: tuple[int, int], *, flip: bool = False, where: str = "image"
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Decode image bytes to a (3, H, W) float tensor in [-1, 1]: cover-resize, center crop, optional flip.

    Returns (pixels, original_size (h, w), crop_top_left (top, left)), the last two as SDXL's
    micro-conditioning expects them (the crop's left edge measured in the flipped image when flipped).
    """
    from PIL import Image, ImageOps

    with _open_image(data, where) as raw:
        try:
            img = ImageOps.exif_transpose(raw).convert("RGB")
        except Exception as exc:
            raise InputError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None
    orig_w, orig_h = img.size
    new_w, new_h, top, left = _cover_crop(orig_h, orig_w, size)
    img = img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    img = img.crop((left, top, left + size[1], top + size[0]))
    if flip:
        img = ImageOps.mirror(img)
        left = new_w - size[1] - left
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0, (orig_h, orig_w), (top, left)


def as_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, checked positive."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or min(size) <= 0:
        raise InputError(f"resolution must be a positive int or (height, width), got {resolution!r}")
    return int(size[0]), int(size[1])


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether item `index` is mirrored in `epoch`: a pure function of its arguments (p = 1/2)."""
    return random.Random(f"{seed}:{epoch}:{index}").random() < 0.5
