"""End-to-end sampling loops (UNet only): iterations per second of plain CFG, this project's NPO path
and the official two-UNet approach; eager, whole-step CUDA graphs, and torch.compile.

    python benchmarks/sampling_e2e.py [--models sd15,sdxl] [--compile sd15] [--compile-mode reduce-overhead] [--runs 3]
    python benchmarks/sampling_e2e.py --eager-pairs 7      # eager only: plain and NPO loops alternated

SD1.5 512x512 runs 25 steps, SDXL 1024x1024 30 steps, from the real configs with random fp16 weights
(benchmarks/cfg_step.py builds them), NPO LoRA rank 8 on the attention projections. A step is the
CFG UNet call(s), the guidance combination and a plain Euler-style update of the latents (the same
for every row, standing in for the scheduler). Peak GPU memory per row (a row's peak includes what
earlier rows' graph captures left allocated: compare memory with loop_peak_memory.py, one order per
process). Prints a markdown table;
writes sampling_e2e.json to $OUT when set.

Eager loops are host-bound, and on a shared host their time drifts by tens of percent between
consecutive runs, so --eager-pairs N alternates a plain and an NPO loop N times (NPO installed
afresh and warmed up each time) and reports the median of the per-pair time ratios and the ratio of
the fastest runs (the least disturbed by other work on the host).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cfg_step  # noqa: E402  (the same models, inputs, LoRAs and row builders)

STEPS = {"sd15": 25, "sdxl": 30}
ROWS = ("plain", "npo_auto", "two_unets")


def sampling_loop(model, inputs: dict, steps: int):
    latents0 = inputs["sample"][:1].clone()

    def run() -> torch.Tensor:
        latents = latents0.clone()
        for _ in range(steps):
            batch = torch.cat([latents, latents])
            noise = cfg_step.cfg_combine(model(**{**inputs, "sample": batch}, return_dict=False)[0], cfg_step.GUIDANCE)
            latents = latents - (1.0 / steps) * noise
        return latents

    return run


def timed_runs(fn, runs: int) -> float:
    """Median seconds of `runs` calls after one warm-up call (CUDA-synchronized).

    As timeit does, the garbage collector is run before and kept off during each timed call: a full
    collection of this process's heap (torch, diffusers, the UNet) takes tens of milliseconds and lands
    on whichever loop runs after many allocations, e.g. the first NPO loop after enable_npo.
    """
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return statistics.median(times)


def eager_pairs(name: str, pairs: int, rows: list[str]) -> list[dict]:
    """Per NPO row, the median per-pair ratio of its eager loop time to plain's; each round runs plain,
    then every row, back to back, so all rows see the same stretch of the host's noise."""
    device, dtype = torch.device("cuda"), torch.float16
    unet = cfg_step.build_unet(cfg_step.UNETS[name], device, dtype)
    inputs = cfg_step.step_inputs(unet, device, dtype)
    deltas = cfg_step.random_lora(unet, cfg_step.lora_targets(unet, "attention"), 8)
    steps = STEPS[name]
    plain_s, npo_s = [], {row: [] for row in rows}
    for _ in range(pairs):
        plain_s.append(timed_runs(sampling_loop(unet, inputs, steps), 1))
        for row in rows:
            with cfg_step.row_model(row, unet, deltas, 8) as (model, _):
                npo_s[row].append(timed_runs(sampling_loop(model, inputs, steps), 1))
    results = []
    for row in rows:
        ratios = [n / p for n, p in zip(npo_s[row], plain_s)]
        result = {"model": name, "row": row, "steps": steps, "pairs": pairs, "plain_s": plain_s, "npo_s": npo_s[row],
                  "median_ratio": statistics.median(ratios), "min_ratio": min(npo_s[row]) / min(plain_s)}
        print(f"[eager-pairs] {result}", flush=True)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--compile", default="", help="comma list of models to also run under torch.compile")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, ...")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help="cfg_step rows to run (first is the baseline)")
    parser.add_argument("--eager-pairs", type=int, default=0, help="eager only: alternate plain/NPO loops N times")
    parser.add_argument("--eager-rows", default="npo_auto", help="NPO rows for --eager-pairs (cfg_step rows), interleaved with plain")
    args = parser.parse_args()
    if args.eager_pairs:
        results = [r for name in args.models.split(",") for r in eager_pairs(name, args.eager_pairs, args.eager_rows.split(","))]
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, eager, fp16, NPO LoRA rank 8 on attention\n")
        print("| model | steps | row | pairs | NPO / plain time, median of pairs | fastest NPO / fastest plain | plain s (median) | NPO s (median) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['model']} | {r['steps']} | {r['row']} | {r['pairs']} | {r['median_ratio']:.3f}x | {r['min_ratio']:.3f}x | "
                  f"{statistics.median(r['plain_s']):.3f} | {statistics.median(r['npo_s']):.3f} |")
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / "sampling_e2e_eager_pairs.json").write_text(json.dumps(results, indent=2))
        return
    device, dtype = torch.device("cuda"), torch.float16
    results = []
    for name in args.models.split(","):
        unet = cfg_step.build_unet(cfg_step.UNETS[name], device, dtype)
        inputs = cfg_step.step_inputs(unet, device, dtype)
        deltas = cfg_step.random_lora(unet, cfg_step.lora_targets(unet, "attention"), 8)
        steps = STEPS[name]
        for row in args.rows.split(","):
            with cfg_step.row_model(row, unet, deltas, 8) as (model, _):
                torch.cuda.reset_peak_memory_stats()
                loop = sampling_loop(model, inputs, steps)
                result = {"model": name, "row": row, "steps": steps, "eager_s": timed_runs(loop, args.runs)}
                graph = cfg_step.capture_graph(loop)
                result["graph_s"] = timed_runs(graph.replay, args.runs)
                del graph
                if name in args.compile.split(",") and row != "two_unets":
                    compiled = torch.compile(model, mode=args.compile_mode)
                    compiled_loop = sampling_loop(compiled, inputs, steps)
                    start = time.perf_counter()
                    compiled_loop()
                    torch.cuda.synchronize()
                    result["compile_warmup_s"] = time.perf_counter() - start
                    result["compiled_s"] = timed_runs(compiled_loop, args.runs)
                    result["compile_mode"] = args.compile_mode
                result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                results.append(result)
                print(f"[e2e] {name} {row} {result}", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, NPO LoRA rank 8 on attention, median of {args.runs} runs\n")
    print("| model | steps | row | eager it/s | x plain | graph it/s | x plain | compiled it/s | x plain | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        plain = next(p for p in results if p["model"] == r["model"] and p["row"] == "plain")
        cells = []
        for key in ("eager_s", "graph_s", "compiled_s"):
            if key in r and key in plain:
                cells += [f"{r['steps'] / r[key]:.2f}", f"{r[key] / plain[key]:.3f}x time"]
            else:
                cells += ["-", "-"]
        print(f"| {r['model']} | {r['steps']} | {r['row']} | " + " | ".join(cells) + f" | {r['peak_mb']:.0f} |")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "sampling_e2e.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
