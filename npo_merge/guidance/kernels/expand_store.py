"""Triton stores that apply a joint layer's expand inside an elementwise pass the model runs on its output anyway.

With a dual-branch linear's weight stored as [W; down] (`joint_linear`), one cuBLAS GEMM yields the output
and the shrink t = x down^T as its last columns. Two diffusers passes then read that output:
- the attention processor's `to_out(x) / rescale_output_factor`: out = (y + s t up^T on uncond rows) / factor;
- GEGLU's `a * gelu(g)` over the halves of its projection (`gated`): the expand goes into both halves first.
Each kernel does the expand as a tl.dot per output tile, so the update costs no pass of its own. The rows of
y may be strided (the joint buffer is wider than the output); `out` is contiguous.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from npo_merge.guidance.kernels.dual_linear_triton import (
    INTERPRETED,
    _current_stream,
    _direct_launcher,
    _dot_precision,
    _launch_hooks,
    _mma,
    rank_block,
)

__all__ = ["ExpandStoreLaunch", "expand_store"]


@triton.jit(do_not_specialize=["n_uncond", "scale", "factor"])
def _expand_store_kernel(y_ptr, up_ptr, out_ptr, M, N, R, n_uncond, scale, factor, stride_y,
                         GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    y_rows = y_ptr + rows[:, None] * stride_y
    y = tl.load(y_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if GATED:  # y holds [a | g | t], a and g N wide
        gate = tl.load(y_rows + N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        shrunk = y_rows + 2 * N
    else:  # [y | t]
        shrunk = y_rows + N
    if tl.program_id(0) * BLOCK_M < n_uncond:
        ranks = tl.arange(0, BLOCK_R)
        t = tl.load(shrunk + ranks[None, :], mask=(rows[:, None] < n_uncond) & (ranks[None, :] < R), other=0.0)
        factor_ok = (ranks[:, None] < R) & (cols[None, :] < N)
        up_t = tl.load(up_ptr + cols[None, :] * R + ranks[:, None], mask=factor_ok, other=0.0)
        y += scale * _mma(t, up_t, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_PRECISION, UPCAST)
        if GATED:
            up_g = tl.load(up_ptr + (N + cols[None, :]) * R + ranks[:, None], mask=factor_ok, other=0.0)
            gate += scale * _mma(t, up_g, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_PRECISION, UPCAST)
    if GATED:
        out = y * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))  # exact gelu, as F.gelu's default
    else:
        out = y / factor
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


def _config(rank: int) -> dict:
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": rank_block(rank), "num_warps": 4}


def expand_store(y: torch.Tensor, up: torch.Tensor, scale: float, n_uncond: int, factor: float, gated: bool,
                 out: torch.Tensor) -> Callable[..., None] | None:
    """Fill `out` (rows, N) contiguous from y (rows, W) with unit column stride, summed in fp32 and rounded once:
    - gated=False: y = [y | t], `up` (N, R): (y + scale * t up^T on the first n_uncond rows) / factor;
    - gated=True: y = [a | g | t], `up` (2N, R) = [up_a; up_g]: a' * gelu(g'), where a' and g' are a and g plus
      their halves of the update on the first n_uncond rows (`factor` unused).
    `up` contiguous. Returns a direct launcher for later calls of this shape (see ExpandStoreLaunch)."""
    rows, n = out.shape
    rank = up.shape[1]
    cfg = _config(rank)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    compiled = _expand_store_kernel[grid](y, up, out, rows, n, rank, n_uncond, float(scale), float(factor), y.stride(0),
                                          GATED=gated, DOT_PRECISION=_dot_precision(y.dtype),
                                          UPCAST=INTERPRETED and y.dtype == torch.bfloat16, **cfg)
    return _direct_launcher(compiled, grid)


class ExpandStoreLaunch:
    """expand_store bound to one call shape of one layer. Later calls start the compiled kernel directly (eager
    sampling is host-bound); without a direct launcher (the CPU interpreter, another Triton), with unaligned
    tensors or under a launch-hooking profiler they take the general entry."""

    def __init__(self, y: torch.Tensor, up: torch.Tensor, n_out: int, n_uncond: int, gated: bool,
                 direct: Callable[..., None] | None):
        self._shape = (y.shape[0], n_out)
        self._rank, self._stride = up.shape[1], y.stride(0)
        self._n_uncond, self._gated = n_uncond, gated
        cfg = _config(self._rank)
        # The kernel's compile-time parameters, in declaration order.
        self._constexprs = (gated, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"], _dot_precision(y.dtype),
                            INTERPRETED and y.dtype == torch.bfloat16)
        self._direct = direct

    def __call__(self, y: torch.Tensor, up: torch.Tensor, scale: float, factor: float = 1.0) -> torch.Tensor:
        """The (rows, N) output for y laid out as at binding."""
        out = y.new_empty(self._shape)
        pointers = (y.data_ptr(), up.data_ptr(), out.data_ptr())
        if (self._direct is None or (pointers[0] | pointers[1]) % 16 or y.stride(0) != self._stride
                or _launch_hooks()):
            expand_store(y, up, scale, self._n_uncond, factor, self._gated, out)
            return out
        self._direct(_current_stream(), *pointers, *self._shape, self._rank, self._n_uncond, float(scale),
                     float(factor), self._stride, *self._constexprs)
        return out
