"""Peak RSS of reading a checkpoint's header and one tensor, and of streaming every tensor.

    python benchmarks/read_one_tensor.py .bench/sd15-unet.safetensors

Each measurement runs in a fresh process (ru_maxrss is a high-water mark), after importing torch,
so the numbers are the reader's own cost. A 1.7 GB SD1.5 UNet (benchmarks/synth.py) is the case
the foundation issue names.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from npo_merge.io.safetensors_stream import SafetensorsReader
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, mode = sys.argv[1], sys.argv[2]
base = rss(); start = time.perf_counter()
with SafetensorsReader(path) as reader:
    names = list(reader)
    largest = max(names, key=lambda n: reader[n].nbytes)
    if mode == "header":
        pass
    elif mode == "one":
        t = reader.tensor(largest); touched = t.numel() * t.element_size(); del t
    else:
        touched = 0
        for name in names:
            t = reader.tensor(name); touched = max(touched, t.numel() * t.element_size()); del t
print(json.dumps({"mode": mode, "baseline": base, "peak": rss(), "largest_tensor": reader[largest].nbytes,
                  "seconds": time.perf_counter() - start}))
"""


def measure(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    size = args.checkpoint.stat().st_size
    print(f"file: {args.checkpoint} ({size / 2**20:.0f} MiB)\n")
    print("| read | peak RSS above baseline | largest tensor | time |")
    print("|---|---|---|---|")
    for mode, label in (("header", "header only"), ("one", "header + largest tensor"), ("all", "every tensor, one at a time")):
        r = measure(args.checkpoint, mode)
        print(f"| {label} | {(r['peak'] - r['baseline']) / 2**20:.1f} MiB | {r['largest_tensor'] / 2**20:.1f} MiB | {r['seconds']:.2f} s |")


if __name__ == "__main__":
    main()
