"""Apply benchmark: wall time as a ratio to `cp` of the target (same run), and peak RSS.

    python benchmarks/synth.py sd1 .bench/sd15.safetensors                 # target, seed 0
    python benchmarks/synth.py sd1 .bench/sd15-tuned.safetensors --seed 1  # for the add-difference job
    python benchmarks/synth.py sd1 .bench/sd15-base.safetensors --seed 2
    python benchmarks/apply_bench.py sd1 [--mecha-python /path/to/venv/bin/python]
    python benchmarks/apply_bench.py sdxl
    mkdir /tmp/before && git archive 8c79739 | tar -x -C /tmp/before  # the code before, for --before
    python benchmarks/apply_bench.py sd1 --before /tmp/before --skip-extract

Rows: `cp` of the target, alone and followed by `sync`; the start every apply pays (Python importing torch);
`npo-merge apply` of a rank-64 LoRA on every UNet linear and conv layer;
`npo-merge apply` of a full fp16 delta (every UNet and text-encoder tensor); for sd1 also the
add-difference job A + (B - C) as `npo-merge extract` then `apply`, and as sd-mecha's
add_difference (if a Python with sd-mecha is given). Every command runs under /usr/bin/time in a
fresh process after its inputs were read once into the page cache and pending writes were synced;
rows take turns (repeat 1 of every row, then repeat 2...), and the 1-minute load average is kept
with each run. Apply rows run twice: with an empty sha256 cache (inputs are hashed during the
run) and with a warm one (filled by an untimed run first). With --before DIR, both apply commands
also run with DIR first on PYTHONPATH (older code, in the same turns). Results, with each run's user and
system CPU seconds: benchmarks/results/apply-ARCH.json, or --results PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
FILES = {"sd1": "sd15", "sdxl": "sdxl"}


def _run(command: list[str], inputs: list[Path], cache: str | None) -> tuple[float, int, float, float, float]:
    """(seconds, peak RSS bytes, load average before, user and system CPU seconds) of one command, inputs warm in the page
    cache; `cache` is the sha256 cache folder it gets (None: a new empty one)."""
    for path in inputs:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    subprocess.run(["sync"], check=True)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "NPO_MERGE_CACHE": cache or empty}
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", *command], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{command} failed: {done.stderr[-2000:]}")
    seconds, kib, user, system = done.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib) * 1024, load, float(user), float(system)


def _lora(target: Path, out: Path, rank: int = 64) -> Path:
    """A random rank-64 kohya LoRA on every UNet linear and conv layer of `target`."""
    from npo_merge.delta.types import LowRank
    from npo_merge.io.checkpoint import open_checkpoint
    from npo_merge.io.lora_writer import write_lora

    if out.exists():
        return out
    gen = torch.Generator().manual_seed(0)
    with open_checkpoint(target) as checkpoint:
        modules = []
        for key in checkpoint.keys():
            shape = checkpoint.shape(key)
            if key.startswith("unet.") and key.endswith(".weight") and len(shape) in (2, 4):
                r = min(rank, shape[0], int(torch.tensor(shape[1:]).prod()))
                down = torch.randn(r, *shape[1:], generator=gen) * 0.01
                up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.01
                modules.append((key[: -len(".weight")], LowRank(down, up, float(r))))
        write_lora(out, modules, layout="kohya", architecture=checkpoint.architecture, dtype=torch.float16)
    return out


def _full_delta(target: Path, out: Path) -> Path:
    """A random fp16 full delta on every UNet and text-encoder tensor of `target` (streamed)."""
    from npo_merge.delta.files import FULL, provenance
    from npo_merge.delta.types import BaseFingerprint
    from npo_merge.io.checkpoint import open_checkpoint
    from npo_merge.io.safetensors_stream import SafetensorsWriter, TensorSpec

    if out.exists():
        return out
    gen = torch.Generator().manual_seed(1)
    with open_checkpoint(target) as checkpoint:
        keys = sorted(k for k in checkpoint.keys() if not k.startswith("vae."))
        specs = [TensorSpec(k, torch.float16, checkpoint.shape(k)) for k in keys]
        meta = provenance(FULL, "positive", BaseFingerprint(checkpoint.architecture))
        with SafetensorsWriter(out, specs, meta) as writer:
            for spec in specs:
                writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * 1e-3).half())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(FILES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mecha-python", help="a python that has sd-mecha installed (sd1 add-difference row)")
    parser.add_argument("--skip-extract", action="store_true", help="leave out the sd1 add-difference rows")
    parser.add_argument("--before", type=Path, help="a checkout of an older npo_merge: its apply rows run too, for comparison")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results/apply-ARCH.json)")
    args = parser.parse_args()
    name = FILES[args.arch]
    target = BENCH / f"{name}.safetensors"
    out = BENCH / f"{name}-out.safetensors"
    lora = _lora(target, BENCH / f"{name}-lora-r64.safetensors")
    full = _full_delta(target, BENCH / f"{name}-full-delta.safetensors")
    npo = [sys.executable, "-m", "npo_merge"]
    warm = tempfile.mkdtemp(prefix="apply-bench-sha256-")
    lora_cmd = [*npo, "apply", "--target", str(target), "--delta", str(lora), "--out", str(out), "-q"]
    full_cmd = [*npo, "apply", "--target", str(target), "--delta", str(full), "--out", str(out), "-q"]
    # (label, command, inputs, sha256 cache: None = empty for each run, else this warm folder)
    rows: list[tuple[str, list[str], list[Path], str | None]] = [
        ("cp of the target", ["cp", str(target), str(out)], [target], None),
        ("cp of the target, then sync (apply's O_DIRECT output is on disk when it returns; cp's is in the page cache)",
         ["sh", "-c", 'cp "$0" "$1" && sync', str(target), str(out)], [target], None),
        ("python -c 'import torch' (the fixed start of every apply)", [sys.executable, "-c", "import torch"], [], None),
        ("npo-merge apply, rank-64 LoRA (all UNet linear+conv), sha256 cache empty", lora_cmd, [target, lora], None),
        ("npo-merge apply, rank-64 LoRA (all UNet linear+conv), sha256 cache warm", lora_cmd, [target, lora], warm),
        ("npo-merge apply, full fp16 delta (UNet + text encoder), sha256 cache empty", full_cmd, [target, full], None),
        ("npo-merge apply, full fp16 delta (UNet + text encoder), sha256 cache warm", full_cmd, [target, full], warm),
        ("npo-merge apply, full fp16 delta, sha256 cache warm, NPO_MERGE_DIRECT_IO=0 (output through the page cache)",
         ["env", "NPO_MERGE_DIRECT_IO=0", *full_cmd], [target, full], warm),
    ]
    if args.before:
        older = ["env", f"PYTHONPATH={args.before.resolve()}", sys.executable, "-P", "-m", "npo_merge"]  # -P: not ./npo_merge
        rows.append(("npo-merge apply (--before checkout), rank-64 LoRA", [*older, *lora_cmd[len(npo):]], [target, lora], None))
        rows.append(("npo-merge apply (--before checkout), full fp16 delta", [*older, *full_cmd[len(npo):]], [target, full], None))
    tuned, base = BENCH / f"{name}-tuned.safetensors", BENCH / f"{name}-base.safetensors"
    if args.arch == "sd1" and tuned.exists() and base.exists() and not args.skip_extract:
        diff = BENCH / f"{name}-tuned-minus-base.safetensors"
        rows.append(("npo-merge extract B - C (fp16 full delta)",
                     [*npo, "extract", "--base", str(base), "--tuned", str(tuned), "--out", str(diff), "--dtype", "fp16", "-q"],
                     [base, tuned], None))
        rows.append(("npo-merge apply A + (B - C) (the delta above), sha256 cache warm for A (B - C is new each time)",
                     [*npo, "apply", "--target", str(target), "--delta", str(diff), "--out", str(out), "-q"], [target, diff], warm))
        if args.mecha_python:
            script = ("import sd_mecha,sys; a,b,c,o=sys.argv[1:]; "
                      "sd_mecha.merge(sd_mecha.add_difference(sd_mecha.model(a), sd_mecha.model(b), sd_mecha.model(c), alpha=1.0), output=o)")
            rows.append(("sd-mecha add_difference A + (B - C)",
                         [args.mecha_python, "-c", script, str(target), str(tuned), str(base), str(out)], [target, tuned, base], None))
    for _, command, inputs, cache in rows:  # fill the warm cache (untimed)
        if cache:
            _run(command, inputs, cache)
            out.unlink(missing_ok=True)
    runs: dict[str, list[tuple[float, int, float, float, float]]] = {label: [] for label, *_ in rows}
    for _ in range(args.repeats):
        for label, command, inputs, cache in rows:
            runs[label].append(_run(command, inputs, cache))
            out.unlink(missing_ok=True)
    results = [{"row": label, "seconds": statistics.median(r[0] for r in done), "runs": [r[0] for r in done],
                "load_average": [r[2] for r in done], "user_s": [r[3] for r in done], "system_s": [r[4] for r in done],
                "peak_rss": max(r[1] for r in done)} for label, done in runs.items()]
    cp_seconds = results[0]["seconds"]
    size = target.stat().st_size
    print(f"target {target.name}: {size / 1e9:.2f} GB; median of {args.repeats} runs; torch {torch.__version__}; {os.cpu_count()} cores\n")
    print("| job | wall time | x cp | peak RSS | load average |")
    print("|---|---|---|---|---|")
    for r in results:
        loads = r["load_average"]
        print(f"| {r['row']} | {r['seconds']:.1f} s | {r['seconds'] / cp_seconds:.2f}x | {r['peak_rss'] / 2**30:.2f} GiB "
              f"| {min(loads):.1f}-{max(loads):.1f} |")
    (args.results or ROOT / "benchmarks" / "results" / f"apply-{args.arch}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
