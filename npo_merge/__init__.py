"""npo_merge: weight deltas for diffusion models, built around Diffusion-NPO.

The public API is re-exported here lazily so that `import npo_merge` stays cheap
(no diffusers import until a pipeline function is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_LAZY = {
    # name -> module that defines it
    "load_pipeline": "npo_merge.guidance.pipeline",
    "enable_npo": "npo_merge.guidance.pipeline",
    "disable_npo": "npo_merge.guidance.install",
    "set_branch_mode": "npo_merge.guidance.install",
    "open_checkpoint": "npo_merge.io.checkpoint",
    "read_lora": "npo_merge.io.lora",
    "open_delta": "npo_merge.delta.files",
    "LowRank": "npo_merge.delta.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'npo_merge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
