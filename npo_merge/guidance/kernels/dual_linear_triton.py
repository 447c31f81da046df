"""Triton kernel for the dual-branch linear: y = x W^T + b, plus scale * (x A^T) B^T on uncond rows.

One launch, one read of x and W, one write of y. Program tiles whose rows include uncond rows run a
main loop that also accumulates the shrink s = x A^T (rank padded to a power of two >= 16) next to
the base product, and add the expand s B^T in the epilogue before the single store; tiles of cond
rows only run the plain loop. A tile that straddles the uncond/cond boundary masks s by row.

Recomputing the shrink in every column tile costs rank/BLOCK_N of extra matrix work on uncond
tiles: free while the layer is memory-bound, not for large ranks on compute-bound shapes. There
the ``"separate"`` shrink mode takes s from one small cuBLAS product first and keeps only the
expand fused (one extra read of the uncond rows). ``"auto"`` picks between them per shape.

Measured on an H100 (triton 3.6, CUDA graphs, benchmarks/kernel_bench.py): the kernel's own GEMM
runs at 0.9-1.15x cuBLAS time for SD1.5's 320-channel attention and for text-token rows, 1.3-2.2x
for larger layers. So it serves both branches at ~1.0x a plain layer for SD1.5 320-channel
attention and at 1.3-1.6x for the other small (< 4 GFLOP) layers, where the torch paths cost
1.7-2.6x; on large feed-forward layers the torch paths win (see the report in the benchmark).

Importing this module imports triton; set TRITON_INTERPRET=1 before that to run on the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "rank_block", "pick_config", "pick_shrink_mode", "dual_branch_linear_triton"]

ShrinkMode = Literal["auto", "fused", "separate"]


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST only under the CPU interpreter, whose tl.dot multiplies bf16 bit patterns as integers.
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _plain_loop(x_ptrs, w_ptrs, offs_k, K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _shrink_loop(x_ptrs, w_ptrs, d_ptrs, offs_k, offs_r, K, R,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    rank_ok = offs_r[None, :] < R
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
            d = tl.load(d_ptrs, mask=rank_ok, other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            d = tl.load(d_ptrs, mask=(offs_k[:, None] < k_left) & rank_ok, other=0.0)
        acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
        s = _mma(a, d, s, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        d_ptrs += BLOCK_K
    return acc, s


@triton.jit
def _expand(acc, s, up_ptr, offs_m, offs_r, cols, R, n_uncond, scale,
            DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc += scale * s B^T on uncond rows: cond rows of a straddling tile get nothing, and padded
    # rank columns of s meet zero rows of the up tile.
    s = tl.where(offs_m[:, None] < n_uncond, s * scale, 0.0)
    up_t = tl.load(up_ptr + offs_r[:, None] + cols[None, :] * R, mask=offs_r[:, None] < R, other=0.0)
    return _mma(s.to(up_t.dtype), up_t, acc, DOT_PRECISION, UPCAST)


@triton.jit
def _fused_tile(x_ptrs, w_ptrs, down_ptr, up_ptr, offs_m, offs_k, offs_r, cols, K, R, n_uncond, scale, has_uncond,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A tile's x W^T, with the shrink in the main loop and the expand added where the tile has uncond rows."""
    if has_uncond:
        d_ptrs = down_ptr + offs_k[:, None] + offs_r[None, :] * K
        acc, s = _shrink_loop(x_ptrs, w_ptrs, d_ptrs, offs_k, offs_r, K, R,
                              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, EVEN_K, DOT_PRECISION, UPCAST)
        acc = _expand(acc, s, up_ptr, offs_m, offs_r, cols, R, n_uncond, scale, DOT_PRECISION, UPCAST)
    else:
        acc = _plain_loop(x_ptrs, w_ptrs, offs_k, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _tile_position(pid, M, num_pid_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles sweep the columns
    together, so their rows of x stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % pids_per_group) % group_rows, (pid % pids_per_group) // group_rows


@triton.jit(do_not_specialize=["n_uncond"])
def _dual_linear_kernel(
    x_ptr, w_ptr, bias_ptr, down_ptr, up_ptr, s_ptr, out_ptr,
    M, N, K, R, n_uncond, scale, stride_xm, stride_wn,
    HAS_BIAS: tl.constexpr, FUSED_SHRINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Rows of x and W are strided (views are fine); their last dim, down, up, s and out are contiguous.
    pid_m, pid_n = _tile_position(tl.program_id(0), M, tl.cdiv(N, BLOCK_N), BLOCK_M, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m % M  # wrapped for unmasked loads; the store is masked
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] + cols[None, :] * stride_wn  # a (BLOCK_K, BLOCK_N) tile of W^T

    # Each main loop appears once per compiled variant: loops in both arms of a branch would each
    # get their own pipeline buffers in shared memory.
    has_uncond = pid_m * BLOCK_M < n_uncond
    if FUSED_SHRINK:
        acc = _fused_tile(x_ptrs, w_ptrs, down_ptr, up_ptr, offs_m, offs_k, offs_r, cols, K, R, n_uncond, scale,
                          has_uncond, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, EVEN_K, DOT_PRECISION, UPCAST)
    else:
        acc = _plain_loop(x_ptrs, w_ptrs, offs_k, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION, UPCAST)
        if has_uncond:
            s_ptrs = s_ptr + offs_m[:, None] * R + offs_r[None, :]
            s = tl.load(s_ptrs, mask=(offs_m[:, None] < n_uncond) & (offs_r[None, :] < R), other=0.0)
            acc = _expand(acc, s.to(tl.float32), up_ptr, offs_m, offs_r, cols, R, n_uncond, scale,
                          DOT_PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# True when TRITON_INTERPRET=1 was set before this module was imported (CPU tests).
INTERPRETED = not isinstance(_dual_linear_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one compiled variant of the kernel."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def rank_block(rank: int) -> int:
    """Rank padded to what tl.dot accepts: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


def pick_config(m: int, n: int, k: int, rank: int, element_size: int = 2) -> KernelConfig:
    """Hand-picked tiles per size class, from the H100 sweep in benchmarks/kernel_bench.py.

    No autotuning: it times candidates with host syncs, which cannot happen under graph capture.
    """
    block_r = rank_block(rank)
    if m <= 256:  # text-token rows (cross-attention k/v), time embeddings: many narrow column tiles
        block_m, block_n, block_k, warps = 64, 32, 128, 4
    elif n >= 2048 and block_r <= 32:  # GEGLU projections: wide tiles, shrink recomputed fewer times
        block_m, block_n, block_k, warps = 128, 256, 64, 8
    elif n <= 320 and k <= 640:  # SD1.5 320-channel attention
        block_m, block_n, block_k, warps = 128, 64, 64, 4
    else:
        block_m, block_n, block_k, warps = 64, 128, 64, 4
    # Shared memory per pipeline stage: the x, W and (fused) down tiles. Three stages measured
    # faster than four; fewer where the tiles are large.
    stage_bytes = element_size * block_k * (block_m + block_n + block_r)
    num_stages = max(2, min(3, (200 * 1024) // stage_bytes))
    return KernelConfig(block_m, block_n, block_k, 8, warps, num_stages)


# Roofline constants for the shrink-mode choice (H100 SXM; calibrated by benchmarks/kernel_bench.py).
# Fitted to the fused/separate timings of the SD1.5/SDXL shapes at ranks 8 and 64 with the tiles
# above (H100, CUDA graphs): 29 of 34 picks right, 4.3 us lost over those 34 layer calls.
_MATRIX_FLOPS = 3.0e14  # rate at which the recomputed shrink costs time in the main loop
_BANDWIDTH = 2.9e12  # bytes/s, a device-to-device copy measured 2.97e12
_LAUNCH_S = 3.0e-6  # the separate shrink's extra cuBLAS launch under CUDA graphs


def pick_shrink_mode(m: int, n: int, k: int, rank: int, n_uncond: int, config: KernelConfig) -> str:
    """Fuse the shrink into the main loop unless recomputing it per column tile costs more than a pass.

    The fused shrink repeats n_uncond * k * block_r multiply-adds in each of the cdiv(n, block_n)
    column tiles; that is free while the layer is memory-bound. The separate shrink does that work
    once but reads the uncond rows again and adds a launch. A two-term roofline picks the cheaper.
    """
    if n_uncond == 0:
        return "fused"
    block_r = rank_block(rank)
    bytes_moved = 2 * (m * k + n * k + m * n)
    base_flops = 2 * m * n * k + 2 * n_uncond * block_r * n
    fused_flops = base_flops + 2 * n_uncond * k * block_r * triton.cdiv(n, config.block_n)
    separate_flops = base_flops + 2 * n_uncond * k * rank
    fused_s = max(bytes_moved / _BANDWIDTH, fused_flops / _MATRIX_FLOPS)
    separate_s = max((bytes_moved + 2 * n_uncond * k) / _BANDWIDTH, separate_flops / _MATRIX_FLOPS) + _LAUNCH_S
    return "fused" if fused_s <= separate_s else "separate"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's tf32 switch; 16-bit inputs always use the tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class _Variant:
    """One layer shape's launch: grid, compile-time arguments and the compiled kernels it has used.

    Eager sampling is host-bound, so after the first launch of a specialization the compiled kernel is
    called directly, without JITFunction.run's per-call argument binding and cache lookup. The key is
    what Triton specializes on beyond the shape fixed here: the row strides (pointers must be 16-byte
    aligned, as PyTorch allocates them; other calls take the JIT path every time).
    """

    def __init__(self, grid: tuple[int], fused: bool, constants: dict):
        self.grid = grid
        self.fused = fused
        self.constants = constants
        self.constexprs = tuple(constants[name] for name in _CONSTEXPR_PARAMS)
        self.direct: dict[tuple[int, int], Callable[..., None]] = {}

    def launch(self, args: tuple) -> None:
        """_dual_linear_kernel[grid](*args, **constants); args are the kernel's runtime parameters in order."""
        aligned = _aligned(*args[:7])
        direct = self.direct.get((args[13], args[14])) if aligned else None
        if direct is not None and not _launch_hooks():
            direct(_current_stream(), *args, *self.constexprs)
            return
        compiled = _dual_linear_kernel[self.grid](*args, **self.constants)
        if aligned and _DIRECT_LAUNCH:
            direct = _direct_launcher(compiled, self.grid[0])
            if direct is not None:
                self.direct[(args[13], args[14])] = direct


# The kernel's compile-time parameters in declaration order (they follow the runtime ones).
_CONSTEXPR_PARAMS = ("HAS_BIAS", "FUSED_SHRINK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_M", "EVEN_K",
                     "DOT_PRECISION", "UPCAST")
# Direct launches use Triton internals (the compiled kernel's launcher and its argument list, as of
# triton 3.6); the GPU tests and benchmarks/eager_overhead.py compare them with kernel[grid] launches.
_DIRECT_LAUNCH = True


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's data pointer is 16-byte aligned (one OR over the pointers: a hot path)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits % 16 == 0


def _direct_launcher(compiled: object, grid: int | tuple[int, int]) -> Callable[..., None] | None:
    """launch(stream, *kernel_args) for a compiled kernel with no Python between the caller and the driver,
    or None where this Triton's compiled kernels do not look as expected (then kernel[grid] it stays).
    `grid`: the number of programs, or (programs along axis 0, along axis 1)."""
    run = getattr(compiled, "run", None)  # the launcher; absent under the interpreter
    function, metadata = getattr(compiled, "function", None), getattr(compiled, "packed_metadata", None)
    if run is None or function is None or metadata is None:
        return None
    gx, gy = (grid, 1) if isinstance(grid, int) else grid
    launch = getattr(run, "launch", None)
    if launch is None or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return lambda stream, *args: run(gx, gy, 1, stream, function, metadata, None, None, None, *args)
    cooperative, pdl = run.launch_cooperative_grid, run.launch_pdl
    return lambda stream, *args: launch(gx, gy, 1, stream, function, cooperative, pdl, None, None, metadata,
                                        None, None, None, *args)


def _launch_hooks() -> bool:
    """Whether a profiler (e.g. proton) hooks kernel launches: then every launch goes through Triton."""
    runtime = triton.knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True)))


def _current_stream() -> int:
    """The current CUDA stream of the current device: what JITFunction.run gets from Triton's driver (torch's
    raw stream of torch's current device), asked of torch directly to save the driver's Python layers."""
    return torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())


class BoundLaunch:
    """The fused kernel bound to one call shape of one layer, for eager inference.

    A call allocates the output and starts the compiled kernel: no op dispatch, no shape checks, no
    cache lookups, which is most of a layer's host time otherwise. Only what may change between calls
    of one shape is checked (contiguity and alignment of the tensors); a call that fails it, or a
    profiler hooking launches, goes to `fallback` (the general entry, same arguments plus n_uncond).
    """

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, n_uncond: int,
                 variant: _Variant, direct: Callable[..., None], fallback: Callable[..., torch.Tensor]):
        out_features, in_features = weight.shape
        self._out_shape = (*x.shape[:-1], out_features)
        self._sizes = (x.numel() // in_features, out_features, in_features, down.shape[0], n_uncond)
        self._strides = (in_features, weight.stride(0))  # x's rows, W's rows (a view of a wider matrix's)
        self._constexprs = variant.constexprs
        self._direct = direct
        self._fallback = fallback

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                 up: torch.Tensor, scale: float) -> torch.Tensor:
        # Pointers as integers: the launcher takes them as they are (for a tensor it calls data_ptr() and
        # asks the driver about the pointer), and they are needed for the alignment check anyway.
        xp, wp, dp, up_p = x.data_ptr(), weight.data_ptr(), down.data_ptr(), up.data_ptr()
        bp = wp if bias is None else bias.data_ptr()  # without a bias the kernel never reads the pointer
        if (xp | wp | bp | dp | up_p) % 16 or not x.is_contiguous() or _launch_hooks():
            return self._fallback(x, weight, bias, down, up, scale, self._sizes[4])
        out = x.new_empty(self._out_shape)
        op = out.data_ptr()
        m, n, k, rank, n_uncond = self._sizes
        self._direct(_current_stream(), xp, wp, bp, dp, up_p, op, op, m, n, k, rank, n_uncond, scale,
                     *self._strides, *self._constexprs)
        return out


def bind_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, n_uncond: int, fallback: Callable[..., torch.Tensor]) -> BoundLaunch | None:
    """A BoundLaunch for this call shape once the kernel ran for it, else None (not launched yet, strided
    or unaligned tensors, a separate-shrink variant, or no direct launch on this Triton). The weight's rows
    may be strided (the bound launch keeps that stride: the layer's routes are rebound when it changes)."""
    out_features, in_features = weight.shape
    if (not all(t.is_contiguous() for t in (x, down, up)) or weight.stride(1) != 1
            or (bias is not None and not bias.is_contiguous())):
        return None
    variant = _launch_plan(x.numel() // in_features, out_features, in_features, down.shape[0], x.dtype,
                           bias is not None, n_uncond, "auto", None, _dot_precision(x.dtype))
    direct = variant.direct.get((in_features, weight.stride(0)))
    if direct is None or not variant.fused:
        return None
    return BoundLaunch(x, weight, down, n_uncond, variant, direct, fallback)


@functools.lru_cache(maxsize=4096)
def _launch_plan(m: int, n: int, k: int, rank: int, dtype: torch.dtype, has_bias: bool, n_uncond: int,
                 shrink: str, config: KernelConfig | None, dot_precision: str) -> _Variant:
    """Grid, shrink mode and compile-time arguments for one layer shape (cached: eager calls are launch-bound)."""
    cfg = config or pick_config(m, n, k, rank, dtype.itemsize)
    mode = pick_shrink_mode(m, n, k, rank, n_uncond, cfg) if shrink == "auto" else shrink
    if mode not in ("fused", "separate"):
        raise ValueError(f"shrink must be 'auto', 'fused' or 'separate', got {shrink!r}")
    constants = dict(
        HAS_BIAS=has_bias, FUSED_SHRINK=mode == "fused",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=rank_block(rank),
        GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0, DOT_PRECISION=dot_precision,
        UPCAST=INTERPRETED and dtype == torch.bfloat16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _Variant((triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),), mode == "fused", constants)


def dual_branch_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
    *,
    shrink: ShrinkMode = "auto",
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the dual-branch kernel (arguments as the custom op; shapes are checked by the caller).

    No host sync and output of a fixed size, so it can be captured in a CUDA graph once compiled:
    run it once before capture. ``shrink`` and ``config`` override the per-shape choice (benchmarks);
    ``out``, a contiguous (rows, out_features) tensor of x's dtype, receives the result (tests poison it).
    Rows of x and of the weight may be strided views; other layouts are made contiguous first.
    """
    out_features, in_features = weight.shape
    rank = down.shape[0]
    # A contiguous x is passed as it is (its rows are rows of the 2-D view): no reshape on the hot path.
    rows = x if x.is_contiguous() else x.reshape(-1, in_features)
    m = x.numel() // in_features if in_features else 0
    if out is None:
        out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    elif out.shape != (m, out_features) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape ({m}, {out_features})")
    if m == 0 or out_features == 0:
        return out.reshape(*x.shape[:-1], out_features)
    row_stride = in_features if rows is x else rows.stride(0)
    if rows is not x and rows.stride(1) != 1:
        rows = rows.contiguous()
        row_stride = rows.stride(0)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if not (down.is_contiguous() and up.is_contiguous()):
        down, up = down.contiguous(), up.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    variant = _launch_plan(m, out_features, in_features, rank, x.dtype, bias is not None,
                           n_uncond, shrink, config, _dot_precision(x.dtype))
    # `out` stands in for pointers the variant never reads (no bias; the shrink when it is fused).
    shrunk = out
    if not variant.fused and n_uncond > 0:
        shrunk = rows.reshape(-1, in_features)[:n_uncond] @ down.t()
    variant.launch((rows, weight, bias if bias is not None else out, down, up, shrunk, out,
                    m, out_features, in_features, rank, n_uncond, float(scale), row_stride, weight.stride(0)))
    return out if out.dim() == x.dim() else out.reshape(*x.shape[:-1], out_features)
