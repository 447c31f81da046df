"""Triton store of an attention's output projection: out = (y + scale * t up^T on uncond rows) / factor.

diffusers' attention processor ends with `to_out(x) / attn.rescale_output_factor`, one elementwise pass
over the output that plain CFG runs too. With the projection's weight stored as [W; down] (`joint_linear`),
one cuBLAS GEMM yields y = x W^T + b and the shrink t = x down^T as its last columns; this kernel then does
the expand inside that pass (a tl.dot of t with `up` per output tile), so the update costs no pass of its
own. The rows of y may be strided (the joint buffer is wider than the output); `out` is contiguous.
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

__all__ = ["ExpandRescaleLaunch", "expand_rescale"]


@triton.jit(do_not_specialize=["n_uncond", "scale", "factor"])
def _expand_rescale_kernel(y_ptr, up_ptr, out_ptr, M, N, R, n_uncond, scale, factor, stride_y,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    y_rows = y_ptr + rows[:, None] * stride_y
    y = tl.load(y_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if tl.program_id(0) * BLOCK_M < n_uncond:
        ranks = tl.arange(0, BLOCK_R)
        t = tl.load(y_rows + N + ranks[None, :], mask=(rows[:, None] < n_uncond) & (ranks[None, :] < R), other=0.0)
        up_t = tl.load(up_ptr + cols[None, :] * R + ranks[:, None], mask=(ranks[:, None] < R) & (cols[None, :] < N),
                       other=0.0)
        update = _mma(t, up_t, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_PRECISION, UPCAST)
        y += scale * update
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], (y / factor).to(out_ptr.dtype.element_ty), mask=ok)


def _config(rank: int) -> dict:
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": rank_block(rank), "num_warps": 4}


def _grid(rows: int, cols: int, cfg: dict) -> tuple[int, int]:
    return triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_N"])


def expand_rescale(y: torch.Tensor, up: torch.Tensor, scale: float, n_uncond: int, factor: float,
                   out: torch.Tensor) -> Callable[..., None] | None:
    """Fill `out` (rows, N) contiguous from y (rows, N + R), unit column stride: (y[:, :N] + scale * y[:, N:] up^T
    on the first n_uncond rows) / factor, summed in fp32 and rounded once. `up` (N, R) contiguous. Returns a
    direct launcher for later calls of this shape (see ExpandRescaleLaunch)."""
    n, rank = up.shape
    rows = y.shape[0]
    cfg = _config(rank)
    grid = _grid(rows, n, cfg)
    compiled = _expand_rescale_kernel[grid](y, up, out, rows, n, rank, n_uncond, float(scale), float(factor), y.stride(0),
                                            DOT_PRECISION=_dot_precision(y.dtype),
                                            UPCAST=INTERPRETED and y.dtype == torch.bfloat16, **cfg)
    return _direct_launcher(compiled, grid)



class ExpandRescaleLaunch:
    """expand_rescale bound to one call shape of one layer. Later calls start the compiled kernel directly (eager
    sampling is host-bound); without a direct launcher (the CPU interpreter, another Triton), with unaligned
    tensors or under a launch-hooking profiler they take the general entry."""

    def __init__(self, y: torch.Tensor, up: torch.Tensor, n_uncond: int, direct: Callable[..., None] | None):
        self._n, self._rank = up.shape
        self._rows, self._stride = y.shape[0], y.stride(0)
        self._n_uncond = n_uncond
        cfg = _config(self._rank)
        # The kernel's compile-time parameters, in declaration order.
        self._constexprs = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"], _dot_precision(y.dtype),
                            INTERPRETED and y.dtype == torch.bfloat16)
        self._direct = direct

    def __call__(self, y: torch.Tensor, up: torch.Tensor, scale: float, factor: float) -> torch.Tensor:
        """The (rows, N) output for y (rows, N + R) laid out as at binding."""
        out = y.new_empty((self._rows, self._n))
        pointers = (y.data_ptr(), up.data_ptr(), out.data_ptr())
        if (self._direct is None or (pointers[0] | pointers[1]) % 16 or y.stride(0) != self._stride
                or _launch_hooks()):
            expand_rescale(y, up, scale, self._n_uncond, factor, out)
            return out
        self._direct(_current_stream(), *pointers, self._rows, self._n, self._rank, self._n_uncond, float(scale),
                     float(factor), self._stride, *self._constexprs)
        return out
