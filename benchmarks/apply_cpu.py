"""Where an apply's CPU time goes: one `npo-merge apply` run in this process, with the CPU time of every
thread (grouped by name) and of apply's stages (read from each thread's own clock), plus the imports.

    python benchmarks/apply_cpu.py apply --target .bench/sdxl.safetensors --delta .bench/sdxl-lora-r64.safetensors \\
        --out /tmp/out.safetensors -q

The arguments are those of `npo-merge`. On a machine with N cores, the wall time cannot go below the
total CPU time / N, nor below the import (one thread) plus the rest / N.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import defaultdict

start = time.perf_counter()
import torch  # noqa: E402  (timed: the fixed start of every apply)

imported = time.perf_counter()

import npo_merge.apply as apply_module  # noqa: E402
from npo_merge.cli import main  # noqa: E402

# apply's stages, timed on the clock of the thread that runs them
STAGES = {
    "_read_rows_fp32": "target rows read and converted to fp32 (delta threads)",
    "_add_lora_rows": "LoRA products added into them (delta threads, GEMM)",
    "summed_delta": "full deltas read, checked and summed",
    "_stream_rows": "touched tensors cast and handed to the writer (main thread)",
}
cpu: dict[str, float] = defaultdict(float)


def _timed(name: str, function):
    def wrapper(*args, **kwargs):
        begin = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            cpu[name] += time.thread_time() - begin
    return wrapper


def _thread_run(run):
    def wrapper(self: threading.Thread) -> None:
        try:
            run(self)
        finally:
            cpu["thread " + re.sub(r"[_-]?\d+$", "", self.name)] += time.thread_time()
    return wrapper


for stage in STAGES:
    setattr(apply_module, stage, _timed(stage, getattr(apply_module, stage)))
threading.Thread.run = _thread_run(threading.Thread.run)

began = time.perf_counter()
code = main(sys.argv[1:])
ended = time.perf_counter()
cpu["thread main"] = time.thread_time()

print(f"\ntorch {torch.__version__}; import torch {imported - start:.2f} s, npo_merge {began - imported:.2f} s, "
      f"the command {ended - began:.2f} s wall (exit code {code})")
print("| thread or stage | CPU |\n|---|---|")
for name, seconds in sorted(cpu.items(), key=lambda item: (not item[0].startswith("thread"), -item[1])):
    print(f"| {STAGES.get(name, name)} | {seconds:.2f} s |")
