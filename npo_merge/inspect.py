"""`inspect`: say exactly what a checkpoint, LoRA or delta file is, as a plain dict (JSON-ready)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from npo_merge.io.checkpoint import Checkpoint, open_checkpoint
from npo_merge.io.detect import DELTA_FORMAT_KEY, detect_kind
from npo_merge.io.keymap.architectures import ARCHITECTURES
from npo_merge.io.lora import BRANCH_PREFIX, LoraFile, read_lora
from npo_merge.io.safetensors_stream import dtype_code
from npo_merge.io.sources import TensorSource, open_source

# What the metadata keys people meet in the wild mean; prefixes end with "*".
KNOWN_METADATA = {
    "format": "tensor framework tag written by safetensors' save_file",
    "lora_adapter_metadata": "diffusers: the peft LoraConfig of each component (r = rank, lora_alpha = alpha)",
    "modelspec.*": "Stability AI model-spec fields (architecture, title, resolution...)",
    "ss_network_dim": "kohya sd-scripts: LoRA rank",
    "ss_network_alpha": "kohya sd-scripts: LoRA alpha (scale = alpha / rank)",
    "ss_network_module": "kohya sd-scripts: network type (networks.lora = LoRA/LoCon)",
    "ss_base_model_version": "kohya sd-scripts: base model family",
    "ss_sd_model_name": "kohya sd-scripts: base checkpoint it was trained on",
    "ss_*": "kohya sd-scripts training setting",
    "npo_merge.*": "written by npo-merge",
}
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def explain_metadata_key(key: str) -> str | None:
    """One-line meaning of a metadata key, or None when it is not one we know."""
    if key in KNOWN_METADATA:
        return KNOWN_METADATA[key]
    for pattern, meaning in KNOWN_METADATA.items():
        if pattern.endswith("*") and key.startswith(pattern[:-1]):
            return meaning
    return None


def _tensor_stats(sources: Iterable[tuple[TensorSource, Iterable[str]]]) -> dict[str, Any]:
    dtypes: Counter[str] = Counter()
    tensors = parameters = 0
    for source, names in sources:
        for name in names:
            info = source.info(name)
            dtypes[dtype_code(info.dtype)] += 1
            tensors += 1
            parameters += info.numel
    main = dtypes.most_common(1)[0][0] if dtypes else None
    return {"dtype": main, "dtypes": dict(dtypes), "tensors": tensors, "parameters": parameters}


def _file_size(files: Iterable[Path]) -> int:
    return sum(Path(f).stat().st_size for f in set(files))


def _module_kind(module: str) -> str:
    component, _, rest = module.partition(".")
    if rest.endswith(_ATTENTION):
        kind = "attention projections"
    elif ".ff." in rest or ".mlp." in rest:
        kind = "feed-forward"
    elif rest.endswith(("proj_in", "proj_out")):
        kind = "transformer proj_in/proj_out"
    elif ".resnets." in rest or "samplers" in rest or rest in ("conv_in", "conv_out"):
        kind = "resnet/conv"
    else:
        kind = "other"
    return f"{component}: {kind}"


def _model_report(checkpoint: Checkpoint) -> dict[str, Any]:
    report: dict[str, Any] = {
        "kind": "model",
        "layout": checkpoint.layout,
        "architecture": checkpoint.architecture,
    }
    arch = ARCHITECTURES.get(checkpoint.architecture)
    if arch is not None:
        report["architecture_name"] = arch.label
    all_sources = [(source, list(source)) for source in checkpoint.sources]
    report.update(_tensor_stats(all_sources))
    report["components"] = {}
    for component in checkpoint.components:
        keys = [k for k in checkpoint.entries if k.startswith(component + ".")]
        natives = {}
        for key in keys:
            entry = checkpoint.entries[key]
            natives.setdefault(id(entry.source), (entry.source, set()))[1].add(entry.link.native)
        stats = _tensor_stats((source, names) for source, names in natives.values())
        report["components"][component] = {"tensors": stats["tensors"], "parameters": stats["parameters"], "dtype": stats["dtype"]}
    report["extra_tensors"] = sorted(name for _, name in checkpoint.extras)
    if checkpoint.branch_names:
        report["dual_branch"] = _branch_report(checkpoint)
    report["files"] = [str(f) for f in checkpoint.files]
    report["file_size"] = _file_size(checkpoint.files)
    report["metadata"] = checkpoint.metadata
    return report


def _branch_report(checkpoint: Checkpoint) -> dict[str, Any]:
    """The uncond-branch difference a dual-branch checkpoint carries."""
    meta = checkpoint.metadata
    source = checkpoint.sources[0]
    names = checkpoint.branch_names
    ranks = Counter(source.info(n).shape[0] for n in names if n.endswith(".lora_down"))
    return {
        "format_version": meta.get("npo_merge.dual_branch"),
        "modules": len({n[len(BRANCH_PREFIX):].rsplit(".", 1)[0] for n in names}),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "dense_layers": sum(n.endswith(".diff") for n in names),
        "eta": meta.get("npo_merge.eta"),
        "beta": meta.get("npo_merge.beta"),
        "guidance_scale": meta.get("npo_merge.guidance_scale"),
    }


def _lora_report(lora: LoraFile) -> dict[str, Any]:
    report: dict[str, Any] = {"kind": "lora", "layout": lora.layout, "architecture": lora.architecture}
    if len(lora.architectures) > 1:
        report["architecture_note"] = "names and shapes fit several architectures; the target decides"
    if lora.variant:
        report["variant"] = lora.variant
    report.update(_tensor_stats([(lora.source, list(lora.source))]))
    ranks = Counter(lora.rank(m) for m in lora.modules)
    alphas = Counter(
        (lora.modules[m].alpha if lora.modules[m].alpha is not None else float(lora.rank(m))) for m in lora.modules
    )
    report["rank"] = max(ranks) if len(ranks) == 1 else sorted(ranks)
    report["alpha"] = next(iter(alphas)) if len(alphas) == 1 else sorted(alphas)
    report["ranks"] = {str(k): v for k, v in sorted(ranks.items())}
    report["alphas"] = {str(k): v for k, v in sorted(alphas.items())}
    report["modules"] = len(lora.modules)
    report["coverage"] = dict(sorted(Counter(_module_kind(m) for m in lora.modules).items()))
    report["mapped_modules"] = sorted(lora.modules)
    report["files"] = [str(lora.source.path)]
    report["file_size"] = _file_size([lora.source.path])
    report["metadata"] = lora.metadata
    return report


def inspect_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe what is at `path`: layout, architecture, components, dtypes, counts, LoRA ranks..."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "model":
        with open_checkpoint(path) as checkpoint:
            report = _model_report(checkpoint)
    else:
        report = _delta_report(path) if kind == "delta" else None
        if report is None:
            with read_lora(path) as lora:
                report = _lora_report(lora)
    return {"path": str(path), **report}


def _delta_report(path: Path) -> dict[str, Any] | None:
    """A delta written by npo-merge: LoRA-shaped deltas get the LoRA report plus role and base."""
    source = open_source(path)
    try:
        metadata = dict(source.metadata)
        stats = _tensor_stats([(source, list(source))])
    finally:
        source.close()
    delta = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith("npo_merge.")}
    if metadata.get(DELTA_FORMAT_KEY) == "delta/lowrank":
        with read_lora(path) as lora:
            report = _lora_report(lora)
    else:
        report = {"kind": "delta", "layout": "npo-merge full delta", "architecture": delta.get("base_architecture", "unknown"),
                  **stats, "files": [str(path)], "file_size": path.stat().st_size, "metadata": metadata}
    report["kind"] = "delta"
    report["delta"] = delta
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text for `inspect` (the --json output is the dict itself)."""
    lines = [f"{report['path']}"]

    def row(label: str, value: Any) -> None:
        lines.append(f"  {label:<14} {value}")

    row("kind", report["kind"])
    row("layout", report["layout"] + (f" ({report['variant']})" if report.get("variant") else ""))
    arch = report["architecture"]
    row("architecture", f"{arch} ({report['architecture_name']})" if report.get("architecture_name") else arch)
    if report.get("architecture_note"):
        row("", report["architecture_note"])
    dtypes = ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items())
    row("dtype", dtypes or "-")
    row("tensors", f"{report['tensors']:,}")
    row("parameters", f"{report['parameters']:,}")
    row("file size", f"{report['file_size']:,} bytes ({report['file_size'] / 2**20:.1f} MiB)")
    for component, stats in report.get("components", {}).items():
        row("component", f"{component}: {stats['tensors']:,} tensors, {stats['parameters']:,} parameters, {stats['dtype']}")
    if report.get("dual_branch"):
        dual = report["dual_branch"]
        ranks = ", ".join(f"rank {k} x{v}" for k, v in dual["ranks"].items()) or "dense"
        row("dual-branch", f"format {dual['format_version']}: uncond difference on {dual['modules']} UNet modules ({ranks}), "
                           f"eta {dual['eta']}, beta {dual['beta']}")
    if report.get("extra_tensors"):
        row("extras", f"{len(report['extra_tensors'])} non-weight tensors kept as they are (scheduler buffers, EMA...)")
    if "rank" in report:
        row("rank", report["rank"] if isinstance(report["rank"], int) else ", ".join(f"{k} x{v}" for k, v in report["ranks"].items()))
        row("alpha", report["alpha"] if not isinstance(report["alpha"], list) else ", ".join(f"{k} x{v}" for k, v in report["alphas"].items()))
        row("modules", f"{report['modules']} covered")
        for kind, count in report["coverage"].items():
            row("", f"{kind}: {count}")
        sample = report["mapped_modules"][:3]
        row("maps to", ", ".join(sample) + (" ..." if report["modules"] > 3 else ""))
    for key, value in report.get("delta", {}).items():
        row("delta", f"{key} = {_short(value)}")
    metadata = report.get("metadata") or {}
    if metadata:
        lines.append("  metadata")
        for key in sorted(metadata):
            shown = _short(metadata[key])
            meaning = explain_metadata_key(key)
            lines.append(f"    {key} = {shown}" + (f"    # {meaning}" if meaning else ""))
    return "\n".join(lines)


def _short(value: str, width: int = 80) -> str:
    """One line of at most `width` characters (long JSON metadata stays readable; --json has it whole)."""
    value = value.replace("\n", " ")
    return value if len(value) <= width else value[: width - 3] + "..."


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
