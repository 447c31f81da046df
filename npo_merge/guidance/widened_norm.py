"""LayerNorm-fed projections in one cuBLAS GEMM: the norm writes the LoRA shrink, the GEMM reads it as input.

In a diffusers transformer block, `norm1`'s output feeds only the self-attention's q/k/v, `norm2`'s only the
cross-attention's q and `norm3`'s only the feed-forward's input projection. `WidenedNorm` replaces such a
norm (`enable_npo`'s `widened_norms`): it runs a Triton LayerNorm
(`kernels.norm_shrink`) that writes rows [LN(h) | s * LN(h_u) A^T | 0] into a buffer K + tail wide and
returns the LN(h) view. `WideGroup` stores its projections' weights as rows of one matrix
[W | B | 0] (the Parameters become views of it: W is still stored once), so when a projection is called
with that very view, one GEMM over the wide rows computes every member's x W^T + s (x A^T) B^T at once:
no update pass, no second launch, the extra cost being the tail's share of K.

The widened path costs less GPU time and more host time (an extra Triton launch per norm, where eager
sampling is host-bound), so by default it serves CUDA-graph captures only; eager calls (bound for capture
at their first call) run the norm and the projections as usual, q/k/v with one grouped launch. Any
other call (another input, small batches, torch.compile, autograd) runs the usual path too, so results
never depend on whether the fast path served. The tail is padded to a multiple of 64 elements: cuBLAS
ran the GEMM up to 1.4x slower with rows of K + 8 elements (H100, fp16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from npo_merge.guidance.dual_branch import GROUP_MAX_RANK, DualBranchLinear, InputGroup, _capturing, uncond_rows

__all__ = ["WideGroup", "WidenedNorm", "widen_norms"]

# Rows of a call below which the norm and the projections run as usual (H100, fp16: the Triton norm is
# slower than torch's below 2048 rows, and the saving is smaller than the loss).
MIN_ROWS = 2048
# The wide GEMM's extra K, at most this fraction of K: rank 8 on 320-wide q/k/v adds 20 % (the Triton norm
# saves more than that costs, H100), rank 64 on them would add 60 %.
MAX_TAIL_FRACTION = 0.2
# At most this much rank over a norm's projections together (rank 8 on q/k/v is 24). With rank 64 on
# every layer the norm's shrink costs more than the GEMM saves (H100: SDXL step 1.154x against 1.155x,
# the norm kernel 10.8-19.7 us against torch's 7.0 us on 2048x1280).
MAX_RANK = 32
_ALIGN = 64


def _wide_width(in_features: int, rank: int) -> int:
    """Row length of the widened input and weight: K + rank, padded to a multiple of _ALIGN."""
    return -(-(in_features + rank) // _ALIGN) * _ALIGN


def _norm_launcher() -> tuple | None:
    """(NormShrinkLaunch, norm_shrink, interpreted) from the kernels package, or None without triton."""
    try:
        from npo_merge.guidance.kernels.dual_linear_triton import INTERPRETED
        from npo_merge.guidance.kernels.norm_shrink import NormShrinkLaunch, norm_shrink
    except ImportError:
        return None
    return NormShrinkLaunch, norm_shrink, INTERPRETED


class WideGroup:
    """Low-rank dual-branch linears that read one LayerNorm's output, with weights stored as [W | B | 0] rows.

    eager: the widened path serves eager calls too, not only CUDA-graph captures. group_inputs: where the
    widened path does not serve, two or more members take one grouped launch (`InputGroup`) over their
    strided weights."""

    owns_weights = True  # DualBranchLayer._join leaves the layout of members to the group

    def __init__(self, members: list[DualBranchLinear], *, eager: bool = False, group_inputs: bool = True) -> None:
        self.members = members
        self.eager = eager
        grouped = group_inputs and len(members) > 1 and all(m.down.shape[0] <= GROUP_MAX_RANK for m in members)
        self.eager_group = InputGroup(members) if grouped else None  # before `member.group = self` below
        self._index = {id(member): i for i, member in enumerate(members)}
        self.in_features = members[0].in_features
        ranks = [m.down.shape[0] for m in members]
        self.rank = sum(ranks)
        self.width = _wide_width(self.in_features, self.rank)
        # The Parameters keep their identity across .to() (their .data changes); buffers are replaced, which
        # .to() reports through clear().
        self._params = [p for m in members for p in (m.weight, m.bias) if p is not None]
        self._layout()
        self._launches: dict[tuple, object] = {}
        self._bound: set[tuple] = set()  # (shape, mode) of eager calls bound for a later capture
        self._scales: tuple[float, ...] | None = None
        self._scale_rows: torch.Tensor | None = None
        self._source: tuple | None = None  # (view, n_uncond, (version, capturing)) of the last widened output
        self._pending: dict[int, torch.Tensor] = {}
        for member in members:
            member.group = self

    def _layout(self) -> None:
        """Copy the members' W and B into one [W | B | 0] matrix and their down factors into one (R, K)
        tensor; point the Parameters and buffers at views of them."""
        members, c = self.members, self.in_features
        first = members[0].weight
        outs = [m.out_features for m in members]
        wide = first.new_zeros((sum(outs), self.width))
        downs = torch.cat([m.down for m in members])
        biases = [m.bias for m in members]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        row = col = 0
        for member, out in zip(members, outs):
            rank = member.down.shape[0]
            wide[row:row + out, :c] = member.weight.detach()
            wide[row:row + out, c + col:c + col + rank] = member.up
            member.weight.data = wide[row:row + out, :c]
            member.down = downs[col:col + rank]
            if bias is not None:
                member.bias.data = bias[row:row + out]
            member.joint_weight = member.joint_bias = None
            row, col = row + out, col + rank
        self.weight, self.down, self.bias = wide, downs, bias
        self._addresses = tuple(p.data_ptr() for p in self._params)
        self._stale = False
        for member in members:  # bound launches keep the weights' old row stride
            member._routes.clear()
        if self.eager_group is not None:
            self.eager_group.clear()

    def clear(self) -> None:
        """Members moved or changed backend: forget launches and pending outputs (the layout is checked
        at the next call)."""
        self._launches.clear()
        self._bound.clear()
        self._source, self._pending = None, {}
        self._stale = True
        if self.eager_group is not None:
            self.eager_group.clear()

    def release(self) -> None:
        """Give the members their own storage again (disable_npo)."""
        for member in self.members:
            member.weight.data = member.weight.data.clone()
            member.down = member.down.clone()
            if member.bias is not None:
                member.bias.data = member.bias.data.clone()
            member.group = None
        self.weight = self.down = self.bias = self.eager_group = None
        self._source, self._pending = None, {}

    def _ready(self, capturing: bool) -> bool:
        """Layout and scales current; they are never rebuilt inside a CUDA graph capture (False then)."""
        fresh = not self._stale and tuple(p.data_ptr() for p in self._params) == self._addresses
        scales = tuple(m.scale for m in self.members)
        if fresh and scales == self._scales:
            return True
        if capturing:
            return False
        if not fresh:
            first = self.members[0].weight
            if any(m.weight.dtype != first.dtype or m.weight.device != first.device for m in self.members):
                return False  # a member was converted apart from its siblings
            self._layout()
        self._scale_rows = torch.tensor([s for m, s in zip(self.members, scales) for _ in range(m.down.shape[0])],
                                        dtype=torch.float32).to(self.weight.device)
        self._scales = scales
        return True

    def normalize(self, norm: nn.LayerNorm, h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor | None:
        """LN(h) as a view of the widened rows, ready for the members; None where this call takes the usual path.
        An eager call the widened path does not serve (`eager` off) binds the launch for its shape, so that a
        CUDA graph captured later can take it."""
        capturing = _capturing(h)
        bind_only = not (capturing or self.eager)
        if bind_only and (h.shape, self.members[0].mode) in self._bound:
            return None  # the usual path, with as little host time as can be: eager sampling is host-bound
        if torch.is_grad_enabled() and (h.requires_grad or gamma.requires_grad):
            return None
        if not self._ready(capturing):
            return None
        if not h.is_contiguous():  # e.g. SD1.5's permuted proj_in output (torch's LayerNorm copies it too)
            h = h.contiguous()
        n_uncond = uncond_rows(h.shape[0], self.members[0].mode)
        key = (h.shape, h.dtype, h.get_device(), n_uncond)  # the kernel counts uncond rows of h flattened to 2-D
        launch = self._launches.get(key, self)
        if launch is self:  # not bound yet: binding compiles and launches, which a capture cannot hold
            if capturing:
                return None
            launch = self._launches[key] = self._bind(norm, h, n_uncond * (h.numel() // (h.shape[0] * h.shape[-1])))
        if bind_only:
            self._bound.add((h.shape, self.members[0].mode))
            return None
        if launch is None:
            return None
        wide = launch(h, gamma, beta, self.down, self._scale_rows)
        view = wide[..., :self.in_features]
        self._source = (view, n_uncond, (-1 if view.is_inference() else view._version, capturing), wide)
        self._pending = {}
        return view

    def _bind(self, norm: nn.LayerNorm, h: torch.Tensor, flat_uncond: int) -> Callable | None:
        """The bound norm launch for calls like this one (after a first launch), or None where the usual path
        serves them. `flat_uncond` counts rows of h flattened to 2-D."""
        kernels = _norm_launcher()
        rows = h.numel() // max(1, h.shape[-1])
        if (kernels is None or not (h.is_cuda or kernels[2]) or not h.is_floating_point() or h.dtype == torch.float64
                or flat_uncond == 0 or rows < MIN_ROWS or h.shape[-1] != self.in_features
                or norm.weight.dtype != h.dtype or self.weight.dtype != h.dtype or self.weight.device != h.device):
            return None
        launch_class, first_launch, _ = kernels
        out = h.new_empty((*h.shape[:-1], self.width))
        direct = first_launch(h, norm.weight, norm.bias, norm.eps, self.down, self._scale_rows, flat_uncond, out)
        return launch_class(h, self.width, self.rank, flat_uncond, norm.eps, direct)

    def output(self, member: DualBranchLinear, x: torch.Tensor, n_uncond: int) -> torch.Tensor | None:
        """This member's output for the widened view x (all members' from one GEMM); for any other x, the
        members' grouped launch where there is one, else None (the member's own path)."""
        source = self._source
        if (source is None or source[0] is not x or source[1] != n_uncond
                or source[2] != (-1 if x.is_inference() else x._version, _capturing(x))):
            return None if self.eager_group is None else self.eager_group.output(member, x, n_uncond)
        index = self._index[id(member)]
        y = self._pending.pop(index, None)
        if y is None:
            full = F.linear(source[3], self.weight, self.bias)
            outs, row = [], 0
            for m in self.members:
                outs.append(full[..., row:row + m.out_features])
                row += m.out_features
            y = outs[index]
            self._pending = {i: out for i, out in enumerate(outs) if i != index}
        if not self._pending:  # every member served: let the widened rows go
            self._source = None
        return y


class WidenedNorm(nn.Module):
    """nn.LayerNorm whose output feeds a `WideGroup`: same Parameters (state_dict unchanged), same result."""

    def __init__(self, norm: nn.LayerNorm, group: WideGroup) -> None:
        super().__init__()
        object.__setattr__(self, "original", norm)  # unregistered: what disable_npo puts back
        self.weight, self.bias = norm.weight, norm.bias
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        if not torch.compiler.is_compiling():
            y = self.group.normalize(self, h, params["weight"], params["bias"])
            if y is not None:
                return y
        return F.layer_norm(h, self.normalized_shape, self.weight, self.bias, self.eps)

    def release(self) -> nn.Module:
        self.group.release()
        return self.original


def _widenable(norm: nn.Module | None, members: list) -> bool:
    """Whether `norm` (an affine nn.LayerNorm) and `members` (low-rank dual-branch linears on backend "auto",
    ungrouped, one input width, all with a bias or none) can form a widened group at an acceptable tail."""
    if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or norm.bias is None or not members:
        return False
    if not all(isinstance(m, DualBranchLinear) and m.strategy == "lowrank" and m.backend == "auto" and m.group is None
               for m in members):
        return False
    first = members[0]
    if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype or (m.bias is None) != (first.bias is None)
           for m in members):
        return False
    c, rank = first.in_features, sum(m.down.shape[0] for m in members)
    return rank <= MAX_RANK and _wide_width(c, rank) - c <= MAX_TAIL_FRACTION * c


def _norm_feeds(block: nn.Module) -> list[tuple[str, list]]:
    """(norm name, the projections that read only its output) in a diffusers BasicTransformerBlock: norm1 ->
    self-attention q/k/v, norm2 -> cross-attention q, norm3 -> the feed-forward's input projection."""
    feeds = []
    for norm_name, attention_name in (("norm1", "attn1"), ("norm2", "attn2")):
        attention = getattr(block, attention_name, None)
        if attention is not None and hasattr(attention, "is_cross_attention"):
            names = ("to_q",) if attention.is_cross_attention else ("to_q", "to_k", "to_v")
            feeds.append((norm_name, [getattr(attention, name, None) for name in names]))
    net = getattr(getattr(block, "ff", None), "net", None)
    if isinstance(net, nn.ModuleList) and len(net) and isinstance(getattr(net[0], "proj", None), nn.Module):
        feeds.append(("norm3", [net[0].proj]))  # GEGLU / GELU: proj reads the norm's output first
    return feeds


def widen_norms(unet: nn.Module, *, eager: bool = False, group_inputs: bool = True, feed_forward: bool = True) -> int:
    """Swap each transformer block's norm1 (feeding self-attention q/k/v), norm2 (cross-attention q) and norm3
    (the feed-forward's input projection; not with `feed_forward` off) for a `WidenedNorm` where all those
    projections are low-rank dual-branch layers on backend "auto"; returns how many norms were swapped.
    `eager`, `group_inputs`: see `WideGroup`. Run before `group_shared_inputs` takes q/k/v into launch groups."""
    swapped = 0
    for block in list(unet.modules()):
        # diffusers' BasicTransformerBlock keeps the flag as a plain attribute (a model's config flag is not one).
        if vars(block).get("only_cross_attention", True) or getattr(block, "pos_embed", None) is not None:
            continue
        for norm_name, members in _norm_feeds(block):
            norm = getattr(block, norm_name, None)
            if (feed_forward or norm_name != "norm3") and _widenable(norm, members):
                setattr(block, norm_name, WidenedNorm(norm, WideGroup(members, eager=eager, group_inputs=group_inputs)))
                swapped += 1
    return swapped
