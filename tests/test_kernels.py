"""Dual-branch kernels against a float64 reference; the custom op's CPU, fake, compile and autograd paths.

Without a GPU the Triton kernel runs under the interpreter (TRITON_INTERPRET=1) on small shapes.
The interpreter must be switched on before triton is first imported, and torch._dynamo imports
triton as soon as anything touches it (diffusers in conftest does), so when that has already
happened the Triton tests rerun in a fresh process. With a GPU they run the compiled kernel.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from npo_merge.errors import CompatibilityError  # noqa: E402
from npo_merge.guidance.kernels import (  # noqa: E402
    available,
    dual_branch_conv1x1,
    dual_branch_conv2d_reference,
    dual_branch_conv2d_unfused,
    dual_branch_linear_eager,
    dual_branch_linear_reference,
    dual_branch_linear_unfused,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_runs_here() -> bool:
    """A GPU, or an interpreter that was on when triton.language was built (its helpers interpreted too)."""
    if not HAS_TRITON:
        return False
    if torch.cuda.is_available():
        return True
    import triton
    import triton.language as tl

    return not isinstance(tl.cdiv, triton.runtime.JITFunction)


TRITON_HERE = _triton_runs_here()
needs_triton = pytest.mark.skipif(
    not TRITON_HERE,
    reason="triton missing, or imported before TRITON_INTERPRET=1 (then test_triton_in_fresh_interpreter runs these)",
)
needs_cuda = pytest.mark.skipif(not available(), reason="needs a CUDA device and triton")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}
SCALE = 0.75


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; infinite when out holds a NaN or inf (so NaN never passes)."""
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def _layer(rows: int, k: int, n: int, rank: int, dtype: torch.dtype, *, seed: int, bias: bool = True):
    """Fresh random x (rows, k), W, b, down, up, scaled so the low-rank update is as large as x W^T."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=DEVICE)

    x = draw(rows, k)
    weight = draw(n, k, std=k**-0.5)
    b = draw(n) if bias else None
    down = draw(rank, k, std=k**-0.5)
    up = draw(n, rank, std=rank**-0.5)
    return x, weight, b, down, up


def _float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.double() for t in tensors]


def _assert_branches_close(out: torch.Tensor, ref: torch.Tensor, n_uncond: int, tol: float) -> None:
    """Each branch on its own, so an error confined to the uncond rows cannot hide in the average."""
    rows_out, rows_ref = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
    for name, part in (("uncond", slice(None, n_uncond)), ("cond", slice(n_uncond, None))):
        if rows_ref[part].numel():
            err = _rel_err(rows_out[part], rows_ref[part])
            assert err < tol, f"{name} rows: relative error {err:.3g} >= {tol}"


# --------------------------------------------------------------------------- the Triton kernel

if TRITON_HERE:
    from npo_merge.guidance.kernels.dual_linear_triton import (
        INTERPRETED,
        KernelConfig,
        dual_branch_linear_triton,
        pick_config,
        rank_block,
    )

    # Small tiles so the interpreter's shapes still span several row and column tiles.
    SMALL = KernelConfig(block_m=32, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2)


def _run_kernel(x, weight, bias, down, up, n_uncond, *, shrink, config=None):
    """The kernel writing into a NaN-poisoned output, so any element it skips fails the check."""
    out = torch.full((x.numel() // x.shape[-1], weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    y = dual_branch_linear_triton(x, weight, bias, down, up, SCALE, n_uncond, shrink=shrink, config=config, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y


@needs_triton
def test_triton_runs_interpreted_without_a_gpu():
    assert INTERPRETED == (not torch.cuda.is_available())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 8, 24, 64, 128])
def test_triton_kernel_matches_float64(rank, dtype):
    rows, k, n = 64, 48, 80  # 2 row tiles x 3 column tiles of SMALL, K not a multiple of the K block
    for seed, (n_uncond, shrink) in enumerate([(rows // 2, "fused"), (37, "separate"), (37, "fused")]):
        x, weight, bias, down, up = _layer(rows, k, n, rank, dtype, seed=seed)
        ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), SCALE, n_uncond)
        out = _run_kernel(x, weight, bias, down, up, n_uncond, shrink=shrink, config=SMALL)
        _assert_branches_close(out, ref, n_uncond, TOLERANCE[dtype])


@needs_triton
@pytest.mark.parametrize("shrink", ["fused", "separate"])
@pytest.mark.parametrize("split", ["none", "all", "half", "inside_tile", "one_row"])
def test_triton_kernel_batch_splits(split, shrink):
    rows = 70
    n_uncond = {"none": 0, "all": rows, "half": rows // 2, "inside_tile": 45, "one_row": 1}[split]
    x, weight, bias, down, up = _layer(rows, 64, 48, 16, torch.float16, seed=7)
    ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), SCALE, n_uncond)
    out = _run_kernel(x, weight, bias, down, up, n_uncond, shrink=shrink, config=SMALL)
    _assert_branches_close(out, ref, n_uncond, 1e-2)


@needs_triton
def test_triton_kernel_leading_dims_no_bias_and_strided_input():
    """x of shape (batch, tokens, in) taken as a strided view, no bias, default tile choice."""
    wide = _layer(2 * 3 * 11, 2 * 40, 24, 8, torch.float16, seed=3, bias=False)[0]
    x = wide.view(6, 11, 80)[..., ::2]  # last-dim stride 2: the kernel reads strides, not a copy
    _, weight, _, down, up = _layer(1, 40, 24, 8, torch.float16, seed=4)
    n_uncond = 3 * 11
    ref = dual_branch_linear_reference(*_float64(x, weight, None, down, up), SCALE, n_uncond)
    out = _run_kernel(x, weight, None, down, up, n_uncond, shrink="auto")
    assert out.shape == (6, 11, 24)
    _assert_branches_close(out, ref, n_uncond, 1e-2)


@needs_triton
def test_triton_fixture_update_is_large_enough_to_fail_a_wrong_kernel():
    """The fixtures make the branch difference material: dropping it would miss the tolerance by far."""
    x, weight, bias, down, up = _float64(*_layer(64, 48, 40, 8, torch.float32, seed=0))
    with_update = dual_branch_linear_reference(x, weight, bias, down, up, SCALE, 64)
    without = dual_branch_linear_reference(x, weight, bias, down, up, 0.0, 64)
    assert _rel_err(without, with_update) > 0.3


@needs_triton
@pytest.mark.parametrize("rank", [1, 8, 24, 64, 128])
def test_triton_configs_fit_shared_memory_for_unet_shapes(rank):
    """Every tile choice for SD1.5/SDXL layer shapes stays within an H100's 227 KiB of shared memory."""
    for m, k, n in [(8192, 320, 320), (8192, 320, 2560), (2048, 2560, 640), (154, 2048, 1280), (512, 5120, 1280)]:
        for element_size in (2, 4):
            cfg = pick_config(m, n, k, rank, element_size)
            stage = element_size * cfg.block_k * (cfg.block_m + cfg.block_n + rank_block(rank))
            assert stage * cfg.num_stages <= 227 * 1024
            assert rank_block(rank) >= max(16, rank)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("members", "rank"), [(2, 8), (3, 8), (3, 64)])
def test_triton_group_kernel_matches_float64(members, rank, dtype):
    """One grouped launch gives every member its own dual-branch output (own weights, factors, scale)."""
    from npo_merge.guidance.kernels.dual_linear_group import launch_group

    rows, k, n = 70, 40, 40  # 3 row tiles x 2 column tiles per member of SMALL; K not a multiple of 16
    for seed, (n_uncond, bias) in enumerate([(35, True), (45, False), (0, True), (rows, True)]):
        layers = [_layer(rows, k, n, rank, dtype, seed=10 * seed + i, bias=bias) for i in range(members)]
        x = layers[0][0].view(2, rows // 2, k)
        scales = [SCALE, -0.5, 1.25][:members]
        outs = [torch.full((2, rows // 2, n), float("nan"), dtype=dtype, device=DEVICE) for _ in range(members)]
        got = launch_group(x, [lay[1] for lay in layers], [lay[2] for lay in layers], [lay[3] for lay in layers],
                           [lay[4] for lay in layers], scales, n_uncond, config=SMALL, outs=outs)
        assert [g.data_ptr() for g in got] == [o.data_ptr() for o in outs]
        for (_, weight, b, down, up), scale, out in zip(layers, scales, got):
            ref = dual_branch_linear_reference(*_float64(x, weight, b, down, up), scale, n_uncond)
            _assert_branches_close(out, ref, n_uncond, TOLERANCE[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("members", "rank"), [(4, 8), (7, 64)])
def test_triton_table_kernel_matches_float64(members, rank, dtype):
    """More members than a group launch takes (every cross-attention's k/v): addresses from a device table,
    outputs back to back in one allocation, each member with its own weights, factors and scale."""
    from npo_merge.guidance.kernels.dual_linear_group import launch_group

    rows, k, n = 70, 40, 40
    for seed, (n_uncond, bias) in enumerate([(35, True), (45, False), (0, True)]):
        layers = [_layer(rows, k, n, rank, dtype, seed=10 * seed + i, bias=bias) for i in range(members)]
        x = layers[0][0].view(2, rows // 2, k)
        scales = [SCALE * (i + 1) * (-1) ** i for i in range(members)]
        got = launch_group(x, [lay[1] for lay in layers], [lay[2] for lay in layers], [lay[3] for lay in layers],
                           [lay[4] for lay in layers], scales, n_uncond, config=SMALL)
        assert len(got) == members
        for (_, weight, b, down, up), scale, out in zip(layers, scales, got):
            ref = dual_branch_linear_reference(*_float64(x, weight, b, down, up), scale, n_uncond)
            _assert_branches_close(out, ref, n_uncond, TOLERANCE[dtype])


@needs_triton
@pytest.mark.parametrize("members", [3, 4])
def test_triton_group_reads_weights_that_are_rows_of_a_wider_matrix(members):
    """Weights as rows of one [W | B | 0] matrix (a WideGroup's layout, one row stride): the group (3 members)
    and table (4) launches read them in place and never touch the columns past K (NaN there)."""
    from npo_merge.guidance.kernels.dual_linear_group import launch_group

    rows, k, n, rank, n_uncond, dtype = 70, 40, 40, 8, 35, torch.float16
    layers = [_layer(rows, k, n, rank, dtype, seed=60 + i) for i in range(members)]
    wide = torch.full((members * n, 64), float("nan"), dtype=dtype, device=DEVICE)
    weights = []
    for i, (_, weight, _, _, _) in enumerate(layers):
        wide[i * n:(i + 1) * n, :k] = weight
        weights.append(wide[i * n:(i + 1) * n, :k])
    x, scales = layers[0][0], [SCALE, -0.5, 1.25, 2.0][:members]
    got = launch_group(x, weights, [lay[2] for lay in layers], [lay[3] for lay in layers], [lay[4] for lay in layers],
                       scales, n_uncond, config=SMALL)
    for (_, weight, b, down, up), scale, out in zip(layers, scales, got):
        ref = dual_branch_linear_reference(*_float64(x, weight, b, down, up), scale, n_uncond)
        _assert_branches_close(out, ref, n_uncond, TOLERANCE[dtype])


@needs_triton
def test_table_launch_follows_new_scales_and_moved_weights():
    """A bound table launch re-reads addresses and scales each call: a new scale or a weight given new storage
    takes effect at the next call."""
    from npo_merge.guidance.kernels.dual_linear_group import TableLaunch

    layers = [_layer(16, 16, 16, 4, torch.float32, seed=i) for i in range(4)]
    x = layers[0][0]
    tensors = [[lay[j] for lay in layers] for j in (1, 2, 3, 4)]
    launch = TableLaunch(x, *tensors, 8, SMALL)
    scales = [1.0, 2.0, 3.0, 4.0]
    launch(x, scales)
    tensors[0][2].data = tensors[0][2].data * 2  # new storage for member 2's weight
    scales[1] = -1.0
    got = launch(x, scales)
    for i, (weight, bias, down, up) in enumerate(zip(*tensors)):
        ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), scales[i], 8)
        _assert_branches_close(got[i], ref, 8, TOLERANCE[torch.float32])


@needs_triton
def test_triton_group_refuses_members_that_do_not_fit():
    from npo_merge.guidance.kernels.dual_linear_group import GroupLaunch, TableLaunch, launch_group

    x, weight, bias, down, up = _layer(8, 16, 16, 4, torch.float32, seed=0)
    other = _layer(8, 16, 32, 4, torch.float32, seed=1)
    with pytest.raises(ValueError, match="share shape"):
        launch_group(x, [weight, other[1]], [bias, other[2]], [down, other[3]], [up, other[4]], [1.0, 1.0], 4)
    with pytest.raises(ValueError, match="share shape"):
        TableLaunch(x, [weight] * 3 + [other[1]], [bias] * 3 + [other[2]], [down] * 4, [up] * 3 + [other[4]], 4)
    with pytest.raises(ValueError, match="1 to 3 members"):
        GroupLaunch(x, [weight] * 4, [bias] * 4, [down] * 4, [up] * 4, 4)
    strided = torch.zeros(16, 24, device=DEVICE)[:, :16]  # rows of another stride than weight's
    with pytest.raises(ValueError, match="row stride"):
        launch_group(x, [weight, strided], [bias, bias], [down, down], [up, up], [1.0, 1.0], 4)


@needs_triton
@pytest.mark.parametrize("rank", [1, 8, 24, 64])
def test_triton_group_configs_fit_shared_memory_for_unet_shapes(rank):
    """Every grouped tile choice for SD1.5/SDXL attention groups fits an H100's 227 KiB, fp16 and fp32."""
    from npo_merge.guidance.kernels.dual_linear_group import pick_group_config

    for members, m, k, n in [(3, 8192, 320, 320), (3, 2048, 640, 640), (3, 512, 1280, 1280), (3, 2048, 1280, 1280),
                             (2, 154, 768, 320), (2, 154, 2048, 1280)]:
        for element_size in (2, 4):
            cfg = pick_group_config(m, n, k, rank, members, element_size)
            stage = element_size * cfg.block_k * (cfg.block_m + cfg.block_n + rank_block(rank))
            assert stage * cfg.num_stages <= 227 * 1024


@pytest.mark.skipif(TRITON_HERE or not HAS_TRITON or torch.cuda.is_available(), reason="ran in this process")
def test_triton_in_fresh_interpreter():
    """Rerun this file's Triton tests in a process where TRITON_INTERPRET=1 precedes any triton import."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", str(Path(__file__)), "--noconftest", "-p", "no:cacheprovider",
               "-k", "test_triton and not fresh_interpreter"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]


# --------------------------------------------------------------------------- the custom op (no triton needed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_uncond", [0, 9, 20])
def test_op_matches_reference(dtype, n_uncond):
    x, weight, bias, down, up = _layer(20, 12, 10, 3, dtype, seed=n_uncond)
    x = x.view(4, 5, 12)
    ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), SCALE, n_uncond)
    out = torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, n_uncond)
    assert out.shape == (4, 5, 10) and out.dtype == dtype
    _assert_branches_close(out, ref, n_uncond, TOLERANCE[dtype])


def test_eager_entry_point_matches_the_op_and_records_autograd():
    x, weight, bias, down, up = _layer(12, 8, 6, 2, torch.float32, seed=9)
    with torch.no_grad():
        fast = dual_branch_linear_eager(x, weight, bias, down, up, SCALE, 5)
    torch.testing.assert_close(fast, torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, 5))
    x.requires_grad_()
    dual_branch_linear_eager(x, weight, bias, down, up, SCALE, 5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_op_passes_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch (what torch.compile relies on)."""
    x, weight, bias, down, up = _layer(8, 6, 5, 2, torch.float32, seed=1)
    samples = [
        (x, weight, bias, down, up, SCALE, 4),
        (x.view(2, 4, 6), weight, None, down, up, 1.0, 8),
        (x.requires_grad_(), weight.requires_grad_(), bias, down.requires_grad_(), up, SCALE, 3),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.npo_merge.dual_branch_linear.default, args)


def test_fake_impl_gives_shape_and_dtype_and_rejects_mismatches():
    with FakeTensorMode():
        x = torch.empty(2, 4096, 320, dtype=torch.float16)
        weight, bias = torch.empty(640, 320, dtype=torch.float16), torch.empty(640, dtype=torch.float16)
        down, up = torch.empty(64, 320, dtype=torch.float16), torch.empty(640, 64, dtype=torch.float16)
        out = torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, 4096)
        assert out.shape == (2, 4096, 640) and out.dtype == torch.float16
        with pytest.raises(CompatibilityError, match="LoRA factors"):
            torch.ops.npo_merge.dual_branch_linear(x, weight, bias, up, down, SCALE, 4096)
        with pytest.raises(CompatibilityError, match="outside"):
            torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, 8193)
        with pytest.raises(CompatibilityError, match="one dtype"):
            torch.ops.npo_merge.dual_branch_linear(x.float(), weight, bias, down, up, SCALE, 0)


def test_op_compiles_into_one_graph_on_cpu():
    """torch.compile traces the op through its fake impl as one node, and the compiled result is right."""
    seen: list[torch.fx.GraphModule] = []

    def recording_backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    def block(x, weight, bias, down, up):
        h = torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, x.shape[0] // 2 * x.shape[1])
        return torch.nn.functional.gelu(h)

    x, weight, bias, down, up = _layer(2 * 6, 16, 8, 4, torch.float32, seed=5)
    x = x.view(2, 6, 16)
    eager = block(x, weight, bias, down, up)
    compiled = torch.compile(block, backend=recording_backend, fullgraph=True)(x, weight, bias, down, up)
    op = torch.ops.npo_merge.dual_branch_linear
    assert any(node.target in (op, op.default) for gm in seen for node in gm.graph.nodes)
    torch.testing.assert_close(compiled, eager)
    aot = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(aot(x, weight, bias, down, up), eager)


def test_op_gradients_match_finite_differences():
    x, weight, bias, down, up = (t.requires_grad_() for t in _float64(*_layer(7, 5, 4, 3, torch.float32, seed=2)))

    def op(x, weight, bias, down, up):
        return torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, 3)

    assert torch.autograd.gradcheck(op, (x, weight, bias, down, up))


def test_unfused_path_equals_reference_in_float64():
    x, weight, bias, down, up = _float64(*_layer(16, 10, 6, 2, torch.float32, seed=11))
    for n_uncond in (0, 5, 16):
        torch.testing.assert_close(
            dual_branch_linear_unfused(x, weight, bias, down, up, SCALE, n_uncond),
            dual_branch_linear_reference(x, weight, bias, down, up, SCALE, n_uncond),
        )


# --------------------------------------------------------------------------- conv helpers


def _conv_layer(kernel: int, rank: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    fan_in = 6 * kernel * kernel

    def draw(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=DEVICE)

    return (
        draw(4, 6, 9, 7),
        draw(5, 6, kernel, kernel, std=fan_in**-0.5),
        draw(5),
        draw(rank, 6, kernel, kernel, std=fan_in**-0.5),
        draw(5, rank, 1, 1, std=rank**-0.5),
    )


@pytest.mark.parametrize("n_uncond", [0, 2, 4])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1)])
def test_conv3x3_torch_path_matches_merged_kernels(n_uncond, stride, padding):
    x, weight, bias, down, up = _conv_layer(3, 4, torch.float32, seed=n_uncond)
    ref = dual_branch_conv2d_reference(*_float64(x, weight, bias, down, up), SCALE, n_uncond, stride, padding)
    out = dual_branch_conv2d_unfused(x, weight, bias, down, up, SCALE, n_uncond, stride, padding)
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv1x1_through_the_linear_op(channels_last):
    x, weight, bias, down, up = _conv_layer(1, 3, torch.float32, seed=4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = dual_branch_conv2d_reference(*_float64(x, weight, bias, down, up), SCALE, 2)
    out = dual_branch_conv1x1(x, weight, bias, down, up, SCALE, 2)
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-5


def test_conv_helpers_reject_factors_that_do_not_fit():
    x, weight, bias, down, up = _conv_layer(3, 4, torch.float32, seed=0)
    with pytest.raises(CompatibilityError, match="do not fit"):
        dual_branch_conv2d_unfused(x, weight, bias, down[:, :5], up, SCALE, 2, 1, 1)
    with pytest.raises(CompatibilityError, match="1x1"):
        dual_branch_conv1x1(x, weight, bias, down, up, SCALE, 2)


# --------------------------------------------------------------------------- GPU only


def test_available_is_false_without_cuda():
    assert available() == (torch.cuda.is_available() and HAS_TRITON)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_replays_in_a_cuda_graph(dtype):
    """Capture once, then replay on new inputs copied into the static buffers."""
    x, weight, bias, down, up = _layer(2 * 1024, 320, 640, 8, dtype, seed=0)
    n_uncond = 1024
    torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, n_uncond)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, n_uncond)
    for seed in (1, 2):
        x.copy_(_layer(2 * 1024, 320, 640, 8, dtype, seed=seed)[0])
        static_out.fill_(float("nan"))
        graph.replay()
        ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), SCALE, n_uncond)
        _assert_branches_close(static_out, ref, n_uncond, 1e-2)


@needs_cuda
def test_op_under_inductor_on_cuda():
    x, weight, bias, down, up = _layer(2 * 512, 640, 1280, 64, torch.float16, seed=3)

    def block(x):
        return torch.nn.functional.gelu(torch.ops.npo_merge.dual_branch_linear(x, weight, bias, down, up, SCALE, 512))

    ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), SCALE, 512)
    out = torch.compile(block, fullgraph=True)(x)
    assert _rel_err(out, torch.nn.functional.gelu(ref)) < 1e-2


@needs_cuda
@pytest.mark.parametrize("row_stride", [320, 384])
def test_bound_eager_launch_matches_the_general_launch_and_the_reference(row_stride):
    """A layer's second eager call of a shape launches the compiled kernel directly (Triton internals):
    bit for bit what the general launch gave, within tolerance of float64; unaligned input falls back.
    A weight whose rows are a wider matrix's (a WideGroup member's) binds with its row stride."""
    from npo_merge.delta.types import LowRank
    from npo_merge.guidance.dual_branch import BranchDelta, DualBranchLinear
    from npo_merge.guidance.kernels.dual_linear_triton import BoundLaunch

    x, weight, bias, down, up = _layer(2 * 1024, 320, 640, 8, torch.float16, seed=4)
    linear = torch.nn.Linear(320, 640).to(DEVICE, torch.float16)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        layer = DualBranchLinear(linear, BranchDelta(LowRank(down, up, alpha=8.0)))  # scale alpha / rank = 1
        if row_stride != 320:  # rows of a wider matrix, as a WideGroup lays out its members' weights
            wide = torch.full((640, row_stride), float("nan"), dtype=torch.float16, device=DEVICE)
            wide[:, :320] = weight
            layer.weight.data, layer.joint_weight = wide[:, :320], None
        assert layer.weight.stride(0) == row_stride
        layer.set_backend("fused")
        x = x.view(2, 1024, 320)
        first = layer(x)
        (route,) = layer._routes.values()
        assert isinstance(route, BoundLaunch)
        for _ in range(2):
            assert torch.equal(layer(x), first)
        ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), 1.0, 1024)
        _assert_branches_close(layer(x), ref, 1024, 1e-2)
        shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)[1:].view_as(x)
        shifted.copy_(x)
        assert torch.equal(layer(shifted), first)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        captured.fill_(float("nan"))
        graph.replay()
        assert torch.equal(captured, first)


@needs_cuda
def test_group_launch_goes_direct_after_the_first_call_and_replays_in_a_cuda_graph():
    """The bound group launch: its second call starts the compiled kernel directly (Triton internals), bit
    for bit what the first call gave; an unaligned input falls back to the JIT launch; capture replays."""
    from npo_merge.guidance.kernels.dual_linear_group import GroupLaunch

    layers = [_layer(2 * 512, 640, 640, 8, torch.float16, seed=20 + i) for i in range(3)]
    x = layers[0][0]
    tensors = [[lay[j] for lay in layers] for j in (1, 2, 3, 4)]
    scales = [SCALE, 0.5, -1.0]
    launch = GroupLaunch(x, *tensors, 512)
    first = launch(x, scales)
    assert launch._direct is not None
    again = launch(x, scales)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for out, weight, bias, down, up, scale in zip(first, *tensors, scales):
        ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), scale, 512)
        _assert_branches_close(out, ref, 512, 1e-2)
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)[1:].view_as(x)
    shifted.copy_(x)
    assert all(torch.equal(a, b) for a, b in zip(launch(shifted, scales), first))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = launch(x, scales)
    for out in captured:
        out.fill_(float("nan"))
    graph.replay()
    assert all(torch.equal(a, b) for a, b in zip(captured, first))


@needs_cuda
def test_table_launch_goes_direct_and_replays_in_a_cuda_graph():
    """Every SDXL-like cross-attention k/v in one launch: the second call starts the compiled kernel directly,
    bit for bit the first call; a capture replays it; a capture that would need new tables gets None."""
    from npo_merge.guidance.kernels.dual_linear_group import TableLaunch

    layers = [_layer(2 * 77, 2048, 1280, 8, torch.float16, seed=40 + i) for i in range(6)]
    x = layers[0][0]
    tensors = [[lay[j] for lay in layers] for j in (1, 2, 3, 4)]
    scales = [SCALE, 0.5, -1.0, 1.0, 2.0, -0.25]
    launch = TableLaunch(x, *tensors, 77)
    first = launch(x, scales)
    assert launch._direct is not None
    assert all(torch.equal(a, b) for a, b in zip(launch(x, scales), first))
    for out, weight, bias, down, up, scale in zip(first, *tensors, scales):
        ref = dual_branch_linear_reference(*_float64(x, weight, bias, down, up), scale, 77)
        _assert_branches_close(out, ref, 77, 1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = launch(x, scales)
        refused = launch(x, [2.0 * s for s in scales])
    assert refused is None
    for out in captured:
        out.fill_(float("nan"))
    graph.replay()
    assert all(torch.equal(a, b) for a, b in zip(captured, first))


@needs_cuda
@pytest.mark.parametrize("rows,features", [(2 * 1024, 1280), (2 * 4096, 640), (2 * 77, 2048)])
def test_auto_times_the_paths_on_the_first_eager_call_and_graph_capture_keeps_the_winner(rows, features):
    """backend 'auto' on a joined layer at SDXL shapes: the first eager call times every path and keeps the one
    with the least GPU time for the shape; a CUDA graph captured afterwards replays that path, and every
    path's output matches float64."""
    from torch import nn

    from npo_merge.delta.types import LowRank
    from npo_merge.guidance import dual_branch
    from npo_merge.guidance.dual_branch import BranchDelta, dual_branch_module

    x, weight, bias, down, up = _layer(rows, features, features, 64, torch.float16, seed=30)
    linear = nn.Linear(features, features).to(DEVICE, torch.float16)
    linear.weight.data.copy_(weight)
    linear.bias.data.copy_(bias)
    wrapped = dual_branch_module(linear, BranchDelta(LowRank(down=down, up=up, alpha=64 * SCALE)), 1.0)
    wrapped.set_backend("auto")
    assert wrapped.joint_weight is not None
    x = x.view(2, rows // 2, features)
    ref = dual_branch_linear_reference(*_float64(x.view(rows, -1), weight, bias, down, up), SCALE, rows // 2)
    with torch.no_grad():
        eager = wrapped(x)
        assert list(wrapped._fastest.values())[0] in ("fused", "joint", "materialize", "lowrank")
        _assert_branches_close(eager.reshape(rows, -1), ref, rows // 2, 1e-2)
        paths = wrapped._paths(1, rows // 2)
        for name, path in paths.items():
            out = path(x, wrapped.weight, wrapped.bias, wrapped.down, wrapped.up, wrapped.scale)
            _assert_branches_close(out.reshape(rows, -1), ref, rows // 2, 1e-2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = wrapped(x)
        captured.fill_(float("nan"))
        graph.replay()
    assert len(wrapped._fastest) == 1  # capture reused the eager timing
    _assert_branches_close(captured.reshape(rows, -1), ref, rows // 2, 1e-2)


# --------------------------------------------------------------------------- the widened LayerNorm


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rank", "width"), [(12, 128), (40, 160)])
def test_triton_norm_shrink_matches_float64(dtype, rank, width):
    """[LN(h) | scale * LN(h) A^T on uncond rows | 0]: the norm against float64, the shrink of the rounded
    output against float64, cond rows and padding exactly zero, whatever was in the buffer before."""
    from npo_merge.guidance.kernels.norm_shrink import NormShrinkLaunch, norm_shrink

    gen = torch.Generator().manual_seed(5)
    rows, c = 40, 96  # 3 row tiles of 16; ranks not multiples of 8, padding past the rank block (12 -> 16 < 32)
    # A large mean and a small spread: the statistics must not cancel.
    h = (torch.randn(2, rows // 2, c, generator=gen) * 3 + 100).to(dtype).to(DEVICE)
    gamma = (torch.randn(c, generator=gen) * 0.2 + 1).to(dtype).to(DEVICE)
    beta = (torch.randn(c, generator=gen) * 0.1).to(dtype).to(DEVICE)
    down = (torch.randn(rank, c, generator=gen) / c**0.5).to(dtype).to(DEVICE)
    scales = torch.linspace(-1.0, 2.0, rank, device=DEVICE)
    ln = torch.nn.functional.layer_norm(h.double(), (c,), gamma.double(), beta.double(), 1e-5).reshape(rows, c)
    for n_uncond in (0, 20, 27, rows):
        out = torch.full((2, rows // 2, width), float("nan"), dtype=dtype, device=DEVICE)
        direct = norm_shrink(h, gamma, beta, 1e-5, down, scales, n_uncond, out)
        flat = out.reshape(rows, width)
        assert _rel_err(flat[:, :c], ln) < TOLERANCE[dtype]
        if n_uncond:
            shrunk = (flat[:n_uncond, :c].double() @ down.double().t()) * scales.double()
            assert _rel_err(flat[:n_uncond, c:c + rank], shrunk) < TOLERANCE[dtype]
        assert torch.equal(flat[n_uncond:, c:], torch.zeros_like(flat[n_uncond:, c:]))
        assert torch.equal(flat[:, c + rank:], torch.zeros_like(flat[:, c + rank:]))
        again = NormShrinkLaunch(h, width, rank, n_uncond, 1e-5, direct)(h, gamma, beta, down, scales)
        assert torch.equal(again, out)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 40])
@pytest.mark.parametrize("kind", ["rescale", "residual", "gated"])
def test_triton_expand_store_matches_float64(dtype, rank, kind):
    """From one strided joint buffer [y | t] (or [a | g | t]): (y + scale * t up^T on uncond rows [+ residual]) /
    factor, or a' * gelu(g') with the update in both halves; against float64 on both branches, every element
    written (NaN-poisoned output), and a bound launch gives the same bits."""
    from npo_merge.guidance.kernels.expand_store import ExpandStoreLaunch, expand_store

    gen = torch.Generator().manual_seed(6)
    rows, n = 150, 200  # 3 row tiles of 64 and 2 column tiles of 128, both with a partial last tile
    gated = kind == "gated"
    halves = 2 if gated else 1
    joint = torch.randn(rows, halves * n + rank, generator=gen).to(dtype).to(DEVICE)  # t as large as y
    up = (torch.randn(halves * n, rank, generator=gen) * rank**-0.5).to(dtype).to(DEVICE)
    residual = torch.randn(rows, n, generator=gen).to(dtype).to(DEVICE) if kind == "residual" else None
    factor = 2.0 if kind == "rescale" else 1.0
    for n_uncond in (0, 64, 70, rows):
        out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
        direct = expand_store(joint, up, residual, SCALE, n_uncond, factor, gated, out)
        full = joint[:, :halves * n].double().clone()
        full[:n_uncond] += SCALE * joint[:n_uncond, halves * n:].double() @ up.double().t()
        if gated:
            ref = full[:, :n] * torch.nn.functional.gelu(full[:, n:])
        else:
            ref = (full if residual is None else full + residual.double()) / factor
        _assert_branches_close(out, ref, n_uncond, TOLERANCE[dtype])
        if kind == "rescale":
            assert torch.equal(out[n_uncond:], joint[n_uncond:, :n] / factor)  # cond rows: torch's own division
        again = ExpandStoreLaunch(joint, up, residual, n, n_uncond, gated, direct)(joint, up, residual, SCALE, factor)
        assert torch.equal(again, out)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("add", ["none", "time_embedding", "residual"])
def test_triton_channel_store_matches_float64(dtype, add):
    """(y[:, :C] + scale * up @ y[:, C:] on uncond samples + add) / factor from a joint convolution's NCHW output,
    the add broadcast from (N, C, 1, 1) or full: against float64 per branch, every element written, and a bound
    launch gives the same bits."""
    from npo_merge.guidance.kernels.expand_store import ChannelStoreLaunch, channel_store

    gen = torch.Generator().manual_seed(7)
    batch, c, rank, h, w = 3, 80, 12, 9, 17  # 2 channel tiles of 64 and 2 pixel tiles of 128, partial ones
    y = torch.randn(batch, c + rank, h, w, generator=gen).to(dtype).to(DEVICE)
    up = (torch.randn(c, rank, 1, 1, generator=gen) * rank**-0.5).to(dtype).to(DEVICE)  # as a conv layer holds it
    extra = {"none": None, "time_embedding": torch.randn(batch, c, generator=gen)[:, :, None, None],
             "residual": torch.randn(batch, c, h, w, generator=gen)}[add]
    extra = None if extra is None else extra.to(dtype).to(DEVICE)
    for n_uncond in (0, 1, batch):
        out = torch.full((batch, c, h, w), float("nan"), dtype=dtype, device=DEVICE)
        direct = channel_store(y, up, extra, SCALE, n_uncond, 2.0, out)
        ref = y[:, :c].double().clone()
        ref[:n_uncond] += SCALE * torch.einsum("ck,nkhw->nchw", up[:, :, 0, 0].double(), y[:n_uncond, c:].double())
        ref = (ref if extra is None else ref + extra.double()) / 2.0
        _assert_branches_close(out.flatten(1), ref.flatten(1), n_uncond, TOLERANCE[dtype])
        again = ChannelStoreLaunch(y, up, extra, n_uncond, direct)(y, up, extra, SCALE, 2.0)
        assert torch.equal(again, out)
