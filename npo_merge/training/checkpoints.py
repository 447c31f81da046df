"""Training checkpoints through accelerate: the adapter only (not the frozen UNet), plus the run's position.

`accelerator.save_state` already stores the optimizer, the LR scheduler, the grad scaler and every
rank's RNG states; the hooks registered here replace its full-model save with the LoRA tensors
(fp32, peft names, `lora_state.safetensors`) and let the caller add files (the delta as of that step),
and `TrainState` (registered for checkpointing) records where the data stream stood, so a resumed
run skips exactly the micro-batches it has already trained on.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from npo_merge.errors import InputError
from npo_merge.training.lora import load_lora_state_dict, lora_state_dict

LORA_STATE = "lora_state.safetensors"
PREFIX = "step-"


@dataclass
class TrainState:
    """Where the run is: optimizer updates done, epoch, micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"{PREFIX}{step:06d}"


def find_checkpoint(output_dir: Path, resume: str, base_dir: Path) -> Path | None:
    """The checkpoint folder `resume` names: "latest" (None when there is none yet) or a path."""
    if resume == "latest":
        folders = sorted((output_dir / "checkpoints").glob(f"{PREFIX}*"))
        return folders[-1] if folders else None
    path = Path(resume).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not (path / LORA_STATE).is_file():
        raise InputError(f"resume: {path} is not a training checkpoint (no {LORA_STATE})")
    return path


def register_lora_checkpointing(accelerator: Any, unet: torch.nn.Module, objects: list[Any],
                                on_save: Callable[[Path], None] | None = None) -> None:
    """Make accelerator.save_state/load_state handle `unet`'s adapter (not its frozen weights) and `objects`.

    objects: anything with state_dict/load_state_dict (TrainState, an EMA); on_save(folder) runs on the
    main process after the adapter is written.
    """
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            save_file(lora_state_dict(unet), str(Path(output_dir) / LORA_STATE))
            if on_save is not None:
                on_save(Path(output_dir))

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        load_lora_state_dict(unet, load_file(str(Path(input_dir) / LORA_STATE)))  # copied onto the params' device

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    for obj in objects:
        accelerator.register_for_checkpointing(obj)


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int | None = None) -> Path:
    """accelerator.save_state into checkpoints/step-NNNNNN; with `keep`, delete all but the newest `keep`."""
    folder = checkpoint_folder(output_dir, step)
    accelerator.save_state(str(folder))
    if keep and accelerator.is_main_process:
        for old in sorted((output_dir / "checkpoints").glob(f"{PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder
