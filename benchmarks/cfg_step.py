"""Time and memory of one CFG denoising step: plain CFG vs every way of serving NPO's two branches.

One step = the UNet call(s) for the [uncond; cond] batch plus the guidance combination
eps_u + w * (eps_c - eps_u) (the scheduler update is the same for every row and is left out).
Rows, side by side in one run on the same inputs:

  plain        one merged model, batch 2: the floor to match
  two_unets    the official NPO approach: theta_c and a materialized theta_u UNet, two passes of batch 1
  peft_toggle  one UNet with the NPO LoRA in peft, adapter enabled for the uncond pass, disabled for cond
  peft_both    peft LoRA active on the whole batch 2: the cost of an unfused LoRA alone (not NPO semantics)
  npo_lowrank  this project's dual-branch layers, base op + rank-r update on the uncond half
  npo_stacked  this project's dual-branch layers, [W_u; W_c] stacked, one bmm per covered linear
  npo_fused    this project's dual-branch layers calling the fused kernel op (npo_merge.guidance.kernels)
               for the low-rank linears; an error row when no kernel is there
  peft_mixed   peft mixed-adapter batch (adapter_names = ["npo", "__base__"]), run last: its CUDA-graph
               capture is expected to fail and the failure is reported as the row's result

Each row is timed eagerly and replayed from a CUDA graph (torch.cuda.CUDAGraph capture of the step with
static inputs): median over --iters steps, CUDA events, after --warmup steps. Memory per row: parameter and
buffer bytes the row's model(s) hold, and torch.cuda.max_memory_allocated (reset before the eager and the
graph part). err_vs_two_unets: max |eps - eps_ref| / max |eps_ref| of the row's output against two_unets.

The UNets come from the real SD1.5 (512x512, latent 64) and SDXL (1024x1024, latent 128) configs, written
below, with random weights in fp16: no network access. NPO LoRA settings: rank 8 on the attention
projections (to_q/to_k/to_v/to_out.0; the official NPO LoRA) and rank 64 on every Linear and Conv2d.

  python benchmarks/cfg_step.py                               # everything (H100: a few minutes)
  python benchmarks/cfg_step.py --models sd15 --lora attn-r8  # one setting
  python benchmarks/cfg_step.py --smoke                       # tiny models on the CPU, checks the wiring

Prints a markdown table; writes cfg_step.json to $OUT when set (or to --json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_merge.delta.types import LowRank  # noqa: E402
from npo_merge.guidance.install import enable_npo  # noqa: E402
from npo_merge.guidance.reference import TwoPassCFG, cfg_combine, uncond_unet  # noqa: E402

GUIDANCE = 7.5
TEXT_TOKENS = 77

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# Same block structure, tiny widths: for --smoke on the CPU.
SMOKE_UNETS = {
    "sd15": {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32, "attention_head_dim": 2},
    "sdxl": {
        **SDXL_UNET,
        "sample_size": 8,
        "block_out_channels": (32, 64, 64),
        "transformer_layers_per_block": (1, 1, 2),
        "attention_head_dim": (2, 2, 4),
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 32,
    },
}
UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
LORAS = {"attn-r8": ("attention", 8), "all-r64": ("linear+conv", 64)}
ROWS = ("two_unets", "plain", "plain_fused_qkv", "peft_toggle", "peft_both", "npo_lowrank", "npo_stacked", "npo_fused", "npo_auto", "npo_auto_ungrouped", "npo_auto_widened",
        "npo_auto_unwidened", "npo_auto_no_store", "npo_auto_widened_no_store", "peft_mixed")
ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")


# ---------------------------------------------------------------------------------------------
# Models, inputs, deltas
# ---------------------------------------------------------------------------------------------


def build_unet(config: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A UNet2DConditionModel from `config` with random weights, built directly on `device`."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(fp16) warns about an empty keep-in-fp32 list
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype).eval().requires_grad_(False)


def step_inputs(unet: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Static UNet arguments for a CFG batch of 2 ([uncond; cond]) at the config's latent size."""
    gen = torch.Generator(device).manual_seed(1)
    cfg = unet.config
    size = cfg.sample_size
    inputs: dict[str, Any] = {
        "sample": torch.randn(2, cfg.in_channels, size, size, generator=gen, device=device, dtype=dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, cfg.cross_attention_dim, generator=gen, device=device, dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        pixels = float(size * 8)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_dim, generator=gen, device=device, dtype=dtype),
            "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * 2, device=device, dtype=dtype),
        }
    return inputs


def lora_targets(unet: nn.Module, coverage: str) -> list[str]:
    """Module paths the NPO LoRA covers: attention projections, or every Linear and Conv2d."""
    if coverage == "attention":
        return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(ATTENTION_PROJECTIONS)]
    return [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def random_lora(unet: nn.Module, names: list[str], rank: int) -> dict[str, LowRank]:
    """Random LoRA factors (alpha = rank) on the UNet's device and dtype; the delta is ~5% of the weights."""
    gen = torch.Generator(unet.device).manual_seed(2)
    deltas = {}
    for name in names:
        weight = unet.get_submodule(name).weight
        like = {"generator": gen, "device": weight.device, "dtype": weight.dtype}
        fan_in = weight[0].numel()
        down = torch.randn(rank, *weight.shape[1:], **like) / fan_in**0.5
        up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else []), **like) * (0.05 / fan_in**0.5)
        deltas[name] = LowRank(down=down, up=up, alpha=float(rank))
    return deltas


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters and buffers of `modules` (shared ones once)."""
    storages = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------
# Rows: each yields (model to call on the [uncond; cond] batch, modules whose weights it holds)
# ---------------------------------------------------------------------------------------------


class _AdapterSwitch(nn.Module):
    """Calls a peft-enabled UNet with its adapters switched on or off first (peft LoRA toggling)."""

    def __init__(self, unet: nn.Module, active: bool) -> None:
        super().__init__()
        self.unet, self.active = unet, active

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.unet.enable_adapters() if self.active else self.unet.disable_adapters()
        return self.unet(*args, **kwargs)


@contextmanager
def _peft_lora(unet: nn.Module, deltas: dict[str, LowRank], rank: int) -> Iterator[nn.Module]:
    """The same LoRA loaded into `unet` through diffusers' peft integration; unloaded afterwards."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(deltas), init_lora_weights=False), "npo")
    for name, delta in deltas.items():
        layer = unet.get_submodule(name)
        layer.lora_A["npo"].weight.data.copy_(delta.down.reshape(layer.lora_A["npo"].weight.shape))
        layer.lora_B["npo"].weight.data.copy_(delta.up.reshape(layer.lora_B["npo"].weight.shape))
    try:
        yield unet
    finally:
        unet.unload_lora()


@contextmanager
def row_model(row: str, unet: nn.Module, deltas: dict[str, LowRank], rank: int) -> Iterator[tuple[nn.Module, list[nn.Module]]]:
    if row == "plain":
        yield unet, [unet]
    elif row == "plain_fused_qkv":  # diffusers' own q/k/v (and k/v) fusion: concatenated weight copies
        unet.fuse_qkv_projections()
        try:
            yield unet, [unet]
        finally:
            unet.unfuse_qkv_projections()  # puts the processors back but keeps the fused copies: drop them
            for module in unet.modules():
                for name in ("to_qkv", "to_kv"):
                    if name in module._modules:
                        del module._modules[name]
                if hasattr(module, "fused_projections"):
                    module.fused_projections = False
    elif row == "two_unets":
        theta_u = uncond_unet(unet, deltas)
        yield TwoPassCFG(unet, theta_u), [unet, theta_u]
        del theta_u
    elif row in ("npo_lowrank", "npo_stacked"):
        with enable_npo(unet, deltas, mode="cfg", path=row.removeprefix("npo_"), backend="torch"):
            yield unet, [unet]
    elif row in ("npo_fused", "npo_auto"):  # every layer fused / fused where it wins for the shape
        with enable_npo(unet, deltas, mode="cfg", path="lowrank", backend=row.removeprefix("npo_")):
            yield unet, [unet]
    elif row == "npo_auto_ungrouped":  # auto without grouped q/k/v launches: every layer on its own
        with enable_npo(unet, deltas, mode="cfg", path="lowrank", backend="auto", group_inputs=False):
            yield unet, [unet]
    elif row in ("npo_auto_widened", "npo_auto_unwidened", "npo_auto_no_store", "npo_auto_widened_no_store"):
        # widened: the widened norms serve eager calls too; unwidened: no widened norms (npo_auto: CUDA-graph
        # captures only); no_store: without the output stores
        widened = {"npo_auto_widened": True, "npo_auto_widened_no_store": True,
                   "npo_auto_unwidened": False}.get(row, "graphs")
        with enable_npo(unet, deltas, mode="cfg", path="lowrank", backend="auto", widened_norms=widened,
                        fused_out="no_store" not in row):
            yield unet, [unet]
    elif row == "peft_toggle":
        with _peft_lora(unet, deltas, rank):
            yield TwoPassCFG(_AdapterSwitch(unet, False), _AdapterSwitch(unet, True)), [unet]
    elif row == "peft_both":
        with _peft_lora(unet, deltas, rank):
            yield unet, [unet]
    elif row == "peft_mixed":
        from peft.tuners.lora import LoraLayer

        def adapter_names(module, args, kwargs):
            return args, {**kwargs, "adapter_names": ["npo", "__base__"]}

        with _peft_lora(unet, deltas, rank):
            hooks = [m.register_forward_pre_hook(adapter_names, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
            try:
                yield unet, [unet]
            finally:
                for hook in hooks:
                    hook.remove()
    else:
        raise ValueError(f"unknown row {row!r}: use {', '.join(ROWS)}")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median wall time of fn() in ms: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def capture_graph(step: Callable[[], torch.Tensor]) -> torch.cuda.CUDAGraph:
    """Capture step() in a CUDA graph (after warming it up on a side stream, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def run_row(row: str, unet: nn.Module, deltas: dict, rank: int, inputs: dict, args: argparse.Namespace, reference) -> dict:
    device = unet.device
    result: dict[str, Any] = {"row": row}
    _reset_memory(device)
    try:
        with row_model(row, unet, deltas, rank) as (model, holders):
            _measure(model, holders, inputs, args, reference, result)
    except Exception as exc:  # a row that cannot even be set up (e.g. no fused kernel) is a result too
        result["setup_error"] = _one_line(exc)
    _reset_memory(device)
    return result


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def _measure(model: nn.Module, holders: list[nn.Module], inputs: dict, args: argparse.Namespace, reference, result: dict) -> None:
    """Fill `result` with eager and CUDA-graph timings, memory and the error against the reference."""
    device = holders[0].device
    result["weights_mb"] = weight_bytes(*holders) / 2**20

    def step() -> torch.Tensor:
        return cfg_combine(model(**inputs, return_dict=False)[0], GUIDANCE)

    try:
        out = step()
        result["eager_ms"] = median_ms(step, args.warmup, args.iters, device)
        result["peak_eager_mb"] = _peak_mb(device)
        result["output"] = out
        if reference is not None and result["row"] != "peft_both":
            result["err_vs_two_unets"] = _max_rel_err(out, reference)
    except Exception as exc:  # a row that cannot run is a result, not a crash
        result["eager_error"] = _one_line(exc)
    if device.type != "cuda" or args.no_graphs:
        return
    _reset_memory(device)
    try:
        graph = capture_graph(step)
        result["graph_ms"] = median_ms(graph.replay, args.warmup, args.iters, device)
        result["peak_graph_mb"] = _peak_mb(device)
        del graph
    except Exception as exc:  # e.g. peft's mixed batch copies index lists to the GPU mid-capture
        result["graph_error"] = _one_line(exc)
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[dict]) -> str:
    head = (
        "| model | NPO LoRA | row | eager ms | x plain | graph ms | x plain | weights MB | extra weights % "
        "| peak eager MB | peak graph MB | err vs two_unets | note |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        note = "; ".join(x for x in (r.get("setup_error"), r.get("eager_error"), r.get("graph_error")) if x)
        lines.append(
            f"| {r['model']} | {r['lora']} | {r['row']} | {_fmt(r.get('eager_ms'))} | {_fmt(r.get('eager_x_plain'), '.3f')} "
            f"| {_fmt(r.get('graph_ms'))} | {_fmt(r.get('graph_x_plain'), '.3f')} | {_fmt(r.get('weights_mb'), '.0f')} "
            f"| {_fmt(r.get('extra_weights_pct'), '.1f')} "
            f"| {_fmt(r.get('peak_eager_mb'), '.0f')} | {_fmt(r.get('peak_graph_mb'), '.0f')} "
            f"| {_fmt(r.get('err_vs_two_unets'), '.1e')} | {note} |"
        )
    return "\n".join(lines)


def environment(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    import diffusers
    import peft

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "iters": args.iters,
        "warmup": args.warmup,
        "cuda_graphs": device.type == "cuda" and not args.no_graphs,
        "smoke": args.smoke,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma list of: sd15, sdxl")
    parser.add_argument("--lora", default="attn-r8,all-r64", help="comma list of: " + ", ".join(LORAS))
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--no-graphs", action="store_true", help="eager timings only")
    parser.add_argument("--json", type=Path, default=None, help="output JSON path (default: $OUT/cfg_step.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, fp32, CPU, 1 iteration: checks the script runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.smoke:
        device, dtype, configs = torch.device("cpu"), torch.float32, SMOKE_UNETS
        args.iters, args.warmup = 1, 0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("cfg_step.py times the GPU: no CUDA device here (use --smoke for a CPU check)")
        device, dtype, configs = torch.device("cuda"), {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype], UNETS
    for option, known in (("models", UNETS), ("lora", LORAS), ("rows", ROWS)):
        unknown = set(getattr(args, option).split(",")) - set(known)
        if unknown:
            raise SystemExit(f"unknown --{option} {', '.join(sorted(unknown))}: use {', '.join(known)}")
    rows = [r for r in ROWS if r in args.rows.split(",")]  # two_unets first: it is the reference
    results = []
    with torch.no_grad():
        for model_name in args.models.split(","):
            unet = build_unet(configs[model_name], device, dtype)
            inputs = step_inputs(unet, device, dtype)
            for lora_name in args.lora.split(","):
                coverage, rank = LORAS[lora_name]
                deltas = random_lora(unet, lora_targets(unet, coverage), rank)
                reference = None
                group = []
                for row in rows:
                    print(f"[cfg_step] {model_name} {lora_name} {row}", file=sys.stderr, flush=True)
                    result = run_row(row, unet, deltas, rank, inputs, args, reference)
                    output = result.pop("output", None)
                    if row == "two_unets":
                        reference = output
                    group.append({"model": model_name, "lora": lora_name, "modules": len(deltas), **result})
                plain = next((r for r in group if r["row"] == "plain"), {})
                for r in group:
                    if r.get("weights_mb") is not None and plain.get("weights_mb"):
                        r["extra_weights_pct"] = 100 * (r["weights_mb"] / plain["weights_mb"] - 1)
                    for kind in ("eager", "graph"):
                        if r.get(f"{kind}_ms") is not None and plain.get(f"{kind}_ms"):
                            r[f"{kind}_x_plain"] = r[f"{kind}_ms"] / plain[f"{kind}_ms"]
                results.extend(group)
                del deltas, reference
            del unet, inputs
            _reset_memory(device)
    env = environment(device, dtype, args)
    print(f"\n{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, {env['dtype']}, "
          f"median of {env['iters']} steps after {env['warmup']} warmup\n")
    print(markdown_table(results))
    out_path = args.json or (Path(os.environ["OUT"]) / "cfg_step.json" if os.environ.get("OUT") else None)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"environment": env, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
