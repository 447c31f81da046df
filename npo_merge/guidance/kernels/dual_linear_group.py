"""One launch for dual-branch layers that read the same input: attention's q/k/v, or every cross-attention's k/v.

Each member is y_i = x W_i^T + b_i, plus scale_i * (x A_i^T) B_i^T on the uncond rows, with its own
weights, factors and output; x is shared. The grid covers the column tiles of every member, so one
launch does the work of two or three, with the tiles of ``dual_linear_triton`` (fused shrink on
uncond tiles). Small layers gain most: three 640-channel projections fill the GPU better together
than one by one, and two launches fewer cost less host time in eager mode.

Up to three members take pointer arguments (`GroupLaunch`); more take their addresses from a device
table (`TableLaunch`). Members must agree on shape, rank and dtype. Their weights may be row-strided views
with one row stride (a `WideGroup` keeps them as rows of a wider matrix); every other tensor is contiguous.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from npo_merge.guidance.kernels import dual_linear_triton
from npo_merge.guidance.kernels.dual_linear_triton import (
    INTERPRETED,
    KernelConfig,
    _aligned,
    _current_stream,
    _direct_launcher,
    _dot_precision,
    _fused_tile,
    _launch_hooks,
    _tile_position,
    rank_block,
)

__all__ = ["MAX_MEMBERS", "GroupLaunch", "TableLaunch", "launch_group", "pick_group_config"]

MAX_MEMBERS = 3


@triton.jit
def _pick(section, first, second, third):
    chosen = first
    if section == 1:
        chosen = second
    if section == 2:
        chosen = third
    return chosen


@triton.jit
def _member_position(members, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, member, column tile) of this program. Grouped tile order over all members' column tiles:
    GROUP_M row tiles of x stay in L2 while the members' columns sweep past them."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_all_n = _tile_position(tl.program_id(0), M, members * tiles_n, BLOCK_M, GROUP_M)
    member = pid_all_n // tiles_n
    return pid_m, member, pid_all_n - member * tiles_n


@triton.jit(do_not_specialize=["n_uncond"])
def _dual_linear_group_kernel(
    x_ptr, w0, w1, w2, b0, b1, b2, d0, d1, d2, u0, u1, u2, o0, o1, o2,
    M, N, K, R, n_uncond, scale0, scale1, scale2, stride_xm, stride_wn,
    MEMBERS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, member, pid_n = _member_position(MEMBERS, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _member_tile(x_ptr, _pick(member, w0, w1, w2), _pick(member, b0, b1, b2), _pick(member, d0, d1, d2),
                 _pick(member, u0, u1, u2), _pick(member, o0, o1, o2), _pick(member, scale0, scale1, scale2),
                 pid_m, pid_n, M, N, K, R, n_uncond, stride_xm, stride_wn, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K,
                 BLOCK_R, EVEN_K, DOT_PRECISION, UPCAST)


@triton.jit(do_not_specialize=["n_uncond"])
def _dual_linear_table_kernel(
    x_ptr, w_ptr, down_ptr, up_ptr, bias_ptr, table_ptr, scales_ptr, out_ptr,
    M, N, K, R, n_uncond, members, stride_xm, stride_wn,
    HAS_BIAS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Any number of members. Their weight, down, up and bias lie at element offsets (rows of an int64 table,
    # members apart; multiples of ALIGN elements, 16 bytes) from member 0's, which are the pointer arguments;
    # their scales are a float32 vector and their outputs lie back to back from out_ptr.
    pid_m, member, pid_n = _member_position(members, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    w_ptr += tl.multiple_of(tl.load(table_ptr + member), ALIGN)
    down_ptr += tl.multiple_of(tl.load(table_ptr + members + member), ALIGN)
    up_ptr += tl.multiple_of(tl.load(table_ptr + 2 * members + member), ALIGN)
    bias_ptr += tl.multiple_of(tl.load(table_ptr + 3 * members + member), ALIGN)
    out_ptr += member.to(tl.int64) * M * N
    _member_tile(x_ptr, w_ptr, bias_ptr, down_ptr, up_ptr, out_ptr, tl.load(scales_ptr + member), pid_m, pid_n,
                 M, N, K, R, n_uncond, stride_xm, stride_wn, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, EVEN_K,
                 DOT_PRECISION, UPCAST)


@triton.jit
def _member_tile(x_ptr, w_ptr, bias_ptr, down_ptr, up_ptr, out_ptr, scale, pid_m, pid_n, M, N, K, R, n_uncond,
                 stride_xm, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One member's (BLOCK_M, BLOCK_N) output tile, stored."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] + cols[None, :] * stride_wn
    acc = _fused_tile(x_ptrs, w_ptrs, down_ptr, up_ptr, offs_m, offs_k, offs_r, cols, K, R, n_uncond, scale,
                      pid_m * BLOCK_M < n_uncond, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, EVEN_K, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def pick_group_config(m: int, n: int, k: int, rank: int, members: int, element_size: int = 2) -> KernelConfig:
    """Tiles for a group (H100 sweep of SD1.5/SDXL attention groups, CUDA graphs; see BENCHMARKS.md).

    Text-token rows (cross-attention k/v): narrow column tiles. Otherwise 128x128 tiles, with a short
    K step for the mid-sized groups (SD1.5's 640- and 1280-channel q/k/v), which measured fastest.
    """
    if m <= 256:
        block_m, block_n, block_k = 64, 64 if n >= 1280 else 32, 128
    else:
        block_m, block_n = 128, 128
        block_k = 32 if k >= 640 and 2.0 * m * k * n * members <= 8e9 else 64
    # Three pipeline stages where they fit in shared memory (the x, W and down tiles), else two.
    stage_bytes = element_size * block_k * (block_m + block_n + rank_block(rank))
    return KernelConfig(block_m, block_n, block_k, 8, 4, max(2, min(3, (200 * 1024) // stage_bytes)))


def _check_members(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                   downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor]) -> tuple[int, int, int, int]:
    """(out_features, in_features, rank, weight row stride) of members that fit one launch; ValueError where
    they do not."""
    if not weights:
        raise ValueError("a group needs at least one member")
    out_features, in_features = weights[0].shape
    rank = downs[0].shape[0]
    stride = weights[0].stride()
    tensors = [*downs, *ups, *(b for b in biases if b is not None)]
    if (any(w.shape != weights[0].shape or w.stride() != stride for w in weights) or stride[1] != 1
            or stride[0] < in_features or any(d.shape != downs[0].shape for d in downs)
            or any(u.shape != (out_features, rank) for u in ups) or not x.is_contiguous()
            or any(t.dtype != x.dtype for t in (*weights, *tensors)) or not all(t.is_contiguous() for t in tensors)
            or len({b is None for b in biases}) != 1 or x.shape[-1] != in_features
            or not len(weights) == len(biases) == len(downs) == len(ups)):
        raise ValueError("group members must share shape, rank, dtype and weight row stride, with contiguous "
                         "factors, biases and input")
    return out_features, in_features, rank, stride[0]


class GroupLaunch:
    """The grouped kernel bound to one call shape and to the members' tensors, which are checked once, here.

    A call allocates the outputs and starts the kernel: after the first launch of a specialization the
    compiled kernel is called directly (as `BoundLaunch` does for one layer), unless the input or an
    output is not 16-byte aligned or a profiler hooks launches. Eager sampling is host-bound, so the
    per-call work is the input, the outputs and the scales alone.
    """

    def __init__(self, x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], n_uncond: int,
                 config: KernelConfig | None = None):
        members = len(weights)
        if not 1 <= members <= MAX_MEMBERS:
            raise ValueError(f"a group launch has 1 to {MAX_MEMBERS} members, got {members} (TableLaunch takes more)")
        out_features, in_features, rank, stride_wn = _check_members(x, weights, biases, downs, ups)
        m = x.numel() // in_features
        cfg = config or pick_group_config(m, out_features, in_features, rank, members, x.dtype.itemsize)
        pad = MAX_MEMBERS - members  # unused member slots repeat member 0; the grid never reaches them
        has_bias = biases[0] is not None
        self._members, self._pad = members, pad
        self._weights = (*weights, *[weights[0]] * pad)
        # Without a bias the kernel never reads its bias pointers: the weights stand in.
        self._rest = (*(biases if has_bias else weights), *[biases[0] if has_bias else weights[0]] * pad,
                      *downs, *[downs[0]] * pad, *ups, *[ups[0]] * pad)
        self._out_shape = (*x.shape[:-1], out_features)
        self._sizes = (m, out_features, in_features, rank, n_uncond)
        self._strides = (in_features, stride_wn)
        self._grid = (triton.cdiv(m, cfg.block_m) * members * triton.cdiv(out_features, cfg.block_n),)
        self._constants = dict(
            MEMBERS=members, HAS_BIAS=has_bias, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_R=rank_block(rank), GROUP_M=cfg.group_m,
            EVEN_K=in_features % cfg.block_k == 0, DOT_PRECISION=_dot_precision(x.dtype),
            UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        )
        self._constexprs = tuple(self._constants.values())  # declaration order, for direct launches
        self._launch_options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        self._direct = None

    def __call__(self, x: torch.Tensor, scales: Sequence[float],
                 outs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each member's output for x (of the bound shape, contiguous), the update scaled by ``scales``.

        ``outs``: contiguous tensors of the output shape to write into (tests poison them). Without them,
        the members' outputs are views of one allocation (one allocator call instead of one per member)."""
        if outs is None:
            outs = list(x.new_empty((self._members, *self._out_shape)).unbind(0))
        elif len(outs) != self._members or any(o.shape != self._out_shape or not o.is_contiguous() for o in outs):
            raise ValueError(f"outs must be {self._members} contiguous tensors of shape {tuple(self._out_shape)}")
        else:
            outs = list(outs)
        if self._sizes[0] == 0:
            return outs
        pad = self._pad
        tensors = (x, *self._weights, *self._rest, *outs, *[outs[0]] * pad)
        sizes = (*self._sizes, *scales, *[scales[0]] * pad, *self._strides)
        if self._direct is not None:
            # Pointers as integers: the launcher takes them as they are, where for a tensor it calls
            # data_ptr() and asks the driver about the pointer (about 0.25 us each, 16 per launch).
            pointers = [t.data_ptr() for t in tensors]
            if not functools.reduce(operator.or_, pointers) % 16 and not _launch_hooks():
                self._direct(_current_stream(), *pointers, *sizes, *self._constexprs)
                return outs
        compiled = _dual_linear_group_kernel[self._grid](*tensors, *sizes, **self._constants, **self._launch_options)
        if self._direct is None and dual_linear_triton._DIRECT_LAUNCH and _aligned(*tensors):
            self._direct = _direct_launcher(compiled, self._grid[0])
        return outs


class TableLaunch:
    """The grouped kernel for any number of members, bound to one call shape: where their tensors lie (element
    offsets from member 0's) and their scales sit in small device tables, their outputs in one allocation. For
    layers across a UNet that read one tensor, such as every cross-attention's to_k and to_v (the text
    states): one launch a step.

    A call re-reads the members' addresses and scales and rebuilds the tables when one changed (weights
    moved, a new scale); that is a copy to the GPU, so a CUDA graph capture that would need it gets None,
    and so does a call whose tensors are not 16-byte aligned (the members then run alone). Tables a capture
    may have recorded are kept, never freed.
    """

    def __init__(self, x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], n_uncond: int,
                 config: KernelConfig | None = None):
        out_features, in_features, rank, stride_wn = _check_members(x, weights, biases, downs, ups)
        members = len(weights)
        m = x.numel() // in_features
        cfg = config or pick_group_config(m, out_features, in_features, rank, members, x.dtype.itemsize)
        has_bias = biases[0] is not None
        # Table rows: weights, downs, ups, biases (without biases the kernel never reads that row).
        self._rows = (weights, downs, ups, biases if has_bias else weights)
        self._members = members
        self._out_shape = (*x.shape[:-1], out_features)
        self._sizes = (m, out_features, in_features, rank, n_uncond, members, in_features, stride_wn)
        self._grid = (triton.cdiv(m, cfg.block_m) * members * triton.cdiv(out_features, cfg.block_n),)
        self._constants = dict(
            HAS_BIAS=has_bias, ALIGN=16 // x.element_size(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_R=rank_block(rank), GROUP_M=cfg.group_m, EVEN_K=in_features % cfg.block_k == 0,
            DOT_PRECISION=_dot_precision(x.dtype), UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        )
        self._constexprs = tuple(self._constants.values())
        self._launch_options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        self._key: tuple | None = None
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] = []  # every table built; the last is current
        self._direct = None

    def _current_tables(self, x: torch.Tensor, scales: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor] | None:
        addresses = [t.data_ptr() for row in self._rows for t in row]
        key = (*addresses, *scales)
        if key != self._key:
            if any(address % 16 for address in addresses) or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                return None
            size, members = x.element_size(), self._members
            offsets = [(address - addresses[i - i % members]) // size for i, address in enumerate(addresses)]
            table = torch.tensor(offsets, dtype=torch.int64).to(x.device)
            self._tables.append((table, torch.tensor(scales, dtype=torch.float32).to(x.device)))
            self._key = key
        return self._tables[-1]

    def __call__(self, x: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor] | None:
        """Each member's output for x (of the bound shape, contiguous), or None (see the class)."""
        tables = self._current_tables(x, scales)
        if tables is None:
            return None
        out = x.new_empty((self._members, *self._out_shape))
        if self._sizes[0] == 0:
            return list(out.unbind(0))
        bases = [row[0] for row in self._rows]
        table, scale_table = tables
        if self._direct is not None and not (x.data_ptr() | out.data_ptr()) % 16 and not _launch_hooks():
            self._direct(_current_stream(), x.data_ptr(), *[t.data_ptr() for t in bases], table.data_ptr(),
                         scale_table.data_ptr(), out.data_ptr(), *self._sizes, *self._constexprs)
        else:
            compiled = _dual_linear_table_kernel[self._grid](x, *bases, table, scale_table, out, *self._sizes,
                                                             **self._constants, **self._launch_options)
            if self._direct is None and dual_linear_triton._DIRECT_LAUNCH and _aligned(x, out):
                self._direct = _direct_launcher(compiled, self._grid[0])
        return list(out.unbind(0))


def launch_group(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], scales: Sequence[float],
                 n_uncond: int, config: KernelConfig | None = None,
                 outs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every member's output (x's leading shape, out_features) from one launch.

    x (..., in) contiguous; weights (out, in), rows of one stride; downs (r, in), ups (out, r), biases (out,)
    or all None; n_uncond counts rows of x flattened to 2-D. ``outs`` (up to MAX_MEMBERS members): tensors
    to write into. Raises ValueError when the members do not fit together.
    """
    scales = [float(s) for s in scales]
    if len(weights) > MAX_MEMBERS and outs is None:
        return TableLaunch(x, weights, biases, downs, ups, n_uncond, config)(x, scales)
    return GroupLaunch(x, weights, biases, downs, ups, n_uncond, config)(x, scales, outs)
