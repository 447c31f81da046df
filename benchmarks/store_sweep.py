"""Tile sweep for the store kernels on SD1.5/SDXL shapes (CUDA graphs, 50 calls), against the plain passes they replace.

    python benchmarks/store_sweep.py results/store_sweep_h100.json
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from npo_merge.guidance.kernels import expand_store as es  # noqa: E402
from npo_merge.guidance.kernels.dual_linear_triton import rank_block  # noqa: E402

dev, dt = "cuda", torch.float16


def timed(fn, reps=50):
    """Best of 5 replays of one CUDA graph holding `reps` calls, in us per call."""
    for _ in range(3): fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    best = 1e9
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); e.synchronize()
        best = min(best, s.elapsed_time(e) * 1000 / reps)
    return round(best, 2)


def main() -> None:
    res = []
    lin_cfgs = [(bm, bn, w) for bm, bn in ((32, 64), (32, 128), (64, 64), (64, 128), (128, 64), (64, 256), (128, 128)) for w in (4, 8)]
    for kind, rows, n, r in [("rescale", 8192, 320, 64), ("rescale", 2048, 640, 64), ("rescale", 512, 1280, 64), ("rescale", 2048, 1280, 8), ("rescale", 8192, 640, 8),
                             ("residual", 8192, 320, 64), ("residual", 2048, 640, 64), ("residual", 2048, 1280, 64), ("residual", 8192, 640, 64),
                             ("gated", 8192, 1280, 64), ("gated", 2048, 2560, 64), ("gated", 512, 5120, 64), ("gated", 2048, 5120, 64), ("gated", 8192, 2560, 64)]:
        gated = kind == "gated"; halves = 2 if gated else 1
        y = torch.randn(rows, halves * n + r, device=dev, dtype=dt); up = torch.randn(halves * n, r, device=dev, dtype=dt) * 0.1
        add = torch.randn(rows, n, device=dev, dtype=dt) if kind == "residual" else None
        out = torch.empty(rows, n, device=dev, dtype=dt)
        yc = y[:, :halves * n].contiguous()
        if kind == "rescale": plain = lambda: yc / 1.0
        elif kind == "residual": plain = lambda: yc + add
        else: plain = lambda: yc[:, :n] * F.gelu(yc[:, n:])
        row = {"kind": kind, "rows": rows, "n": n, "r": r, "plain": timed(plain)}
        for bm, bn, w in lin_cfgs:
            grid = (triton.cdiv(rows, bm), triton.cdiv(n, bn))
            f = lambda: es._expand_store_kernel[grid](y, up, y if add is None else add, out, rows, n, r, rows // 2, 1.0, 1.0, y.stride(0), 0 if add is None else add.stride(0),
                                                       GATED=gated, HAS_ADD=add is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=rank_block(r), DOT_PRECISION="tf32", UPCAST=False, num_warps=w)
            try: row[f"{bm}x{bn}w{w}"] = timed(f)
            except Exception as exc: row[f"{bm}x{bn}w{w}"] = str(exc)[:40]
        print(row, flush=True); res.append(row)
    ch_cfgs = [(bc, bp, w) for bc, bp in ((32, 128), (64, 64), (64, 128), (32, 256), (64, 256), (128, 128)) for w in (4, 8)]
    for b, c, hw, r, has_add in [(2, 320, 64, 64, True), (2, 640, 32, 64, True), (2, 1280, 16, 64, True), (2, 1280, 8, 64, True), (2, 320, 64, 64, False), (2, 640, 64, 64, True), (2, 1280, 32, 64, True)]:
        y = torch.randn(b, c + r, hw, hw, device=dev, dtype=dt); up = torch.randn(c, r, device=dev, dtype=dt) * 0.1
        add = torch.randn(b, c, hw, hw, device=dev, dtype=dt) if has_add else torch.randn(b, c, device=dev, dtype=dt)[:, :, None, None]
        out = torch.empty(b, c, hw, hw, device=dev, dtype=dt)
        yc = y[:, :c].contiguous()
        row = {"kind": "channel" + ("_residual" if has_add else "_temb"), "shape": [b, c, hw, hw], "r": r, "plain": timed(lambda: yc + add)}
        strides = es.add_strides(add, out.shape)
        for bc, bp, w in ch_cfgs:
            grid = (b * triton.cdiv(c, bc), triton.cdiv(hw * hw, bp))
            f = lambda: es._channel_store_kernel[grid](y, up, add, out, c, hw * hw, r, 1, 0.5, 1.0, y.stride(0), *strides, HAS_ADD=True,
                                                        BLOCK_C=bc, BLOCK_P=bp, BLOCK_R=rank_block(r), DOT_PRECISION="tf32", UPCAST=False, num_warps=w)
            try: row[f"{bc}x{bp}w{w}"] = timed(f)
            except Exception as exc: row[f"{bc}x{bp}w{w}"] = str(exc)[:40]
        print(row, flush=True); res.append(row)
    json.dump(res, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
