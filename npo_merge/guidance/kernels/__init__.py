"""Dual-branch layer kernels: one launch serves both CFG branches without a second weight copy.

Importing this package registers ``torch.ops.npo_merge.dual_branch_linear`` (Triton on CUDA when
:func:`available`, plain torch elsewhere). The torch paths beside it are the reference, the
fallback, and the helpers for conv layers.
"""

from __future__ import annotations

from npo_merge.guidance.kernels.ops import (
    available,
    dual_branch_conv1x1,
    dual_branch_linear,
    dual_branch_linear_eager,
)
from npo_merge.guidance.kernels.torch_paths import (
    dual_branch_conv2d_reference,
    dual_branch_conv2d_unfused,
    dual_branch_linear_reference,
    dual_branch_linear_unfused,
)

__all__ = [
    "available",
    "dual_branch_linear",
    "dual_branch_linear_eager",
    "dual_branch_conv1x1",
    "dual_branch_linear_reference",
    "dual_branch_linear_unfused",
    "dual_branch_conv2d_reference",
    "dual_branch_conv2d_unfused",
]
