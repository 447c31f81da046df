"""Dual-branch linear on the GPU: the fused Triton op against the torch ways of serving both CFG branches.

For SD1.5 (512x512) and SDXL (1024x1024) UNet linear shapes with a CFG batch of 2 ([uncond; cond]),
times per layer call, median, both under CUDA graphs (replays of a captured run of calls) and eager
(back-to-back calls between two events, so launch overhead counts as it does in a UNet):

  plain     x @ W^T + b over the whole batch (cuBLAS; one merged model, the floor to match)
  t_plain   the Triton kernel with no uncond rows (how far the kernel's GEMM is from cuBLAS)
  fused     Triton, shrink and expand fused into the GEMM (shrink recomputed per column tile)
  separate  Triton, shrink as one cuBLAS product first, expand fused into the GEMM epilogue
  op        torch.ops.npo_merge.dual_branch_linear (auto choice between the two, op dispatch included)
  eager_fn  dual_branch_linear_eager: the same auto choice without the op's dispatch (eager inference)
  unfused   cuBLAS GEMM + shrink + expand added in place on the uncond rows (3 launches)
  two_w     two cuBLAS GEMMs with bias, W_u on the uncond rows and W on the cond rows, each writing its
            half of the output (needs a second copy of W: the stacked-weights design)

Each method is checked against a float64 reference (relative error, NaN-poisoned outputs) before it
is timed. ``--sweep`` also times a set of tile configs per shape class. Full numbers go to JSON
under --out (default $OUT); a markdown table is printed last.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py --ranks 8,64 --sweep
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, rows M of the CFG batch, in_features K, out_features N); M = 2 * tokens at that level.
SHAPES: list[tuple[str, int, int, int]] = [
    ("sd15.attn.320", 8192, 320, 320),
    ("sd15.geglu.320", 8192, 320, 2560),
    ("sd15.ff_out.320", 8192, 1280, 320),
    ("sd15.attn.640", 2048, 640, 640),
    ("sd15.geglu.640", 2048, 640, 5120),
    ("sd15.ff_out.640", 2048, 2560, 640),
    ("sd15.attn.1280", 512, 1280, 1280),
    ("sd15.ff_out.1280", 512, 5120, 1280),
    ("sd15.to_kv.320", 154, 768, 320),
    ("sd15.time_emb", 2, 1280, 1280),
    ("sdxl.attn.640", 8192, 640, 640),
    ("sdxl.geglu.640", 8192, 640, 5120),
    ("sdxl.ff_out.640", 8192, 2560, 640),
    ("sdxl.attn.1280", 2048, 1280, 1280),
    ("sdxl.geglu.1280", 2048, 1280, 10240),
    ("sdxl.ff_out.1280", 2048, 5120, 1280),
    ("sdxl.to_kv.1280", 154, 2048, 1280),
]
SWEEP_SHAPES = ["sd15.attn.320", "sd15.attn.640", "sd15.attn.1280", "sd15.to_kv.320", "sd15.ff_out.320",
                "sdxl.attn.640", "sdxl.attn.1280", "sdxl.geglu.1280"]
# (block_m, block_n, block_k, group_m, num_warps, num_stages)
SWEEP_CONFIGS = [
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 2), (128, 128, 128, 8, 8, 2), (128, 256, 64, 8, 8, 3),
    (64, 128, 64, 8, 4, 3), (64, 128, 128, 8, 4, 3), (128, 64, 64, 8, 4, 3), (64, 64, 128, 8, 4, 3),
    (64, 32, 128, 8, 4, 3), (64, 64, 64, 8, 4, 2),
]
SWEEP_METHODS = ("t_plain", "fused")
SCALE = 0.75
DEVICE = "cuda"  # "cpu" with --smoke: the Triton interpreter on tiny shapes, to check the script itself
METHODS = ["plain", "t_plain", "fused", "separate", "op", "eager_fn", "unfused", "two_w"]


def _layer(m: int, k: int, n: int, rank: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random layer and input on the GPU; the low-rank update is as large as x W^T (see the tests)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def draw(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=DEVICE) * std).to(dtype)

    return {"x": draw(m, k), "weight": draw(n, k, std=k**-0.5), "bias": draw(n),
            "down": draw(rank, k, std=k**-0.5), "up": draw(n, rank, std=rank**-0.5)}


def _methods(t: dict[str, torch.Tensor], n_uncond: int, config=None) -> dict[str, object]:
    """Zero-argument callables, one per method, all computing the dual-branch output (t_plain excepted)."""
    from npo_merge.guidance.kernels import dual_branch_linear_eager, dual_branch_linear_unfused
    from npo_merge.guidance.kernels.dual_linear_triton import dual_branch_linear_triton

    x, w, b, d, u = t["x"], t["weight"], t["bias"], t["down"], t["up"]
    m, n = x.shape[0], w.shape[0]
    weight_uncond = w + SCALE * (u @ d)  # the second copy, built once like a loader would
    two_w_out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    op = torch.ops.npo_merge.dual_branch_linear

    def two_w() -> torch.Tensor:
        torch.addmm(b, x[:n_uncond], weight_uncond.t(), out=two_w_out[:n_uncond])
        torch.addmm(b, x[n_uncond:], w.t(), out=two_w_out[n_uncond:])
        return two_w_out

    return {
        "plain": lambda: F.linear(x, w, b),
        "t_plain": lambda: dual_branch_linear_triton(x, w, b, d, u, SCALE, 0, config=config),
        "fused": lambda: dual_branch_linear_triton(x, w, b, d, u, SCALE, n_uncond, shrink="fused", config=config),
        "separate": lambda: dual_branch_linear_triton(x, w, b, d, u, SCALE, n_uncond, shrink="separate",
                                                      config=config),
        "op": lambda: op(x, w, b, d, u, SCALE, n_uncond),
        "eager_fn": lambda: dual_branch_linear_eager(x, w, b, d, u, SCALE, n_uncond),
        "unfused": lambda: dual_branch_linear_unfused(x, w, b, d, u, SCALE, n_uncond),
        "two_w": two_w,
    }


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def _check(t: dict[str, torch.Tensor], n_uncond: int, methods: dict[str, object]) -> dict[str, float]:
    """Relative error of every method against float64 (t_plain and plain against the plain layer)."""
    from npo_merge.guidance.kernels import dual_branch_linear_reference
    from npo_merge.guidance.kernels.dual_linear_triton import dual_branch_linear_triton

    t64 = {key: v.double() for key, v in t.items()}
    ref = dual_branch_linear_reference(t64["x"], t64["weight"], t64["bias"], t64["down"], t64["up"], SCALE, n_uncond)
    ref_plain = F.linear(t64["x"], t64["weight"], t64["bias"])
    errors = {}
    for name, fn in methods.items():
        if name in ("fused", "separate"):  # write into a NaN-poisoned buffer: unwritten elements fail
            out = torch.full((t["x"].shape[0], t["weight"].shape[0]), float("nan"), dtype=t["x"].dtype,
                             device=DEVICE)
            dual_branch_linear_triton(t["x"], t["weight"], t["bias"], t["down"], t["up"], SCALE, n_uncond,
                                      shrink=name, out=out)
        else:
            out = fn()
        errors[name] = _rel_err(out, ref_plain if name in ("plain", "t_plain") else ref)
    return errors


def _time_wall(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e6


def _time_eager(fn, calls: int = 20, reps: int = 7) -> float:
    """Median microseconds per call over back-to-back calls (launch overhead included, as in a UNet)."""
    if DEVICE == "cpu":
        return _time_wall(fn)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def _time_graph(fn, replay_us: float = 2000.0, replays: int = 7, calls: int | None = None) -> float:
    """Median microseconds per call, from replays of one CUDA graph holding `calls` back-to-back calls
    (by default as many as take ~2 ms eagerly)."""
    if DEVICE == "cpu":
        return _time_wall(fn)
    if calls is None:
        calls = max(5, min(1000, int(replay_us / max(_time_eager(fn, calls=10, reps=3), 1.0))))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(samples)


def _useful_flops(m: int, k: int, n: int, rank: int, n_uncond: int) -> int:
    return 2 * m * k * n + 2 * n_uncond * rank * (k + n)


def _precompile_job(job: tuple) -> str:
    """Worker: run each variant once so its compiled kernel lands in triton's on-disk cache."""
    from npo_merge.guidance.kernels.dual_linear_triton import KernelConfig

    name, m, k, n, rank, dtype_name, config = job
    t = _layer(m, k, n, rank, getattr(torch, dtype_name), seed=0)
    cfg = KernelConfig(*config) if config else None
    try:
        for fn_name, fn in _methods(t, m // 2, cfg).items():
            if fn_name in (SWEEP_METHODS if config else ("t_plain", "fused", "separate", "op")):
                fn()
        torch.cuda.synchronize()
    except Exception as error:  # reported again, with its config, when the main process runs it
        return f"{name} {config}: {type(error).__name__}"
    return name


def _precompile(jobs: list[tuple], workers: int) -> float:
    """Compile all kernel variants in parallel processes (compilation is single-threaded per kernel)."""
    started = time.perf_counter()
    if workers > 1 and jobs:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for done in pool.map(_precompile_job, jobs):
                if ":" in done:
                    print(f"precompile failed: {done}", flush=True)
    return time.perf_counter() - started


def _ceilings() -> dict[str, float]:
    """The two roofline ceilings measured on this card: fp16 GEMM TFLOP/s and copy GB/s."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    src = torch.empty(2**29, device="cuda", dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return {"gemm_tflops": 2 * 8192**3 / ms / 1e9, "copy_gbps": 2 * src.numel() / copy_ms / 1e6}


def _sweep(dtype: torch.dtype, rank: int) -> list[dict]:
    from npo_merge.guidance.kernels.dual_linear_triton import KernelConfig, pick_config

    rows = []
    for name, m, k, n in SHAPES:
        if name not in SWEEP_SHAPES:
            continue
        t = _layer(m, k, n, rank, dtype, seed=1)
        plain_us = _time_graph(lambda: F.linear(t["x"], t["weight"], t["bias"]))
        picked = asdict(pick_config(m, n, k, rank))
        for config in SWEEP_CONFIGS:
            cfg = KernelConfig(*config)
            fns = _methods(t, m // 2, cfg)
            row = {"shape": name, "rank": rank, "config": asdict(cfg), "picked": asdict(cfg) == picked,
                   "plain_us": plain_us}
            for method in SWEEP_METHODS:
                try:
                    row[f"{method}_us"] = _time_graph(fns[method])
                except Exception as error:  # a config may not fit in shared memory at this rank
                    row[f"{method}_us"] = None
                    row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
            rows.append(row)
            print(f"sweep {name} r{rank} {config}: " + " ".join(
                f"{key}={row[key]:.1f}" for key in ("plain_us", "t_plain_us", "fused_us")
                if row.get(key) is not None), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--sweep", action="store_true", help="also time the tile configs in SWEEP_CONFIGS")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, shapes / 64: checks the script")
    args = parser.parse_args(argv)

    global DEVICE
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"
    import triton

    from npo_merge.guidance.kernels import available

    if not (available() or args.smoke):
        print("needs a CUDA device and triton", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    ranks = [int(r) for r in args.ranks.split(",")]
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    if args.smoke:
        shapes = [(name, max(2, m // 64), max(16, k // 64), max(16, n // 64)) for name, m, k, n in shapes]
    env = {"card": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "dtype": args.dtype,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    print(json.dumps(env), flush=True)
    env.update(_ceilings() if DEVICE == "cuda" else {"gemm_tflops": float("nan"), "copy_gbps": float("nan")})
    print(f"ceilings: fp16 GEMM {env['gemm_tflops']:.0f} TFLOP/s, copy {env['copy_gbps']:.0f} GB/s", flush=True)

    jobs = [(name, m, k, n, r, args.dtype, None) for name, m, k, n in shapes for r in ranks]
    if args.sweep:
        jobs += [(name, m, k, n, ranks[0], args.dtype, c) for name, m, k, n in SHAPES if name in SWEEP_SHAPES
                 for c in SWEEP_CONFIGS]
    env["precompile_s"] = _precompile(jobs, args.workers if DEVICE == "cuda" else 0)
    print(f"precompiled {len(jobs)} jobs in {env['precompile_s']:.1f} s", flush=True)

    results = []
    for name, m, k, n in shapes:
        for rank in ranks:
            n_uncond = m // 2
            t = _layer(m, k, n, rank, dtype, seed=rank)
            fns = _methods(t, n_uncond)
            errors = _check(t, n_uncond, fns)
            row = {"shape": name, "m": m, "k": k, "n": n, "rank": rank, "n_uncond": n_uncond, "rel_err": errors}
            from npo_merge.guidance.kernels.dual_linear_triton import pick_config, pick_shrink_mode

            cfg = pick_config(m, n, k, rank)
            row["config"], row["auto_mode"] = asdict(cfg), pick_shrink_mode(m, n, k, rank, n_uncond, cfg)
            row["graph_us"] = {key: _time_graph(fn) for key, fn in fns.items()}
            row["eager_us"] = {key: _time_eager(fn) for key, fn in fns.items()}
            flops = _useful_flops(m, k, n, rank, n_uncond)
            row["tflops_graph"] = {key: flops / us / 1e6 for key, us in row["graph_us"].items()}
            results.append(row)
            bad = [key for key, e in errors.items() if not e < 1e-2]
            print(f"{name} r{rank}: graph " + " ".join(f"{key}={v:.1f}" for key, v in row["graph_us"].items())
                  + " | eager " + " ".join(f"{key}={v:.1f}" for key, v in row["eager_us"].items())
                  + f" | auto={row['auto_mode']} | max err {max(errors.values()):.2e}"
                  + (f" FAIL {bad}" if bad else ""), flush=True)

    sweep = []
    if args.sweep and DEVICE == "cuda":
        sweep = _sweep(dtype, ranks[0])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernel_bench.json").write_text(json.dumps({"env": env, "results": results, "sweep": sweep}, indent=1))
    table = _markdown(env, results)
    (out_dir / "kernel_bench.md").write_text(table)
    print(table)
    return 0 if all(all(e < 1e-2 for e in r["rel_err"].values()) for r in results) else 2


def _markdown(env: dict, results: list[dict]) -> str:
    lines = [f"{env['card']}, torch {env['torch']}, triton {env['triton']}, {env['dtype']}, {env['date']}; "
             f"ceilings {env['gemm_tflops']:.0f} TFLOP/s, {env['copy_gbps']:.0f} GB/s",
             "",
             "| shape (M,K,N) | r | plain us graph / eager | fused | separate | op (auto) | unfused | two_w "
             "| t_plain | eager_fn eager x | op eager x | unfused eager x | two_w eager x | best TFLOP/s | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        g, e = r["graph_us"], r["eager_us"]

        def ratio(key: str, times: dict = g) -> str:
            return f"{times[key] / times['plain']:.2f}x" if key in times else "-"

        lines.append(
            f"| {r['shape']} ({r['m']},{r['k']},{r['n']}) | {r['rank']} | {g['plain']:.1f} / {e['plain']:.1f} | {ratio('fused')} "
            f"| {ratio('separate')} | {ratio('op')} ({r['auto_mode'][0]}) | {ratio('unfused')} | {ratio('two_w')} "
            f"| {ratio('t_plain')} | {ratio('eager_fn', e)} | {ratio('op', e)} | {ratio('unfused', e)} | {ratio('two_w', e)} "
            f"| {max(r['tflops_graph'][key] for key in ('fused', 'separate')):.0f} | {max(r['rel_err'].values()):.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
