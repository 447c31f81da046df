"""Read LoRA files of every common layout into canonical modules with (down, up, alpha).

Layouts: kohya (lora_unet_/lora_te_/lora_te1_/lora_te2_ with .alpha, LoCon conv factors), diffusers
(unet./text_encoder. prefixes with lora_A/lora_B, the older lora.down/lora.up, and the legacy
attention-processor names), and peft (base_model.model. prefix, adapter_config.json beside it).
The official Diffusion-NPO release is a diffusers LoRA (rank 8, fp32, attention projections only).
Every key must map to a module of the detected architecture; anything else is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from npo_merge.errors import FormatError, InputError, KeyMappingError
from npo_merge.delta.types import LowRank
from npo_merge.io.architecture import architecture_from_cross_attention_dim
from npo_merge.io.keymap.architectures import ARCHITECTURES
from npo_merge.io.keymap.tables import canonical_modules, ldm_table
from npo_merge.io.sources import TensorSource, open_source

BRANCH_PREFIX = "npo_uncond."  # dual-branch checkpoints keep their uncond difference under it

LORA_LAYOUTS = ("kohya", "diffusers", "peft")
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# Name endings of LoRA-like types we do not apply (LyCORIS and friends).
_LYCORIS_MARKERS = {
    ".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr", ".lora_mid.weight": "LoCon with a CP/Tucker mid factor",
    ".dora_scale": "DoRA", ".lora_magnitude_vector": "DoRA", ".diff": "LyCORIS full-diff", ".diff_b": "LyCORIS full-diff",
    ".oft_blocks": "OFT",
}
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraModule:
    """One module's factors inside a file: the tensor names, and alpha (None: alpha = rank)."""

    canonical: str
    down_key: str
    up_key: str
    alpha: float | None


@dataclass
class LoraFile:
    """A LoRA file seen through canonical module names. Use as a context manager."""

    path: Path
    layout: str
    architectures: tuple[str, ...]  # candidates; one when the file tells them apart
    source: TensorSource
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    variant: str | None = None  # e.g. "legacy attention processors", "official Diffusion-NPO release"

    @property
    def architecture(self) -> str:
        return self.architectures[0] if len(self.architectures) == 1 else " or ".join(self.architectures)

    def lowrank(self, module: str) -> LowRank:
        """The factors of one canonical module, in fp32."""
        ref = self.modules[module]
        down = self.source.tensor(ref.down_key).float()
        up = self.source.tensor(ref.up_key).float()
        if up.dim() == 4 and down.dim() == 2:  # 1x1 conv stored with a linear down (rare writers)
            down = down[:, :, None, None]
        if down.dim() == 4 and up.dim() == 2:
            up = up[:, :, None, None]
        alpha = float(ref.alpha) if ref.alpha is not None else float(down.shape[0])
        try:
            return LowRank(down=down, up=up, alpha=alpha)
        except ValueError as exc:
            raise FormatError(f"{self.path}: module {module!r}: {exc}") from None

    def items(self) -> Iterator[tuple[str, LowRank]]:
        for module in self.modules:
            yield module, self.lowrank(module)

    def rank(self, module: str) -> int:
        return int(self.source.info(self.modules[module].down_key).shape[0])

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "LoraFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- name tables
@lru_cache(maxsize=None)
def kohya_names(architecture: str) -> dict[str, str]:
    """kohya module name (no suffix) -> canonical module, for every module of an architecture.

    kohya writes SD1/SD2 UNet modules by diffusers path and SDXL ones by SGM path; other tools
    (diffusers' own kohya converter among them) use the other style, so both are read.
    """
    arch = ARCHITECTURES[architecture]
    table = ldm_table(architecture)
    unet_prefix = arch.component("unet").ldm_prefix
    text_prefixes = {component: prefix for prefix, component in arch.kohya_text_prefixes.items()}
    names: dict[str, str] = {}
    for module in canonical_modules(architecture):
        component, _, rest = module.partition(".")
        if component == "unet":
            names["lora_unet_" + rest.replace(".", "_")] = module
            names["lora_unet_" + _ldm_module(table, module, unet_prefix).replace(".", "_")] = module
        elif component in text_prefixes:
            names[text_prefixes[component] + rest.replace(".", "_")] = module
    return names


def kohya_name(architecture: str, module: str) -> str:
    """The kohya name kohya's own scripts write for a canonical module."""
    arch = ARCHITECTURES[architecture]
    component, _, rest = module.partition(".")
    if component == "unet":
        if arch.kohya_unet_naming == "ldm":
            rest = _ldm_module(ldm_table(architecture), module, arch.component("unet").ldm_prefix)
        return "lora_unet_" + rest.replace(".", "_")
    prefix = {c: p for p, c in arch.kohya_text_prefixes.items()}[component]
    return prefix + rest.replace(".", "_")


def _ldm_module(table, module: str, prefix: str) -> str:
    key = f"{module}.weight" if f"{module}.weight" in table.by_canonical else f"{module}.bias"
    return table.link_for_canonical(key).native[len(prefix):].rsplit(".", 1)[0]


def _peft_match(pattern_map: dict[str, object], module: str) -> object | None:
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module path suffix."""
    for key, value in pattern_map.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


# ---------------------------------------------------------------------------- parsing
_DIFFUSERS_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<peft>lora_[AB])\.weight|lora\.(?P<old>down|up)\.weight|lora_linear_layer\.(?P<lin>down|up)\.weight)$"
)
_LEGACY_PROCESSOR = re.compile(
    r"^(?P<block>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<dir>down|up)\.weight$"
)


def _split_component(name: str, default: str) -> tuple[str, str]:
    for component in ("unet", "text_encoder_2", "text_encoder"):
        if name.startswith(component + "."):
            return component, name[len(component) + 1:]
    return default, name


def _factor_pairs(names: list[str], where: Path) -> tuple[dict[str, dict[str, str]], dict[str, str], bool]:
    """Group diffusers/peft factor keys by module: module -> {"down": key, "up": key}; alpha keys."""
    pairs: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    legacy = False
    for name in names:
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = name
            continue
        legacy_match = _LEGACY_PROCESSOR.match(name)
        if legacy_match:
            legacy = True
            proj = "to_out.0" if legacy_match["proj"] == "to_out" else legacy_match["proj"]
            module, side = f"{legacy_match['block']}.{proj}", legacy_match["dir"]
        else:
            match = _DIFFUSERS_FACTOR.match(name)
            if match is None:
                raise KeyMappingError(f"{where}: tensor {name!r} is not a LoRA factor this tool understands")
            module = match["module"]
            side = {"lora_A": "down", "lora_B": "up"}.get(match["peft"] or "", match["old"] or match["lin"] or "")
        pairs.setdefault(module, {})[side] = name
    for module, sides in pairs.items():
        if set(sides) != {"down", "up"}:
            raise FormatError(f"{where}: module {module!r} has only its {next(iter(sides))} factor")
    return pairs, alphas, legacy


def _check_lycoris(names: list[str], where: Path) -> None:
    for name in names:
        for marker, kind in _LYCORIS_MARKERS.items():
            if name.endswith(marker) or f"{marker}." in name:
                raise FormatError(
                    f"{where}: {kind} weights ({name!r}) are not supported; only plain LoRA/LoCon factors are"
                )


def _cross_attention_hint(source: TensorSource, modules: dict[str, LoraModule]) -> str | None:
    for module, ref in modules.items():
        if module.startswith("unet.") and module.endswith("attn2.to_k"):
            return architecture_from_cross_attention_dim(int(source.info(ref.down_key).shape[1]))
    return None


def _choose_architecture(source: TensorSource, modules: dict[str, LoraModule], candidates: list[str]) -> tuple[str, ...]:
    """Narrow the candidates by the cross-attention width when the file has a real-size attn2.to_k."""
    hint = _cross_attention_hint(source, modules)
    if hint in candidates:
        return (hint,)
    return tuple(candidates)


def _resolve_diffusers_style(
    source: TensorSource, names: list[str], where: Path, strip: str, default_component: str
) -> tuple[dict[str, LoraModule], tuple[str, ...], bool]:
    pairs, alpha_keys, legacy = _factor_pairs([n[len(strip):] if n.startswith(strip) else n for n in names], where)
    raw: dict[str, LoraModule] = {}
    for module, sides in pairs.items():
        component, rest = _split_component(module, default_component)
        canonical = f"{component}.{rest}"
        if component.startswith("text_encoder") and not rest.startswith("text_model."):
            canonical = f"{component}.text_model.{rest}"
        alpha_key = alpha_keys.get(module)
        alpha = float(source.tensor(strip + alpha_key).float().item()) if alpha_key else None
        raw[canonical] = LoraModule(canonical, strip + sides["down"], strip + sides["up"], alpha)
    candidates = [a for a in ARCHITECTURES if set(raw) <= canonical_modules(a)]
    if not candidates:
        unknown = sorted(set(raw) - canonical_modules("sdxl") - canonical_modules("sd1"))
        first = unknown[0] if unknown else sorted(raw)[0]
        raise KeyMappingError(f"{where}: LoRA module {first!r} matches no SD1/SD2/SDXL module")
    return raw, _choose_architecture(source, raw, candidates), legacy


def _read_kohya(source: TensorSource, where: Path) -> tuple[dict[str, LoraModule], tuple[str, ...]]:
    by_module: dict[str, dict[str, str]] = {}
    for name in source:
        module, _, suffix = name.partition(".")
        by_module.setdefault(module, {})[suffix] = name
    candidates = [a for a in ARCHITECTURES if set(by_module) <= set(kohya_names(a))]
    if not candidates:
        best = min(ARCHITECTURES, key=lambda a: len(set(by_module) - set(kohya_names(a))))
        first = sorted(set(by_module) - set(kohya_names(best)))[0]
        raise KeyMappingError(f"{where}: kohya LoRA module {first!r} matches no SD1/SD2/SDXL module")
    table = kohya_names(candidates[0])
    modules: dict[str, LoraModule] = {}
    for module, parts in by_module.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise FormatError(f"{where}: kohya module {module!r} lacks lora_down/lora_up weights ({sorted(parts)})")
        extra = set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if extra:
            raise KeyMappingError(f"{where}: unexpected tensor {parts[sorted(extra)[0]]!r}")
        alpha = float(source.tensor(parts["alpha"]).float().item()) if "alpha" in parts else None
        canonical = table[module]
        modules[canonical] = LoraModule(canonical, parts["lora_down.weight"], parts["lora_up.weight"], alpha)
    # The same kohya name can mean the same module in SD1 and SD2; tell them apart by shape.
    return modules, _choose_architecture(source, modules, candidates)


def _diffusers_config(metadata: dict[str, str], where: Path) -> dict[str, object]:
    """diffusers' lora_adapter_metadata: each component's LoraConfig, keys prefixed "unet." etc."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError(f"{where}: lora_adapter_metadata is not valid JSON") from None


def _alpha_from_config(config: dict[str, object], prefix: str, module: str, rank: int) -> float | None:
    """alpha for `module` from a peft LoraConfig dict (keys may carry `prefix`, e.g. "unet.")."""
    get = lambda key: config.get(prefix + key)  # noqa: E731
    if get("lora_alpha") is None and get("r") is None:
        return None
    rank_pattern = get("rank_pattern") or {}
    alpha_pattern = get("alpha_pattern") or {}
    r = _peft_match(rank_pattern, module) or get("r") or rank
    alpha = _peft_match(alpha_pattern, module) or get("lora_alpha") or r
    if get("use_dora"):
        raise FormatError(f"DoRA adapters are not supported (module {module!r})")
    if get("use_rslora"):  # rsLoRA scales by alpha/sqrt(r); keep scale = alpha'/rank
        return float(alpha) * math.sqrt(float(rank))
    return float(alpha) * rank / float(r) if int(r) != rank else float(alpha)


def _apply_config_alphas(modules: dict[str, LoraModule], source: TensorSource, config: dict[str, object],
                         prefix_of: dict[str, str]) -> dict[str, LoraModule]:
    out = {}
    for canonical, ref in modules.items():
        if ref.alpha is not None:
            out[canonical] = ref
            continue
        component, _, rest = canonical.partition(".")
        rank = int(source.info(ref.down_key).shape[0])
        alpha = _alpha_from_config(config, prefix_of.get(component, ""), rest, rank)
        out[canonical] = LoraModule(canonical, ref.down_key, ref.up_key, alpha)
    return out


def _is_official_npo(lora: LoraFile) -> bool:
    ranks = {lora.rank(m) for m in lora.modules}
    dtypes = {lora.source.info(ref.down_key).dtype for ref in lora.modules.values()}
    attention_only = all(m.startswith("unet.") and m.endswith(_ATTENTION_PROJECTIONS) for m in lora.modules)
    return lora.layout == "diffusers" and ranks == {8} and dtypes == {torch.float32} and attention_only


def lora_layout_of(names: list[str]) -> str | None:
    """Which LoRA layout a list of tensor names is in, or None when it is no LoRA."""
    names = [name for name in names if not name.startswith(BRANCH_PREFIX)]  # a dual-branch model's own
    if any(name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for name in names):
        return "kohya"
    lora_like = [n for n in names if ".lora" in n or "_lora." in n]
    if not lora_like:
        return None
    if all(name.startswith("base_model.model.") for name in lora_like):
        return "peft"
    return "diffusers"


def find_lora_weights(path: Path) -> tuple[Path, Path | None]:
    """The weights file of a LoRA path (file or folder) and the peft adapter_config.json, if any."""
    if path.is_dir():
        for name in PEFT_WEIGHTS + DIFFUSERS_WEIGHTS:
            if (path / name).is_file():
                config = path / "adapter_config.json"
                return path / name, config if config.is_file() else None
        raise InputError(f"{path}: folder holds no LoRA weights (adapter_model.safetensors or pytorch_lora_weights.safetensors)")
    config = path.parent / "adapter_config.json"
    return path, config if path.name.startswith("adapter_model") and config.is_file() else None


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Open a LoRA file or folder (kohya, diffusers, peft) with canonical module names."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    weights, config_path = find_lora_weights(path)
    source = open_source(weights)
    try:
        return _read(path, source, config_path)
    except BaseException:
        source.close()
        raise


def _read(path: Path, source: TensorSource, config_path: Path | None) -> LoraFile:
    names = list(source)
    layout = lora_layout_of(names)
    if layout is None:
        raise KeyMappingError(f"{path}: no LoRA factors found (no lora_down/lora_up, lora_A/lora_B keys)")
    _check_lycoris(names, path)
    metadata = dict(source.metadata)
    variant = None
    if layout == "kohya":
        modules, archs = _read_kohya(source, path)
    elif layout == "peft":
        config: dict[str, object] = {}
        if config_path is not None:
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as exc:
                raise FormatError(f"{config_path}: not valid JSON ({exc})") from None
        component = _peft_component(names)
        modules, archs, _ = _resolve_diffusers_style(source, names, path, "base_model.model.", component)
        modules = _apply_config_alphas(modules, source, config, {component: ""})
    else:
        modules, archs, legacy = _resolve_diffusers_style(source, names, path, "", "unet")
        config = _diffusers_config(metadata, path)
        if config:
            prefixes = {c: f"{c}." for c in ("unet", "text_encoder", "text_encoder_2")}
            modules = _apply_config_alphas(modules, source, config, prefixes)
        variant = "legacy attention-processor names" if legacy else None
    lora = LoraFile(path, layout, archs, source, modules, metadata, variant)
    if variant is None and _is_official_npo(lora):
        lora.variant = "official Diffusion-NPO release layout (diffusers, rank 8, fp32, attention projections)"
    return lora


def _peft_component(names: list[str]) -> str:
    """peft files carry no component prefix; text-encoder modules start with text_model."""
    inner = [n[len("base_model.model."):] for n in names if n.startswith("base_model.model.")]
    return "text_encoder" if inner and all(n.startswith("text_model.") for n in inner) else "unet"
