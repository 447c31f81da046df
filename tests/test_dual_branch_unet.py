"""NPO on tiny SD1.5/SDXL-structure UNets: one dual-branch call equals two UNets, equals peft, and undoes exactly."""

from __future__ import annotations

import copy
import os

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from tiny_models import (
    attention_projection_names,
    linear_and_conv_names,
    one_torch_thread,
    random_lora,
    tiny_sd15_unet,
    tiny_sdxl_unet,
    tiny_unet_inputs,
)

from npo_merge.delta.types import LowRank
from npo_merge.errors import CompatibilityError, InputError
from npo_merge.guidance.dual_branch import BranchDelta, DualBranchLayer
from npo_merge.guidance.install import disable_npo, dual_branch_layers, enable_npo, set_branch_mode
from npo_merge.guidance.reference import TwoPassCFG, uncond_unet

ARCHS = {"sd15": tiny_sd15_unet, "sdxl": tiny_sdxl_unet}
COVERAGE = {"attention": (attention_projection_names, 4), "all": (linear_and_conv_names, 8)}


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's scale."""
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def unets():
    return {arch: build() for arch, build in ARCHS.items()}


@pytest.fixture(scope="module")
def cases(unets):
    """(unet, deltas, inputs, two-UNet reference output, plain output) per arch and coverage."""
    out = {}
    for arch, unet in unets.items():
        inputs = tiny_unet_inputs(unet)
        with torch.no_grad():
            plain = unet(**inputs).sample
        for coverage, (names, rank) in COVERAGE.items():
            deltas = random_lora(unet, names(unet), rank, seed=3)
            with torch.no_grad():
                reference = TwoPassCFG(unet, uncond_unet(unet, deltas))(**inputs).sample
            out[arch, coverage] = (unet, deltas, inputs, reference, plain)
    return out


def _call(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("coverage", COVERAGE)
@pytest.mark.parametrize("path", ["lowrank", "stacked", "dense"])
def test_one_call_matches_two_unets(cases, arch, coverage, path):
    unet, deltas, inputs, reference, plain = cases[arch, coverage]
    assert max_rel_err(plain, reference) > 1e-2  # the delta matters: the check below can fail
    with enable_npo(unet, deltas, path=path):
        got = _call(unet, inputs)
    assert max_rel_err(got, reference) < 1e-5
    assert not any(isinstance(m, DualBranchLayer) for m in unet.modules())


def test_fused_backend_through_the_kernels_package(cases):
    """backend='fused' calls npo_merge.guidance.kernels (its CPU path here); the result is unchanged."""
    pytest.importorskip("npo_merge.guidance.kernels.ops")
    unet, deltas, inputs, reference, _ = cases["sdxl", "attention"]
    with enable_npo(unet, deltas, backend="fused") as handle:
        assert all(m.fused is not None for m in handle.modules.values())
        assert max_rel_err(_call(unet, inputs), reference) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_projections_grouped_by_shared_input(cases, arch, monkeypatch):
    """Each self-attention's q/k/v forms a group, and the k/v of all cross-attentions of one width another;
    one grouped run per group and step gives the two-UNet result (the group binder here computes members
    with the torch path)."""
    from npo_merge.guidance import dual_branch
    from npo_merge.guidance.install import group_shared_inputs

    unet, deltas, inputs, reference, _ = cases[arch, "attention"]
    runs = []

    def bind(x, weights, biases, downs, ups, rows):
        def run(x, scales):
            runs.append(len(weights))
            flat = x.reshape(-1, x.shape[-1])
            return [dual_branch.lowrank_linear(flat, w, b, d, u, s, rows).reshape(*x.shape[:-1], -1)
                    for w, b, d, u, s in zip(weights, biases, downs, ups, scales)]
        return run

    monkeypatch.setattr(dual_branch, "group_binder", lambda: bind)
    monkeypatch.setattr(dual_branch, "prefers_fused", lambda *shape, eager: False)
    attentions = [m for m in unet.modules() if hasattr(m, "to_q") and hasattr(m, "is_cross_attention")]
    with enable_npo(unet, deltas, mode="cfg", backend="torch") as handle:
        assert group_shared_inputs(unet) == 0  # backend 'torch': nothing to group
        for module in handle.modules.values():
            module.set_backend("auto")
        self_attn = sum(not m.is_cross_attention for m in attentions)
        widths = Counter(m.to_k.out_features for m in attentions if m.is_cross_attention)
        assert len(widths) > 1  # several cross-attention groups: one per width
        assert group_shared_inputs(unet) == self_attn + len(widths)
        assert max_rel_err(_call(unet, inputs), reference) < 1e-5
        assert sorted(runs) == sorted([3] * self_attn + [2 * count for count in widths.values()])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", ["joint_linear", "materialized_linear"])
def test_joint_and_materialized_paths_through_the_unet(cases, arch, path, monkeypatch):
    """Linear layers on the joint GEMM (outputs are strided views of a wider buffer, fed on to diffusers'
    attention, feed-forward and projections) or on a per-call theta_u give the two-UNet result."""
    from npo_merge.guidance import dual_branch

    unet, deltas, inputs, reference, _ = cases[arch, "all"]
    monkeypatch.setattr(dual_branch, "fused_entry", lambda: lambda *args: pytest.fail("the fused op was called"))
    monkeypatch.setattr(dual_branch, "prefers_fused", lambda *shape, eager: False)
    monkeypatch.setattr(dual_branch, "MATERIALIZE_MIN_ROWS", 1 if path == "materialized_linear" else 10**9)
    calls = []
    real = getattr(dual_branch, path)
    monkeypatch.setattr(dual_branch, path, lambda *a: calls.append(1) or real(*a))
    with enable_npo(unet, deltas, mode="cfg", backend="torch", group_inputs=False) as handle:
        for module in handle.modules.values():
            if hasattr(module, "set_backend"):
                module.set_backend("auto")
        joined = sum(m.joint_weight is not None for m in handle.modules.values() if hasattr(m, "set_backend"))
        assert max_rel_err(_call(unet, inputs), reference) < 1e-5
    assert joined > 10 and len(calls) >= (joined if path == "joint_linear" else 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_modes_cond_and_uncond(cases, arch):
    unet, deltas, inputs, _, plain = cases[arch, "all"]
    with torch.no_grad():
        all_uncond = uncond_unet(unet, deltas)(**inputs).sample
    with enable_npo(unet, deltas, mode="cond") as handle:
        assert torch.equal(_call(unet, inputs), plain)  # theta_c rows are the untouched base op
        handle.set_mode("uncond")
        assert max_rel_err(_call(unet, inputs), all_uncond) < 1e-5


def test_eta_scales_the_uncond_offset(cases):
    unet, deltas, inputs, reference, plain = cases["sd15", "attention"]
    doubled = {name: LowRank(d.down, d.up, 2 * d.alpha) for name, d in deltas.items()}
    with torch.no_grad():
        expected = TwoPassCFG(unet, uncond_unet(unet, doubled))(**inputs).sample
    with enable_npo(unet, deltas, eta=2.0):
        assert max_rel_err(_call(unet, inputs), expected) < 1e-5


def test_fp16_on_cpu_matches_fp16_two_unets(cases):
    unet, deltas, inputs, reference, _ = cases["sdxl", "all"]
    half = copy.deepcopy(unet).half()
    inputs16 = {
        "sample": inputs["sample"].half(),
        "timestep": inputs["timestep"],
        "encoder_hidden_states": inputs["encoder_hidden_states"].half(),
        "added_cond_kwargs": {k: v.half() for k, v in inputs["added_cond_kwargs"].items()},
    }
    with torch.no_grad():
        reference16 = TwoPassCFG(half, uncond_unet(half, deltas))(**inputs16).sample
    enable_npo(half, deltas)
    got = _call(half, inputs16)
    assert got.dtype == torch.float16
    assert max_rel_err(got, reference16) < 1e-2
    assert max_rel_err(got, reference) < 1e-2


def _peft_unet(unet, deltas: dict[str, LowRank], rank: int):
    """A copy of `unet` with the same LoRA loaded through diffusers' peft integration (adapter "npo")."""
    from peft import LoraConfig

    lora_unet = copy.deepcopy(unet)
    config = LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=list(deltas), init_lora_weights=False)
    lora_unet.add_adapter(config, adapter_name="npo")
    for name, delta in deltas.items():
        layer = lora_unet.get_submodule(name)
        layer.lora_A["npo"].weight.data.copy_(delta.down.reshape(layer.lora_A["npo"].weight.shape))
        layer.lora_B["npo"].weight.data.copy_(delta.up.reshape(layer.lora_B["npo"].weight.shape))
    return lora_unet


def _half(inputs: dict, which: int) -> dict:
    rows = slice(0, 1) if which == 0 else slice(1, 2)
    out = dict(inputs)
    out["sample"] = inputs["sample"][rows]
    out["encoder_hidden_states"] = inputs["encoder_hidden_states"][rows]
    if "added_cond_kwargs" in inputs:
        out["added_cond_kwargs"] = {k: v[rows] for k, v in inputs["added_cond_kwargs"].items()}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_peft_adapter_toggled_and_mixed_batch(cases, arch):
    from peft.tuners.lora import LoraLayer

    unet, deltas, inputs, reference, _ = cases[arch, "all"]
    lora_unet = _peft_unet(unet, deltas, COVERAGE["all"][1])
    with torch.no_grad():
        lora_unet.enable_adapters()
        eps_u = lora_unet(**_half(inputs, 0)).sample
        lora_unet.disable_adapters()
        eps_c = lora_unet(**_half(inputs, 1)).sample
        lora_unet.enable_adapters()
        # peft's own mixed-adapter batch: the hook peft installs for `adapter_names`.
        hooks = [
            m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "adapter_names": ["npo", "__base__"]}), with_kwargs=True)
            for m in lora_unet.modules()
            if isinstance(m, LoraLayer)
        ]
        mixed = lora_unet(**inputs).sample
        for hook in hooks:
            hook.remove()
    toggled = torch.cat([eps_u, eps_c])
    with enable_npo(unet, deltas):
        got = _call(unet, inputs)
    assert max_rel_err(toggled, reference) < 1e-5
    assert max_rel_err(got, toggled) < 1e-5
    assert max_rel_err(got, mixed) < 1e-5


@pytest.mark.parametrize("path", ["lowrank", "stacked"])
def test_disable_restores_modules_bits_and_outputs(cases, path):
    unet, deltas, inputs, _, plain = cases["sdxl", "all"]
    modules = dict(unet.named_modules())
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    handle = enable_npo(unet, deltas, path=path)
    assert len(handle.modules) == len(deltas) == len(list(dual_branch_layers(unet)))
    assert handle.extra_bytes > 0
    enabled_state = unet.state_dict()
    assert list(enabled_state) == list(state)  # same keys: the dual-branch buffers are not persistent
    assert all(torch.equal(enabled_state[k], v) for k, v in state.items())
    _call(unet, inputs)
    assert disable_npo(unet) == len(deltas)
    assert all(module is modules[name] for name, module in unet.named_modules())
    restored = unet.state_dict()
    for key, value in state.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key].view(torch.uint8), value.view(torch.uint8))
    assert torch.equal(_call(unet, inputs), plain)
    # The handle still holds the dual-branch modules: they must not keep a copy of any weight alive.
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    for module in handle.modules.values():
        assert module.joint_weight is None and getattr(module, "stacked_weight", None) is None
        assert all(b.untyped_storage().data_ptr() not in weights for b in module.buffers())


def test_unet_prefix_weight_suffix_and_branch_delta_values(cases):
    unet, deltas, inputs, reference, _ = cases["sd15", "attention"]
    keyed = {f"unet.{name}.weight": BranchDelta(delta) for name, delta in deltas.items()}
    with enable_npo(unet, keyed):
        assert max_rel_err(_call(unet, inputs), reference) < 1e-5


def test_bad_keys_are_named_in_one_error(unets):
    unet = unets["sd15"]
    good = random_lora(unet, attention_projection_names(unet)[:1], 2)
    name = next(iter(good))
    bad = {
        **good,
        "down_blocks.9.attentions.0.proj_in": good[name],
        "unet.mid_block.attentions.0.proj_in": LowRank(torch.zeros(2, 7), torch.zeros(5, 2), 1.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": good[name],
    }
    with pytest.raises(CompatibilityError) as info:
        enable_npo(unet, bad)
    message = str(info.value)
    assert "down_blocks.9.attentions.0.proj_in" in message
    assert "unet.mid_block.attentions.0.proj_in (low-rank delta expands to (5, 7)" in message
    assert "text_encoder.text_model" in message
    assert not any(isinstance(m, DualBranchLayer) for m in unet.modules())  # nothing half-installed
    with pytest.raises(CompatibilityError, match="no deltas"):
        enable_npo(unet, {})


def test_misuse_is_refused_with_a_clear_message(cases):
    unet, deltas, inputs, _, _ = cases["sd15", "attention"]
    with pytest.raises(InputError, match="torch.compile"):
        enable_npo(torch.compile(unet), deltas)
    with pytest.raises(InputError, match="not enabled"):
        set_branch_mode(unet, "cond")
    with pytest.raises(InputError, match="unknown widened_norms 'sometimes'"):
        enable_npo(unet, deltas, widened_norms="sometimes")
    assert not any(isinstance(m, DualBranchLayer) for m in unet.modules())  # nothing was installed
    with enable_npo(unet, deltas):
        with pytest.raises(InputError, match="already enabled"):
            enable_npo(unet, deltas)
        with pytest.raises(InputError, match="odd batch of 1"):
            _call(unet, _half(inputs, 0))
        set_branch_mode(unet, "cond")
        _call(unet, _half(inputs, 0))


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_traces_fullgraph_under_torch_compile(cases, backend):
    """A transformer block of the enabled UNet (linear layers, 1x1-conv proj_in/out) compiles with
    fullgraph=True, once per branch mode; the mode switch recompiles instead of reusing a stale graph.

    aot_eager runs dynamo tracing and AOT functionalization (the in-place update of the output view);
    inductor code generation for the whole UNet is the slow test below.
    """
    if backend == "fused":
        pytest.importorskip("npo_merge.guidance.kernels.ops")
    unet, deltas, inputs, _, _ = cases["sd15", "all"]
    x, text = torch.randn(2, 64, 8, 8), torch.randn(2, 8, 32)
    block = unet.down_blocks[1].attentions[0]
    torch._dynamo.reset()
    with enable_npo(unet, deltas, backend=backend) as handle, torch.no_grad():
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        outputs = {}
        for mode in ("cfg", "cond"):
            handle.set_mode(mode)
            outputs[mode] = compiled(x, encoder_hidden_states=text, return_dict=False)[0]
            eager = block(x, encoder_hidden_states=text, return_dict=False)[0]
            torch.testing.assert_close(outputs[mode], eager, rtol=1e-5, atol=1e-6)
        assert max_rel_err(outputs["cfg"], outputs["cond"]) > 1e-3  # the mode switch took effect
    torch._dynamo.reset()


def _cuda_case(arch: str, coverage: str = "attention") -> tuple:
    """A tiny UNet in fp16 on CUDA, a rank-8 LoRA on its attention projections (or every layer) and its inputs."""
    unet = ARCHS[arch]().cuda().half()
    deltas = {k: LowRank(down=v.down.cuda().half(), up=v.up.cuda().half(), alpha=v.alpha)
              for k, v in random_lora(unet, COVERAGE[coverage][0](unet), 8, seed=3).items()}
    inputs = {k: v.cuda().half() if torch.is_tensor(v) and v.is_floating_point() else
              ({a: b.cuda().half() for a, b in v.items()} if isinstance(v, dict) else v.cuda())
              for k, v in tiny_unet_inputs(unet).items()}
    return unet, deltas, inputs


def test_auto_layers_run_their_eager_route_as_one_op_under_torch_compile(cases):
    """With backend 'auto', torch.compile sees each low-rank linear as one `routed_linear` node whose
    implementation is the layer's eager route; a copied layer gets a key of its own."""
    from npo_merge.guidance import routed_op
    from npo_merge.guidance.dual_branch import DualBranchLinear

    pytest.importorskip("npo_merge.guidance.kernels.ops")
    unet, deltas, _, _, _ = cases["sd15", "all"]
    x, text = torch.randn(2, 64, 8, 8), torch.randn(2, 8, 32)
    block = unet.down_blocks[1].attentions[0]
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with enable_npo(unet, deltas, backend="torch"), torch.no_grad():
        layers = [m for m in block.modules() if isinstance(m, DualBranchLinear)]
        for layer in layers:
            layer.set_backend("auto")
        eager = block(x, encoder_hidden_states=text, return_dict=False)[0]
        compiled = torch.compile(block, fullgraph=True, backend=recording_backend)
        torch.testing.assert_close(compiled(x, encoder_hidden_states=text, return_dict=False)[0], eager,
                                   rtol=1e-5, atol=1e-6)
        op = torch.ops.npo_merge.routed_linear
        keys = [node.args[-1] for gm in graphs for node in gm.graph.nodes if node.target in (op, op.default)]
        assert sorted(keys) == sorted(layer._op_key for layer in layers)
        aot = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(aot(x, encoder_hidden_states=text, return_dict=False)[0], eager, rtol=1e-5, atol=1e-6)
        set_branch_mode(unet, "cond")  # another n_uncond: the graph is traced again, not reused
        cond = block(x, encoder_hidden_states=text, return_dict=False)[0]
        assert max_rel_err(cond, eager) > 1e-3
        torch.testing.assert_close(aot(x, encoder_hidden_states=text, return_dict=False)[0], cond, rtol=1e-5, atol=1e-6)
        copied = copy.deepcopy(layers[0])
        assert copied._op_key != layers[0]._op_key and routed_op._LAYERS[copied._op_key]() is copied
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_routed_layers_under_inductor_on_cuda(mode):
    """On CUDA, Inductor (and its CUDA graphs with mode="reduce-overhead") runs each layer's routed op: the
    compiled UNet matches the eager one, step after step."""
    unet, deltas, inputs = _cuda_case("sdxl")
    torch._dynamo.reset()
    with torch.no_grad():
        plain = unet(**inputs).sample
    with enable_npo(unet, deltas, mode="cfg", backend="auto"), torch.no_grad():
        eager = unet(**inputs).sample
        assert max_rel_err(eager, plain) > 2e-2  # the delta is not lost in the tolerance below
        compiled = torch.compile(unet, mode=mode, fullgraph=True)
        for _ in range(3):  # warm-up, capture, replay
            got = compiled(**inputs).sample.clone()
            assert max_rel_err(got, eager) < 1e-2
    torch._dynamo.reset()


@pytest.mark.skipif(not os.environ.get("NPO_SLOW_TESTS"), reason="inductor on a whole UNet takes minutes on 2 CPU cores")
def test_whole_unet_under_inductor(cases):
    unet, deltas, inputs, reference, _ = cases["sdxl", "all"]
    torch._dynamo.reset()
    with enable_npo(unet, deltas):
        compiled = torch.compile(unet, fullgraph=True)
        assert max_rel_err(_call(compiled, inputs), reference) < 1e-5
    torch._dynamo.reset()


def _torch_norm_shrink(h, gamma, beta, eps, down, scales, n_uncond, out):
    """What kernels.norm_shrink computes, with torch ops (the UNet tests run without the Triton kernel)."""
    c, rank = h.shape[-1], down.shape[0]
    flat = out.view(-1, out.shape[-1])
    normed = torch.nn.functional.layer_norm(h, (c,), gamma, beta, eps).reshape(-1, c)
    flat.zero_()
    flat[:, :c] = normed
    flat[:n_uncond, c:c + rank] = (normed[:n_uncond] @ down.t()) * scales
    return None


class _TorchNormLaunch:
    def __init__(self, h, width, rank, n_uncond, eps, direct):
        self.shape, self.n_uncond, self.eps = (*h.shape[:-1], width), n_uncond, eps

    def __call__(self, h, gamma, beta, down, scales):
        out = h.new_empty(self.shape)
        _torch_norm_shrink(h, gamma, beta, self.eps, down, scales, self.n_uncond, out)
        return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("coverage", COVERAGE)
def test_norm_fed_projections_in_one_wide_gemm(cases, arch, coverage, monkeypatch):
    """Each transformer block's norm1 (q/k/v), norm2 (cross-attention q) and, where the feed-forward is covered,
    norm3 (its input projection) widened: every member served from one GEMM over [LN(h) | shrink] gives the
    two-UNet result; state_dict, modes, .to() and disable stay exact."""
    from npo_merge.guidance import widened_norm

    unet, deltas, inputs, reference, plain = cases[arch, coverage]
    monkeypatch.setattr(widened_norm, "_norm_launcher", lambda: (_TorchNormLaunch, _torch_norm_shrink, True))
    monkeypatch.setattr(widened_norm, "MIN_ROWS", 0)
    monkeypatch.setattr(widened_norm, "MAX_TAIL_FRACTION", 100.0)  # tiny widths: the tail is most of K
    served = Counter()
    output = widened_norm.WideGroup.output

    def counting(self, member, x, n_uncond):
        y = output(self, member, x, n_uncond)
        served[y is not None] += 1
        return y

    monkeypatch.setattr(widened_norm.WideGroup, "output", counting)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    with enable_npo(unet, deltas, mode="cfg", backend="torch") as handle:
        for module in handle.modules.values():
            if hasattr(module, "set_backend"):
                module.set_backend("auto")
        norms = 2 if coverage == "attention" else 3
        assert widened_norm.widen_norms(unet, eager=True) == norms * len(blocks)
        assert all(isinstance(b.norm1, widened_norm.WidenedNorm) for b in blocks)
        assert unet.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
        assert max_rel_err(_call(unet, inputs), reference) < 1e-5
        assert served == {True: (norms + 2) * len(blocks)}
        set_branch_mode(unet, "cond")  # no uncond rows: the usual path
        assert max_rel_err(_call(unet, inputs), plain) < 1e-5
        set_branch_mode(unet, "cfg")
        unet.double()  # members converted: the group lays out the new weights at the next call
        got = _call(unet, {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()})
        unet.float()
        assert max_rel_err(got, reference) < 1e-5
        assert max_rel_err(_call(unet, inputs), reference) < 1e-5
    assert not any(isinstance(m, widened_norm.WidenedNorm) for m in unet.modules())
    assert all(v.is_contiguous() and torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert max_rel_err(_call(unet, inputs), plain) < 1e-6


def _graph_replay(unet, inputs) -> torch.Tensor:
    """The UNet's output from a CUDA graph captured after eager calls, replayed once."""
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = unet(**inputs).sample
    graph.replay()
    torch.cuda.synchronize()
    return captured


def _count_widened(monkeypatch) -> Counter:
    """Counts WideGroup.normalize calls by whether the widened path served them."""
    from npo_merge.guidance import widened_norm

    served = Counter()
    normalize = widened_norm.WideGroup.normalize

    def counting(self, *args):
        y = normalize(self, *args)
        served[y is not None] += 1
        return y

    monkeypatch.setattr(widened_norm.WideGroup, "normalize", counting)
    return served


@pytest.mark.parametrize("arch", ARCHS)
def test_widened_norms_serve_graph_captures_and_bind_at_eager_calls(cases, arch, monkeypatch):
    """By default the widened path serves CUDA-graph captures only: an eager call runs the usual norm and
    projections (q/k/v in one eager group) and binds the widened launch for its shape; a capture (simulated)
    then takes the widened path. Both give the two-UNet result."""
    from npo_merge.guidance import widened_norm

    unet, deltas, inputs, reference, _ = cases[arch, "attention"]
    monkeypatch.setattr(widened_norm, "_norm_launcher", lambda: (_TorchNormLaunch, _torch_norm_shrink, True))
    monkeypatch.setattr(widened_norm, "MIN_ROWS", 0)
    monkeypatch.setattr(widened_norm, "MAX_TAIL_FRACTION", 100.0)
    served = _count_widened(monkeypatch)
    with enable_npo(unet, deltas, mode="cfg", backend="torch") as handle:
        for module in handle.modules.values():
            if hasattr(module, "set_backend"):
                module.set_backend("auto")
        norms = widened_norm.widen_norms(unet)
        groups = [m.group for m in unet.modules() if isinstance(m, widened_norm.WidenedNorm)]
        assert norms == len(groups) > 0
        assert all((g.eager_group is not None) == (len(g.members) == 3) for g in groups)
        for _ in range(2):  # the first eager call binds, the second finds the shape bound
            assert max_rel_err(_call(unet, inputs), reference) < 1e-5
        assert served == {False: 2 * norms}
        assert all(len(g._launches) == 1 and None not in g._launches.values() for g in groups)
        served.clear()
        monkeypatch.setattr(widened_norm, "_capturing", lambda t: True)
        assert max_rel_err(_call(unet, inputs), reference) < 1e-5
        assert served == {True: norms}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("widened", [True, "graphs"])
def test_widened_norms_with_the_triton_kernel_eager_and_in_a_cuda_graph(arch, widened, monkeypatch):
    """On CUDA (fp16) the real norm kernel serves every norm-fed projection (eager calls too, with
    widened_norms=True): the result matches the ungrouped layers, and a CUDA graph captured after an eager
    call replays it. With "graphs", eager calls take the usual path (q/k/v grouped over the wide rows)."""
    from npo_merge.guidance import widened_norm

    monkeypatch.setattr(widened_norm, "MIN_ROWS", 0)
    monkeypatch.setattr(widened_norm, "MAX_TAIL_FRACTION", 100.0)
    unet, deltas, inputs = _cuda_case(arch)
    with enable_npo(unet, deltas, mode="cfg", backend="auto", group_inputs=False, widened_norms=False):
        reference = _call(unet, inputs)
    served = _count_widened(monkeypatch)
    with enable_npo(unet, deltas, mode="cfg", backend="auto", widened_norms=widened) as handle:
        norms = handle.counts["WidenedNorm"]
        assert norms > 0
        eager = _call(unet, inputs)
        assert served == {widened is True: norms}
        assert max_rel_err(eager, reference) < 1e-2
        served.clear()
        assert max_rel_err(_graph_replay(unet, inputs), eager) < 1e-2
        assert served == {True: norms}


def test_widened_norms_trace_fullgraph_under_torch_compile(cases, monkeypatch):
    """Under torch.compile a WidenedNorm is a plain LayerNorm and its projections take their torch path over
    the strided weight views: a transformer block compiles with fullgraph=True and matches eager."""
    from npo_merge.guidance import widened_norm

    monkeypatch.setattr(widened_norm, "_norm_launcher", lambda: (_TorchNormLaunch, _torch_norm_shrink, True))
    monkeypatch.setattr(widened_norm, "MIN_ROWS", 0)
    monkeypatch.setattr(widened_norm, "MAX_TAIL_FRACTION", 100.0)
    unet, deltas, _, _, _ = cases["sd15", "all"]
    x, text = torch.randn(2, 64, 8, 8), torch.randn(2, 8, 32)
    block = unet.down_blocks[1].attentions[0]
    torch._dynamo.reset()
    with enable_npo(unet, deltas, mode="cfg", backend="torch") as handle, torch.no_grad():
        for module in handle.modules.values():
            if hasattr(module, "set_backend"):
                module.set_backend("auto")
        assert widened_norm.widen_norms(unet, eager=True) > 0
        eager = block(x, encoder_hidden_states=text, return_dict=False)[0]  # the widened path serves this call
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, encoder_hidden_states=text, return_dict=False)[0], eager,
                                   rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def _torch_expand_store(y, up, add, scale, n_uncond, factor, gated, out):
    """What kernels.expand_store computes, with torch ops (the UNet tests run without the Triton kernels)."""
    width = up.shape[0]
    full = y[:, :width].clone()
    full[:n_uncond] += scale * (y[:n_uncond, width:] @ up.t())
    n = out.shape[1]
    if gated:
        out.copy_(full[:, :n] * torch.nn.functional.gelu(full[:, n:]))
    else:
        out.copy_((full if add is None else full + add) / factor)


class _TorchStoreLaunch:
    def __init__(self, y, up, add, n_out, n_uncond, gated, direct):
        self.n_out, self.n_uncond, self.gated = n_out, n_uncond, gated

    def __call__(self, y, up, add, scale, factor=1.0):
        out = y.new_empty((y.shape[0], self.n_out))
        _torch_expand_store(y, up, add, scale, self.n_uncond, factor, self.gated, out)
        return out


def _torch_channel_store(y, up, add, scale, n_uncond, factor, out):
    """What kernels.channel_store computes, with torch ops."""
    c = up.shape[0]
    full = y[:, :c].clone()
    full[:n_uncond] += scale * torch.nn.functional.conv2d(y[:n_uncond, c:], up.reshape(c, -1, 1, 1))
    out.copy_((full if add is None else full + add) / factor)


class _TorchChannelLaunch:
    def __init__(self, y, up, add, n_uncond, direct):
        self.n_uncond = n_uncond

    def __call__(self, y, up, add, scale, factor):
        out = y.new_empty((y.shape[0], up.shape[0], *y.shape[2:]))
        _torch_channel_store(y, up, add, scale, self.n_uncond, factor, out)
        return out


def _torch_store_kernels():
    from npo_merge.guidance.kernels.expand_store import add_strides

    return SimpleNamespace(expand_store=_torch_expand_store, ExpandStoreLaunch=_TorchStoreLaunch,
                           channel_store=_torch_channel_store, ChannelStoreLaunch=_TorchChannelLaunch,
                           add_strides=add_strides), True


def _auto_backend(handle) -> None:
    for module in handle.modules.values():
        if hasattr(module, "set_backend"):
            module.set_backend("auto")


def _count_stores(monkeypatch) -> Counter:
    """Counts store calls by (store class, gated, whether the store served them rather than the usual code)."""
    from npo_merge.guidance import output_store

    served = Counter()
    call = output_store.OutputStore.__call__

    def counting(self, layer, x, usual, factor=1.0, add=None):
        y = call(self, layer, x, usual, factor, add)
        served[type(self).__name__, self.gated, y is not None] += 1
        return y

    monkeypatch.setattr(output_store.OutputStore, "__call__", counting)
    return served


def _not_called(*args, **kwargs):
    raise AssertionError("not expected to be called")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("coverage", COVERAGE)
def test_output_stores_apply_the_update_in_the_pass_that_reads_the_output(cases, arch, coverage, monkeypatch):
    """Every attention whose to_out is covered gets an NpoAttnProcessor and, where every layer is covered, every
    GEGLU, transformer block and ResnetBlock2D its Npo counterpart; each call comes from the joint GEMM
    (convolution) and a store (none from the usual code) and equals two UNets; state_dict, modes, a rescale
    factor, an attention mask and removal stay exact."""
    from diffusers.models import attention_processor
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    from npo_merge.guidance import output_store

    unet, deltas, inputs, reference, plain = cases[arch, coverage]
    monkeypatch.setattr(output_store, "_store_kernels", _torch_store_kernels)
    served = _count_stores(monkeypatch)
    attentions = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    gates = resnets = blocks = conv_projections = 0
    if coverage == "all":
        gates = sum(type(m) is GEGLU for m in unet.modules())
        resnets = sum(type(m) is ResnetBlock2D for m in unet.modules())
        blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
        conv_projections = sum(type(m).__name__ == "Transformer2DModel" and not m.use_linear_projection
                               for m in unet.modules())
        assert (conv_projections > 0) == (arch == "sd15")  # SD1.5: 1x1-conv proj_in/out; SDXL: linear
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    with enable_npo(unet, deltas, mode="cfg", backend="torch") as handle:
        _auto_backend(handle)
        counts = output_store.install_output_stores(unet)
        expected = {"NpoAttnProcessor": len(attentions), "NpoGEGLU": gates, "NpoResnetBlock": resnets,
                    "NpoTransformerBlock": blocks, "NpoProjOut": conv_projections}
        assert counts == {kind: n for kind, n in expected.items() if n}
        assert all(isinstance(vars(a)["forward"], output_store.NpoAttentionCall) for a in attentions)
        assert unet.state_dict().keys() == state.keys()
        with monkeypatch.context() as patch:  # the processor is called without diffusers' per-call signature
            patch.setattr(attention_processor, "inspect", SimpleNamespace(signature=_not_called))
            assert max_rel_err(_call(unet, inputs), reference) < 1e-5
        expected = {("OutputStore", False, True): len(attentions) + blocks, ("OutputStore", True, True): gates,
                    ("ChannelStore", False, True): 2 * resnets + conv_projections}
        assert served == {key: n for key, n in expected.items() if n}
        set_branch_mode(unet, "cond")  # no uncond rows: the usual code
        assert max_rel_err(_call(unet, inputs), plain) < 1e-5
        set_branch_mode(unet, "cfg")
        attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
        h, text = torch.randn(2, 16, attn.query_dim), torch.randn(2, 8, attn.cross_attention_dim)
        mask = torch.zeros(2, 1, 8)
        mask[0, 0, 5:] = -10000.0  # the uncond row ignores its last text tokens
        attn.rescale_output_factor = 2.0
        served.clear()
        try:
            with torch.no_grad():
                ours = attn(h, encoder_hidden_states=text, attention_mask=mask)
                theirs = AttnProcessor2_0()(attn, h, encoder_hidden_states=text, attention_mask=mask)
        finally:
            attn.rescale_output_factor = 1.0
        assert served == {("OutputStore", False, True): 1}  # the new shape and factor were served too
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(type(a.processor) is AttnProcessor2_0 and "forward" not in vars(a) for a in attentions)
    swapped = (output_store.NpoGEGLU, output_store.NpoResnetBlock, output_store.NpoTransformerBlock)
    assert not any(isinstance(m, swapped) or "_get_output_for_continuous_inputs" in vars(m) for m in unet.modules())
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert max_rel_err(_call(unet, inputs), plain) < 1e-6


def test_output_stores_come_with_enable_npo_on_cuda_only_and_leave_other_processors(cases):
    """enable_npo installs the stores only with CUDA's backend 'auto' (on CPU it is 'torch'), and
    install_output_stores never replaces a processor other than AttnProcessor2_0."""
    from diffusers.models.attention_processor import AttnProcessor

    from npo_merge.guidance import output_store

    unet, deltas, _, _, _ = cases["sd15", "attention"]
    with enable_npo(unet, deltas, mode="cfg") as handle:
        assert "NpoAttnProcessor" not in handle.counts
        _auto_backend(handle)
        attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
        original = attn.processor
        attn.set_processor(AttnProcessor())
        try:
            counts = output_store.install_output_stores(unet)
            assert counts == {"NpoAttnProcessor": sum(type(m).__name__ == "Attention" for m in unet.modules()) - 1}
            assert type(attn.processor) is AttnProcessor
        finally:
            attn.set_processor(original)
    assert not any(isinstance(getattr(m, "processor", None), output_store.NpoAttnProcessor) for m in unet.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("coverage", ["attention", "all"])
def test_output_stores_with_the_triton_kernel_eager_and_in_a_cuda_graph(arch, coverage, monkeypatch):
    """On CUDA (fp16) enable_npo installs the stores and the Triton kernel serves every call (its timing against
    the usual code skipped); the result matches the layers' own paths, and a CUDA graph captured after an eager
    call replays it."""
    from npo_merge.guidance import output_store

    monkeypatch.setattr(output_store, "_fastest_on_gpu", lambda calls, device: 0)
    served = _count_stores(monkeypatch)
    unet, deltas, inputs = _cuda_case(arch, coverage)
    with enable_npo(unet, deltas, mode="cfg", backend="auto", fused_out=False):
        reference = _call(unet, inputs)
    with enable_npo(unet, deltas, mode="cfg", backend="auto", widened_norms=True) as handle:
        sites = (handle.counts["NpoAttnProcessor"] + handle.counts.get("NpoGEGLU", 0) + handle.counts.get("NpoProjOut", 0)
                 + 2 * handle.counts.get("NpoResnetBlock", 0) + handle.counts.get("NpoTransformerBlock", 0))
        assert handle.counts["NpoAttnProcessor"] == sum(type(m).__name__ == "Attention" for m in unet.modules())
        assert (coverage == "all") == ("NpoGEGLU" in handle.counts) == ("NpoResnetBlock" in handle.counts)
        eager = _call(unet, inputs)
        assert all(key[-1] for key in served) and sum(served.values()) == sites
        assert max_rel_err(eager, reference) < 1e-2
        assert max_rel_err(_graph_replay(unet, inputs), eager) < 1e-3


def test_output_stores_step_aside_under_torch_compile_and_for_unsupported_calls(cases, monkeypatch):
    """With every store installed, a down block (resnets, transformer blocks, attention processors, GEGLU, 1x1-conv
    proj_out) compiles with fullgraph=True and matches eager; cross_attention_kwargs, a chunked feed-forward and
    training mode take the original modules' code, with the same result."""
    from npo_merge.guidance import output_store

    monkeypatch.setattr(output_store, "_store_kernels", _torch_store_kernels)
    served = _count_stores(monkeypatch)
    unet, deltas, _, _, _ = cases["sd15", "all"]
    x, temb, text = torch.randn(2, 32, 8, 8), torch.randn(2, 128), torch.randn(2, 8, 32)
    down = unet.down_blocks[1]
    torch._dynamo.reset()
    with enable_npo(unet, deltas, mode="cfg", backend="torch") as handle, torch.no_grad():
        _auto_backend(handle)
        output_store.install_output_stores(unet)
        eager = down(x, temb, encoder_hidden_states=text)[0]
        assert served and all(key[-1] for key in served)
        compiled = torch.compile(down, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, temb, encoder_hidden_states=text)[0], eager, rtol=1e-5, atol=1e-6)
        block = down.attentions[0].transformer_blocks[0]
        assert isinstance(block, output_store.NpoTransformerBlock)
        h = torch.randn(2, 16, block.norm1.normalized_shape[0])
        stored = block(h, encoder_hidden_states=text)
        served.clear()
        torch.testing.assert_close(block(h, encoder_hidden_states=text, cross_attention_kwargs={"gligen": None}),
                                   stored, rtol=1e-5, atol=1e-6)
        block.original.set_chunk_feed_forward(8, 1)
        try:
            torch.testing.assert_close(block(h, encoder_hidden_states=text), stored, rtol=1e-5, atol=1e-6)
        finally:
            block.original.set_chunk_feed_forward(None, 0)
        # Two calls, each served attn1's and attn2's to_out; the feed-forward's output store stepped aside both times.
        assert served["OutputStore", False, True] == 4
        resnet = down.resnets[0]
        resnet.train()
        try:
            served.clear()
            torch.testing.assert_close(resnet(x, temb), eager_resnet := resnet.original(x, temb), rtol=1e-5, atol=1e-6)
            assert not served and eager_resnet.shape == x.shape[:1] + eager_resnet.shape[1:]
        finally:
            resnet.eval()
    torch._dynamo.reset()
