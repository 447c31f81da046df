"""Per-kernel GPU time of one eager UNet step, plain vs NPO (rank 64 on every layer), after warm-up: where NPO's time goes.

    python benchmarks/kernel_diff.py sd15      # or sdxl; prints a markdown table of the largest differences
"""
import sys
from collections import defaultdict
sys.path.insert(0, "benchmarks")
import torch, cfg_step
from npo_merge.guidance.install import enable_npo
torch.set_grad_enabled(False)
dev, dt = torch.device("cuda"), torch.float16
model = sys.argv[1] if len(sys.argv) > 1 else "sd15"
unet = cfg_step.build_unet(cfg_step.UNETS[model], dev, dt)
inputs = cfg_step.step_inputs(unet, dev, dt)
deltas = cfg_step.random_lora(unet, cfg_step.lora_targets(unet, "linear+conv"), 64)

def profile():
    for _ in range(3): unet(**inputs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5): unet(**inputs)
        torch.cuda.synchronize()
    times = defaultdict(float); counts = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name[:90]] += e.device_time / 5; counts[e.name[:90]] += 1
    return times, counts

plain, pc = profile()
with enable_npo(unet, deltas, mode="cfg", backend="auto") as h:
    print(h.counts)
    npo, nc = profile()
names = set(plain) | set(npo)
rows = sorted(names, key=lambda n: -(npo.get(n, 0) - plain.get(n, 0)))
print("total plain us", round(sum(plain.values())), "npo us", round(sum(npo.values())))
print("| kernel | plain us | npo us | diff | calls plain | calls npo |")
for n in rows[:30] + rows[-8:]:
    print(f"| {n} | {plain.get(n,0):.0f} | {npo.get(n,0):.0f} | {npo.get(n,0)-plain.get(n,0):+.0f} | {pc.get(n,0)//5} | {nc.get(n,0)//5} |")
