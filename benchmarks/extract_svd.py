"""LoRA extraction speed and fidelity: our randomized `factorize` against full per-layer SVD (kohya).

For every linear and conv weight of the SD1.5 UNet (real shapes, read from diffusers'
UNet2DConditionModel built on the meta device), a synthetic delta is generated layer by layer
(seeded, so both methods see the same matrix and memory stays at one layer) with the spectrum of a
fine-tune delta, low rank plus noise:

    D = U0 diag(s) V0 + N,   s_j = (1 + j / 4)^-1 for j < min(256, out, in*kh*kw),
    U0, V0 Gaussian (nearly orthogonal columns / rows), N Gaussian with ||N|| = noise * ||signal||

(random matrices alone have flat spectra, which no low-rank method can compress). Each layer is
compressed to rank R by

    ours    npo_merge.delta.lowrank.factorize(method="randomized")  (torch.svd_lowrank + power iterations)
    kohya   torch.linalg.svd(full_matrices=False) + truncation, as kohya's extract_lora_from_models
            does it (minus its 0.99 quantile clamp, which only adds error; kohya's default
            full_matrices=True is slower still, so this baseline is the stronger one)

timed back to back on the same tensor (order alternating per layer, so load from other processes
hits both alike). Errors are measured on the dense reconstruction ||D - D_r|| / ||D||, not taken
from either method's own report; ours' reported fidelity is checked against it. Per-layer JSON
lines go to --out; a markdown summary is printed last.

    python benchmarks/extract_svd.py --threads 1 --out .bench/extract_svd_t1.jsonl   # ~14 min here
    python benchmarks/extract_svd.py --out .bench/extract_svd_t2.jsonl              # torch's 2 threads

On a shared machine prefer --threads 1: with 2 OpenMP threads and other processes on the cores,
LAPACK's many barriers make the full SVD's time erratic (a 1280 x 1280 SVD took 0.5 s to 30 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_merge.delta.lowrank import DEFAULT_NITER, DEFAULT_OVERSAMPLE, factorize  # noqa: E402
from npo_merge.delta.types import LowRank  # noqa: E402

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def sd15_unet_weight_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every linear (2-D) and conv (4-D) weight of the SD1.5 UNet, no memory used."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return [(n, tuple(p.shape)) for n, p in unet.named_parameters() if n.endswith(".weight") and p.dim() in (2, 4)]


def synthetic_delta(shape: tuple[int, ...], seed: int, *, signal_rank: int = 256, noise: float = 0.5) -> torch.Tensor:
    """A fine-tune-like delta: power-law low-rank signal plus Gaussian noise (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    k = min(signal_rank, rows, cols)
    s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32) / 4.0)
    u0 = torch.randn(rows, k, generator=g) / math.sqrt(rows)
    v0 = torch.randn(k, cols, generator=g) / math.sqrt(cols)
    signal = (u0 * s) @ v0
    scale = noise * float(signal.norm()) / math.sqrt(rows * cols)
    signal.add_(torch.randn(rows, cols, generator=g), alpha=scale)
    return signal.reshape(shape)


def kohya_svd(delta: torch.Tensor, rank: int) -> LowRank:
    """The reference method: full SVD of the flattened delta, keep the top `rank` triplets."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    return LowRank(down=vh[:r], up=u[:, :r] * s[:r], alpha=float(r))


def measured_error(delta: torch.Tensor, lowrank: LowRank) -> float:
    """||D - D_r||_F^2 from the dense reconstruction, summed in fp64 (squared, to sum over layers)."""
    matrix = delta.reshape(delta.shape[0], -1)
    return _squared_norm64(matrix - lowrank.to_dense().reshape(matrix.shape))


def _squared_norm64(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def _timed(fn):
    """Run fn, return (result, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


METHODS = ("kohya", "exact", "ours")
LABELS = {
    "kohya": "full torch.linalg.svd per layer, as kohya calls it (on (out, in*kh*kw))",
    "exact": "full SVD, wide matrices transposed (our method=\"exact\")",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--oversample", type=int, default=DEFAULT_OVERSAMPLE)
    parser.add_argument("--niter", type=int, default=DEFAULT_NITER)
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm as a fraction of the signal norm")
    parser.add_argument("--subset", type=int, default=None, help="only N layers, evenly spread over the UNet")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per layer here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    LABELS["ours"] = f"npo_merge randomized factorize (oversample {args.oversample}, niter {args.niter})"

    layers = sd15_unet_weight_shapes()
    if args.subset:
        step = len(layers) / args.subset
        layers = [layers[int(i * step)] for i in range(args.subset)]
    sink = None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sink = args.out.open("w")
    load_start = os.getloadavg()[0]
    print(
        f"{len(layers)} layers, {sum(math.prod(s) for _, s in layers) / 1e6:.0f} M params, rank {args.rank}, "
        f"oversample {args.oversample}, niter {args.niter}, {torch.get_num_threads()} threads, load {load_start:.2f}",
        file=sys.stderr,
    )

    runners = {
        "kohya": lambda d: kohya_svd(d, args.rank),
        "exact": lambda d: factorize(d, rank=args.rank, method="exact")[0],
        "ours": lambda d: factorize(d, rank=args.rank, oversample=args.oversample, niter=args.niter),
    }
    wall = dict.fromkeys(METHODS, 0.0)
    cpu = dict.fromkeys(METHODS, 0.0)
    err2 = dict.fromkeys(METHODS, 0.0)
    norm2_total = reported_err2 = generate = 0.0
    worst_ratio, worst_layer = 0.0, ""
    for i, (name, shape) in enumerate(layers):
        delta, t_gen, _ = _timed(lambda: synthetic_delta(shape, seed=args.seed * 100_003 + i, noise=args.noise))
        generate += t_gen
        norm2 = _squared_norm64(delta)
        norm2_total += norm2
        order = METHODS[i % len(METHODS):] + METHODS[: i % len(METHODS)]  # rotate: load hits all alike
        record: dict[str, object] = dict(layer=name, shape=list(shape))
        for method in order:
            result, t_wall, t_cpu = _timed(lambda: runners[method](delta))
            if method == "ours":
                result, fidelity = result
                reported_err2 += (fidelity.rel_error * fidelity.norm) ** 2
                record["rel_err_reported"] = fidelity.rel_error
            e2 = measured_error(delta, result)
            wall[method] += t_wall
            cpu[method] += t_cpu
            err2[method] += e2
            record.update({f"wall_{method}": t_wall, f"cpu_{method}": t_cpu, f"rel_err_{method}": math.sqrt(e2 / norm2)})
        ratio = record["rel_err_ours"] / record["rel_err_kohya"]
        if ratio > worst_ratio:
            worst_ratio, worst_layer = ratio, f"{name} {shape}"
        if sink:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
        print(
            f"[{i + 1}/{len(layers)}] {name} {shape}: "
            + " ".join(f"{m} {record[f'wall_{m}']:.3f}s/{record[f'rel_err_{m}']:.4f}" for m in METHODS),
            file=sys.stderr,
            flush=True,
        )
    if sink:
        sink.close()

    err = {m: math.sqrt(err2[m] / norm2_total) for m in METHODS}
    print(
        f"\nMeasured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; load average {load_start:.2f} at "
        f"start, {os.getloadavg()[0]:.2f} at end. Synthesizing the deltas took {generate:.1f} s (not counted).\n"
    )
    print(f"Rank {args.rank} over {len(layers)} SD1.5 UNet weights (linear + conv), noise {args.noise}:\n")
    print("| method | wall (s) | CPU (s) | wall speed-up vs kohya | vs exact | rel. error | retained norm | error vs kohya |")
    print("|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        print(
            f"| {LABELS[m]} | {wall[m]:.1f} | {cpu[m]:.1f} | {wall['kohya'] / wall[m]:.1f}x | "
            f"{wall['exact'] / wall[m]:.1f}x | {err[m]:.4f} | "
            f"{math.sqrt(max(0.0, 1 - err[m] ** 2)):.4f} | {err[m] / err['kohya']:.4f}x |"
        )
    print(
        f"\nWorst single layer, ours vs kohya error: {worst_ratio:.4f}x ({worst_layer}). "
        f"Overall error reported by factorize {math.sqrt(reported_err2 / norm2_total):.4f}, measured {err['ours']:.4f}."
    )


if __name__ == "__main__":
    main()
