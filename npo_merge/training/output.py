"""The trained offset as a delta file: LoRA factors in diffusers or kohya layout, with the run's provenance.

Metadata (all strings, "npo_merge." prefixed, via delta.files.provenance): role (negative for dpo-npo
and self-npo, positive for dpo), base architecture, sha256 and name, the objective, its
hyperparameters (beta and its convention, or the Self-NPO settings), LoRA rank/alpha/targets, the
learning rate, total batch, updates done, the data summary (pairs, ties dropped), every option as
JSON and, when the run came from a recipe, the recipe text.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from npo_merge.delta.files import LOWRANK, provenance
from npo_merge.delta.types import BaseFingerprint
from npo_merge.io.lora_writer import write_lora
from npo_merge.training.config import TrainOptions
from npo_merge.training.lora import lora_factors
from npo_merge.training.objectives import PAPER_SELF_NPO, Objective, SelfNpoSettings

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def self_npo_settings(options: TrainOptions, architecture: str) -> SelfNpoSettings:
    """The Self-NPO settings of a run: the options, with the paper's values where they are None."""
    paper = PAPER_SELF_NPO["sdxl" if architecture == "sdxl" else "sd1"]
    opts = options.self_npo
    return SelfNpoSettings(
        w=paper.w if opts.w is None else opts.w, uncond=opts.uncond or paper.uncond,
        num_ddim_steps=opts.num_ddim_steps, teacher_steps=opts.teacher_steps, huber_c=opts.huber_c,
        ema_decay=opts.ema_decay,
    )


def delta_metadata(options: TrainOptions, objective: Objective, base: BaseFingerprint, *, updates: int,
                   processes: int, data: dict[str, str], recipe_text: str | None = None) -> dict[str, str]:
    """The provenance entries of a trained delta (see the module docstring)."""
    extra: dict[str, str] = {
        "objective": objective.name, "train_updates": str(updates), "lora_rank": str(options.lora.rank),
        "lora_alpha": f"{options.lora.alpha:g}", "lora_targets": json.dumps(list(options.lora.targets)),
        "learning_rate": f"{options.optim.lr:g}", "lr_scheduler": options.optim.scheduler,
        "batch_size_total": str(options.batch_size * options.gradient_accumulation * processes),
        "resolution": str(options.data.resolution), "mixed_precision": options.mixed_precision,
        "seed": str(options.seed), "train_options": json.dumps(options.as_dict(), sort_keys=True), **data,
    }
    if objective.data == "pairs":
        extra.update(dpo_beta=f"{options.dpo.beta:g}", dpo_beta_convention=options.dpo.convention,
                     dpo_loss=options.dpo.loss_type)
    else:
        extra.update(self_npo=json.dumps(asdict(self_npo_settings(options, base.architecture))),
                     self_npo_teacher=options.self_npo.teacher)
    if recipe_text is not None:
        extra["recipe"] = recipe_text
    return provenance(LOWRANK, objective.role, base, extra)


def write_delta(out: Path, unet: torch.nn.Module, options: TrainOptions, architecture: str,
                metadata: dict[str, str]) -> Path:
    """Write the UNet's adapter to `out` in the options' layout and save dtype."""
    return write_lora(out, lora_factors(unet), layout=options.layout, architecture=architecture, metadata=metadata,
                      dtype=SAVE_DTYPES[options.save_dtype])
