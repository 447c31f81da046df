"""The dual-branch linear kernel for Hopper GPUs: x, W and the down factor arrive by TMA.

Same arithmetic as ``dual_linear_triton`` (base GEMM on every row; the shrink s = x A^T accumulated
next to it on uncond tiles, or taken from a cuBLAS product in "separate" mode; s B^T added before the
single store), but the tiles of x, W and A are copied into shared memory by the tensor memory
accelerator from host-built descriptors, which feeds wgmma at the rate cuBLAS gets: the pointer-load
kernel's GEMM measured 1.3-2.2x cuBLAS on layers above 320 channels. The descriptors also zero-fill
out-of-bounds tiles, so the main loop has no masks and the store is clipped to the output.

TMA wants 16-byte aligned bases and row strides (K and N multiples of 8 in 16-bit types);
`supports` says whether a call qualifies.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from npo_merge.guidance.kernels.dual_linear_triton import KernelConfig, _expand, _mma, rank_block

__all__ = ["hopper", "supports", "pick_tma_config", "launch_tma"]


@triton.jit
def _tma_plain_loop(x_desc, w_desc, off_m, off_n, K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k * BLOCK_K])
        b = w_desc.load([off_n, k * BLOCK_K])
        acc = _mma(a, b.T, acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _tma_shrink_loop(x_desc, w_desc, d_desc, off_m, off_n, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k * BLOCK_K])
        b = w_desc.load([off_n, k * BLOCK_K])
        d = d_desc.load([0, k * BLOCK_K])  # rows past the rank are zero-filled
        acc = _mma(a, b.T, acc, DOT_PRECISION, UPCAST)
        s = _mma(a, d.T, s, DOT_PRECISION, UPCAST)
    return acc, s


@triton.jit(do_not_specialize=["n_uncond"])
def _dual_linear_tma_kernel(
    x_desc, w_desc, d_desc, out_desc, bias_ptr, up_ptr, s_ptr,
    M, N, K, R, n_uncond, scale,
    HAS_BIAS: tl.constexpr, FUSED_SHRINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grouped tile order, as in the pointer kernel: GROUP_M row tiles sweep the columns together.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    cols = (off_n + tl.arange(0, BLOCK_N)) % N  # wrapped for the unmasked bias and up loads

    has_uncond = off_m < n_uncond
    if FUSED_SHRINK:
        if has_uncond:
            acc, s = _tma_shrink_loop(x_desc, w_desc, d_desc, off_m, off_n, K,
                                      BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, DOT_PRECISION, UPCAST)
            acc = _expand(acc, s, up_ptr, offs_m, offs_r, cols, R, n_uncond, scale, DOT_PRECISION, UPCAST)
        else:
            acc = _tma_plain_loop(x_desc, w_desc, off_m, off_n, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST)
    else:
        acc = _tma_plain_loop(x_desc, w_desc, off_m, off_n, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST)
        if has_uncond:
            s_ptrs = s_ptr + offs_m[:, None] * R + offs_r[None, :]
            s = tl.load(s_ptrs, mask=(offs_m[:, None] < n_uncond) & (offs_r[None, :] < R), other=0.0)
            acc = _expand(acc, s.to(tl.float32), up_ptr, offs_m, offs_r, cols, R, n_uncond, scale,
                          DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@functools.lru_cache(maxsize=16)
def hopper(device_index: int) -> bool:
    """Whether the CUDA device has TMA (compute capability 9.0 or later)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def supports(rows: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether TMA descriptors can describe these tensors: 16-byte aligned bases and row strides."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in (rows, weight, down, out))


def pick_tma_config(m: int, n: int, k: int, rank: int) -> KernelConfig:
    """Tiles per size class for the TMA kernel (H100 sweep, benchmarks/kernel_bench.py --sweep-tma)."""
    if m <= 256:
        return KernelConfig(64, 64, 128, 8, 4, 3)
    if n <= 320:
        return KernelConfig(128, 64, 64, 8, 4, 4)
    return KernelConfig(128, 128, 64, 8, 8, 3)


def launch_tma(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
               up: torch.Tensor, shrunk: torch.Tensor | None, out: torch.Tensor, scale: float, n_uncond: int,
               config: KernelConfig, dot_precision: str, upcast: bool) -> None:
    """Start the TMA kernel on 2-D views: out (m, n) = rows (m, k) W^T + b, + the update on uncond rows.

    ``shrunk`` is the separate shrink (n_uncond, rank) from the caller, or None to fuse it.
    """
    m, k = rows.shape
    n, rank = up.shape
    block_r = rank_block(rank)
    cfg = config
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _dual_linear_tma_kernel[grid](
        TensorDescriptor.from_tensor(rows, [cfg.block_m, cfg.block_k]),
        TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k]),
        TensorDescriptor.from_tensor(down, [block_r, cfg.block_k]),
        TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n]),
        out if bias is None else bias, up, out if shrunk is None else shrunk,
        m, n, k, rank, n_uncond, float(scale),
        HAS_BIAS=bias is not None, FUSED_SHRINK=shrunk is None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
        DOT_PRECISION=dot_precision, UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
