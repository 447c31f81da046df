"""Write real-size single-file checkpoints with random weights, streamed (low RAM), for benchmarks.

    python benchmarks/synth.py sd1 out.safetensors [--dtype fp16] [--unet-only]

Shapes come from the published configs (npo_merge.configs) built on the meta device; names from our
single-file tables; values are seeded random normals scaled like real weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from npo_merge import configs
from npo_merge.io.keymap.tables import ldm_table
from npo_merge.io.safetensors_stream import SafetensorsWriter, TensorSpec

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def canonical_shapes(architecture: str, unet_only: bool = False) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name of the real-size model with its shape."""
    with torch.device("meta"):
        models = {"unet": configs.build_unet(architecture)}
        if not unet_only:
            for index, encoder in enumerate(configs.build_text_encoders(architecture)):
                models["text_encoder" if index == 0 else "text_encoder_2"] = encoder
            models["vae"] = configs.build_vae()
    shapes = {}
    for component, model in models.items():
        for key, value in model.state_dict().items():
            if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection")):
                key = f"text_model.{key}"
            if key.endswith("position_ids"):
                continue
            shapes[f"{component}.{key}"] = tuple(value.shape)
    return shapes


def native_specs(architecture: str, dtype: torch.dtype, unet_only: bool = False) -> list[TensorSpec]:
    """The single-file tensors (LDM/SGM names, native shapes) in sorted order."""
    table = ldm_table(architecture)
    specs: dict[str, TensorSpec] = {}
    for name, shape in canonical_shapes(architecture, unet_only).items():
        link = table.link_for_canonical(name)
        if link.native in specs:
            continue
        native = {"split3": (3 * shape[0], *shape[1:]), "squeeze": (*shape, 1, 1), "transpose": shape[::-1]}.get(
            link.transform, shape)
        specs[link.native] = TensorSpec(link.native, dtype, tuple(native))
    return [specs[name] for name in sorted(specs)]


def write_random_checkpoint(path: Path, architecture: str, dtype: torch.dtype = torch.float16, *,
                            unet_only: bool = False, seed: int = 0) -> Path:
    """Stream a random real-size checkpoint to `path` (one tensor in memory at a time)."""
    specs = native_specs(architecture, dtype, unet_only)
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path, specs, {"format": "pt", "npo_merge.synthetic": "random weights"}) as writer:
        for spec in specs:
            fan_in = max(1, int(torch.tensor(spec.shape[1:]).prod().item()) if len(spec.shape) > 1 else 1)
            tensor = torch.randn(spec.shape, generator=gen) * (fan_in ** -0.5)
            writer.write(spec.name, tensor.to(dtype))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(configs.UNET))
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--unet-only", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_random_checkpoint(args.out, args.architecture, DTYPES[args.dtype], unet_only=args.unet_only, seed=args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
