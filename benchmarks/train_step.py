"""Time and peak memory of one Diffusion-DPO/NPO LoRA optimizer step: separate vs batched reference forward.

Rows, side by side in one run on the same inputs (SD1.5 UNet from the real config with random
weights in bf16, LoRA rank 8 / alpha 8 on to_q/to_k/to_v/to_out.0 in fp32, bf16 autocast, AdamW):

  separate   the diffusers Diffusion-DPO script's way: policy forward of [winners; losers], then a
             reference forward of the same batch with the adapter disabled under no_grad, loss, backward
  batched    this project's: one forward of [policy rows; reference rows] in which each peft LoRA layer
             adds its update to the policy rows only (npo_merge.training.reference.lora_on_first_half)

each without and with gradient checkpointing. Both rows call the trainer's own step code
(npo_merge.training.dpo.dpo_step with a ReferenceForward), so this measures what `npo-merge train`
runs. Latents (64x64, i.e. 512 px) and text embeddings (77x768) are given: no VAE, no text encoder.

Per row: median ms per optimizer step over --iters steps after --warmup (CUDA events), pairs/s,
throughput relative to `separate` with the same checkpointing setting, and peak memory
(torch.cuda.max_memory_allocated, reset before each row). Before timing, each row's loss and LoRA
gradients from one identical step are compared with the separate row's (rel_grad_err).

  python benchmarks/train_step.py                    # H100: about a minute
  python benchmarks/train_step.py --pairs 8,16       # more batch sizes
  python benchmarks/train_step.py --smoke            # tiny UNet on the CPU, seconds: checks the wiring
  python benchmarks/train_step.py --cpu --resolution 128 --pairs 1 --warmup 1 --iters 3   # real UNet, CPU fp32

Prints a markdown table; writes train_step.json to $OUT when set (or to --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_merge.training.config import DpoOptions, LoraOptions  # noqa: E402
from npo_merge.training.dpo import PairBatch, dpo_step  # noqa: E402
from npo_merge.training.encoding import UNetConditioning  # noqa: E402
from npo_merge.training.lora import add_lora, lora_parameters  # noqa: E402
from npo_merge.training.reference import ReferenceForward  # noqa: E402

ROWS = ("separate", "batched")
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")


def build_unet(smoke: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The SD1.5 UNet (real config, random weights) or, for --smoke, the tiny SD1.5-structure UNet; LoRA added."""
    from diffusers import UNet2DConditionModel

    if smoke:
        from npo_merge.tiny import UNET_CONFIGS

        unet = UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    else:
        from npo_merge.configs import build_unet as real_unet

        unet = real_unet("sd1")
    unet.to(device, dtype=dtype)
    add_lora(unet, LoraOptions(rank=8, alpha=8))
    with torch.no_grad():  # a trained-looking adapter, so the reference and policy rows differ
        gen = torch.Generator().manual_seed(0)
        for param in lora_parameters(unet):
            param.copy_(torch.randn(param.shape, generator=gen).mul_(0.01).to(param.device))
    return unet.train()


def step_inputs(unet: torch.nn.Module, pairs: int, latent: int, device: torch.device, dtype: torch.dtype) -> PairBatch:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2 * pairs, unet.config.in_channels, latent, latent, generator=gen).to(device)
    text = torch.randn(pairs, 77, unet.config.cross_attention_dim, generator=gen).to(device, dtype)
    return PairBatch(latents, UNetConditioning(torch.cat([text, text])))


class Row:
    """One benchmark row: a reference mode, a checkpointing setting, an optimizer, and its step."""

    def __init__(self, mode: str, checkpointing: bool, unet: torch.nn.Module, batch: PairBatch, scheduler: Any,
                 device: torch.device, autocast_dtype: torch.dtype | None):
        self.mode, self.checkpointing, self.unet, self.batch, self.scheduler = mode, checkpointing, unet, batch, scheduler
        self.device, self.autocast_dtype = device, autocast_dtype
        self.reference = ReferenceForward(mode, unet, unet)
        self.params = lora_parameters(unet)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)

    @property
    def name(self) -> str:
        return f"{self.mode}{' +ckpt' if self.checkpointing else ''}"

    def _setup(self) -> None:
        if self.checkpointing:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def loss_and_grads(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward/backward without an optimizer step (for the agreement check)."""
        self._setup()
        torch.manual_seed(1234)
        for param in self.params:
            param.grad = None
        loss = self._forward_backward()
        grads = [p.grad.detach().float().clone() for p in self.params]
        for param in self.params:
            param.grad = None
        return loss.detach().float(), grads

    def _forward_backward(self) -> torch.Tensor:
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        with autocast, self.reference.context():
            loss, _ = dpo_step(self.reference, self.batch, self.scheduler, DpoOptions(beta=500.0), reverse=True)
            loss.backward()
        return loss

    def step(self) -> None:
        self._forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def median_ms(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from diffusers import DDPMScheduler

    on_cpu = args.smoke or args.cpu
    device = torch.device("cpu" if on_cpu else "cuda")
    weight_dtype = torch.float32 if on_cpu else torch.bfloat16
    autocast_dtype = None if on_cpu else torch.bfloat16
    latent = 8 if args.smoke else args.resolution // 8
    unet = build_unet(args.smoke, device, weight_dtype)
    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    initial = [p.detach().clone() for p in lora_parameters(unet)]
    results = []
    for pairs in args.pairs:
        batch = step_inputs(unet, pairs, latent, device, weight_dtype)
        baseline: dict[bool, tuple[torch.Tensor, list[torch.Tensor], float]] = {}
        for checkpointing in (False, True):
            for mode in ROWS:
                with torch.no_grad():  # every row starts from the same adapter (earlier rows stepped it)
                    torch._foreach_copy_(lora_parameters(unet), initial)
                row = Row(mode, checkpointing, unet, batch, scheduler, device, autocast_dtype)
                result: dict[str, Any] = {"row": row.name, "mode": mode, "checkpointing": checkpointing, "pairs": pairs}
                try:
                    loss, grads = row.loss_and_grads()
                    if mode == "separate":
                        baseline[checkpointing] = (loss, grads, 0.0)
                    ref_loss, ref_grads, _ = baseline[checkpointing]
                    result["loss"] = float(loss)
                    result["rel_loss_err"] = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12))
                    result["rel_grad_err"] = max(float((g - r).norm() / r.norm().clamp_min(1e-12)) for g, r in zip(grads, ref_grads))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    ms = median_ms(row.step, args.warmup, args.iters, device)
                    result.update(ms=ms, pairs_per_s=pairs * 1000.0 / ms)
                    if device.type == "cuda":
                        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    if mode == "separate":
                        baseline[checkpointing] = (ref_loss, ref_grads, result["pairs_per_s"])
                    result["x_separate"] = result["pairs_per_s"] / baseline[checkpointing][2]
                except torch.cuda.OutOfMemoryError:
                    result["error"] = "out of memory"
                    torch.cuda.empty_cache()
                results.append(result)
                print(_line(result), file=sys.stderr)
    return results


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['row']:>16} pairs {r['pairs']}: {r['error']}"
    mem = f", {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
    return (f"{r['row']:>16} pairs {r['pairs']}: {r['ms']:.1f} ms, {r['pairs_per_s']:.1f} pairs/s, "
            f"x{r['x_separate']:.3f}{mem}, rel grad err {r['rel_grad_err']:.1e}")


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| row | pairs | ms/step | pairs/s | x separate | peak GiB | rel grad err |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['pairs']} | {r['error']} | | | | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['row']} | {r['pairs']} | {r['ms']:.1f} | {r['pairs_per_s']:.2f} | {r['x_separate']:.3f} | "
                     f"{peak} | {r['rel_grad_err']:.1e} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import peft

    env: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                           "python": platform.python_version(), "smoke": args.smoke, "cpu": args.cpu,
                           "resolution": args.resolution,
                           "warmup": args.warmup, "iters": args.iters}
    if torch.cuda.is_available() and not (args.smoke or args.cpu):
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="8", help="comma-separated batch sizes in pairs (default 8)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny UNet on the CPU, fp32, 2 timed steps")
    parser.add_argument("--cpu", action="store_true", help="the real UNet on the CPU in fp32 (FLOP-bound; use a small --resolution)")
    parser.add_argument("--json", type=Path, help="where to write the results (default: $OUT/train_step.json)")
    args = parser.parse_args(argv)
    try:
        args.pairs = [int(p) for p in str(args.pairs).split(",") if p]
    except ValueError:
        parser.error(f"--pairs takes comma-separated integers, got {args.pairs!r}")
    if args.smoke:
        args.pairs = [min(p, 2) for p in args.pairs]
        args.warmup, args.iters = 1, 2
    elif not args.cpu and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (--smoke or --cpu run on the CPU)")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    results = run(args)
    print(markdown_table(results))
    target = args.json or (Path(os.environ["OUT"]) / "train_step.json" if os.environ.get("OUT") else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"environment": environment(args), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
