"""Eager CFG step, attention rank 8: plain CFG, NPO, and NPO with diffusers' Attention.forward put back.

NpoAttentionCall (enable_npo's output stores) calls an attention's NpoAttnProcessor at once, where diffusers'
Attention.forward first takes inspect.signature of the processor on every call. The third row deletes those
instance forwards after enable_npo, so it shows what NPO's eager step costs without that saving. Rows take
turns, 8 rounds of 10 steps after 3 warm-up steps, each round with NPO installed afresh; prints per-step
times, the median of the per-round ratios to plain and the ratio of the fastest rounds.

    python benchmarks/eager_attention_call.py sdxl
    python benchmarks/eager_attention_call.py sd15
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cfg_step  # noqa: E402  (the same models, inputs and LoRAs)

from npo_merge.guidance.install import enable_npo  # noqa: E402
from npo_merge.guidance.output_store import NpoAttentionCall  # noqa: E402

ROWS = ("plain", "npo", "npo_without_call")


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "sdxl"
    device, dtype = torch.device("cuda"), torch.float16
    unet = cfg_step.build_unet(cfg_step.UNETS[name], device, dtype)
    inputs = cfg_step.step_inputs(unet, device, dtype)
    deltas = cfg_step.random_lora(unet, cfg_step.lora_targets(unet, "attention"), 8)
    ms: dict[str, list[float]] = {row: [] for row in ROWS}
    with torch.no_grad():
        for _ in range(8):
            for row in ROWS:
                handle = enable_npo(unet, deltas, mode="cfg") if row != "plain" else None
                if row == "npo_without_call":
                    for module in unet.modules():
                        if isinstance(module.__dict__.get("forward"), NpoAttentionCall):
                            del module.__dict__["forward"]
                for _ in range(3):
                    unet(**inputs, return_dict=False)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    unet(**inputs, return_dict=False)
                torch.cuda.synchronize()
                ms[row].append((time.perf_counter() - start) * 100)
                if handle is not None:
                    handle.remove()
    for row in ROWS:
        ratios = [t / p for t, p in zip(ms[row], ms["plain"])]
        print(f"{name} {row}: ms/step {[round(t, 1) for t in ms[row]]}, median of per-round ratios "
              f"{statistics.median(ratios):.3f}x, fastest/fastest {min(ms[row]) / min(ms['plain']):.3f}x")


if __name__ == "__main__":
    main()
