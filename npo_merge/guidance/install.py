"""Turn NPO on and off in a diffusers UNet or pipeline: swap covered layers for dual-branch layers and back.

`enable_npo(pipe, deltas)` replaces every Linear/Conv2d layer named in `deltas` with a dual-branch
layer that shares the layer's Parameters (no weight copy, `unet.state_dict()` unchanged) and applies
theta_u - theta_c to the uncond half of the batch. `disable_npo(pipe)` puts the very same original
modules back.

Which rows are "uncond" is the branch mode. diffusers pipelines batch [uncond; cond] only when they do
classifier-free guidance (guidance_scale > 1); otherwise the whole batch is cond. With mode="auto" on a
pipeline, the pipeline's own `encode_prompt` call (made once per pipeline call, before the denoising
loop, with the pipeline's `do_classifier_free_guidance` flag) sets the mode: "cfg" or "cond". The
mode is thus a plain Python attribute that never changes inside the UNet call: torch.compile guards
on it (one graph per mode actually used) and a captured CUDA graph keeps the mode it was captured with.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from npo_merge.delta.types import LowRank
from npo_merge.errors import CompatibilityError, InputError
from npo_merge.guidance.dual_branch import (
    BRANCH_MODES,
    PATHS,
    Backend,
    BranchDelta,
    BranchMode,
    BranchPath,
    DualBranchLayer,
    GROUP_MAX_RANK,
    DualBranchLinear,
    InputGroup,
    delta_problem,
    dual_branch_module,
    fused_op_available,
    replace_submodule,
)
from npo_merge.guidance.output_store import install_output_stores, remove_output_stores
from npo_merge.guidance.widened_norm import WidenedNorm, widen_norms

ModeSetting = Literal["auto", "cfg", "cond", "uncond"]
DeltaValue = BranchDelta | LowRank | torch.Tensor

_UNET_PREFIX = "unet."
_WRAPPER_MARK = "_npo_follows_guidance"
_MAX_LISTED = 6


@dataclass
class NpoHandle:
    """What enable_npo did: the UNet, the dual-branch layers by module path, and how to undo it."""

    unet: nn.Module
    modules: dict[str, DualBranchLayer]
    eta: float
    path: BranchPath
    pipeline: Any | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def extra_bytes(self) -> int:
        """Memory held for the branch differences (factors, dense differences, stacked weights)."""
        return sum(module.extra_bytes() for module in self.modules.values())

    def set_mode(self, mode: ModeSetting) -> None:
        set_branch_mode(self.pipeline if self.pipeline is not None else self.unet, mode)

    def remove(self) -> None:
        disable_npo(self.pipeline if self.pipeline is not None else self.unet)

    def __enter__(self) -> NpoHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enable_npo(
    pipe_or_unet: Any,
    deltas: Mapping[str, DeltaValue],
    eta: float = 1.0,
    *,
    mode: ModeSetting = "auto",
    path: BranchPath = "lowrank",
    backend: Literal["auto", "torch", "fused"] = "auto",
    group_inputs: bool = True,
    widened_norms: bool | Literal["graphs"] = "graphs",
    fused_out: bool = True,
) -> NpoHandle:
    """Make the UNet serve theta_c to the cond half and theta_c + eta * delta to the uncond half of each batch.

    pipe_or_unet: a diffusers StableDiffusion(XL)Pipeline (its .unet is used) or a UNet2DConditionModel.
    deltas: theta_u - theta_c per UNet module path (diffusers names, optional "unet." prefix, optional
        ".weight" suffix): `BranchDelta`, or bare `LowRank` factors / a dense tensor for the weight.
    eta: scales the whole difference (weight and bias).
    mode: "auto" follows the pipeline's classifier-free-guidance flag ("cfg" for a bare UNet);
        "cfg", "cond", "uncond" fix the mode (see `set_branch_mode`).
    path: "lowrank" (default), "dense" or "stacked" (see `dual_branch_module`).
    backend: for low-rank linear layers, "fused" uses torch.ops.npo_merge.dual_branch_linear for every
        call; "auto" (on CUDA, when the op is there) uses it only where `prefers_fused` says it beats
        cuBLAS plus the torch update for the call's shape, and under torch.compile runs each layer's
        eager route as one op (`routed_op`); "torch" never uses it.
    group_inputs: with backend "auto", serve projections that read the same input with one grouped launch
        (each self-attention's q/k/v; all cross-attention k/v of one width; `group_shared_inputs`).
    widened_norms: with backend "auto", also swap the LayerNorms that feed q/k/v, cross-attention q and (without
        `fused_out`) the feed-forward's input projection for `WidenedNorm`s: the norm writes the shrink, one
        cuBLAS GEMM serves the projections (`widen_norms`). That costs less GPU time (H100, SDXL, attention
        rank 8, CUDA-graph step: 1.005-1.008x plain CFG against 1.027-1.029x) and more host time (eager step
        1.12-1.34x against 0.99-1.05x). "graphs" (default): the widened path serves CUDA-graph captures only,
        eager calls run the usual path; True: every call it can serve; False: no swap.
    fused_out: with backend "auto", apply a covered layer's update inside the elementwise pass that diffusers
        runs on its output anyway (the attention's rescale, GEGLU's gate, the residual and time-embedding
        adds of transformer and resnet blocks), where that times faster (`install_output_stores`).
    Raises CompatibilityError naming every key that has no matching layer or the wrong shape.
    """
    pipeline, unet = _split_pipeline(pipe_or_unet)
    if mode not in ("auto", *BRANCH_MODES):
        raise InputError(f"unknown branch mode {mode!r}: use auto, {', '.join(BRANCH_MODES)}")
    if path not in PATHS:
        raise InputError(f"unknown path {path!r}: use one of {', '.join(PATHS)}")
    if widened_norms not in (True, False, "graphs"):
        raise InputError(f"unknown widened_norms {widened_norms!r}: use 'graphs', True or False")
    if any(isinstance(m, DualBranchLayer) for m in unet.modules()):
        raise InputError("NPO is already enabled on this UNet: call disable_npo first")
    if mode == "auto" and pipeline is not None:
        _encode_prompt_signature(pipeline)  # fail now, not at the first call
    targets = resolve_deltas(unet, deltas)
    layer_backend = _pick_backend(backend, unet, path)

    start_mode: BranchMode = "cfg" if mode == "auto" else mode
    modules: dict[str, DualBranchLayer] = {}
    try:
        for name, (layer, delta) in targets.items():
            wrapped = dual_branch_module(layer, delta, eta, path=path, mode=start_mode)
            if isinstance(wrapped, DualBranchLinear) and wrapped.strategy == "lowrank":
                wrapped.set_backend(layer_backend)
            replace_submodule(unet, name, wrapped)
            modules[name] = wrapped
    except BaseException:
        disable_npo(unet)  # never leave a half-installed UNet behind
        raise
    if mode == "auto" and pipeline is not None:
        _follow_pipeline_guidance(pipeline, list(modules.values()))

    counts: dict[str, int] = {}
    for module in modules.values():
        key = f"{type(module).__name__}:{module.strategy}"
        counts[key] = counts.get(key, 0) + 1
    widened = 0
    if widened_norms and layer_backend == "auto":
        widened = widen_norms(unet, eager=widened_norms is True, group_inputs=group_inputs,
                              feed_forward=not fused_out)
    if widened:
        counts["WidenedNorm"] = widened
    groups = group_shared_inputs(unet) if group_inputs else 0
    if groups:
        counts["InputGroup"] = groups
    if fused_out and layer_backend == "auto":
        counts.update(install_output_stores(unet))
    return NpoHandle(unet=unet, modules=modules, eta=float(eta), path=path, pipeline=pipeline, counts=counts)


def disable_npo(pipe_or_unet: Any) -> int:
    """Put the original layers back (the same module and Parameter objects); returns how many were restored."""
    pipeline, unet = _split_pipeline(pipe_or_unet)
    remove_output_stores(unet)  # first: the stand-in modules hold dual-branch layers
    restored = 0
    for name, module in list(unet.named_modules()):
        if isinstance(module, WidenedNorm):
            replace_submodule(unet, name, module.release())
        elif isinstance(module, DualBranchLayer):
            replace_submodule(unet, name, module.release())
            restored += 1
    if pipeline is not None and getattr(pipeline.__dict__.get("encode_prompt"), _WRAPPER_MARK, None) is not None:
        del pipeline.__dict__["encode_prompt"]
    return restored


def set_branch_mode(pipe_or_unet: Any, mode: ModeSetting) -> None:
    """Choose which rows of each UNet batch get theta_u.

    "cfg": the batch is [uncond; cond] (what pipelines pass when guidance_scale > 1).
    "cond": every row gets theta_c, i.e. plain CFG with the target model (also right for guidance <= 1).
    "uncond": every row gets theta_u.
    "auto": on a pipeline, follow its classifier-free-guidance flag at each call; on a UNet, "cfg".
    A torch.compile'd UNet recompiles once per mode it meets; a captured CUDA graph keeps its mode.
    """
    pipeline, unet = _split_pipeline(pipe_or_unet)
    if mode not in ("auto", *BRANCH_MODES):
        raise InputError(f"unknown branch mode {mode!r}: use auto, {', '.join(BRANCH_MODES)}")
    layers = [m for m in unet.modules() if isinstance(m, DualBranchLayer)]
    if not layers:
        raise InputError("NPO is not enabled on this UNet: call enable_npo first")
    wrapper = pipeline.__dict__.get("encode_prompt") if pipeline is not None else None
    follow = getattr(wrapper, _WRAPPER_MARK, None)
    if mode == "auto":
        if pipeline is not None and follow is None:
            _follow_pipeline_guidance(pipeline, layers)
        elif follow is not None:
            follow["on"] = True
        mode = "cfg"
    elif follow is not None:
        follow["on"] = False
    _set_layer_modes(layers, mode)


def resolve_deltas(unet: nn.Module, deltas: Mapping[str, DeltaValue]) -> dict[str, tuple[nn.Module, BranchDelta]]:
    """Map each delta key to its UNet layer and check shapes; one CompatibilityError lists every bad key."""
    if not deltas:
        raise CompatibilityError("no deltas given: nothing to enable (check the LoRA file's key names)")
    foreign, missing, mismatched = [], [], []
    targets: dict[str, tuple[nn.Module, BranchDelta]] = {}
    for key, value in deltas.items():
        name = _module_path(key)
        if name is None:
            foreign.append(key)
            continue
        delta = value if isinstance(value, BranchDelta) else BranchDelta(value)
        try:
            layer = unet.get_submodule(name)
        except AttributeError:
            missing.append(key)
            continue
        problem = delta_problem(layer, delta)
        if problem is not None:
            mismatched.append(f"{key} ({problem})")
            continue
        if name in targets:
            raise CompatibilityError(f"two deltas for the UNet module {name!r}: combine them before enabling")
        targets[name] = (layer, delta)
    problems = []
    if foreign:
        problems.append(f"keys outside the UNet (NPO guidance covers UNet layers only): {_listing(foreign)}")
    if missing:
        problems.append(f"no such UNet module for {len(missing)} keys: {_listing(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} keys do not fit their layer: {_listing(mismatched)}")
    if problems:
        raise CompatibilityError("; ".join(problems) + " - is the delta for this architecture?")
    return targets


def dual_branch_layers(pipe_or_unet: Any) -> Iterator[tuple[str, DualBranchLayer]]:
    """The dual-branch layers currently installed, by module path."""
    _, unet = _split_pipeline(pipe_or_unet)
    for name, module in unet.named_modules():
        if isinstance(module, DualBranchLayer):
            yield name, module


# ---------------------------------------------------------------------------------------------


def _split_pipeline(pipe_or_unet: Any) -> tuple[Any | None, nn.Module]:
    """(pipeline or None, UNet) from a diffusers pipeline or a bare UNet."""
    unet = getattr(pipe_or_unet, "unet", None)
    pipeline = pipe_or_unet if isinstance(unet, nn.Module) else None
    if pipeline is None:
        unet = pipe_or_unet
    if not isinstance(unet, nn.Module):
        raise InputError(f"expected a diffusers pipeline or a UNet, got {type(pipe_or_unet).__name__}")
    if hasattr(unet, "_orig_mod"):
        raise InputError("the UNet is already torch.compile'd: enable or disable NPO before compiling it")
    return pipeline, unet


def _module_path(key: str) -> str | None:
    """Delta key -> UNet module path; None for keys of other components (text_encoder., vae., ...)."""
    if key.startswith(_UNET_PREFIX):
        key = key[len(_UNET_PREFIX) :]
    elif key.split(".", 1)[0] in ("text_encoder", "text_encoder_2", "vae"):
        return None
    if key.endswith(".weight"):
        key = key[: -len(".weight")]
    return key


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def group_shared_inputs(unet: nn.Module) -> int:
    """Group the dual-branch projections that read one input (see `InputGroup`); returns the number of groups.

    Self-attention's to_q/to_k/to_v read the hidden states: one group per attention. Every cross-attention's
    to_k/to_v read the text states, which a diffusers UNet hands unchanged to each of its blocks: one group
    per projection shape across the whole UNet, one launch a step. Members must be low-rank layers on
    backend "auto" with one shape, rank and dtype, at ranks up to GROUP_MAX_RANK.
    """
    groupable = {id(m) for m in unet.modules() if isinstance(m, DualBranchLinear) and m.strategy == "lowrank"
                 and m.backend == "auto" and m.group is None and m.down.shape[0] <= GROUP_MAX_RANK}
    candidates: dict[tuple, list[DualBranchLinear]] = {}
    for attention in unet.modules():
        if not all(hasattr(attention, name) for name in ("to_q", "to_k", "to_v", "is_cross_attention")):
            continue
        names = ("to_k", "to_v") if attention.is_cross_attention else ("to_q", "to_k", "to_v")
        for name in names:
            member = getattr(attention, name)
            if id(member) in groupable:
                where = "text" if attention.is_cross_attention else id(attention)
                shape = (tuple(member.weight.shape), tuple(member.down.shape), member.weight.dtype, member.bias is None)
                candidates.setdefault((where, shape), []).append(member)
    groups = [members for members in candidates.values() if len(members) > 1]
    for members in groups:
        InputGroup(members)
    return len(groups)


def _pick_backend(backend: str, unet: nn.Module, path: BranchPath) -> Backend:
    if backend not in ("auto", "torch", "fused"):
        raise InputError(f"unknown backend {backend!r}: use auto, torch or fused")
    if backend == "auto":  # per-shape dispatch between the fused op and torch, on CUDA only
        on_cuda = next(unet.parameters()).is_cuda
        return "auto" if path == "lowrank" and on_cuda and fused_op_available() else "torch"
    return backend  # type: ignore[return-value]


def _set_layer_modes(layers: list[DualBranchLayer], mode: BranchMode) -> None:
    for layer in layers:
        layer.set_mode(mode)


def _encode_prompt_signature(pipeline: Any) -> inspect.Signature:
    """The signature of pipeline.encode_prompt, which must take `do_classifier_free_guidance` for mode 'auto'."""
    encode = getattr(pipeline, "encode_prompt", None)
    signature = inspect.signature(encode) if callable(encode) else None
    if signature is None or "do_classifier_free_guidance" not in signature.parameters:
        raise InputError(
            f"mode 'auto' needs a pipeline whose encode_prompt takes do_classifier_free_guidance "
            f"({type(pipeline).__name__} has none): pass mode='cfg' or 'cond' and switch with set_branch_mode"
        )
    return signature


def _follow_pipeline_guidance(pipeline: Any, layers: list[DualBranchLayer]) -> None:
    """Wrap pipeline.encode_prompt (instance attribute) so each pipeline call sets 'cfg' or 'cond' first.

    diffusers SD/SDXL pipelines call encode_prompt once per __call__, before the denoising loop, with
    do_classifier_free_guidance=self.do_classifier_free_guidance: the flag that decides whether the
    UNet sees [uncond; cond] or cond only. The mode is set outside the UNet call, so nothing here runs
    under torch.compile or inside a CUDA graph.
    """
    signature = _encode_prompt_signature(pipeline)
    original = pipeline.encode_prompt
    state = {"on": True}

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        if state["on"]:
            bound = signature.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            does_cfg = bool(bound.arguments.get("do_classifier_free_guidance", True))
            _set_layer_modes(layers, "cfg" if does_cfg else "cond")
        return original(*args, **kwargs)

    setattr(encode_prompt, _WRAPPER_MARK, state)
    pipeline.__dict__["encode_prompt"] = encode_prompt
