"""Dual-branch layers against hand-built theta_u layers: every strategy, mode and layer kind, float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from npo_merge.delta.types import LowRank
from npo_merge.errors import CompatibilityError, InputError
from npo_merge.guidance import dual_branch
from npo_merge.guidance.dual_branch import (
    BranchDelta,
    DualBranchConv2d,
    DualBranchLinear,
    delta_problem,
    dual_branch_module,
    lowrank_linear,
    stacked_linear,
    uncond_rows,
)

DT = torch.float64


def _layer(kind: str, bias: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A layer of `kind` and an input batch of 4 rows for it."""
    gen = torch.Generator().manual_seed(0)
    if kind == "linear2d":
        layer, x = nn.Linear(6, 5, bias=bias), torch.randn(4, 6, generator=gen)
    elif kind == "linear3d":
        layer, x = nn.Linear(6, 5, bias=bias), torch.randn(4, 3, 6, generator=gen)
    elif kind == "conv3x3":
        layer, x = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=bias), torch.randn(4, 3, 7, 7, generator=gen)
    else:
        layer, x = nn.Conv2d(3, 5, 1, bias=bias), torch.randn(4, 3, 4, 4, generator=gen)
    return layer.to(DT), x.to(DT)


def _lora(layer: nn.Module, rank: int = 2) -> LowRank:
    gen = torch.Generator().manual_seed(1)
    w = layer.weight
    down = torch.randn(rank, *w.shape[1:], generator=gen, dtype=DT)
    up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=gen, dtype=DT)
    return LowRank(down=down, up=up, alpha=3.0)


def _by_hand(layer: nn.Module, delta: BranchDelta, eta: float, x: torch.Tensor, n_uncond: int) -> torch.Tensor:
    """Rows [:n_uncond] through a copy of the layer holding theta_u, the rest through the layer itself."""
    theta_u = copy.deepcopy(layer)
    theta_u.weight.data += eta * delta.dense_weight(layer.weight.shape, DT)
    if delta.bias is not None:
        theta_u.bias = nn.Parameter((theta_u.bias.data if theta_u.bias is not None else 0) + eta * delta.bias)
    return torch.cat([theta_u(x[:n_uncond]), layer(x[n_uncond:])])


@pytest.mark.parametrize("kind", ["linear2d", "linear3d", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("path", ["lowrank", "dense", "stacked"])
@pytest.mark.parametrize("mode", ["cfg", "cond", "uncond"])
@pytest.mark.parametrize("with_bias_delta", [False, True])
def test_layer_matches_hand_built_branches(kind, path, mode, with_bias_delta):
    layer, x = _layer(kind)
    bias_delta = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=DT) if with_bias_delta else None
    delta = BranchDelta(_lora(layer), bias_delta)
    expected = _by_hand(layer, delta, 0.7, x, uncond_rows(x.shape[0], mode))
    wrapped = dual_branch_module(copy.deepcopy(layer), delta, 0.7, path=path, mode=mode)
    with torch.no_grad():
        got = wrapped(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_dense_difference_on_layer_without_bias():
    layer, x = _layer("linear3d", bias=False)
    delta = BranchDelta(torch.randn(5, 6, dtype=DT), torch.randn(5, dtype=DT))
    wrapped = dual_branch_module(copy.deepcopy(layer), delta, 1.0)
    assert wrapped.strategy == "dense"
    torch.testing.assert_close(wrapped(x), _by_hand(layer, delta, 1.0, x, 2), rtol=1e-12, atol=1e-12)


def test_cond_half_is_the_untouched_base_output():
    layer, x = _layer("linear3d")
    base = layer(x)
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0)
    y = wrapped(x)
    assert torch.equal(y[2:], base[2:])
    assert (y[:2] - base[:2]).abs().max() > 0.1


def test_eta_scales_the_difference():
    layer, x = _layer("conv3x3")
    delta = BranchDelta(_lora(layer))
    base = layer(x)
    one = dual_branch_module(copy.deepcopy(layer), delta, 1.0)(x)
    two = dual_branch_module(copy.deepcopy(layer), delta, 2.0)(x)
    zero = dual_branch_module(copy.deepcopy(layer), delta, 0.0)(x)
    torch.testing.assert_close(two - base, 2 * (one - base))
    assert torch.equal(zero, base)


def test_cfg_mode_refuses_odd_batch():
    layer, x = _layer("linear2d")
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0)
    with pytest.raises(InputError, match="odd batch of 3.*'cond'"):
        wrapped(x[:3])


def test_weights_are_shared_not_copied():
    linear, _ = _layer("linear3d")
    conv, _ = _layer("conv3x3")
    for layer, cls in ((linear, DualBranchLinear), (conv, DualBranchConv2d)):
        wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0)
        assert isinstance(wrapped, cls)
        assert wrapped.weight is layer.weight and wrapped.bias is layer.bias
        assert wrapped.original is layer
        assert set(wrapped.state_dict()) == {"weight", "bias"}  # buffers are not persistent
        assert wrapped.extra_bytes() == (wrapped.down.numel() + wrapped.up.numel()) * 8


def test_stacked_stores_theta_c_once_and_release_gives_it_back():
    layer, x = _layer("linear3d")
    before = layer.weight.detach().clone()
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0, path="stacked")
    stack = wrapped.stacked_weight
    assert layer.weight.data_ptr() == stack[1].data_ptr()  # W_c lives inside the stack
    assert torch.equal(stack[1], before)
    original = wrapped.release()
    assert original is layer
    assert layer.weight.untyped_storage().data_ptr() != stack.untyped_storage().data_ptr()
    assert torch.equal(layer.weight, before)


def _joint_conv(bias: bool = True, stride: int = 1) -> tuple[nn.Conv2d, torch.Tensor, BranchDelta]:
    """A conv with 8 output channels and a rank-2 delta: `joint_conv2d` serves it."""
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 8, 3, stride=stride, padding=1, bias=bias).to(DT)
    return conv, torch.randn(4, 3, 6, 5, generator=gen, dtype=DT), BranchDelta(_lora(conv))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("n_uncond", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_joint_conv_equals_separate_shrink_and_expand(memory_format, n_uncond, bias):
    conv, x, delta = _joint_conv(bias, stride=2)
    factors = delta.weight
    joint_weight = torch.cat([conv.weight.detach(), factors.down]).contiguous(memory_format=memory_format)
    joint_bias = None if conv.bias is None else torch.cat([conv.bias.detach(), torch.zeros(2, dtype=DT)])
    x = x.contiguous(memory_format=memory_format)
    expected = dual_branch.lowrank_conv2d(x, conv.weight, conv.bias, factors.down, factors.up, 0.6, n_uncond, (2, 2), (1, 1))
    with torch.no_grad():
        got = dual_branch.joint_conv2d(x, joint_weight, joint_bias, factors.up, 0.6, n_uncond, (2, 2), (1, 1))
    assert got.shape == expected.shape == (4, 8, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _joint_linear(bias: bool = True, stride: int = 1) -> tuple[nn.Linear, torch.Tensor, BranchDelta]:
    """A linear layer with 8 outputs and a rank-2 delta: `joint_linear` can serve it."""
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(6, 8, bias=bias).to(DT)
    return linear, torch.randn(4, 3, 6, generator=gen, dtype=DT), BranchDelta(_lora(linear))


@pytest.mark.parametrize("make", [_joint_conv, _joint_linear])
@pytest.mark.parametrize("bias", [False, True])
def test_joint_layer_keeps_one_copy_of_w_across_to_and_release(make, bias):
    conv, x, delta = make(bias)
    before = [p.detach().clone() for p in conv.parameters()]
    expected = _by_hand(conv, delta, 0.7, x, 2)
    wrapped = dual_branch_module(conv, delta, 0.7)
    joint = wrapped.joint_weight
    assert joint.shape == (10, *conv.weight.shape[1:])
    assert conv.weight.data_ptr() == joint.data_ptr() and wrapped.down.data_ptr() == joint[8:].data_ptr()
    assert wrapped.extra_bytes() == (wrapped.down.numel() + wrapped.up.numel()) * 8
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), expected, rtol=1e-12, atol=1e-12)
    wrapped.to(torch.float32)  # converts W and down apart: the layer joins them again
    assert conv.weight.dtype == wrapped.joint_weight.dtype == torch.float32
    assert conv.weight.data_ptr() == wrapped.joint_weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x.float()), expected.float(), rtol=1e-5, atol=1e-5)
    joint_storage = wrapped.joint_weight.untyped_storage().data_ptr()
    original = wrapped.release()
    assert original is conv
    assert conv.weight.untyped_storage().data_ptr() != joint_storage
    assert wrapped.joint_weight is None and wrapped.down.untyped_storage().data_ptr() != joint_storage
    for param, old in zip(conv.parameters(), before):
        assert param.shape == old.shape
        torch.testing.assert_close(param.detach(), old.float())


def test_joint_linear_is_the_rule_path_without_timings(monkeypatch):
    """Without GPU timings (CPU here; capture with no eager call first) a joined layer takes `joint_linear`
    where the fused op and materializing are not preferred."""
    linear, x, delta = _joint_linear()
    wrapped = dual_branch_module(copy.deepcopy(linear), delta, 0.7)
    monkeypatch.setattr(dual_branch, "fused_entry", lambda: lambda *args: pytest.fail("the fused op was called"))
    monkeypatch.setattr(dual_branch, "prefers_fused", lambda *shape, eager: False)
    wrapped.set_backend("auto")
    taken = []
    real = dual_branch.joint_linear
    monkeypatch.setattr(dual_branch, "joint_linear", lambda *a: taken.append(a) or real(*a))
    with torch.no_grad():
        got = wrapped(x)
    assert len(taken) == 1 and got.stride()[-2] == 10  # a view of the joint GEMM's output
    torch.testing.assert_close(got, _by_hand(linear, delta, 0.7, x, 2), rtol=1e-12, atol=1e-12)


def test_joint_conv_steps_aside_for_autograd_and_large_ranks():
    conv, x, delta = _joint_conv()
    wrapped = dual_branch_module(copy.deepcopy(conv), delta, 1.0)
    x.requires_grad_(True)
    wrapped(x).square().sum().backward()  # the in-place expand would not be differentiable: lowrank path
    reference = x.grad.clone()
    x.grad = None
    _by_hand(conv, delta, 1.0, x, 2).square().sum().backward()
    torch.testing.assert_close(reference, x.grad)
    wide = BranchDelta(_lora(conv, rank=3))  # 3 * JOINT_MIN_OUT_PER_RANK > 8 output channels
    assert dual_branch_module(copy.deepcopy(conv), wide, 1.0).joint_weight is None


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("n_uncond", [0, 1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_materialized_linear_equals_shrink_and_expand(layout, n_uncond, bias):
    layer, x = _layer("linear3d", bias=bias)
    if layout == "transposed":  # (batch, pixels, channels) viewed from NCHW, as diffusers' proj_in gets it
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    factors = _lora(layer)
    down, up = factors.down, factors.up
    expected = lowrank_linear(x, layer.weight, layer.bias, down, up, 0.6, n_uncond)
    with torch.no_grad():
        got = dual_branch.materialized_linear(x, layer.weight, layer.bias, down, up, 0.6, n_uncond)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_auto_backend_materializes_theta_u_for_many_uncond_rows(monkeypatch):
    """Calls the fused op does not take go to `materialized_linear` from MATERIALIZE_MIN_ROWS uncond rows."""
    layer, x = _layer("linear3d")
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0)
    monkeypatch.setattr(dual_branch, "fused_entry", lambda: lambda *args: pytest.fail("the fused op was called"))
    monkeypatch.setattr(dual_branch, "prefers_fused", lambda *shape, eager: False)
    wrapped.set_backend("auto")
    taken = []
    for name in ("lowrank_linear", "materialized_linear"):
        real = getattr(dual_branch, name)
        monkeypatch.setattr(dual_branch, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    assert dual_branch.prefers_materialized(4096) and not dual_branch.prefers_materialized(1024)
    expected = _by_hand(layer, BranchDelta(_lora(layer)), 1.0, x, 2)
    for min_rows, path in ((7, "lowrank_linear"), (6, "materialized_linear")):  # 2 uncond items x 3 tokens
        monkeypatch.setattr(dual_branch, "MATERIALIZE_MIN_ROWS", min_rows)
        wrapped.set_backend("auto")
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), expected)
        assert taken[-1] == path
    wrapped(x).sum().backward()  # autograd records: the shrink/expand pair, even where many rows would materialize
    assert taken[-1] == "lowrank_linear" and layer.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_joint_conv_and_materialized_linear_on_cuda(dtype):
    """Half-precision cuDNN/cuBLAS paths against float64, at SD1.5 shapes, NCHW and channels_last."""
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(320, 320, 3, padding=1).to(DT)
    delta = BranchDelta(_lora(conv, rank=64))
    x = torch.randn(2, 320, 64, 64, generator=gen, dtype=DT)
    expected = _by_hand(conv, delta, 1.0, x, 1)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        wrapped = dual_branch_module(copy.deepcopy(conv), delta, 1.0).to("cuda", dtype, memory_format=memory_format)
        assert wrapped.joint_weight is not None
        x_cuda = x.to("cuda", dtype).contiguous(memory_format=memory_format)
        with torch.no_grad():
            for _ in range(2):  # the first call times joint against lowrank, the second takes the winner
                got = wrapped(x_cuda).double().cpu()
                assert ((got - expected).norm() / expected.norm()).item() < 1e-2, memory_format
        assert len(wrapped._joint_faster) == 1
    linear = nn.Linear(640, 640).to(DT)
    factors = _lora(linear, rank=64)
    x = torch.randn(2, 640, 4096, generator=gen, dtype=DT).transpose(1, 2)
    expected = lowrank_linear(x, linear.weight, linear.bias, factors.down, factors.up, 0.05, 1)
    cuda = [t.detach().to("cuda", dtype) for t in (x, linear.weight, linear.bias, factors.down, factors.up)]
    got = dual_branch.materialized_linear(*cuda, 0.05, 1).double().cpu()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


def test_buffers_follow_module_dtype():
    layer, x = _layer("linear3d")
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0).to(torch.float32)
    assert wrapped.down.dtype == wrapped.up.dtype == wrapped.weight.dtype == torch.float32
    assert wrapped(x.float()).dtype == torch.float32


def test_linear_and_1x1_conv_accept_each_others_factor_shapes():
    linear, x = _layer("linear2d")
    conv_shaped = LowRank(down=torch.randn(2, 6, 1, 1, dtype=DT), up=torch.randn(5, 2, 1, 1, dtype=DT), alpha=2.0)
    assert delta_problem(linear, BranchDelta(conv_shaped)) is None
    flat = LowRank(down=conv_shaped.down.reshape(2, 6), up=conv_shaped.up.reshape(5, 2), alpha=2.0)
    y = dual_branch_module(copy.deepcopy(linear), BranchDelta(conv_shaped), 1.0)(x)
    torch.testing.assert_close(y, dual_branch_module(linear, BranchDelta(flat), 1.0)(x))


def test_delta_problem_names_what_is_wrong():
    linear, _ = _layer("linear2d")
    assert "expands to (5, 7)" in delta_problem(linear, BranchDelta(LowRank(torch.zeros(2, 7), torch.zeros(5, 2), 1.0)))
    assert "dense delta has shape (4, 6)" in delta_problem(linear, BranchDelta(torch.zeros(4, 6)))
    assert "bias delta" in delta_problem(linear, BranchDelta(torch.zeros(5, 6), torch.zeros(4)))
    assert "LayerNorm" in delta_problem(nn.LayerNorm(6), BranchDelta(torch.zeros(6)))
    with pytest.raises(CompatibilityError, match="expands to"):
        dual_branch_module(linear, BranchDelta(LowRank(torch.zeros(2, 7), torch.zeros(5, 2), 1.0)))


def test_pure_functions_on_hand_checkable_numbers():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.eye(2)
    down, up = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [0.0]])
    # uncond row 0 gets + scale * (x0 . [1, 1]) * [1, 0] = [2, 0]; cond row 1 is plain.
    assert torch.equal(lowrank_linear(x, weight, None, down, up, 2.0, 1), torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    stacked = torch.stack([2 * torch.eye(2), torch.eye(2)])
    assert torch.equal(stacked_linear(x, stacked, torch.tensor([[1.0, 1.0], [0.0, 0.0]])), torch.tensor([[3.0, 1.0], [0.0, 1.0]]))
    assert [uncond_rows(4, m) for m in ("cfg", "cond", "uncond")] == [2, 0, 4]


def test_fused_backend_dispatches_to_the_op(monkeypatch):
    """The fused entry gets the module's tensors and n_uncond counted in flattened rows (the op's contract)."""
    layer, x = _layer("linear3d")  # (4, 3, 6): 2 uncond items = 6 flattened rows
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0)
    monkeypatch.setattr(dual_branch, "fused_entry", lambda: None)
    with pytest.raises(InputError, match="dual_branch_linear"):
        wrapped.set_backend("fused")
    calls = []

    def fake_op(x, weight, bias, down, up, scale, n_rows):
        calls.append(n_rows)
        flat = lowrank_linear(x.reshape(-1, x.shape[-1]), weight, bias, down, up, scale, n_rows)
        return flat.reshape(*x.shape[:-1], -1)

    monkeypatch.setattr(dual_branch, "fused_entry", lambda: fake_op)
    expected = wrapped(x)
    wrapped.set_backend("fused")
    torch.testing.assert_close(wrapped(x), expected)
    wrapped.set_mode("uncond")
    wrapped(x)
    assert calls == [6, 12]


def test_auto_backend_takes_the_fused_op_in_eager_only_where_the_shape_favours_it(monkeypatch):
    """'auto' follows prefers_fused in eager mode, and under torch.compile runs that same route inside the
    routed op; a forced 'fused' backend calls the fused op under compile too."""
    layer, x = _layer("linear3d")
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0)
    calls = []

    def fake_op(x, weight, bias, down, up, scale, n_rows):
        calls.append(n_rows)
        return lowrank_linear(x.reshape(-1, x.shape[-1]), weight, bias, down, up, scale, n_rows).reshape(*x.shape[:-1], -1)

    monkeypatch.setattr(dual_branch, "fused_entry", lambda: fake_op)
    wrapped.set_backend("auto")
    expected = lowrank_linear(x, layer.weight, layer.bias, wrapped.down, wrapped.up, wrapped.scale, 2)
    for favoured in (False, True):
        monkeypatch.setattr(dual_branch, "prefers_fused", lambda *shape, eager, favoured=favoured: favoured)
        torch.testing.assert_close(wrapped(x), expected)
    assert calls == [6]
    routed = []
    monkeypatch.setattr(dual_branch, "routed_linear", lambda *args: routed.append(args[-1]) or wrapped.route(*args[:-1]))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():  # inference: with autograd every call decides between the fused op and torch
        torch.testing.assert_close(wrapped(x), expected)
        assert routed == [wrapped._op_key] and calls == [6, 6]  # compiling: the op, running the bound eager route
        wrapped.set_backend("fused")
        wrapped(x)
        assert routed == [wrapped._op_key] and calls == [6, 6, 6]  # a forced backend is kept under compile too


def test_eager_inference_decides_and_binds_the_path_once_per_input_shape(monkeypatch):
    """Without autograd, a layer picks its path once per (shape, dtype, device, uncond rows) and reuses the
    bound call; set_backend and .to() forget the choices; with autograd recording every call decides."""
    layer, x = _layer("linear3d")
    wrapped = dual_branch_module(layer, BranchDelta(_lora(layer)), 1.0)
    calls, decisions = [], []

    def fake_op(x, weight, bias, down, up, scale, n_rows):
        calls.append(("op", n_rows))
        return lowrank_linear(x.reshape(-1, x.shape[-1]), weight, bias, down, up, scale, n_rows).reshape(*x.shape[:-1], -1)

    def fake_binder(x, weight, bias, down, up, n_rows):
        def bound(x, w, b, d, u, s):
            calls.append(("bound", n_rows))
            return fake_op(x, w, b, d, u, s, n_rows)
        return bound

    monkeypatch.setattr(dual_branch, "fused_entry", lambda: fake_op)
    monkeypatch.setattr(dual_branch, "fused_binder", lambda: fake_binder)
    monkeypatch.setattr(dual_branch, "prefers_fused", lambda *shape, eager: decisions.append(shape) or shape[0] > 6)
    wrapped.set_backend("auto")
    expected = lowrank_linear(x, layer.weight, layer.bias, wrapped.down, wrapped.up, wrapped.scale, 2)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(wrapped(x), expected)
        assert len(decisions) == 1
        assert calls == [("bound", 6), ("op", 6)] * 3  # bound on the first call, reused after
        wrapped(x[:2])  # another shape: 6 rows, where this rule says torch (eager rule, then the capture rule)
        wrapped(x[:2])
        assert len(decisions) == 3 and len(calls) == 6
        wrapped.set_mode("uncond")  # other uncond rows: decided again
        wrapped(x)
        assert len(decisions) == 4 and calls[-2:] == [("bound", 12), ("op", 12)]
        wrapped.set_backend("auto")
        wrapped(x)
        assert len(decisions) == 5
        wrapped.to(DT)
        assert not wrapped._routes
    wrapped(x)
    wrapped(x)  # the layer's parameters require grad: no binding, every call decides
    assert len(decisions) == 7 and calls[-1] == ("op", 12)


def _fake_group_binder(runs: list):
    """A group binder computing each member with the torch path, recording the uncond rows of every run."""

    def bind(x, weights, biases, downs, ups, rows):
        def run(x, scales):
            runs.append(rows)
            flat = x.reshape(-1, x.shape[-1])
            return [lowrank_linear(flat, w, b, d, u, s, rows).reshape(*x.shape[:-1], -1)
                    for w, b, d, u, s in zip(weights, biases, downs, ups, scales)]
        return run

    return bind


def test_input_group_computes_siblings_once_per_input_tensor(monkeypatch):
    """The first member called computes all members' outputs; siblings called with that very tensor take
    theirs; another tensor, an in-place change, autograd, backend 'torch' or .to() make members run alone."""
    gen = torch.Generator().manual_seed(5)
    layers = [nn.Linear(6, 5).to(DT) for _ in range(3)]
    wrapped = [dual_branch_module(layer, BranchDelta(_lora(layer), bias=torch.randn(5, generator=gen, dtype=DT)), 0.5)
               for layer in layers]
    runs: list = []
    monkeypatch.setattr(dual_branch, "group_binder", lambda: _fake_group_binder(runs))
    monkeypatch.setattr(dual_branch, "prefers_fused", lambda *shape, eager: False)  # alone: the torch path
    for layer in wrapped:
        layer.set_backend("auto")
    dual_branch.InputGroup(wrapped)
    x = torch.randn(4, 3, 6, generator=gen, dtype=DT)

    def expected(x):
        return [_by_hand(layer, BranchDelta(_lora(layer), bias=w.bias_diff / 0.5), 0.5, x, 2)
                for layer, w in zip(layers, wrapped)]

    with torch.no_grad():
        for got, want in zip([w(x) for w in wrapped], expected(x)):
            torch.testing.assert_close(got, want)
        assert runs == [6]  # one run for three members; 2 uncond items x 3 tokens
        copy_of_x = x.clone()
        wrapped[1](copy_of_x)  # not the tensor the pending outputs came from: runs again
        torch.testing.assert_close(wrapped[2](copy_of_x), expected(copy_of_x)[2])
        assert len(runs) == 2
        wrapped[0](x)
        x.mul_(2.0)  # changed in place after the group ran: the sibling must not get the stale output
        torch.testing.assert_close(wrapped[1](x), expected(x)[1])
        assert len(runs) == 4
        wrapped[0].to(DT)  # .to() forgets bound launches and pending outputs
        assert not wrapped[0].group._pending and not wrapped[0].group._runners
        wrapped[0].set_backend("torch")
        wrapped[0](x)
        assert len(runs) == 4
    for layer in wrapped:
        layer.set_backend("auto")
    wrapped[0](x)  # parameters require grad: every member runs alone, autograd records
    assert len(runs) == 4


def test_per_shape_dispatch_rule_picks_fused_for_small_layers_only() -> None:
    from npo_merge.guidance.dual_branch import prefers_fused

    assert prefers_fused(8192, 320, 320, 8)  # SD1.5 attention at 64x64 latents
    assert prefers_fused(154, 768, 320, 8)  # cross-attention k/v over text tokens
    assert prefers_fused(8192, 320, 2560, 8)  # narrow input, small rank
    assert not prefers_fused(8192, 320, 2560, 64)  # ... but not at rank 64
    assert not prefers_fused(2048, 1280, 10240, 8)  # SDXL GEGLU: cuBLAS + torch update wins
    assert not prefers_fused(2, 1280, 1280, 8)  # time embedding: too few rows
    # Eager (host-bound): one launch beats three for every attention projection of SD1.5 and SDXL
    assert prefers_fused(2048, 1280, 1280, 8, eager=True) and prefers_fused(8192, 640, 640, 64, eager=True)
    assert prefers_fused(2, 1280, 1280, 8, eager=True)
    assert not prefers_fused(2048, 1280, 10240, 8, eager=True)  # SDXL GEGLU: the GPU-time rule
