"""Ways to run a rank-64 dual-branch 3x3 conv on SD UNet shapes (H100 probe, CUDA graphs of 50 calls), in us.

plain conv; joint conv [W; down] plus the expand; theta_u materialized then one grouped conv over the batch
viewed as channels (groups=2) or two half-batch convs; the plain conv in channels-last. Informed the
choice of the joint conv plus a store (results/conv_paths_probe_h100.json).

    python benchmarks/conv_paths.py results/conv_paths_probe_h100.json
"""
import json, sys
from pathlib import Path

import torch, torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_sweep import timed  # noqa: E402  (the same CUDA-graph timing as the store sweep)
torch.backends.cudnn.benchmark = True
dev, dt = "cuda", torch.float16
R = 64
rows = []
for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8), (640, 64), (1280, 32)):
    x = torch.randn(2, c, hw, hw, device=dev, dtype=dt)
    w = torch.randn(c, c, 3, 3, device=dev, dtype=dt) * 0.02
    b = torch.randn(c, device=dev, dtype=dt)
    down = torch.randn(R, c, 3, 3, device=dev, dtype=dt) * 0.02
    up = torch.randn(c, R, 1, 1, device=dev, dtype=dt) * 0.02
    joint = torch.cat([w, down]); jb = torch.cat([b, b.new_zeros(R)])
    def plain(): return F.conv2d(x, w, b, padding=1)
    def joint_path():
        y = F.conv2d(x, joint, jb, padding=1)
        yu = y[:1]
        out = yu[:, :c]
        out.add_(torch.einsum("ok,bkhw->bohw", up[:, :, 0, 0], yu[:, c:]))
        return y
    def theta(): return torch.addmm(w.view(c, -1), up.view(c, R), down.view(R, -1)).view_as(w)
    def grouped():
        w2 = torch.cat([theta(), w])
        return F.conv2d(x.view(1, 2 * c, hw, hw), w2, torch.cat([b, b]), padding=1, groups=2)
    def grouped_prebuilt_w2(w2=torch.cat([w, w]), b2=torch.cat([b, b])):
        return F.conv2d(x.view(1, 2 * c, hw, hw), w2, b2, padding=1, groups=2)
    def halves():
        t = theta()
        y = torch.empty_like(x)
        y[:1] = F.conv2d(x[:1], t, b, padding=1); y[1:] = F.conv2d(x[1:], w, b, padding=1)
        return y
    def theta_only(): return theta()
    r = {"c": c, "hw": hw}
    for name, fn in (("plain", plain), ("joint", joint_path), ("grouped", grouped), ("grouped_conv_only", grouped_prebuilt_w2), ("halves", halves), ("theta", theta_only)):
        r[name] = round(timed(fn), 2)
    # channels_last variants
    xl = x.contiguous(memory_format=torch.channels_last); wl = w.contiguous(memory_format=torch.channels_last)
    r["plain_cl"] = round(timed(lambda: F.conv2d(xl, wl, b, padding=1)), 2)
    print(r, flush=True); rows.append(r)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
