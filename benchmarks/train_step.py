"""Time and peak memory of one Diffusion-DPO/NPO LoRA optimizer step: the diffusers script's way vs this trainer's.

Rows, side by side in one run on the same data (SD1.5 UNet, VAE and CLIP text encoder from the real
configs with random weights in bf16, LoRA rank 8 / alpha 8 on to_q/to_k/to_v/to_out.0 in fp32, bf16
autocast, AdamW), each without and with gradient checkpointing:

  script          the diffusers Diffusion-DPO script's way: every step VAE-encodes the 2B images and
                  text-encodes the B captions, then a policy forward of [winners; losers], a reference
                  forward of the same batch with the adapter disabled under no_grad, loss, backward
  cached          this trainer with `data.cache` (after the first epoch): the batch holds the stored VAE
                  posteriors and text embeddings (on the CPU, as the data loader yields them), a latent is
                  drawn from the posterior; then the same separate reference forward
  cached batched  as `cached`, with `ref_forward: batched`: one forward of [policy rows; reference rows] in
                  which each peft LoRA layer adds its update to the policy rows only

Every row calls the trainer's own code (npo_merge.training.dpo.pair_batch and dpo_step with a
ReferenceForward), so this measures what `npo-merge train` runs. The tokenizer is a tiny in-process
CLIP tokenizer (no downloads), padding to 77 tokens like the real one; the text encoder is full size.

Per row: median ms per optimizer step over --iters steps after --warmup (CUDA events), pairs/s,
throughput relative to `script` with the same checkpointing setting, and peak memory
(torch.cuda.max_memory_allocated, reset before each row). Before timing, each row's loss and LoRA
gradients from one identical step are compared with the script row's (rel_grad_err: ||g - g_script|| /
||g_script|| over all LoRA gradients concatenated).

  python benchmarks/train_step.py                    # H100: about two minutes
  python benchmarks/train_step.py --pairs 8,16       # more batch sizes
  python benchmarks/train_step.py --smoke            # tiny models on the CPU, seconds: checks the wiring
  python benchmarks/train_step.py --cpu --resolution 128 --pairs 1 --warmup 1 --iters 3   # real models, CPU fp32

Prints a markdown table; writes train_step.json to $OUT when set (or to --json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_merge.training.config import DpoOptions, LoraOptions  # noqa: E402
from npo_merge.training.dpo import dpo_step, pair_batch  # noqa: E402
from npo_merge.training.encoding import Encoders  # noqa: E402
from npo_merge.training.lora import add_lora, lora_parameters  # noqa: E402
from npo_merge.training.reference import ReferenceForward  # noqa: E402

ROWS = (("script", "pixels", "separate"), ("cached", "cached", "separate"), ("cached batched", "cached", "batched"))
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, clip_sample=False)


def build_pipeline(smoke: bool, device: torch.device, dtype: torch.dtype, workdir: Path) -> Any:
    """An SD1.5 pipeline (real configs, random weights; tiny models for --smoke) with a LoRA on its UNet, on `device`."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from npo_merge.tiny import tiny_models, tiny_tokenizer

    if smoke:
        parts = {name: copy.deepcopy(model) for name, model in tiny_models("sd1").items()}
    else:
        from npo_merge.configs import build_text_encoders, build_unet, build_vae

        parts = {"unet": build_unet("sd1"), "text_encoder": build_text_encoders("sd1")[0], "vae": build_vae()}
    pipe = StableDiffusionPipeline(**parts, tokenizer=tiny_tokenizer(workdir / "tokenizer"),
                                   scheduler=DDPMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    unet = pipe.unet.to(device, dtype=dtype)
    add_lora(unet, LoraOptions(rank=8, alpha=8))
    with torch.no_grad():  # a trained-looking adapter, so the reference and policy rows differ
        gen = torch.Generator().manual_seed(0)
        for param in lora_parameters(unet):
            param.copy_(torch.randn(param.shape, generator=gen).mul_(0.01).to(param.device))
    unet.train()
    return pipe


def data_batches(encoders: Encoders, pairs: int, resolution: int, autocast_dtype: torch.dtype | None) -> dict[str, dict[str, Any]]:
    """One collated batch of `pairs` pairs as the data loader yields it: pixels and captions, or cached encodings.

    The cached encodings are made under the same autocast as the script rows' per-step encoding, so both
    kinds of row see the same numbers.
    """
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(2 * pairs, 3, resolution, resolution, generator=gen).mul_(2).sub_(1)
    captions = [f"a photo of cat number {i}" for i in range(pairs)]
    winners, losers = pixels[:pairs], pixels[pairs:]
    with torch.autocast(encoders.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        encoded = {"winner": encoders.latent_dist(winners), "loser": encoders.latent_dist(losers),
                   "text": encoders.text(captions)}
    cached = {part: {k: v.cpu() for k, v in tensors.items()} for part, tensors in encoded.items()}
    return {"pixels": {"winner": winners, "loser": losers, "caption": captions}, "cached": cached}


class Row:
    """One benchmark row: its inputs (pixels or cached), reference mode, checkpointing setting, optimizer and step."""

    def __init__(self, name: str, mode: str, checkpointing: bool, encoders: Encoders, batch: dict[str, Any],
                 scheduler: Any, resolution: int, autocast_dtype: torch.dtype | None):
        self.mode, self.checkpointing, self.encoders, self.batch, self.scheduler = mode, checkpointing, encoders, batch, scheduler
        self.name = f"{name}{' +ckpt' if checkpointing else ''}"
        self.size, self.autocast_dtype = (resolution, resolution), autocast_dtype
        self.unet = encoders.pipe.unet
        self.reference = ReferenceForward(mode, self.unet, self.unet)
        self.params = lora_parameters(self.unet)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)

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
        device = self.encoders.device
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        with autocast, self.reference.context():
            batch = pair_batch(self.batch, self.encoders, self.size)
            loss, _ = dpo_step(self.reference, batch, self.scheduler, DpoOptions(beta=500.0), reverse=True)
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
    on_cpu = args.smoke or args.cpu
    device = torch.device("cpu" if on_cpu else "cuda")
    dtype = torch.float32 if on_cpu else torch.bfloat16
    autocast_dtype = None if on_cpu else torch.bfloat16
    with tempfile.TemporaryDirectory() as workdir:
        pipe = build_pipeline(args.smoke, device, dtype, Path(workdir))
    encoders = Encoders(pipe, "sd1", device, dtype, dtype)
    unet = pipe.unet
    initial = [p.detach().clone() for p in lora_parameters(unet)]
    results = []
    for pairs in args.pairs:
        batches = data_batches(encoders, pairs, args.resolution, autocast_dtype)
        baseline: dict[bool, tuple[torch.Tensor, list[torch.Tensor], float]] = {}
        for checkpointing in (False, True):
            for name, inputs, mode in ROWS:
                with torch.no_grad():  # every row starts from the same adapter (earlier rows stepped it)
                    torch._foreach_copy_(lora_parameters(unet), initial)
                row = Row(name, mode, checkpointing, encoders, batches[inputs], pipe.scheduler, args.resolution, autocast_dtype)
                result: dict[str, Any] = {"row": row.name, "inputs": inputs, "mode": mode, "checkpointing": checkpointing,
                                          "pairs": pairs}
                try:
                    loss, grads = row.loss_and_grads()
                    if name == "script":
                        baseline[checkpointing] = (loss, grads, 0.0)
                    ref_loss, ref_grads, _ = baseline[checkpointing]
                    result["loss"] = float(loss)
                    result["rel_loss_err"] = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12))
                    # over all LoRA gradients at once: single tensors can have near-zero gradients (1e-10) where
                    # summation order alone gives a large per-tensor relative error
                    got, want = torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in ref_grads])
                    result["grad_norm"] = float(got.norm())
                    result["rel_grad_err"] = float((got - want).norm() / want.norm().clamp_min(1e-12))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    ms = median_ms(row.step, args.warmup, args.iters, device)
                    result.update(ms=ms, pairs_per_s=pairs * 1000.0 / ms)
                    if device.type == "cuda":
                        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    if name == "script":
                        baseline[checkpointing] = (ref_loss, ref_grads, result["pairs_per_s"])
                    result["x_script"] = result["pairs_per_s"] / baseline[checkpointing][2]
                except torch.cuda.OutOfMemoryError:
                    result["error"] = "out of memory"
                    torch.cuda.empty_cache()
                results.append(result)
                print(_line(result), file=sys.stderr)
    return results


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['row']:>20} pairs {r['pairs']}: {r['error']}"
    mem = f", {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""
    return (f"{r['row']:>20} pairs {r['pairs']}: {r['ms']:.1f} ms, {r['pairs_per_s']:.1f} pairs/s, "
            f"x{r['x_script']:.3f}{mem}, rel grad err {r['rel_grad_err']:.1e}")


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| row | pairs | ms/step | pairs/s | x script | peak GiB | rel grad err |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['pairs']} | {r['error']} | | | | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['row']} | {r['pairs']} | {r['ms']:.1f} | {r['pairs_per_s']:.2f} | {r['x_script']:.3f} | "
                     f"{peak} | {r['rel_grad_err']:.1e} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import peft

    env: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                           "python": platform.python_version(), "smoke": args.smoke, "cpu": args.cpu,
                           "resolution": args.resolution, "warmup": args.warmup, "iters": args.iters}
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
        args.warmup, args.iters, args.resolution = 1, 2, 64
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
