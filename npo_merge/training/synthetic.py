"""Small synthetic training sets in the real input formats, for CI, tests and a first run without data.

`write_brightness_pairs` writes PNG pairs and a JSONL file (the format `data.pairs` reads) in which
the preferred image is always the clean, bright rendering of a random scene and the other one a
darker, grainy rendering of the same scene, so a DPO run has a signal to learn (and an NPO run one
to unlearn); a few pairs are ties (label 0.5). `write_captioned_images` writes a captioned image
folder (image.png + image.txt) for Self-NPO.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

LOSER_GAIN, LOSER_GRAIN = 0.35, 0.3


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field in [0, 1], (size, size, 3)."""
    coarse = rng.random((4, 4, 3))
    index = np.arange(size) * 4 // size
    return coarse[index][:, index]


def _png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_brightness_pairs(folder: str | os.PathLike[str], count: int = 16, size: int = 32, *, ties: int = 2,
                           seed: int = 0) -> Path:
    """Write `count` pairs (+ `ties` tied pairs) under `folder`; returns the JSONL file.

    Lines use the {"caption", "image_0", "image_1", "label_0"} form with the preferred image on a
    random side, so label_0 is 1 or 0 (0.5 for the ties).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(count + ties):
        scene = _scene(rng, size)
        bright, dark = f"images/{index:04d}-a.png", f"images/{index:04d}-b.png"
        _png(scene, folder / bright)
        _png(scene * LOSER_GAIN + LOSER_GRAIN * rng.random(scene.shape), folder / dark)
        if index >= count:
            record = {"caption": f"scene {index}", "image_0": bright, "image_1": dark, "label_0": 0.5}
        elif rng.random() < 0.5:
            record = {"caption": f"scene {index}", "image_0": bright, "image_1": dark, "label_0": 1}
        else:
            record = {"caption": f"scene {index}", "image_0": dark, "image_1": bright, "label_0": 0}
        lines.append(json.dumps(record))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_captioned_images(folder: str | os.PathLike[str], count: int = 8, size: int = 32, *, seed: int = 0) -> Path:
    """Write `count` images with a caption file beside each under `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        _png(_scene(rng, size), folder / f"{index:04d}.png")
        (folder / f"{index:04d}.txt").write_text(f"scene {index}\n", encoding="utf-8")
    return folder
