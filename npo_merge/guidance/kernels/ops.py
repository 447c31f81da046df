"""The dual-branch linear as a torch custom op: Triton on CUDA, plain torch elsewhere, traceable.

``torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, scale, n_uncond)`` returns
``x @ weight.T + bias`` for every row, plus ``scale * (x @ down.T) @ up.T`` on the first
``n_uncond`` rows of x flattened to (rows, in_features) (the CFG batch is [uncond; cond]).
A fake implementation lets torch.compile trace through it, and an autograd formula makes it
usable where gradients flow. The CUDA implementation never syncs the host and allocates only its
output, so it can be captured in a CUDA graph after one warm-up call.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Sequence

import torch

from npo_merge.errors import CompatibilityError
from npo_merge.guidance.kernels.torch_paths import (
    check_dual_linear_args,
    check_dual_linear_shapes,
    dual_branch_linear_unfused,
)

__all__ = ["available", "bind_eager", "dual_branch_linear", "dual_branch_linear_eager", "dual_branch_conv1x1"]


_INT32_LIMIT = 2**31  # the kernel's offsets are 32-bit; larger tensors take the torch path
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 takes the torch path


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    """Whether triton imports here (cached: the import is slow and its outcome does not change)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is the same as none
        return False
    return True


def available() -> bool:
    """True when the fused Triton kernel can run: triton imports and a CUDA device is present."""
    return torch.cuda.is_available() and _triton_imports()


@torch.library.custom_op("npo_merge::dual_branch_linear", mutates_args=())
def dual_branch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    """y = x W^T + b on all rows, + scale * (x A^T) B^T on the first n_uncond rows (plain torch)."""
    check_dual_linear_args(x, weight, bias, down, up, n_uncond)
    return dual_branch_linear_unfused(x, weight, bias, down, up, scale, n_uncond)


@dual_branch_linear.register_kernel("cuda")
def _dual_branch_linear_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    if _takes_triton(x, weight, bias, down, up, n_uncond):
        return _triton_module().dual_branch_linear_triton(x, weight, bias, down, up, scale, n_uncond)
    return dual_branch_linear_unfused(x, weight, bias, down, up, scale, n_uncond)


@dual_branch_linear.register_fake
def _dual_branch_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    check_dual_linear_args(x, weight, bias, down, up, n_uncond)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    x, weight, bias, down, up, scale, n_uncond = inputs
    ctx.save_for_backward(x, weight, down, up)
    ctx.scale, ctx.n_uncond, ctx.has_bias = scale, n_uncond, bias is not None


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    """Gradients of y = x W^T + b + scale * mask_u * (x A^T) B^T with respect to x, W, b, A, B."""
    x, weight, down, up = ctx.saved_tensors
    scale, n_uncond = ctx.scale, ctx.n_uncond
    need_x, need_w, need_b, need_down, need_up = ctx.needs_input_grad[:5]
    rows_in = x.reshape(-1, weight.shape[1])
    grad_rows = grad.reshape(-1, weight.shape[0])
    grad_u, rows_u = grad_rows[:n_uncond], rows_in[:n_uncond]
    grad_u_up = grad_u @ up if (need_x or need_down) else None  # (n_uncond, r)
    grad_x = grad_w = grad_b = grad_down = grad_up = None
    if need_x:
        grad_x = grad_rows @ weight
        grad_x[:n_uncond].addmm_(grad_u_up, down, alpha=scale)
        grad_x = grad_x.reshape(x.shape)
    if need_w:
        grad_w = grad_rows.t() @ rows_in
    if need_b and ctx.has_bias:
        grad_b = grad_rows.sum(0)
    if need_down:
        grad_down = scale * (grad_u_up.t() @ rows_u)
    if need_up:
        grad_up = scale * (grad_u.t() @ (rows_u @ down.t()))
    return grad_x, grad_w, grad_b, grad_down, grad_up, None, None


dual_branch_linear.register_autograd(_backward, setup_context=_setup_context)


def dual_branch_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    """The op's result with less host time per call: what a module's forward can call.

    Under torch.compile, or when autograd must record, this is the custom op. In eager inference on
    CUDA it calls the Triton launcher directly: the op's Python dispatch cost ~60 us of host time per
    call on the H100 host, more than most of these GEMMs take on the GPU. Elsewhere, the torch path.
    """
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, down, up)
    )
    if torch.compiler.is_compiling() or needs_graph:
        return torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, scale, n_uncond)
    if _takes_triton(x, weight, bias, down, up, n_uncond):
        return _triton_module().dual_branch_linear_triton(x, weight, bias, down, up, scale, n_uncond)
    return dual_branch_linear_unfused(x, weight, bias, down, up, scale, n_uncond)


def bind_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
               up: torch.Tensor, n_uncond: int) -> Callable[..., torch.Tensor] | None:
    """`dual_branch_linear_eager` bound to this call's shape: f(x, weight, bias, down, up, scale), or None.

    For a layer module that calls the kernel once per step with the same shapes: the bound call skips
    the checks and lookups of a general call (eager sampling is host-bound). None until the kernel has
    run for this shape, and where the Triton kernel does not serve the call.
    """
    if not _takes_triton(x, weight, bias, down, up, n_uncond):
        return None
    return _triton_module().bind_launch(x, weight, bias, down, up, n_uncond, dual_branch_linear_eager)


def bind_group(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
               downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], n_uncond: int) -> Callable[..., list[torch.Tensor]] | None:
    """One launch for sibling layers that read x, bound to this call's shape and to these tensors:
    f(x, scales) -> outputs (or None from a call it cannot serve); None where the grouped Triton kernel does
    not serve the shape. Where it does not serve, each layer runs alone."""
    if not (x.is_contiguous() and _takes_triton(x, weights[0], biases[0], downs[0], ups[0], n_uncond)):
        return None
    from npo_merge.guidance.kernels.dual_linear_group import MAX_MEMBERS, GroupLaunch, TableLaunch

    try:
        launch = GroupLaunch if len(weights) <= MAX_MEMBERS else TableLaunch
        return launch(x, weights, biases, downs, ups, n_uncond)
    except ValueError:  # members differ in shape, rank, dtype or layout
        return None


def _takes_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                  up: torch.Tensor, n_uncond: int) -> bool:
    """Check the call (raises on a mismatch) and say whether the Triton kernel serves it."""
    return _route(
        x.shape, weight.shape, None if bias is None else bias.shape, down.shape, up.shape,
        (x.dtype, weight.dtype, down.dtype, up.dtype, x.dtype if bias is None else bias.dtype), n_uncond, x.is_cuda,
    )


@functools.lru_cache(maxsize=4096)
def _route(x_shape: torch.Size, weight_shape: torch.Size, bias_shape: torch.Size | None, down_shape: torch.Size,
           up_shape: torch.Size, dtypes: tuple[torch.dtype, ...], n_uncond: int, on_cuda: bool) -> bool:
    """Check a layer call once per shape and say whether the Triton kernel takes it (eager is host-bound)."""
    check_dual_linear_shapes(x_shape, weight_shape, bias_shape, down_shape, up_shape, dtypes, n_uncond)
    rows = math.prod(x_shape[:-1])
    too_large = max(rows * x_shape[-1], rows * weight_shape[0]) >= _INT32_LIMIT
    return on_cuda and dtypes[0] in _KERNEL_DTYPES and not too_large and _triton_imports()


@functools.lru_cache(maxsize=1)
def _triton_module():  # noqa: ANN202 (imports triton: only called once the kernel is known to run)
    from npo_merge.guidance.kernels import dual_linear_triton

    return dual_linear_triton


def dual_branch_conv1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    n_uncond: int,
) -> torch.Tensor:
    """A 1x1 conv (weight (out, in, 1, 1), down (r, in, 1, 1), up (out, r, 1, 1)) through the linear op.

    ``n_uncond`` counts batch items. Pixels become rows in channels-last order: free for a
    channels_last input, one copy for an NCHW one. The result is returned as a channels_last view.
    """
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise CompatibilityError(f"dual_branch_conv1x1 takes a 1x1 conv weight, got {tuple(weight.shape)}")
    height, width = x.shape[2:]
    rows = x.permute(0, 2, 3, 1)
    y = torch.ops.npo_merge.dual_branch_linear(
        rows, weight.flatten(1), bias, down.flatten(1), up.flatten(1), float(scale), n_uncond * height * width
    )
    return y.permute(0, 3, 1, 2)
