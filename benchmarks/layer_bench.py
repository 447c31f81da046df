"""Where NPO's extra step time goes: every dual-branch layer of a UNet timed alone, per path, under CUDA graphs.

One CFG step of a real UNet config (random fp16 weights) records the input each dual-branch layer gets;
each distinct (layer shape, input shape) is then timed alone (50 back-to-back calls per CUDA graph, median
of 7 replays) on every path that serves it:

  plain        the original nn.Linear / nn.Conv2d on the whole batch (the floor)
  auto         the layer as enable_npo(backend="auto") installs it, grouping off
  lowrank      base op + shrink/expand on the uncond half (torch)
  joint        one conv / GEMM with the kernel [W; down], expand accumulated in place
  materialize  linear layers: theta_u = W + s * up @ down for the call, uncond half through theta_u
  fused        linear layers: the fused Triton kernel

Totals weight each shape by how often it occurs in the step. Every path is checked against `lowrank`.

    python benchmarks/layer_bench.py --models sd15,sdxl --lora all-r64   # writes layer_bench.json to $OUT or .
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cfg_step import LORAS, UNETS, build_unet, lora_targets, random_lora, step_inputs  # noqa: E402
import kernel_bench  # noqa: E402
from kernel_bench import _time_graph  # noqa: E402

from npo_merge.guidance import dual_branch as db  # noqa: E402
from npo_merge.guidance.install import enable_npo  # noqa: E402


def _paths(layer: db.DualBranchLayer, x: torch.Tensor) -> dict:
    n = db.uncond_rows(x.shape[0], layer.mode)
    w, b, d, u, s = layer.weight, layer.bias, layer.down, layer.up, layer.scale
    # Built here rather than taken from the layer: layers too narrow for the joint layout are timed on it too.
    joint = torch.cat([w, d])
    joint_bias = None if b is None else torch.cat([b, b.new_zeros(d.shape[0])])
    if isinstance(layer, db.DualBranchConv2d):
        conv = (layer.stride, layer.padding, layer.dilation)
        paths = {"lowrank": lambda: db.lowrank_conv2d(x, w, b, d, u, s, n, *conv),
                 "joint": lambda: db.joint_conv2d(x, joint, joint_bias, u, s, n, *conv)}
    else:
        paths = {"lowrank": lambda: db.lowrank_linear(x, w, b, d, u, s, n),
                 "joint": lambda: db.joint_linear(x, joint, joint_bias, [u], [s], n)[0],
                 "materialize": lambda: db.materialized_linear(x, w, b, d, u, s, n)}
        if layer.fused is not None:
            rows = n * (x.numel() // x.shape[-1] // x.shape[0])
            paths["fused"] = lambda: layer.fused(x, w, b, d, u, s, rows)
    return {"plain": lambda: layer.original(x), "auto": lambda: layer(x), **paths}


def _record_inputs(unet: torch.nn.Module, inputs: dict) -> dict[str, tuple[db.DualBranchLayer, torch.Tensor]]:
    seen: dict[str, tuple[db.DualBranchLayer, torch.Tensor]] = {}

    def keep(name: str, module: db.DualBranchLayer, args: tuple) -> None:
        seen.setdefault(name, (module, args[0].clone()))

    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: keep(name, m, args))
             for name, module in unet.named_modules() if isinstance(module, db.DualBranchLayer)]
    with torch.no_grad():
        unet(**inputs)
    for hook in hooks:
        hook.remove()
    return seen


def _kind(name: str, layer: db.DualBranchLayer) -> str:
    if isinstance(layer, db.DualBranchConv2d):
        return f"conv{layer.kernel_size[0]}x{layer.kernel_size[1]}"
    for part in ("to_q", "to_k", "to_v", "to_out", "ff.net", "proj_in", "proj_out"):
        if part in name:
            return "linear." + part.replace("ff.net", "ff")
    return "linear.other"


def bench(model: str, lora: str, calls: int) -> list[dict]:
    device = torch.device(kernel_bench.DEVICE)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build_unet(UNETS[model], device, dtype)
    coverage, rank = LORAS[lora]
    deltas = random_lora(unet, lora_targets(unet, coverage), rank)
    inputs = step_inputs(unet, device, dtype)
    rows = []
    with enable_npo(unet, deltas, mode="cfg", backend="auto", group_inputs=False), torch.no_grad():
        recorded = _record_inputs(unet, inputs)
        shapes = Counter()
        first: dict[tuple, tuple[str, db.DualBranchLayer, torch.Tensor]] = {}
        for name, (layer, x) in recorded.items():
            key = (_kind(name, layer), tuple(layer.weight.shape), tuple(x.shape), getattr(layer, "stride", None))
            shapes[key] += 1
            first.setdefault(key, (name, layer, x))
        for key, count in shapes.items():
            name, layer, x = first[key]
            paths = _paths(layer, x)
            ref = paths["lowrank"]().float()
            row = {"model": model, "lora": lora, "kind": key[0], "example": name, "weight": list(key[1]),
                   "input": list(key[2]), "count": count, "us": {}, "rel_err": {}}
            for path, fn in paths.items():
                if path != "plain":
                    out = fn().float()
                    row["rel_err"][path] = float((out - ref).norm() / ref.norm())
                row["us"][path] = _time_graph(fn, replays=7, calls=calls)
            rows.append(row)
            print(f"{model} {key[0]:13s} w={key[1]} x={key[2]} x{count}: "
                  + " ".join(f"{p}={t:.1f}" for p, t in row["us"].items()), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    lines = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        paths = sorted({p for r in mine for p in r["us"]})
        total = {p: sum(r["count"] * r["us"].get(p, r["us"]["lowrank"]) for r in mine) for p in paths}
        best = sum(r["count"] * min(t for p, t in r["us"].items() if p != "plain") for r in mine)
        lines.append(f"{model}: per-step sum of layer times (us): "
                     + ", ".join(f"{p} {t:.0f}" for p, t in total.items()) + f", best-of {best:.0f}")
        for kind in sorted({r["kind"] for r in mine}):
            part = [r for r in mine if r["kind"] == kind]
            lines.append(f"  {kind:14s} " + ", ".join(f"{p} {sum(r['count'] * r['us'].get(p, r['us']['lowrank']) for r in part):.0f}"
                                                   for p in paths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--lora", default="all-r64", choices=sorted(LORAS))
    parser.add_argument("--calls", type=int, default=50, help="layer calls per CUDA graph")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        kernel_bench.DEVICE = "cpu"  # checks the script itself: one wall-clock call per path
    rows = [row for model in args.models.split(",") for row in bench(model, args.lora, args.calls)]
    text = summary(rows)
    print(text)
    out = Path(args.out) / "layer_bench.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name() if kernel_bench.DEVICE == "cuda" else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
