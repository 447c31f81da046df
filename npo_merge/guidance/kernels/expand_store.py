"""Triton stores that apply a joint layer's expand inside an elementwise pass the model runs on its output anyway.

With a dual-branch layer's weight stored as [W; down] (`joint_linear`, `joint_conv2d`), one cuBLAS GEMM or cuDNN
convolution yields the output and the shrink t as its last columns (channels). diffusers passes that read it:
- the attention processor's `to_out(x) / rescale_output_factor`: out = (y + s t up^T on uncond rows) / factor;
- a transformer block's `ff(h) + h` after the feed-forward's output projection: out = y + s t up^T + h;
- GEGLU's `a * gelu(g)` over the halves of its projection (`gated`): the expand goes into both halves first;
- a ResnetBlock2D's `conv1(h) + temb` and `(shortcut + conv2(h)) / output_scale_factor` (`channel_store`).
Each kernel does the expand as a tl.dot per output tile, so the update costs no pass of its own. y may be
strided (the joint buffer is wider than the output); `out` is contiguous.
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

__all__ = ["ChannelStoreLaunch", "ExpandStoreLaunch", "channel_store", "expand_store"]


@triton.jit(do_not_specialize=["n_uncond", "scale", "factor"])
def _expand_store_kernel(y_ptr, up_ptr, add_ptr, out_ptr, M, N, R, n_uncond, scale, factor, stride_y, stride_add,
                         GATED: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
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
        if HAS_ADD:
            y += tl.load(add_ptr + rows[:, None] * stride_add + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        out = y / factor
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


def _config(rank: int) -> dict:
    """64 x 64 tiles, 4 warps: the fastest or within 0.4 us of it for every SD1.5/SDXL shape swept on the H100
    (benchmarks/store_sweep.py, results/store_sweep_h100.json); 64 x 256 tiles ran the gated store 2.3x slower."""
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": rank_block(rank), "num_warps": 4}


def expand_store(y: torch.Tensor, up: torch.Tensor, add: torch.Tensor | None, scale: float, n_uncond: int,
                 factor: float, gated: bool, out: torch.Tensor) -> Callable[..., None] | None:
    """Fill `out` (rows, N) contiguous from y (rows, W) with unit column stride, summed in fp32 and rounded once:
    - gated=False: y = [y | t], `up` (N, R): (y + scale * t up^T on the first n_uncond rows + add) / factor,
      `add` (rows, N) with unit column stride (a residual) or None;
    - gated=True: y = [a | g | t], `up` (2N, R) = [up_a; up_g]: a' * gelu(g'), where a' and g' are a and g plus
      their halves of the update on the first n_uncond rows (`factor` unused).
    `up` contiguous. Returns a direct launcher for later calls of this shape (see ExpandStoreLaunch)."""
    rows, n = out.shape
    rank = up.shape[1]
    cfg = _config(rank)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    compiled = _expand_store_kernel[grid](y, up, y if add is None else add, out, rows, n, rank, n_uncond, float(scale),
                                          float(factor), y.stride(0), 0 if add is None else add.stride(0),
                                          GATED=gated, HAS_ADD=add is not None, DOT_PRECISION=_dot_precision(y.dtype),
                                          UPCAST=INTERPRETED and y.dtype == torch.bfloat16, **cfg)
    return _direct_launcher(compiled, grid)


class ExpandStoreLaunch:
    """expand_store bound to one call shape of one layer. Later calls start the compiled kernel directly (eager
    sampling is host-bound); without a direct launcher (the CPU interpreter, another Triton), with unaligned
    tensors or under a launch-hooking profiler they take the general entry."""

    def __init__(self, y: torch.Tensor, up: torch.Tensor, add: torch.Tensor | None, n_out: int, n_uncond: int,
                 gated: bool, direct: Callable[..., None] | None):
        self._shape = (y.shape[0], n_out)
        self._rank, self._strides = up.shape[1], _row_strides(y, add)
        self._n_uncond, self._gated = n_uncond, gated
        cfg = _config(self._rank)
        # The kernel's compile-time parameters, in declaration order.
        self._constexprs = (gated, add is not None, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"], _dot_precision(y.dtype),
                            INTERPRETED and y.dtype == torch.bfloat16)
        self._direct = direct

    def __call__(self, y: torch.Tensor, up: torch.Tensor, add: torch.Tensor | None, scale: float,
                 factor: float = 1.0) -> torch.Tensor:
        """The (rows, N) output for y (and add) laid out as at binding."""
        out = y.new_empty(self._shape)
        pointers = (y.data_ptr(), up.data_ptr(), y.data_ptr() if add is None else add.data_ptr(), out.data_ptr())
        strides = _row_strides(y, add)
        if (self._direct is None or (pointers[0] | pointers[1] | pointers[2]) % 16 or strides != self._strides
                or _launch_hooks()):
            expand_store(y, up, add, scale, self._n_uncond, factor, self._gated, out)
            return out
        self._direct(_current_stream(), *pointers, *self._shape, self._rank, self._n_uncond, float(scale),
                     float(factor), *strides, *self._constexprs)
        return out


def _row_strides(y: torch.Tensor, add: torch.Tensor | None) -> tuple[int, int]:
    return y.stride(0), 0 if add is None else add.stride(0)


@triton.jit(do_not_specialize=["n_uncond", "scale", "factor"])
def _channel_store_kernel(y_ptr, up_ptr, add_ptr, out_ptr, C, P, R, n_uncond, scale, factor,
                          stride_ys, stride_as, stride_ac, stride_ap,
                          HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    c_tiles = tl.cdiv(C, BLOCK_C)
    sample = tl.program_id(0) // c_tiles
    chans = (tl.program_id(0) % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixels = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = (chans[:, None] < C) & (pixels[None, :] < P)
    y_sample = y_ptr + sample * stride_ys
    y = tl.load(y_sample + chans[:, None] * P + pixels[None, :], mask=ok, other=0.0).to(tl.float32)
    if sample < n_uncond:
        ranks = tl.arange(0, BLOCK_R)
        up = tl.load(up_ptr + chans[:, None] * R + ranks[None, :], mask=(chans[:, None] < C) & (ranks[None, :] < R),
                     other=0.0)
        t = tl.load(y_sample + (C + ranks[:, None]) * P + pixels[None, :], mask=(ranks[:, None] < R) & (pixels[None, :] < P),
                    other=0.0)
        y += scale * _mma(up, t, tl.zeros((BLOCK_C, BLOCK_P), tl.float32), DOT_PRECISION, UPCAST)
    if HAS_ADD:
        y += tl.load(add_ptr + sample * stride_as + chans[:, None] * stride_ac + pixels[None, :] * stride_ap, mask=ok,
                     other=0.0).to(tl.float32)
    tl.store(out_ptr + sample * C * P + chans[:, None] * P + pixels[None, :], (y / factor).to(out_ptr.dtype.element_ty),
             mask=ok)


_CHANNEL_CONFIG = {"BLOCK_C": 64, "BLOCK_P": 64, "num_warps": 4}  # as _config (the same sweep)


def add_strides(add: torch.Tensor | None, out_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(sample, channel, pixel) strides of `add` broadcast to the NCHW output, or None where its pixels are neither
    contiguous nor broadcast (e.g. channels-last): the channel store does not serve those."""
    if add is None:
        return 0, 0, 0
    full = add.expand(out_shape)
    _, _, h_stride, w_stride = full.stride()
    if (h_stride, w_stride) == (0, 0):
        return full.stride(0), full.stride(1), 0
    if w_stride == 1 and h_stride == out_shape[3]:
        return full.stride(0), full.stride(1), 1
    return None


def channel_store(y: torch.Tensor, up: torch.Tensor, add: torch.Tensor | None, scale: float, n_uncond: int,
                  factor: float, out: torch.Tensor) -> Callable[..., None] | None:
    """Fill `out` (N, C, H, W) contiguous from a joint convolution's output y (N, C + R, H, W) contiguous, summed in
    fp32 and rounded once: (y[:, :C] + scale * up @ y[:, C:] on the first n_uncond samples + add) / factor, `add`
    broadcast to out's shape (a time embedding (N, C, 1, 1), a residual (N, C, H, W)) or None. `up` (C, R)
    contiguous. Returns a direct launcher for later calls of this shape (see ChannelStoreLaunch)."""
    batch, c, h, w = out.shape
    rank = up.shape[1]
    strides = add_strides(add, out.shape)
    grid = (batch * triton.cdiv(c, _CHANNEL_CONFIG["BLOCK_C"]), triton.cdiv(h * w, _CHANNEL_CONFIG["BLOCK_P"]))
    compiled = _channel_store_kernel[grid](y, up, y if add is None else add, out, c, h * w, rank, n_uncond, float(scale),
                                           float(factor), y.stride(0), *strides, HAS_ADD=add is not None,
                                           BLOCK_R=rank_block(rank), DOT_PRECISION=_dot_precision(y.dtype),
                                           UPCAST=INTERPRETED and y.dtype == torch.bfloat16, **_CHANNEL_CONFIG)
    return _direct_launcher(compiled, grid)


class ChannelStoreLaunch:
    """channel_store bound to one call shape of one layer (see ExpandStoreLaunch)."""

    def __init__(self, y: torch.Tensor, up: torch.Tensor, add: torch.Tensor | None, n_uncond: int,
                 direct: Callable[..., None] | None):
        batch, width, h, w = y.shape
        self._shape = (batch, up.shape[0], h, w)
        self._rank, self._n_uncond = up.shape[1], n_uncond
        self._layout = (y.stride(0), add_strides(add, self._shape))
        self._constexprs = (add is not None, _CHANNEL_CONFIG["BLOCK_C"], _CHANNEL_CONFIG["BLOCK_P"], rank_block(self._rank),
                            _dot_precision(y.dtype), INTERPRETED and y.dtype == torch.bfloat16)
        self._direct = direct

    def __call__(self, y: torch.Tensor, up: torch.Tensor, add: torch.Tensor | None, scale: float,
                 factor: float) -> torch.Tensor:
        out = y.new_empty(self._shape)
        pointers = (y.data_ptr(), up.data_ptr(), y.data_ptr() if add is None else add.data_ptr(), out.data_ptr())
        layout = (y.stride(0), add_strides(add, self._shape))
        if (self._direct is None or (pointers[0] | pointers[1] | pointers[2]) % 16 or layout != self._layout
                or _launch_hooks()):
            channel_store(y, up, add, scale, self._n_uncond, factor, out)
            return out
        batch, c, h, w = self._shape
        self._direct(_current_stream(), *pointers, c, h * w, self._rank, self._n_uncond, float(scale), float(factor),
                     layout[0], *layout[1], *self._constexprs)
        return out
