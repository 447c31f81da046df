"""Dual-branch linears under torch.compile: one opaque op a layer that runs the layer's eager route.

Left to Inductor, a layer's torch ops become three kernels (the GEMM, the shrink, an out-of-place addmm
for the uncond rows) plus a copy of those rows back into the output, since the in-place update of a view
does not survive functionalization. This op instead runs what an eager call runs: the timed fastest path
for the shape, the shared-input group launches and the bound Triton launches. Inductor sees a function
of (x, W, b, A, B, scale, n_uncond) with a fake implementation, so it traces, and under
mode="reduce-overhead" its CUDA graphs hold the launches the op makes.

The layer is found through a registry key (an int, as op arguments must be tensors or scalars).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

__all__ = ["register", "routed_linear"]

_LAYERS: dict[int, weakref.ref] = {}
_KEYS = itertools.count()


def register(layer: Any) -> int:
    """A key for `layer` (weakly held: a deleted layer's entry goes with it)."""
    key = next(_KEYS)
    _LAYERS[key] = weakref.ref(layer, lambda _, key=key: _LAYERS.pop(key, None))
    return key


# Defined with torch.library directly rather than @torch.library.custom_op: a call dispatches through fewer
# Python layers (benchmarks/op_dispatch.py, cpu2: 53.8 against 78.1 us a call, the route alone 36.9 us),
# which torch.compile's default mode, without CUDA graphs, pays on every layer of every step. Inference
# only: calls that need autograd take the torch ops instead (DualBranchLinear._fused_lowrank).
_LIBRARY = torch.library.Library("npo_merge", "FRAGMENT")  # registrations live as long as this object
_LIBRARY.define("routed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up, float scale, "
                "int n_uncond, int layer) -> Tensor")


def _routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                   up: torch.Tensor, scale: float, n_uncond: int, layer: int) -> torch.Tensor:
    """x W^T + b on every row, + scale (x A^T) B^T on the leading n_uncond rows (dim 0), computed by the
    eager route of the registered layer `layer`; always a contiguous tensor, as the fake one is."""
    ref = _LAYERS.get(layer)
    module = ref() if ref is not None else None
    if module is None:
        raise RuntimeError(f"dual-branch layer {layer} no longer exists: compile the model again")
    y = module.route(x, weight, bias, down, up, scale, n_uncond)
    return y if y.is_contiguous() else y.contiguous()


_LIBRARY.impl("routed_linear", _routed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("npo_merge::routed_linear")
def _routed_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                        up: torch.Tensor, scale: float, n_uncond: int, layer: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


routed_linear = torch.ops.npo_merge.routed_linear.default
