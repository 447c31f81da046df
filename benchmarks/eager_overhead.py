"""Host time of one dual-branch layer call in eager mode, next to a plain nn.Linear call.

Eager diffusers sampling is host-bound (a plain SD1.5 CFG step dispatches ~1600 ATen operators), so
what a covered layer adds is its extra host time per call. Each row times many back-to-back calls on
an input small enough (128 rows) that the GPU keeps up, i.e. host time per call, median of runs:

  linear        nn.Linear module call (F.linear: the plain model's layer)
  npo_torch     DualBranchLinear, backend "torch" (GEMM + shrink + expand: 3 ATen ops)
  npo_auto      DualBranchLinear, backend "auto" (here: the fused kernel, bound launch after the first call)
  eager_fn      dual_branch_linear_eager, called directly
  launcher      dual_branch_linear_triton, called directly (direct launch of the compiled kernel)
  launcher_jit  the same with direct launches off (every launch through JITFunction.run)
  op            torch.ops.npo_merge.dual_branch_linear (the custom op's dispatch)
  empty         torch.empty of the output alone
  qkv_*         three sibling layers on one input, as attention's q/k/v: nn.Linear x3 (linear), dual-branch
                layers each on its own bound launch (alone), and grouped into one launch (group)

Outputs of the direct and JIT launches are compared bit for bit before timing.

    python benchmarks/eager_overhead.py        # prints a table, writes $OUT/eager_overhead.json if OUT is set
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_merge.delta.types import LowRank  # noqa: E402
from npo_merge.guidance.dual_branch import BranchDelta, DualBranchLinear, InputGroup  # noqa: E402
from npo_merge.guidance.kernels import dual_linear_triton as kernel_module  # noqa: E402
from npo_merge.guidance.kernels.ops import dual_branch_linear_eager  # noqa: E402


def _per_call_us(fn, calls: int = 2000, runs: int = 7) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


@contextmanager
def jit_launches() -> Iterator[None]:
    """Every launch through JITFunction.run (direct launches off, variants forgotten before and after)."""
    kernel_module._DIRECT_LAUNCH = False
    kernel_module._launch_plan.cache_clear()
    try:
        yield
    finally:
        kernel_module._DIRECT_LAUNCH = True
        kernel_module._launch_plan.cache_clear()


def main() -> None:
    torch.manual_seed(0)
    dtype, device, rank = torch.float16, "cuda", 8
    linear = nn.Linear(320, 320).to(device, dtype)
    delta = BranchDelta(LowRank(torch.randn(rank, 320) * 0.02, torch.randn(320, rank) * 0.02, float(rank)))
    x = torch.randn(2, 64, 320, device=device, dtype=dtype)
    npo_torch = DualBranchLinear(linear, delta)
    npo_auto = DualBranchLinear(linear, delta)
    npo_auto.set_backend("auto")
    args = (x, linear.weight, linear.bias, npo_auto.down, npo_auto.up, npo_auto.scale, 64)
    launcher = kernel_module.dual_branch_linear_triton

    with torch.inference_mode():
        with jit_launches():
            reference = launcher(*args)
        launcher(*args)  # compiles and records the variant
        direct = launcher(*args)  # a direct launch
        torch.cuda.synchronize()
        if not torch.equal(direct, reference):
            raise SystemExit("direct launch differs from the JIT launch")
        rows = {
            "linear": lambda: linear(x),
            "npo_torch": lambda: npo_torch(x),
            "npo_auto": lambda: npo_auto(x),
            "eager_fn": lambda: dual_branch_linear_eager(*args),
            "launcher": lambda: launcher(*args),
            "op": lambda: torch.ops.npo_merge.dual_branch_linear(*args),
            "empty": lambda: torch.empty((2, 64, 320), device=device, dtype=dtype),
        }
        siblings = [nn.Linear(320, 320).to(device, dtype) for _ in range(3)]
        alone = [DualBranchLinear(layer, delta) for layer in siblings]
        grouped = [DualBranchLinear(layer, delta) for layer in siblings]
        for layer in (*alone, *grouped):
            layer.set_backend("auto")
        InputGroup(grouped)
        for a, g in zip(alone, grouped):
            torch.testing.assert_close(g(x), a(x), rtol=1e-2, atol=1e-2)  # the same layers, two kernels
        rows.update({
            "qkv_linear": lambda: [layer(x) for layer in siblings],
            "qkv_alone": lambda: [layer(x) for layer in alone],
            "qkv_group": lambda: [layer(x) for layer in grouped],
        })
        results = {name: _per_call_us(fn) for name, fn in rows.items()}
        with jit_launches():
            results["launcher_jit"] = _per_call_us(lambda: launcher(*args))
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "shape": "x (2, 64, 320) fp16, W 320x320, rank 8", "unit": "us host time per call"}
    print("| row | us per call | extra over linear |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} | {value - results['linear']:+.1f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "eager_overhead.json").write_text(json.dumps({"meta": meta, "us": results}, indent=1))


if __name__ == "__main__":
    main()
