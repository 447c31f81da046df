"""Plain-torch dual-branch layers: the reference, the CPU/fallback path and the conv helpers.

A dual-branch layer runs the CFG batch [uncond; cond] in one call: every row gets the conditional
weights W (+ bias); the first ``n_uncond`` rows also get the low-rank branch difference
``scale * up @ down`` (theta_u - theta_c stored as LoRA factors, ``scale`` = alpha / rank * eta).
Everything here is ordinary torch, so it runs on any device, traces under torch.compile and can be
captured in a CUDA graph (slices along the leading dim and in-place adds; no indexing by lists).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from npo_merge.errors import CompatibilityError
from npo_merge.guidance.dual_branch import lowrank_conv2d, lowrank_linear

__all__ = [
    "check_dual_linear_args",
    "check_dual_linear_shapes",
    "dual_branch_linear_reference",
    "dual_branch_linear_unfused",
    "dual_branch_conv2d_reference",
    "dual_branch_conv2d_unfused",
]


def check_dual_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    n_uncond: int,
) -> None:
    """Raise CompatibilityError unless the tensors form one dual-branch linear layer.

    Only shapes and dtypes are read, so this runs on fake tensors and never syncs the device.
    """
    check_dual_linear_shapes(
        x.shape, weight.shape, None if bias is None else bias.shape, down.shape, up.shape,
        tuple(t.dtype for t in (x, weight, bias, down, up) if t is not None), n_uncond,
    )


def check_dual_linear_shapes(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    bias_shape: Sequence[int] | None,
    down_shape: Sequence[int],
    up_shape: Sequence[int],
    dtypes: tuple[torch.dtype, ...],
    n_uncond: int,
) -> None:
    """The same check on shapes and dtypes alone (hashable, so callers can cache it per layer)."""
    if len(weight_shape) != 2 or len(down_shape) != 2 or len(up_shape) != 2:
        raise CompatibilityError(
            f"dual-branch linear wants 2-D weight/down/up, got {tuple(weight_shape)}, "
            f"{tuple(down_shape)}, {tuple(up_shape)}: reshape conv factors before calling"
        )
    out_features, in_features = weight_shape
    rank = down_shape[0]
    if len(x_shape) < 1 or x_shape[-1] != in_features:
        raise CompatibilityError(
            f"input's last dim is {x_shape[-1] if len(x_shape) else None}, the layer takes {in_features} features"
        )
    if down_shape[1] != in_features or tuple(up_shape) != (out_features, rank):
        raise CompatibilityError(
            f"LoRA factors down {tuple(down_shape)} / up {tuple(up_shape)} do not fit weight "
            f"{tuple(weight_shape)}: want down (r, {in_features}) and up ({out_features}, r)"
        )
    if bias_shape is not None and tuple(bias_shape) != (out_features,):
        raise CompatibilityError(f"bias has shape {tuple(bias_shape)}, want ({out_features},)")
    rows = math.prod(x_shape[:-1])
    if not 0 <= n_uncond <= rows:
        raise CompatibilityError(f"n_uncond={n_uncond} is outside the {rows} rows of the input")
    if len(set(dtypes)) != 1:
        raise CompatibilityError(
            f"dual-branch linear wants one dtype for input, weight, bias and factors, got {sorted(map(str, set(dtypes)))}"
        )


def dual_branch_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    """Each branch with its own merged weight, in the inputs' dtype: the definition to test against.

    theta_u = W + scale * up @ down serves the first ``n_uncond`` flattened rows, W the rest.
    Call it with float64 tensors to get the ground truth; it stores a second weight, so it is slow.
    """
    in_features = weight.shape[1]
    rows = x.reshape(-1, in_features)
    weight_uncond = weight + scale * (up @ down)
    y_uncond = F.linear(rows[:n_uncond], weight_uncond, bias)
    y_cond = F.linear(rows[n_uncond:], weight, bias)
    return torch.cat([y_uncond, y_cond]).reshape(*x.shape[:-1], weight.shape[0])


def dual_branch_linear_unfused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    """Base GEMM over all rows, then shrink and expand on the uncond rows added in place (3 launches).

    The CPU implementation of the custom op and the fallback where Triton is missing.
    """
    rows = x.reshape(-1, weight.shape[1])  # the op counts n_uncond in rows of x flattened to 2-D
    return lowrank_linear(rows, weight, bias, down, up, scale, n_uncond).view(*x.shape[:-1], weight.shape[0])


def _conv_factors_fit(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> None:
    """Raise CompatibilityError unless down (r, in, kh, kw) and up (out, r, 1, 1) fit the conv weight."""
    out_channels, in_channels, kh, kw = weight.shape
    rank = down.shape[0]
    if down.shape != (rank, in_channels, kh, kw) or up.shape != (out_channels, rank, 1, 1):
        raise CompatibilityError(
            f"conv LoRA factors down {tuple(down.shape)} / up {tuple(up.shape)} do not fit weight "
            f"{tuple(weight.shape)}: want down (r, {in_channels}, {kh}, {kw}) and up ({out_channels}, r, 1, 1)"
        )


def dual_branch_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """Each branch convolved with its own merged kernel; ``n_uncond`` counts batch items (dim 0)."""
    _conv_factors_fit(weight, down, up)
    delta = (up.flatten(1) @ down.flatten(1)).view_as(weight)
    y_uncond = F.conv2d(x[:n_uncond], weight + scale * delta, bias, stride, padding, dilation)
    y_cond = F.conv2d(x[n_uncond:], weight, bias, stride, padding, dilation)
    return torch.cat([y_uncond, y_cond])


def dual_branch_conv2d_unfused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """cuDNN conv over the whole batch, plus the low-rank conv pair on the uncond items added in place.

    ``down`` carries the kernel size, stride, padding and dilation (the LoCon layout); ``up`` is 1x1.
    ``n_uncond`` counts batch items (dim 0), which keeps the uncond half a contiguous slice.
    """
    _conv_factors_fit(weight, down, up)
    return lowrank_conv2d(x, weight, bias, down, up, scale, n_uncond, stride, padding, dilation)  # type: ignore[arg-type]
