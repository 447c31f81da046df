"""Host time of one dual-branch linear call under torch.compile's default mode: the layer's route called
directly, through the registered `npo_merge::routed_linear` op, and through a @torch.library.custom_op twin.

A tiny layer on one CPU thread, so the time is dispatch and Python, not arithmetic. Rounds alternate the
three; min and median of 15 rounds of 3000 calls each.

    python benchmarks/op_dispatch.py
"""

from __future__ import annotations

import time

import torch

from npo_merge.delta.types import LowRank
from npo_merge.guidance import routed_op
from npo_merge.guidance.dual_branch import BranchDelta, dual_branch_module


@torch.library.custom_op("npo_bench::routed_twin", mutates_args=())
def _twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor,
          scale: float, n_uncond: int, layer: int) -> torch.Tensor:
    return routed_op._routed_linear(x, weight, bias, down, up, scale, n_uncond, layer)


def _us_per_call(fn, calls: int = 3000) -> float:
    for _ in range(100):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(1)
    delta = BranchDelta(LowRank(down=torch.randn(2, 8), up=torch.randn(8, 2), alpha=2.0))
    layer = dual_branch_module(torch.nn.Linear(8, 8), delta, 1.0)
    layer.set_backend("auto")
    args = (torch.randn(2, 4, 8), layer.weight, layer.bias, layer.down, layer.up, layer.scale, 1)
    calls = {"route": lambda: layer.route(*args),
             "routed_linear op": lambda: routed_op.routed_linear(*args, layer._op_key),
             "custom_op twin": lambda: _twin(*args, layer._op_key)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(15):
            for name, fn in calls.items():
                times[name].append(_us_per_call(fn))
    print("| call | min us | median us |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.1f} | {sorted(values)[len(values) // 2]:.1f} |")


if __name__ == "__main__":
    main()
