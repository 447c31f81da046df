"""Triton LayerNorm that also writes the LoRA shrink: out = [LN(h) | scale * LN(h) A^T on uncond rows | 0].

The dual-branch projections that read a LayerNorm's output (an attention's q/k/v, a cross-attention's q,
the feed-forward's input projection) then need no update pass: with their weights stored as rows of
[W | B | 0], one cuBLAS GEMM over the widened rows computes x W^T + (s x A^T) B^T, the shrink columns
being zero on cond rows. The norm reads each row twice (statistics, then normalize-and-store); the shrink
is a tl.dot on the tile just normalized.

Measured on an H100 (fp16, CUDA graphs): faster than torch's LayerNorm on 8192-row inputs (10.6 against
16.8 us at 640 channels), slower on 2048 rows (9.3 against 8.0 us at 1280), much slower below.
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

__all__ = ["NormShrinkLaunch", "norm_shrink"]


@triton.jit(do_not_specialize=["n_uncond", "eps"])
def _norm_shrink_kernel(h_ptr, gamma_ptr, beta_ptr, down_ptr, scale_ptr, out_ptr,
                        M, C, R, TAIL, n_uncond, eps, stride_h, stride_out,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    h_rows = h_ptr + rows[:, None] * stride_h
    out_rows = out_ptr + rows[:, None] * stride_out
    # Statistics in fp32 from sums shifted by each row's first element (no cancellation for large means).
    shift = tl.load(h_ptr + rows * stride_h, mask=row_ok, other=0.0).to(tl.float32)
    sum1 = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    sum2 = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols[None, :] < C)
        x = tl.where(ok, tl.load(h_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32) - shift[:, None], 0.0)
        sum1 += x
        sum2 += x * x
    mean_shifted = tl.sum(sum1, 1) / C
    rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(sum2, 1) / C - mean_shifted * mean_shifted, 0.0) + eps)
    mean = mean_shifted + shift
    has_uncond = tl.program_id(0) * BLOCK_M < n_uncond
    ranks = tl.arange(0, BLOCK_R)
    shrunk = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(h_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = ((x - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_rows + cols[None, :], y, mask=ok)
        if has_uncond:  # the shrink of the rounded output, as the projection would see it
            down_t = tl.load(down_ptr + ranks[None, :] * C + cols[:, None], mask=(ranks[None, :] < R) & col_ok[:, None],
                             other=0.0)
            shrunk = _mma(y, down_t, shrunk, DOT_PRECISION, UPCAST)
    scales = tl.load(scale_ptr + ranks, mask=ranks < R, other=0.0)
    shrunk = tl.where(rows[:, None] < n_uncond, shrunk * scales[None, :], 0.0)  # cond rows and padding: zero
    tl.store(out_rows + C + ranks[None, :], shrunk.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (ranks[None, :] < TAIL))
    for t0 in range(BLOCK_R, TAIL, BLOCK_R):  # the rest of the padding
        tl.store(out_rows + C + t0 + ranks[None, :], tl.zeros((BLOCK_M, BLOCK_R), out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (t0 + ranks[None, :] < TAIL))


def _config(rows: int, rank: int) -> dict:
    """Tiles from the H100 sweep (.whl probe, 2026-11-26): 32 rows a program from 8192 rows, else 16; the
    shrink's factor tile (BLOCK_C x BLOCK_R) kept to 16K elements."""
    block_r = rank_block(rank)
    if rows >= 8192:
        cfg = {"BLOCK_M": 32, "BLOCK_C": 128, "STAGES": 1, "num_warps": 8}
    else:
        cfg = {"BLOCK_M": 16, "BLOCK_C": 256, "STAGES": 3, "num_warps": 4}
    cfg["BLOCK_C"] = min(cfg["BLOCK_C"], max(32, 16384 // block_r))
    cfg["BLOCK_R"] = block_r
    return cfg


def norm_shrink(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, down: torch.Tensor,
                scales: torch.Tensor, n_uncond: int, out: torch.Tensor) -> Callable[..., None] | None:
    """Fill `out` (rows, C + tail), rows of h flattened: LN(h) in the first C columns, then the shrink
    (scales * LN(h) down^T, `down` (R, C) contiguous, `scales` (R,) fp32) on the first n_uncond rows and
    zeros everywhere else. Returns a direct launcher for later calls of this shape (see NormShrinkLaunch)."""
    c = h.shape[-1]
    rows = h.numel() // c
    tail = out.shape[-1] - c
    cfg = _config(rows, down.shape[0])
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]),)
    compiled = _norm_shrink_kernel[grid](h, gamma, beta, down, scales, out, rows, c, down.shape[0], tail, n_uncond,
                                         float(eps), c, out.shape[-1],
                                         DOT_PRECISION=_dot_precision(h.dtype), UPCAST=INTERPRETED and h.dtype == torch.bfloat16,
                                         **cfg)
    return _direct_launcher(compiled, grid[0])


class NormShrinkLaunch:
    """norm_shrink bound to one input shape of one norm. Later calls start the compiled kernel directly (eager
    sampling is host-bound), with pointers as integers; without a direct launcher (the CPU interpreter, another
    Triton), with unaligned tensors or under a launch-hooking profiler they take the general entry."""

    def __init__(self, h: torch.Tensor, out_width: int, rank: int, n_uncond: int, eps: float,
                 direct: Callable[..., None] | None):
        c = h.shape[-1]
        self._out_shape = (*h.shape[:-1], out_width)
        self._sizes = (h.numel() // c, c)
        self._n_uncond, self._eps = n_uncond, float(eps)
        cfg = _config(self._sizes[0], rank)
        # The kernel's compile-time parameters, in declaration order.
        self._constexprs = (cfg["BLOCK_M"], cfg["BLOCK_C"], cfg["BLOCK_R"], cfg["STAGES"],
                            _dot_precision(h.dtype), INTERPRETED and h.dtype == torch.bfloat16)
        self._direct = direct

    def __call__(self, h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, down: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
        out = h.new_empty(self._out_shape)
        pointers = (h.data_ptr(), gamma.data_ptr(), beta.data_ptr(), down.data_ptr(), scales.data_ptr(), out.data_ptr())
        if self._direct is None or (pointers[0] | pointers[1] | pointers[2] | pointers[3] | pointers[4]) % 16 or _launch_hooks():
            norm_shrink(h, gamma, beta, self._eps, down, scales, self._n_uncond, out)
            return out
        rows, c = self._sizes
        width = self._out_shape[-1]
        self._direct(_current_stream(), *pointers, rows, c, down.shape[0], width - c, self._n_uncond, self._eps, c,
                     width, *self._constexprs)
        return out
