"""Dual-branch layers: one module serves theta_c to the cond half and theta_u to the uncond half of a CFG batch.

A diffusers pipeline doing classifier-free guidance calls the UNet once per step on the batch
[uncond; cond] (negative/empty prompt first). NPO wants the uncond half computed with
theta_u = theta_c + eta * delta. The layers here run the base op (theta_c, the original module's own
weight, never copied) over the whole batch and add the branch difference to the leading
`n_uncond` rows only:

    y = base(x);  y[:n_uncond] += delta(x[:n_uncond])

`n_uncond` follows from the branch mode and the batch's static shape (no host syncs, no index
tensors, no data-dependent control flow), so the layers trace under torch.compile(fullgraph=True)
and replay inside CUDA graphs.

Strategies for the difference (chosen per module, see `dual_branch_module`):
- "lowrank": shrink (x_u @ down^T) and expand accumulated in place into the output view (addmm_).
             On CUDA (backend "auto") each layer picks, per input shape, the fastest of: the fused
             Triton kernel, a "joint" GEMM/convolution over [W; down] (the layer stores W and down
             as one tensor), a per-call theta_u (`materialized_linear`) and the shrink/expand pair.
- "dense":   a full-rank difference applied to the uncond half (e.g. beta != 0 without compression).
- "stacked": linear layers only; weights [W_u; W_c] stacked as (2, out, in), one batched GEMM over
             the two halves. Same FLOPs as plain CFG but a second copy of the covered weights.

The math lives in the pure functions (`lowrank_linear`, `joint_linear`, `materialized_linear`,
`lowrank_conv2d`, `joint_conv2d`, `dense_linear`, `dense_conv2d`, `stacked_linear`); the modules hold
tensors, pick `n_uncond` and choose among the paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from npo_merge.delta.types import LowRank
from npo_merge.errors import CompatibilityError, InputError
from npo_merge.guidance.routed_op import register as register_routed
from npo_merge.guidance.routed_op import routed_linear

BranchMode = Literal["cfg", "cond", "uncond"]
BRANCH_MODES: tuple[BranchMode, ...] = ("cfg", "cond", "uncond")

Strategy = Literal["lowrank", "dense", "stacked"]
BranchPath = Literal["lowrank", "dense", "stacked"]
PATHS: tuple[BranchPath, ...] = ("lowrank", "dense", "stacked")

Backend = Literal["torch", "fused", "auto"]
FUSED_OP_NAME = "npo_merge::dual_branch_linear"


@dataclass(frozen=True)
class BranchDelta:
    """theta_u - theta_c for one module: a low-rank or dense weight difference, optionally a bias difference.

    weight: `LowRank` factors, or a dense tensor of the module's weight shape.
    bias:   (out,) difference of the bias, or None when the branches share the bias.
    """

    weight: LowRank | torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def is_lowrank(self) -> bool:
        return isinstance(self.weight, LowRank)

    def dense_weight(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight difference as a dense tensor of `shape`, expanded in fp32 (fp64 for fp64 factors)."""
        weight = self.weight
        if not isinstance(weight, LowRank):
            return weight.reshape(shape).to(dtype)
        work = torch.promote_types(weight.down.dtype, torch.float32)
        up = weight.up.reshape(weight.up.shape[0], weight.rank).to(work)
        down = weight.down.reshape(weight.rank, -1).to(work)
        return ((up @ down) * weight.scale).reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# Pure functions: tensors in, tensor out. x is batch-first; its leading `n_uncond` rows get theta_u.
# ---------------------------------------------------------------------------------------------


def uncond_rows(batch: int, mode: BranchMode) -> int:
    """How many leading rows of a batch of `batch` belong to the uncond branch in `mode`."""
    if mode == "cfg":
        if batch % 2:
            raise InputError(
                f"branch mode 'cfg' needs a batch of [uncond; cond] halves, got an odd batch of {batch}: "
                "use set_branch_mode(..., 'cond') when the pipeline runs without classifier-free guidance"
            )
        return batch // 2
    if mode == "uncond":
        return batch
    if mode == "cond":
        return 0
    raise InputError(f"unknown branch mode {mode!r}: use one of {', '.join(BRANCH_MODES)}")


def _accumulate_rows(y: torch.Tensor, update_in: torch.Tensor, factor: torch.Tensor, alpha: float) -> None:
    """y[:n] += alpha * update_in @ factor^T, in place; update_in is (n, ..., k), factor (out, k)."""
    n = update_in.shape[0]
    y_u = y[:n]
    if y_u.is_contiguous():
        # cuBLAS accumulates into the output view (beta = 1): no extra pass over y.
        y_u.view(-1, y.shape[-1]).addmm_(update_in.reshape(-1, update_in.shape[-1]), factor.t(), alpha=alpha)
    else:
        y_u.add_(update_in @ factor.t(), alpha=alpha)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    """x W^T + b for every row, plus scale * (x down^T) up^T on the leading n_uncond rows of dim 0.

    x (..., in), weight (out, in), down (r, in), up (out, r). The fused op takes the same arguments
    but counts n_uncond in rows of x flattened to (rows, in).
    """
    y = F.linear(x, weight, bias)
    if n_uncond > 0:
        _accumulate_rows(y, F.linear(x[:n_uncond], down), up, scale)
    return y


def materialized_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """theta_u = W + scale * up @ down for one call (shaped like W, rounded once), never stored.

    weight (out, ...), down (r, ...) and up (out, r, ...) as a layer holds them; one small GEMM whose cost
    does not grow with the batch, so it undercuts the shrink/expand pair wherever rows far outnumber
    the layer's channels (high-resolution layers).
    """
    flat = torch.addmm(weight.reshape(weight.shape[0], -1), up.reshape(up.shape[0], -1),
                       down.reshape(down.shape[0], -1), alpha=scale)
    return flat.view(weight.shape)


def materialized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    """`lowrank_linear`'s result from two half GEMMs: the uncond rows through `materialized_weight`,
    the rest through W, each written straight into its rows of the output."""
    if n_uncond == 0:
        return F.linear(x, weight, bias)
    theta_u = materialized_weight(weight, down, up, scale)
    if n_uncond == x.shape[0]:
        return F.linear(x, theta_u, bias)
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    for part, w in ((slice(None, n_uncond), theta_u), (slice(n_uncond, None), weight)):
        # Split before flattening: a half of one sample flattens as a view even when x is a transposed view.
        rows, out = x[part].reshape(-1, x.shape[-1]), y[part].view(-1, weight.shape[0])
        if bias is None:
            torch.mm(rows, w.t(), out=out)
        else:
            torch.addmm(bias, rows, w.t(), out=out)
    return y


# The joint paths compute the shrink for the cond rows too (r extra outputs over the whole batch), so
# they serve layers whose outputs outnumber the rank this many times over.
JOINT_MIN_OUT_PER_RANK = 4


def joint_linear(
    x: torch.Tensor,
    joint_weight: torch.Tensor,
    joint_bias: torch.Tensor | None,
    ups: list[torch.Tensor],
    scales: list[float],
    n_uncond: int,
) -> list[torch.Tensor]:
    """`lowrank_linear` for m layers that read x, from ONE GEMM with [W_1; ..; W_m; down_1; ..; down_m].

    The shrinks come out as extra output columns (cuBLAS runs one wide GEMM better than thin ones); each
    expand is accumulated into its layer's uncond rows in place. Returns views of the layers' columns
    (row stride: all columns), as diffusers' own fused q/k/v projection does. joint_bias: [b_1; ..; 0] or None.
    """
    y = F.linear(x, joint_weight, joint_bias)
    flat = y.view(-1, y.shape[-1])
    rows = n_uncond * (flat.shape[0] // x.shape[0])
    outs, col, shrunk = [], 0, sum(up.shape[0] for up in ups)
    for up, scale in zip(ups, scales):
        out, rank = up.shape
        if rows > 0:
            flat[:rows, col:col + out].addmm_(flat[:rows, shrunk:shrunk + rank], up.t(), alpha=scale)
        outs.append(y[..., col:col + out])
        col, shrunk = col + out, shrunk + rank
    return outs


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, diff: torch.Tensor, n_uncond: int
) -> torch.Tensor:
    """x W^T + b for every row, plus x diff^T on the leading n_uncond rows (diff: (out, in), pre-scaled)."""
    y = F.linear(x, weight, bias)
    if n_uncond > 0:
        _accumulate_rows(y, x[:n_uncond], diff, 1.0)
    return y


def stacked_linear(x: torch.Tensor, stacked_weight: torch.Tensor, stacked_bias: torch.Tensor | None) -> torch.Tensor:
    """[uncond; cond] halves of x through W_u and W_c in ONE batched GEMM.

    x (2n, ..., in) with an even leading dim; stacked_weight (2, out, in) = [W_u; W_c];
    stacked_bias (2, out) or None.
    """
    out_features, in_features = stacked_weight.shape[1], stacked_weight.shape[2]
    halves = x.reshape(2, -1, in_features)
    if stacked_bias is None:
        y = torch.bmm(halves, stacked_weight.transpose(1, 2))
    else:
        y = torch.baddbmm(stacked_bias.unsqueeze(1), halves, stacked_weight.transpose(1, 2))
    return y.reshape(*x.shape[:-1], out_features)


def lowrank_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """conv(x, W) for every row, plus scale * conv(conv(x, down), up) on the leading n_uncond rows.

    down (r, in, kh, kw) uses the layer's stride/padding/dilation; up (out, r, 1, 1) is a 1x1 conv.
    Ungrouped convolutions only (every conv of SD1.x/SD2/SDXL UNets).
    """
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    if n_uncond > 0:
        shrunk = F.conv2d(x[:n_uncond], down, None, stride, padding, dilation)
        y[:n_uncond].add_(F.conv2d(shrunk, up), alpha=scale)
    return y


def joint_conv2d(
    x: torch.Tensor,
    joint_weight: torch.Tensor,
    joint_bias: torch.Tensor | None,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """`lowrank_conv2d`'s result from ONE convolution with the kernel [W; down] (out + r, in, kh, kw).

    The shrink comes out as r extra output channels of the base convolution (cuDNN runs one large conv
    far better than a second thin one), and the expand is a GEMM accumulated into the uncond samples'
    channels in place. Returns a view of the first `out` channels; joint_bias is [b; 0] or None.
    """
    out = up.shape[0]
    y = F.conv2d(x, joint_weight, joint_bias, stride, padding, dilation)
    if n_uncond > 0:
        _expand_channels(y, out, up.reshape(out, -1), scale, n_uncond)
    return y[:, :out]


def _expand_channels(y: torch.Tensor, out: int, up: torch.Tensor, scale: float, n_uncond: int) -> None:
    """y[:n, :out] += scale * up @ y[:n, out:] per uncond sample and pixel, in place (y: (N, out + r, H, W))."""
    y_u, shrunk = y[:n_uncond, :out], y[:n_uncond, out:]
    batch, pixels = n_uncond, y.shape[2] * y.shape[3]
    if y.is_contiguous():  # NCHW: per sample, (channels, pixels) matrices with a batch stride
        y_u.view(batch, out, pixels).baddbmm_(up.expand(batch, -1, -1), shrunk.view(batch, -1, pixels), alpha=scale)
    elif y.is_contiguous(memory_format=torch.channels_last):  # NHWC: (pixels, channels), row stride out + r
        rows = y_u.permute(0, 2, 3, 1).view(batch, pixels, out)
        rows.baddbmm_(shrunk.permute(0, 2, 3, 1).view(batch, pixels, -1), up.t().expand(batch, -1, -1), alpha=scale)
    else:
        y_u.add_(F.conv2d(shrunk, up[:, :, None, None]), alpha=scale)


def dense_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    diff: torch.Tensor,
    n_uncond: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """conv(x, W) for every row, plus conv(x, diff) on the leading n_uncond rows (diff pre-scaled)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if n_uncond > 0:
        y[:n_uncond].add_(F.conv2d(x[:n_uncond], diff, None, stride, padding, dilation, groups))
    return y


# ---------------------------------------------------------------------------------------------
# Fused-kernel hook (issue 5): npo_merge.guidance.kernels registers the CUDA op
# torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, scale, n_uncond), which counts
# n_uncond in rows of x flattened to (rows, in_features). Nothing here needs it to exist.
# ---------------------------------------------------------------------------------------------

FusedLinear = Callable[..., torch.Tensor]


def fused_entry() -> FusedLinear | None:
    """The fused dual-branch linear to call, or None when no kernel package provides one.

    The kernels package's eager entry point (less host time per call than op dispatch) when it
    imports, else the registered op itself.
    """
    try:
        from npo_merge.guidance.kernels.ops import dual_branch_linear_eager
    except ImportError:
        pass
    else:
        return dual_branch_linear_eager
    try:
        return torch.ops.npo_merge.dual_branch_linear
    except (AttributeError, RuntimeError):
        return None


# Where the fused kernel beats base GEMM + shrink/expand on an H100 (benchmarks/kernel_bench.py,
# 2026-11-25): layers up to ~4 GFLOP with at least 64 rows (every SD1.5 attention projection,
# cross-attention k/v over text tokens), and narrow inputs (K <= 320) at small ranks. On larger
# layers cuBLAS's GEMM is ahead of ours and the unfused torch path wins.
FUSED_MAX_FLOP = 4e9
# In eager mode a step is host-bound: the torch path's two extra launches cost more host time than
# the kernel's slower GEMM costs GPU time. Measured with every SDXL attention projection fused (up to
# 6.7 GFLOP; benchmarks/sampling_e2e.py --eager-pairs); larger layers keep the GPU-time rule.
EAGER_FUSED_MAX_FLOP = 8e9


def prefers_fused(rows: int, in_features: int, out_features: int, rank: int, *, eager: bool = False) -> bool:
    """Per-shape dispatch for backend "auto": is the fused kernel the faster path for this call?

    `eager`: the call runs eagerly (not captured in a CUDA graph), where launches cost host time.
    """
    flop = 2.0 * rows * in_features * out_features
    if eager and flop <= EAGER_FUSED_MAX_FLOP:
        return True
    if rows < 64:
        return False
    return flop <= FUSED_MAX_FLOP or (in_features <= 320 and rank <= 32)


# For calls no timing decided: where the per-call theta_u (`materialized_linear`) beats the shrink/expand
# pair on an H100 (benchmarks/layer_bench.py, 2026-11-26). Its cost (one small GEMM and a weight-sized
# write) does not grow with the rows, while the pair's does; from 4096 uncond rows (64x64 latents, batch 1)
# it is ahead at ranks 8 and 64.
MATERIALIZE_MIN_ROWS = 4096


def prefers_materialized(uncond_rows: int) -> bool:
    """Per-shape dispatch for backend "auto", for calls the fused kernel does not take: theta_u for the call?"""
    return uncond_rows >= MATERIALIZE_MIN_ROWS


def fused_binder() -> Callable[..., FusedLinear | None] | None:
    """The kernels package's `bind_eager` (a fused call bound to one input shape), or None without it."""
    try:
        from npo_merge.guidance.kernels.ops import bind_eager
    except ImportError:
        return None
    return bind_eager


def group_binder() -> Callable[..., Callable[..., list[torch.Tensor]] | None] | None:
    """The kernels package's `bind_group` (one launch for layers that share an input), or None without it."""
    try:
        from npo_merge.guidance.kernels.ops import bind_group
    except ImportError:
        return None
    return bind_group


# Grouped launches recompute each member's shrink in every column tile (as the fused kernel does).
# H100, CUDA graphs (benchmarks/group_bench.py): faster than the per-layer paths for every SD1.5/SDXL
# q/k/v and k/v group at rank 8, and at rank 64 for SD1.5's groups and SDXL's k/v (see GROUP_HIGH_RANK).
# Larger ranks were not measured grouped, so they keep the per-layer paths.
GROUP_MAX_RANK = 64
# Above this rank, groups serve members of up to GROUP_HIGH_RANK_MAX_FLOP each, and larger ones run alone.
# H100, CUDA graphs, rank 64: SD1.5's groups run 0.70-0.97x plain cuBLAS grouped (group_bench.py); SDXL's
# q/k/v run 1.73-1.81x grouped, against about 1.3-1.5x for each member on its fastest own path
# (layer_bench.py).
GROUP_HIGH_RANK = 32
GROUP_HIGH_RANK_MAX_FLOP = 2e9


class InputGroup:
    """Low-rank dual-branch linears that read the same input: attention's q/k/v, or the k/v of every
    cross-attention of one width (they all read the text states).

    Where the kernels package serves the call, the first member called with an input computes every
    member's output in one launch; each other member called with that very tensor (same object, not
    modified in place since) takes its output from here. Any other call runs the member alone, so a
    processor that feeds the members different tensors still gets exact results. (Tensors made under
    torch.inference_mode carry no version counter; for them the object alone decides.) Eager inference
    and CUDA-graph capture only: with autograd or under torch.compile every member runs alone.
    """

    def __init__(self, members: list[DualBranchLinear]) -> None:
        self.members = members
        self._index = {id(member): i for i, member in enumerate(members)}
        self._runners: dict[tuple, Callable[..., list[torch.Tensor]] | None] = {}
        self._source: tuple | None = None  # (input, n_uncond, (version, capturing)) of the pending outputs
        self._pending: dict[int, torch.Tensor] = {}
        for member in members:
            member.group = self

    def clear(self) -> None:
        """Forget bound launches and pending outputs (members moved or changed backend: launches hold tensors)."""
        self._runners.clear()
        self._source, self._pending = None, {}

    def _bind(self, x: torch.Tensor, n_uncond: int) -> Callable[..., list[torch.Tensor]] | None:
        binder = group_binder()
        if binder is None:
            return None
        members = self.members
        rows = n_uncond * math.prod(x.shape[1:-1])  # the kernel counts uncond rows of x flattened to 2-D
        first, rank = members[0], members[0].down.shape[0]
        if rank > GROUP_HIGH_RANK and 2.0 * x.numel() * first.out_features > GROUP_HIGH_RANK_MAX_FLOP:
            return None  # each member alone, on its own fastest path, is faster
        return binder(x, [m.weight for m in members], [m.bias for m in members], [m.down for m in members],
                      [m.up for m in members], rows)

    def output(self, member: DualBranchLinear, x: torch.Tensor, n_uncond: int) -> torch.Tensor | None:
        """This member's output for x, computed with its siblings' in one launch; None where no kernel serves it."""
        index = self._index[id(member)]
        # An output computed eagerly is never handed over inside a CUDA graph capture (the graph would miss
        # its computation), nor the reverse.
        version = (-1 if x.is_inference() else x._version, _capturing(x))
        if self._source is not None and self._source[0] is x and self._source[1:] == (n_uncond, version):
            y = self._pending.pop(index, None)
            if y is not None:
                if not self._pending:
                    self._source = None
                return y
        key = (x.shape, x.dtype, x.get_device(), n_uncond)
        runner = self._runners.get(key, self)  # self: not bound yet (None: no kernel serves this call)
        if runner is self:
            runner = self._runners[key] = self._bind(x, n_uncond)
        if runner is None:
            return None
        outs = runner(x, [m.scale for m in self.members])
        if outs is None:  # the launch cannot serve this call (see TableLaunch)
            return None
        self._source = (x, n_uncond, version)
        self._pending = {i: out for i, out in enumerate(outs) if i != index}
        return outs[index]


def fused_op_available() -> bool:
    """Whether a fused dual-branch linear is there to call (see `fused_entry`)."""
    return fused_entry() is not None


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class DualBranchLayer(nn.Module):
    """What both dual-branch layers share: the original module, the branch mode, the strategy."""

    strategy: Strategy

    def __init__(self, original: nn.Module, mode: BranchMode) -> None:
        super().__init__()
        # The original module is kept unregistered: it is what disable_npo puts back, and its
        # Parameters are the very objects registered below (shared, never copied).
        object.__setattr__(self, "original", original)
        self.weight = original.weight
        self.register_parameter("bias", original.bias)
        # [W; down] and [b; 0] (see _join), or None. Kept out of the buffers so that .to() converts W and
        # down once each (through the Parameter and the buffer) before _apply joins them again.
        self.joint_weight: torch.Tensor | None = None
        self.joint_bias: torch.Tensor | None = None
        self.mode: BranchMode = "cfg"
        self.set_mode(mode)

    def set_mode(self, mode: BranchMode) -> None:
        """Choose which branch the batch rows get: 'cfg' ([uncond; cond]), 'cond' (theta_c), 'uncond' (theta_u)."""
        if mode not in BRANCH_MODES:
            raise InputError(f"unknown branch mode {mode!r}: use one of {', '.join(BRANCH_MODES)}")
        self.mode = mode

    def release(self) -> nn.Module:
        """Undo what construction did to the shared weight and hand back the original module."""
        if self.joint_weight is not None:  # give the Parameters their own storage so the joint one can go
            self.weight.data = self.weight.data.clone()
            if self.bias is not None:
                self.bias.data = self.bias.data.clone()
            # This module may outlive the swap (an NpoHandle keeps it): hold nothing of the joint storage.
            self.down = self.down.clone()
            self.joint_weight = self.joint_bias = None
        return self.original

    def _join(self) -> None:
        """Store W and down as one tensor [W; down] (the shared Parameter and the `down` buffer become views of
        it) and the bias as [b; 0], for the joint paths (`joint_linear`, `joint_conv2d`): low-rank layers whose
        outputs outnumber the rank JOINT_MIN_OUT_PER_RANK times over (the shrink runs on the cond rows too)."""
        if getattr(getattr(self, "group", None), "owns_weights", False):
            return  # a WideGroup lays out this layer's weight (and re-lays it out after .to())
        self.joint_weight = self.joint_bias = None
        if self.strategy != "lowrank" or self.down.shape[0] * JOINT_MIN_OUT_PER_RANK > self.weight.shape[0]:
            return
        weight, bias, out, rank = self.weight, self.bias, self.weight.shape[0], self.down.shape[0]
        joint = torch.cat([weight.detach(), self.down])
        weight.data, self.down, self.joint_weight = joint[:out], joint[out:], joint
        if bias is not None:
            joint_bias = torch.cat([bias.detach(), bias.new_zeros(rank)])
            bias.data, self.joint_bias = joint_bias[:out], joint_bias

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        module = super()._apply(fn, recurse)  # converts W (the Parameter) and down apart: join them again
        self._join()
        return module

    def extra_bytes(self) -> int:
        """Bytes held for the branch difference (buffers this module adds on top of the original)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, mode={self.mode}"


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (dotted) under `root`."""
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)


def _capturing(x: torch.Tensor) -> bool:
    """Whether this call is being captured into a CUDA graph (there, GPU time alone decides the path)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _fastest_on_gpu(calls: list[Callable[[], object]], device: torch.device, reps: int = 5, rounds: int = 2) -> int:
    """Index of the call that takes the least GPU time on `device`'s current stream.

    Each call runs once to warm up (kernel compilation, library heuristics); then, for each, the GPU is kept
    busy while the host queues `reps` calls, so the events measure the kernels back to back, as a CUDA
    graph replays them, and not the host's launch time. Rounds alternate the order (whichever runs first
    in a round can meet a GPU still raising its clocks) and each call keeps its best round.
    """
    keep_busy = getattr(torch.cuda, "_sleep", None)  # private torch API: without it, time what the host queues
    best = [math.inf] * len(calls)
    order = list(range(len(calls)))
    with torch.cuda.device(device):
        for call in calls:
            call()
        for _ in range(rounds):
            events = []
            for index in order:
                if keep_busy is not None:
                    keep_busy(_QUEUE_CYCLES)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    calls[index]()
                end.record()
                events.append((index, start, end))
            events[-1][2].synchronize()
            for index, start, end in events:
                best[index] = min(best[index], start.elapsed_time(end))
            order.reverse()
    return best.index(min(best))


_QUEUE_CYCLES = 2_000_000  # ~1 ms of GPU clock: longer than the host takes to queue the timed calls


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision layers (sums in fp32, cast on store), the layer's dtype otherwise."""
    return torch.promote_types(weight.dtype, torch.float32)


def _bias_buffer(delta: BranchDelta, eta: float, like: torch.Tensor) -> torch.Tensor | None:
    if delta.bias is None:
        return None
    return (delta.bias.to(_work_dtype(like)) * eta).to(dtype=like.dtype, device=like.device)


class DualBranchLinear(DualBranchLayer):
    """nn.Linear serving [uncond; cond]: the original weight for all rows, plus theta_u - theta_c on the uncond rows."""

    def __init__(
        self,
        linear: nn.Linear,
        delta: BranchDelta,
        eta: float = 1.0,
        *,
        strategy: Strategy = "lowrank",
        mode: BranchMode = "cfg",
    ) -> None:
        super().__init__(linear, mode)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.strategy = strategy
        self.backend: Backend = "torch"
        self.fused: FusedLinear | None = None
        # Eager inference: per input shape, the call that serves it (see _fused_lowrank).
        self._routes: dict[tuple, Callable[..., torch.Tensor]] = {}
        self.group: InputGroup | None = None  # set by `InputGroup` (enable_npo groups attention's q/k/v)
        weight = linear.weight
        like = {"dtype": weight.dtype, "device": weight.device}
        self.scale = 0.0
        self.register_buffer("down", None, persistent=False)
        self.register_buffer("up", None, persistent=False)
        self.register_buffer("diff", None, persistent=False)
        self.register_buffer("stacked_weight", None, persistent=False)
        self.register_buffer("stacked_bias", None, persistent=False)
        self.register_buffer("bias_diff", _bias_buffer(delta, eta, weight), persistent=False)
        if strategy == "lowrank":
            if not isinstance(delta.weight, LowRank):
                raise InputError("strategy 'lowrank' needs LowRank factors; use 'dense' for a dense difference")
            self.down = delta.weight.down.reshape(delta.weight.rank, -1).to(**like)
            self.up = delta.weight.up.reshape(-1, delta.weight.rank).to(**like)
            self.scale = delta.weight.scale * float(eta)
        elif strategy == "dense":
            self.diff = (delta.dense_weight(weight.shape, _work_dtype(weight)) * eta).to(**like)
        elif strategy == "stacked":
            theta_u = weight.detach().to(_work_dtype(weight)) + delta.dense_weight(weight.shape, _work_dtype(weight)) * eta
            stacked = torch.stack([theta_u.to(weight.dtype), weight.detach()])
            self.stacked_weight = stacked
            # theta_c lives in the stack: point the shared Parameter at it so W is stored once.
            weight.data = stacked[1]
            if linear.bias is not None or delta.bias is not None:
                bias_c = linear.bias.detach() if linear.bias is not None else torch.zeros_like(weight[:, 0])
                bias_u = bias_c + self.bias_diff if self.bias_diff is not None else bias_c
                self.stacked_bias = torch.stack([bias_u, bias_c])
        else:
            raise InputError(f"unknown strategy {strategy!r}: use one of lowrank, dense, stacked")
        self._join()
        # Per (shape, dtype, device, uncond rows): the path with the least GPU time, timed at the first eager call.
        self._fastest: dict[tuple, str] = {}
        self._op_key = register_routed(self)  # how the op torch.compile calls finds this layer

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy: the copy is a layer of its own
        super().__setstate__(state)
        self._op_key = register_routed(self)

    def set_backend(self, backend: Backend) -> None:
        """Pick the implementation of the 'lowrank' strategy: 'torch', the 'fused' kernel op for every
        call, or 'auto': the fused op where `prefers_fused` says it wins for the call's shape."""
        if backend not in ("torch", "fused", "auto"):
            raise InputError(f"unknown backend {backend!r}: use 'torch', 'fused' or 'auto'")
        fused = fused_entry() if backend != "torch" else None
        if backend != "torch" and fused is None:
            raise InputError(f"backend {backend!r} needs the {FUSED_OP_NAME} op (npo_merge.guidance.kernels): use 'torch'")
        self.backend, self.fused = backend, fused
        self._forget_routes()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._forget_routes()  # .to()/.half()/.cuda(): routes were bound to the old dtype and device
        return super()._apply(fn, recurse)

    def _forget_routes(self) -> None:
        self._routes.clear()
        self._fastest.clear()
        if self.group is not None:
            self.group.clear()

    def release(self) -> nn.Module:
        if self.strategy == "stacked":
            # Give the Parameter its own storage again so the stack can be freed.
            self.weight.data = self.weight.data.clone()
            self.stacked_weight = None
        return super().release()

    def _takes_fused(self, x: torch.Tensor, rank: int) -> bool:
        """Whether this call goes to the fused op: always with backend 'fused'; with 'auto' where the shape
        favours it (`prefers_fused`: one rule for eager calls, one for CUDA-graph capture), never under
        torch.compile (inference calls take the routed op there, and autograd calls the torch ops, which
        Inductor plans and differentiates itself)."""
        if self.backend == "fused":
            return True
        if torch.compiler.is_compiling():
            return False
        eager = not _capturing(x)
        return prefers_fused(x.numel() // x.shape[-1], self.in_features, self.out_features, rank, eager=eager)

    def _fused_lowrank(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                       up: torch.Tensor, n_uncond: int) -> torch.Tensor:
        """Backends 'fused' and 'auto'. In inference the path for an input shape is decided once and bound
        (`_bind_route`): later calls of that shape skip the dispatch checks, which cost more host time than
        the kernels take on the GPU. With 'auto', a layer in an `InputGroup` first asks the group for its
        output, and under torch.compile the same route runs inside one opaque op (`routed_op`). With
        autograd, every call decides between the fused op and torch."""
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or down.requires_grad or up.requires_grad
            or (bias is not None and bias.requires_grad)
        )
        compiling = torch.compiler.is_compiling()
        if needs_graph or compiling:
            if compiling and not needs_graph and self.backend == "auto":  # one opaque op running `route`
                return routed_linear(x, weight, bias, down, up, self.scale, n_uncond, self._op_key)
            if self._takes_fused(x, down.shape[0]):
                return self.fused(x, weight, bias, down, up, self.scale, n_uncond * math.prod(x.shape[1:-1]))
            return lowrank_linear(x, weight, bias, down, up, self.scale, n_uncond)
        return self.route(x, weight, bias, down, up, self.scale, n_uncond)

    def route(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
              up: torch.Tensor, scale: float, n_uncond: int) -> torch.Tensor:
        """An inference call's output: from the layer's group where it serves the call, else from the path
        bound for the call's shape (eager calls, CUDA-graph capture, and the op torch.compile calls)."""
        if self.group is not None and self.backend == "auto":
            y = self.group.output(self, x, n_uncond)
            if y is not None:
                return y
        key = (x.shape, x.dtype, x.get_device(), n_uncond, _capturing(x))
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._bind_route(x, weight, bias, down, up, n_uncond, key)
        return route(x, weight, bias, down, up, scale)

    def _paths(self, n_uncond: int, rows: int) -> dict[str, Callable[..., torch.Tensor]]:
        """Every path that can serve a call with these uncond rows, as (x, w, b, down, up, scale) -> y."""
        fused = self.fused
        paths = {"fused": lambda x, w, b, d, u, s: fused(x, w, b, d, u, s, rows),
                 "lowrank": lambda x, w, b, d, u, s: lowrank_linear(x, w, b, d, u, s, n_uncond),
                 "materialize": lambda x, w, b, d, u, s: materialized_linear(x, w, b, d, u, s, n_uncond)}
        joint_weight, joint_bias = self.joint_weight, self.joint_bias
        if joint_weight is not None:
            paths["joint"] = lambda x, w, b, d, u, s: joint_linear(x, joint_weight, joint_bias, [u], [s], n_uncond)[0]
        return paths

    def _bind_route(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                    up: torch.Tensor, n_uncond: int, key: tuple) -> Callable[..., torch.Tensor]:
        """The path for calls like this one. Backend 'fused': the fused op. 'auto': where the host is the
        bottleneck (an eager call the eager rule of `prefers_fused` gives to the fused op), the fused op;
        otherwise the path with the least GPU time, timed on the first eager call of the shape (so a CUDA
        graph captured after eager warm-up steps gets it too); the `prefers_*` rules where nothing was timed."""
        rows = n_uncond * math.prod(x.shape[1:-1])  # the fused op counts uncond rows of x flattened to 2-D
        paths = self._paths(n_uncond, rows)
        capturing, shape = key[-1], key[:-1]
        total_rows, rank = x.numel() // x.shape[-1], down.shape[0]
        if self.backend == "auto" and not capturing and x.is_cuda and shape not in self._fastest:
            names = list(paths)
            calls = [lambda p=paths[n]: p(x, weight, bias, down, up, self.scale) for n in names]
            self._fastest[shape] = names[_fastest_on_gpu(calls, x.device)]
        if self.backend == "fused" or (not capturing and prefers_fused(total_rows, self.in_features, self.out_features,
                                                                        rank, eager=True)):
            name = "fused"
        else:
            name = self._fastest.get(shape) or self._rule_path(total_rows, rows, rank)
        if name == "fused":
            binder = fused_binder()
            bound = binder(x, weight, bias, down, up, rows) if binder is not None else None
            if bound is None and binder is not None and x.is_cuda and not capturing:  # binds once the kernel ran for it
                paths["fused"](x, weight, bias, down, up, self.scale)
                bound = binder(x, weight, bias, down, up, rows)
            return bound or paths["fused"]
        return paths[name]

    def _rule_path(self, total_rows: int, uncond_rows: int, rank: int) -> str:
        """The path for a call no timing decided (CUDA-graph capture without an eager call first)."""
        if prefers_fused(total_rows, self.in_features, self.out_features, rank, eager=False):
            return "fused"
        if prefers_materialized(uncond_rows):
            return "materialize"
        return "lowrank" if self.joint_weight is None else "joint"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager sampling is host-bound, so this runs once per layer per step with as little Python as it
        # can: tensors come straight from the registries (Module.__getattr__ costs ~1 us a lookup).
        n_uncond = uncond_rows(x.shape[0], self.mode)
        params, buffers = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        if self.strategy == "lowrank":
            down, up = buffers["down"], buffers["up"]
            if self.fused is None:
                y = lowrank_linear(x, weight, bias, down, up, self.scale, n_uncond)
            else:
                y = self._fused_lowrank(x, weight, bias, down, up, n_uncond)
        elif self.strategy == "dense":
            y = dense_linear(x, weight, bias, buffers["diff"], n_uncond)
        else:  # stacked: W_u and W_c in one tensor, bias_diff folded into the stacked bias
            stacked_weight, stacked_bias = buffers["stacked_weight"], buffers["stacked_bias"]
            if n_uncond not in (0, x.shape[0]):
                return stacked_linear(x, stacked_weight, stacked_bias)
            half = 0 if n_uncond else 1
            return F.linear(x, stacked_weight[half], None if stacked_bias is None else stacked_bias[half])
        bias_diff = buffers["bias_diff"]
        if bias_diff is not None and n_uncond > 0:
            y[:n_uncond].add_(bias_diff)
        return y


class DualBranchConv2d(DualBranchLayer):
    """nn.Conv2d serving [uncond; cond]: the original kernel for all rows, plus theta_u - theta_c on the uncond rows.

    The 'stacked' path does not apply to convolutions: a conv asked for it uses its low-rank
    (or dense) difference instead.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        delta: BranchDelta,
        eta: float = 1.0,
        *,
        strategy: Strategy = "lowrank",
        mode: BranchMode = "cfg",
    ) -> None:
        super().__init__(conv, mode)
        if conv.padding_mode != "zeros":
            raise CompatibilityError(f"dual-branch conv supports padding_mode 'zeros' only, got {conv.padding_mode!r}")
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        weight = conv.weight
        like = {"dtype": weight.dtype, "device": weight.device}
        self.scale = 0.0
        self.register_buffer("down", None, persistent=False)
        self.register_buffer("up", None, persistent=False)
        self.register_buffer("diff", None, persistent=False)
        self.register_buffer("bias_diff", _bias_buffer(delta, eta, weight), persistent=False)
        if strategy == "stacked":
            strategy = "lowrank" if isinstance(delta.weight, LowRank) and conv.groups == 1 else "dense"
        if strategy == "lowrank" and (not isinstance(delta.weight, LowRank) or conv.groups != 1):
            raise InputError("strategy 'lowrank' needs LowRank factors and an ungrouped conv; use 'dense'")
        self.strategy = strategy
        if strategy == "lowrank":
            rank = delta.weight.rank
            self.down = delta.weight.down.reshape(rank, *weight.shape[1:]).to(**like)
            self.up = delta.weight.up.reshape(-1, rank, 1, 1).to(**like)
            self.scale = delta.weight.scale * float(eta)
        elif strategy == "dense":
            self.diff = (delta.dense_weight(weight.shape, _work_dtype(weight)) * eta).to(**like)
        else:
            raise InputError(f"unknown strategy {strategy!r}: use one of lowrank, dense, stacked")
        self._join()
        # Per input signature, whether `joint_conv2d` was the faster path when timed on the GPU (see _takes_joint).
        self._joint_faster: dict[tuple, bool] = {}

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self._joint_faster.clear()
        return super()._apply(fn, recurse)

    def _takes_joint(self, x: torch.Tensor, n_uncond: int) -> bool:
        """Whether `joint_conv2d` serves this call. cuDNN's speed on the widened kernel depends on the shape
        (on an H100, 1.05x the plain conv for most SD layers but 1.5x at 704 channels on 32x32 inputs), so on
        CUDA the first eager call of each input signature times both paths and keeps the faster one."""
        if n_uncond == 0 or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return False  # the in-place expand is for inference; cond-only calls need no shrink
        if not x.is_cuda or torch.compiler.is_compiling():
            return True
        key = (x.shape, x.stride(), x.dtype, n_uncond)
        faster = self._joint_faster.get(key)
        if faster is None:
            if _capturing(x):
                return True  # not timed in eager first: the usual winner
            conv = (self.stride, self.padding, self.dilation)
            up, scale = self._buffers["up"], self.scale
            faster = self._joint_faster[key] = 0 == _fastest_on_gpu([
                lambda: joint_conv2d(x, self.joint_weight, self.joint_bias, up, scale, n_uncond, *conv),
                lambda: lowrank_conv2d(x, self.weight, self.bias, self._buffers["down"], up, scale, n_uncond, *conv),
            ], x.device)
        return faster

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_uncond = uncond_rows(x.shape[0], self.mode)
        params, buffers = self._parameters, self._buffers  # see DualBranchLinear.forward
        weight, bias = params["weight"], params["bias"]
        joint = self.joint_weight
        if joint is not None and self._takes_joint(x, n_uncond):
            y = joint_conv2d(x, joint, self.joint_bias, buffers["up"], self.scale, n_uncond, self.stride, self.padding,
                             self.dilation)
        elif self.strategy == "lowrank":
            y = lowrank_conv2d(x, weight, bias, buffers["down"], buffers["up"], self.scale, n_uncond, self.stride,
                               self.padding, self.dilation)
        else:
            y = dense_conv2d(x, weight, bias, buffers["diff"], n_uncond, self.stride, self.padding, self.dilation,
                             self.groups)
        bias_diff = buffers["bias_diff"]
        if bias_diff is not None and n_uncond > 0:
            y[:n_uncond].add_(bias_diff.view(-1, 1, 1))
        return y


def delta_problem(module: nn.Module, delta: BranchDelta) -> str | None:
    """Why `delta` cannot serve as theta_u - theta_c of `module`, or None when it fits."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"is a {type(module).__name__}, not a Linear or Conv2d layer"
    shape = tuple(module.weight.shape)
    if isinstance(delta.weight, LowRank):
        got = delta.weight.weight_shape
        if _squeeze_1x1(got) != _squeeze_1x1(shape):
            return f"low-rank delta expands to {got}, the layer's weight is {shape}"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"low-rank delta on a grouped conv (groups={module.groups}) is not supported"
    else:
        got = tuple(delta.weight.shape)
        if _squeeze_1x1(got) != _squeeze_1x1(shape):
            return f"dense delta has shape {got}, the layer's weight is {shape}"
    if delta.bias is not None:
        if module.bias is None and tuple(delta.bias.shape) != (shape[0],):
            return f"bias delta has shape {tuple(delta.bias.shape)}, expected ({shape[0]},)"
        if module.bias is not None and tuple(delta.bias.shape) != tuple(module.bias.shape):
            return f"bias delta has shape {tuple(delta.bias.shape)}, the layer's bias is {tuple(module.bias.shape)}"
    return None


def _squeeze_1x1(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(out, in, 1, 1) -> (out, in): a 1x1 conv and a linear layer hold the same matrix."""
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def dual_branch_module(
    module: nn.Module, delta: BranchDelta, eta: float = 1.0, *, path: BranchPath = "lowrank", mode: BranchMode = "cfg"
) -> DualBranchLinear | DualBranchConv2d:
    """Wrap a Linear/Conv2d layer so it serves both CFG branches; `path` picks the strategy.

    path "lowrank": low-rank deltas as shrink/expand, dense deltas as a dense update (the default).
    path "dense":   every delta applied as a dense update (low-rank factors expanded once).
    path "stacked": linear layers hold [W_u; W_c] and run one bmm; convs fall back to "lowrank".
    """
    problem = delta_problem(module, delta)
    if problem is not None:
        raise CompatibilityError(f"cannot serve this delta: the module {problem}")
    if path not in PATHS:
        raise InputError(f"unknown path {path!r}: use one of {', '.join(PATHS)}")
    strategy: Strategy = path if (path != "lowrank" or delta.is_lowrank) else "dense"
    if isinstance(module, nn.Linear):
        return DualBranchLinear(module, delta, eta, strategy=strategy, mode=mode)
    return DualBranchConv2d(module, delta, eta, strategy=strategy, mode=mode)
