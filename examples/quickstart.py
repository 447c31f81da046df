"""Quick start with no downloads: build a tiny SD1.5-architecture checkpoint and a kohya LoRA, then
inspect both with npo-merge, the way you would inspect DreamShaper 8 and a LoRA from CivitAI.

    python examples/quickstart.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from npo_merge import tiny
from npo_merge.cli import main as npo_merge
from npo_merge.io.lora import kohya_name
from npo_merge.io.safetensors_stream import save_tensors


def write_kohya_lora(path: Path, rank: int = 4) -> Path:
    """A rank-`rank` kohya LoRA on every attention projection of the tiny SD1.5 UNet."""
    unet = tiny.tiny_models("sd1")["unet"]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = kohya_name("sd1", f"unet.{name}")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.1
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_tensors(path, tensors, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    return path


def run(out: Path) -> int:
    checkpoint = tiny.write_single_file(out / "tiny-sd15.safetensors", "sd1", dtype=torch.float16)
    lora = write_kohya_lora(out / "tiny-lora.safetensors")
    for path in (checkpoint, lora):
        print(f"$ npo-merge inspect {path}")
        code = npo_merge(["inspect", str(path)])
        if code:
            return code
        print()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the files (default: a temporary folder)")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        raise SystemExit(run(args.out))
    with tempfile.TemporaryDirectory() as folder:
        raise SystemExit(run(Path(folder)))
