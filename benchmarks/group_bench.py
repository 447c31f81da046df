"""Grouped dual-branch launches: attention's q/k/v (or cross-attention's k/v) in one kernel, per group shape.

For the SD1.5 (512x512) and SDXL (1024x1024) attention groups with a CFG batch of 2, rank 8 (--rank), times one
group's work under CUDA graphs (100 back-to-back group calls per graph, median of 9 replays, three rounds
in alternating order, median of rounds):

  plain    cuBLAS F.linear per member (one merged model: the floor to match)
  alone    each member on its own, as `auto` runs a layer outside a group (fused kernel or torch path)
  joint    one cuBLAS GEMM over [W_1; ..; W_m; down_1; ..; down_m], then one expand per member (joint_linear)
  group    one grouped launch (dual_linear_group, its own tile choice), and each of CONFIGS

Every method is checked against float64 first. Writes group_bench_r{rank}.json to --out (default $OUT or .).

    python benchmarks/group_bench.py
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_bench import _time_graph  # noqa: E402  (CUDA-graph replay timing)

# (name, members, rows M of the CFG batch, in_features K, out_features N)
GROUPS = [("sd15.qkv.320", 3, 8192, 320, 320), ("sd15.qkv.640", 3, 2048, 640, 640), ("sd15.qkv.1280", 3, 512, 1280, 1280),
          ("sd15.qkv.mid", 3, 128, 1280, 1280), ("sd15.kv.320", 2, 154, 768, 320), ("sd15.kv.640", 2, 154, 768, 640),
          ("sd15.kv.1280", 2, 154, 768, 1280), ("sdxl.qkv.640", 3, 8192, 640, 640), ("sdxl.qkv.1280", 3, 2048, 1280, 1280),
          ("sdxl.kv.640", 2, 154, 2048, 640), ("sdxl.kv.1280", 2, 154, 2048, 1280)]
# (block_m, block_n, block_k, group_m, num_warps, num_stages)
CONFIGS = [(128, 128, 64, 8, 4, 3), (128, 128, 32, 8, 4, 3), (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 3),
           (128, 256, 64, 8, 8, 3), (64, 64, 128, 8, 4, 3), (64, 32, 128, 8, 4, 3), (128, 128, 64, 8, 8, 3)]
RANK, SCALE = 8, 0.75  # default rank; --rank overrides


def _group(members: int, m: int, k: int, n: int, rank: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def draw(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * std).half()

    layers = [(draw(n, k, std=k**-0.5), draw(n), draw(rank, k, std=k**-0.5), draw(n, rank, std=rank**-0.5))
              for _ in range(members)]
    return draw(m, k), layers


def _methods(x: torch.Tensor, layers: list, configs: list) -> dict:
    from npo_merge.guidance.dual_branch import joint_linear, lowrank_linear, prefers_fused
    from npo_merge.guidance.kernels import dual_branch_linear_eager
    from npo_merge.guidance.kernels.dual_linear_group import GroupLaunch
    from npo_merge.guidance.kernels.dual_linear_triton import KernelConfig

    m, k = x.shape
    n_uncond = m // 2
    rank = layers[0][2].shape[0]
    tensors = [[layer[i] for layer in layers] for i in range(4)]
    scales = [SCALE] * len(layers)

    def alone() -> list[torch.Tensor]:
        fused = prefers_fused(m, k, layers[0][0].shape[0], rank)  # the capture-time rule for a lone layer
        return [dual_branch_linear_eager(x, w, b, d, u, SCALE, n_uncond) if fused else lowrank_linear(x, w, b, d, u, SCALE, n_uncond)
                for w, b, d, u in layers]

    joint_weight = torch.cat(tensors[0] + tensors[2])
    joint_bias = torch.cat(tensors[1] + [b.new_zeros(rank) for b in tensors[1]])
    methods = {"plain": lambda: [F.linear(x, w, b) for w, b, _, _ in layers], "alone": alone,
               "joint": lambda: joint_linear(x, joint_weight, joint_bias, tensors[3], scales, n_uncond),
               "group": GroupLaunch(x, *tensors, n_uncond)}
    for config in configs:
        methods[str(config)] = GroupLaunch(x, *tensors, n_uncond, KernelConfig(*config))
    return {name: (fn if name in ("plain", "alone", "joint") else (lambda fn=fn: fn(x, scales))) for name, fn in methods.items()}


def _compile(job: tuple) -> str | None:
    """Worker: run every variant of one group once, so its kernels land in triton's on-disk cache."""
    name, members, m, k, n, rank, configs = job
    x, layers = _group(members, m, k, n, rank)
    try:
        for fn in _methods(x, layers, configs).values():
            fn()
        torch.cuda.synchronize()
    except Exception as error:  # reported again when the main process runs it
        return f"{name}: {type(error).__name__}: {str(error)[:160]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rank", type=int, default=RANK, help="LoRA rank of every member (default 8)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel-config sweep (CONFIGS)")
    args = parser.parse_args(argv)
    rank, configs = args.rank, [] if args.no_sweep else CONFIGS
    import triton

    from npo_merge.guidance.kernels import available, dual_branch_linear_reference

    if not available():
        print("needs a CUDA device and triton", file=sys.stderr)
        return 1
    with concurrent.futures.ProcessPoolExecutor(min(12, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) as pool:
        for failure in pool.map(_compile, [(*group, rank, configs) for group in GROUPS]):
            if failure:
                print(f"compile failed: {failure}", flush=True)
    env = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rank": rank, "dtype": "float16", "command": " ".join(sys.argv)}
    results, failed = [], False
    for name, members, m, k, n in GROUPS:
        x, layers = _group(members, m, k, n, rank)
        refs = [dual_branch_linear_reference(x.double(), w.double(), b.double(), d.double(), u.double(), SCALE, m // 2)
                for w, b, d, u in layers]
        methods = _methods(x, layers, configs)
        errors = {}
        for key, fn in methods.items():
            if key != "plain":
                outs = fn()
                errors[key] = max(((o.double() - r).norm() / r.norm()).item() if torch.isfinite(o).all() else float("inf")
                                  for o, r in zip(outs, refs))
        failed |= any(not e < 1e-2 for e in errors.values())
        times: dict[str, list[float]] = {key: [] for key in methods}
        for round_ in range(3):
            for key in (list(methods) if round_ % 2 == 0 else list(methods)[::-1]):
                times[key].append(_time_graph(methods[key], replays=9, calls=100))
        us = {key: statistics.median(v) for key, v in times.items()}
        results.append({"group": name, "members": members, "m": m, "k": k, "n": n, "us": us, "rounds_us": times,
                        "max_rel_err": max(errors.values())})
        best = min(((v, key) for key, v in us.items() if key.startswith("(")), default=(us["group"], "group"))
        print(f"{name} x{members} ({m},{k},{n}): plain {us['plain']:.2f} us, alone {us['alone'] / us['plain']:.3f}x, "
              f"group {us['group'] / us['plain']:.3f}x, joint {us['joint'] / us['plain']:.3f}x, best config {best[1]} {best[0] / us['plain']:.3f}x, "
              f"max err {max(errors.values()):.1e}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"group_bench_r{rank}.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
