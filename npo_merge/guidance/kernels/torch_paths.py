"""Plain-torch dual-branch layers: the reference, the CPU/fallback path and the conv helpers.

A dual-branch layer runs the CFG batch [uncond; cond] in one call: every row gets the conditional
weights W (+ bias); the first ``n_uncond`` rows also get the low-rank branch difference
``scale * up @ down`` (theta_u - theta_c stored as LoRA factors, ``scale`` = alpha / rank * eta).
Everything here is ordinary torch, so it runs on any device, traces under torch.compile and can be
captured in a CUDA graph (slices along the leading dim and in-place adds; no indexing by lists).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npo_merge.errors import CompatibilityError

__all__ = [
    "check_dual_linear_args",
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
    """Raise CompatibilityError unless the shapes form one dual-branch linear layer.

    Only shapes and dtypes are read, so this runs on fake tensors and never syncs the device.
    """
    if weight.dim() != 2 or down.dim() != 2 or up.dim() != 2:
        raise CompatibilityError(
            f"dual-branch linear wants 2-D weight/down/up, got {tuple(weight.shape)}, "
            f"{tuple(down.shape)}, {tuple(up.shape)}: reshape conv factors before calling"
        )
    out_features, in_features = weight.shape
    rank = down.shape[0]
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise CompatibilityError(
            f"input's last dim is {x.shape[-1] if x.dim() else None}, the layer takes {in_features} features"
        )
    if down.shape[1] != in_features or up.shape != (out_features, rank):
        raise CompatibilityError(
            f"LoRA factors down {tuple(down.shape)} / up {tuple(up.shape)} do not fit weight "
            f"{tuple(weight.shape)}: want down (r, {in_features}) and up ({out_features}, r)"
        )
    if bias is not None and bias.shape != (out_features,):
        raise CompatibilityError(f"bias has shape {tuple(bias.shape)}, want ({out_features},)")
    rows = x.numel() // in_features if in_features else 0
    if not 0 <= n_uncond <= rows:
        raise CompatibilityError(f"n_uncond={n_uncond} is outside the {rows} rows of the input")
    dtypes = {t.dtype for t in (x, weight, down, up) if t is not None}
    if bias is not None:
        dtypes.add(bias.dtype)
    if len(dtypes) != 1:
        raise CompatibilityError(
            f"dual-branch linear wants one dtype for input, weight, bias and factors, got {sorted(map(str, dtypes))}"
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
    y = F.linear(x, weight, bias)
    if n_uncond == 0:
        return y
    in_features, out_features = weight.shape[1], weight.shape[0]
    rows_in = x.reshape(-1, in_features)[:n_uncond]
    rows_out = y.view(-1, out_features)[:n_uncond]
    rows_out.addmm_(rows_in @ down.t(), up.t(), alpha=scale)
    return y


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
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    if n_uncond == 0:
        return y
    update = F.conv2d(F.conv2d(x[:n_uncond], down, None, stride, padding, dilation), up)
    y[:n_uncond].add_(update, alpha=scale)
    return y
