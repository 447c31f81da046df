"""Peak GPU memory of a sampling loop (SD1.5 25 steps, or SDXL 30), plain CFG vs NPO, rows in a chosen order.

sampling_e2e.py measures every row in one process, and a row's peak then includes what earlier rows
left allocated (after a CUDA-graph capture about 99 MiB stay: workspaces and caches of the capture),
so its later rows look larger. Run this twice, once per order, each in a fresh process, and compare
the rows that ran first. Per row: allocated at its start, eager peak, peak after a graph capture.

    python benchmarks/loop_peak_memory.py plain,npo_auto
    python benchmarks/loop_peak_memory.py npo_auto,plain
    python benchmarks/loop_peak_memory.py plain,npo_auto sdxl
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cfg_step  # noqa: E402
import sampling_e2e  # noqa: E402


def main() -> None:
    order = sys.argv[1].split(",") if len(sys.argv) > 1 else ["plain", "npo_auto"]
    name = sys.argv[2] if len(sys.argv) > 2 else "sd15"
    device, dtype = torch.device("cuda"), torch.float16
    unet = cfg_step.build_unet(cfg_step.UNETS[name], device, dtype)
    inputs = cfg_step.step_inputs(unet, device, dtype)
    deltas = cfg_step.random_lora(unet, cfg_step.lora_targets(unet, "attention"), 8)
    mib = 2**20
    for row in order:
        with cfg_step.row_model(row, unet, deltas, 8) as (model, _):
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loop = sampling_e2e.sampling_loop(model, inputs, sampling_e2e.STEPS[name])
            loop()
            loop()
            torch.cuda.synchronize()
            eager_peak = torch.cuda.max_memory_allocated()
            graph = cfg_step.capture_graph(loop)
            graph.replay()
            torch.cuda.synchronize()
            print(f"{name} order={order} row={row} start={start / mib:.1f} eager_peak={eager_peak / mib:.1f} "
                  f"peak={torch.cuda.max_memory_allocated() / mib:.1f} "
                  f"after_capture={torch.cuda.memory_allocated() / mib:.1f} MiB", flush=True)
            del graph


if __name__ == "__main__":
    main()
