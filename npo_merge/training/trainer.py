"""The training loop on accelerate: LoRA NPO/DPO/Self-NPO offsets from a base model, written as a delta file.

    from npo_merge.training.config import TrainOptions, DataOptions
    from npo_merge.training.trainer import train
    result = train(TrainOptions(model="sd15", objective="dpo-npo", data=DataOptions(pairs="pickapic/"),
                                mixed_precision="bf16", batch_size=8, gradient_accumulation=8))

One GPU: `npo-merge train recipe.yaml`; several: `accelerate launch -m npo_merge train recipe.yaml`
(accelerate's own launcher and DDP; batch_size is per device). What the loop does, in accelerate's
idiom: `Accelerator(mixed_precision, gradient_accumulation_steps)`, `prepare`, `accumulate`,
`backward`, `clip_grad_norm_`, trackers (tensorboard when installed), `save_state`/`load_state`.

* Weights: the base UNet and encoders in the mixed-precision dtype, the LoRA parameters in fp32
  (`cast_training_params`), so fp16 runs do not hit "Attempting to unscale FP16 gradients". SDXL's
  VAE stays fp32 unless a replacement VAE is given.
* Seeds: `set_seed(seed, device_specific=True)`: each rank draws its own noise and timesteps; the
  data order is a function of (seed, epoch) shared by all ranks and sharded by accelerate.
* Checkpoints (`checkpoint_every`, and at the end) hold the LoRA (fp32, peft names), optimizer,
  scheduler, grad scaler, every rank's RNG states, the EMA teacher, and the data position
  (epoch, micro-batches consumed); `resume: latest` continues bit-exactly, skipping the seen batches
  with accelerate's `skip_first_batches` (their indices are dropped, nothing is loaded). Each
  checkpoint folder also holds the delta file as it was at that step.
* Validation samples (plain CFG vs CFG + NPO) run on the main process inside `fork_rng`, so they
  never change the training's random stream.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from npo_merge.delta.types import BaseFingerprint
from npo_merge.errors import InputError
from npo_merge.io.atomic import check_output_path
from npo_merge.io.hashing import BackgroundHashes, fingerprint
from npo_merge.training.base_model import BaseModel, load_base_model
from npo_merge.training.checkpoints import TrainState, find_checkpoint, register_lora_checkpointing, save_checkpoint
from npo_merge.training.config import TrainOptions
from npo_merge.training.dpo import dpo_step, pair_batch
from npo_merge.training.encoding import Encoders
from npo_merge.training.encoding_cache import EncodingCache
from npo_merge.training.loader import EpochSampler, cached_dataset, open_dataset, set_epoch
from npo_merge.training.lora import add_lora, lora_factors, lora_parameters
from npo_merge.training.objectives import Objective, get_objective
from npo_merge.training.output import delta_metadata, self_npo_settings, write_delta
from npo_merge.training.reference import ReferenceForward
from npo_merge.training.self_npo import EmaLora, Teacher, image_batch, self_npo_step

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
StepFn = Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class TrainResult:
    """What a run produced: the delta file, the steps done, per-step metrics (main process) and summary lines."""

    out: Path
    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class Trainer:
    """One training run; `run()` does everything and returns a TrainResult."""

    def __init__(self, options: TrainOptions, *, base_dir: Path | None = None, recipe_text: str | None = None,
                 quiet: bool = False, notes: Callable[[str], None] = _stderr,
                 resolve_model: Callable[[str], Path] | None = None):
        options.validate()
        self.options = options
        self.objective: Objective = get_objective(options.objective)
        self.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        self.recipe_text, self.quiet, self.notes = recipe_text, quiet, notes
        self._resolve_model = resolve_model
        self.out = self.path(options.out)
        stem = self.out.name.split(".")[0]
        self.output_dir = self.path(options.output_dir) if options.output_dir else self.out.parent / f"{stem}-run"
        self.size = (options.data.resolution, options.data.resolution)
        self.state = TrainState()
        self.history: list[dict[str, float]] = []
        self.data_metadata: dict[str, str] = {}
        self.num_processes = 1

    # ---------------------------------------------------------------------------------- paths

    def path(self, spec: str) -> Path:
        path = Path(spec).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def model_path(self, spec: str) -> Path:
        local = self.path(spec)
        if local.exists():
            return local
        if self._resolve_model is not None:
            return self._resolve_model(spec)
        from npo_merge.targets import resolve_target

        return resolve_target(spec).path

    # ---------------------------------------------------------------------------------- setup

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        opts = self.options
        tracker = None
        if opts.report_to == "tensorboard" or (opts.report_to == "auto" and _tensorboard_available()):
            if not _tensorboard_available():
                raise InputError("report_to: tensorboard needs the tensorboard package (pip install tensorboard)")
            tracker = "tensorboard"
        try:
            accelerator = Accelerator(
                mixed_precision=opts.mixed_precision, gradient_accumulation_steps=opts.gradient_accumulation,
                cpu=opts.cpu, log_with=tracker,
                project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
            )
        except ValueError as exc:  # accelerate's process-wide state was set up differently earlier
            raise InputError(f"accelerate: {str(exc).splitlines()[0]}") from None
        set_seed(opts.seed, device_specific=True)
        return accelerator

    def _model(self, accelerator: Any, model_path: Path) -> tuple[BaseModel, Encoders, torch.nn.Module]:
        opts = self.options
        base = load_base_model(str(model_path), self.model_path, vae=opts.vae, pipeline_config=opts.pipeline_config)
        dtype = DTYPES[accelerator.mixed_precision]
        vae_dtype = torch.float32 if base.architecture == "sdxl" and opts.vae is None else dtype
        encoders = Encoders(base.pipe, base.architecture, accelerator.device, dtype, vae_dtype)
        unet = base.pipe.unet
        unet.to(accelerator.device, dtype=dtype)
        add_lora(unet, opts.lora)
        if opts.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        return base, encoders, unet

    def _data(self, accelerator: Any, base: BaseModel, encoders: Encoders) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
        from torch.utils.data import DataLoader

        from npo_merge.training.datasets import ImageItemDataset, PairDataset

        opts = self.options
        dataset, lines, self.data_metadata = open_dataset(opts, self.objective, self.path)
        block_ids = dataset.block_ids() if isinstance(dataset, PairDataset) else None
        if opts.data.cache and isinstance(dataset, ImageItemDataset):
            cache = EncodingCache(self.path(opts.data.cache), f"{fingerprint(base.path)}:{encoders.identity}")
            description = json.dumps({"data": self.data_metadata.get("train_data"), "pairs": opts.data.pairs,
                                      "split": opts.data.split, "images": opts.data.images, "keep_ties": opts.data.keep_ties})
            dataset, note = cached_dataset(dataset, cache, description, encode_images=encoders.latent_dist,
                                           encode_captions=encoders.text, is_main=accelerator.is_main_process,
                                           barrier=accelerator.wait_for_everyone)
            lines.append(note)
            block_ids = None
        per_step = opts.batch_size * accelerator.num_processes
        if len(dataset) < per_step:
            raise InputError(f"the data has {len(dataset)} items, fewer than one batch ({opts.batch_size} x "
                             f"{accelerator.num_processes} processes); lower batch_size")
        if accelerator.is_main_process:
            for line in lines:
                self.notes(line)
        sampler = EpochSampler(len(dataset), opts.seed, block_ids)
        self.sampler, self.sampler_dataset = sampler, dataset
        # its own generator: a DataLoader draws a base seed per epoch, which must not come from the global RNG
        # (the noise stream), or a resumed run would draw it at a different point than an uninterrupted one
        loader = DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.data.num_workers,
                            drop_last=True, persistent_workers=opts.data.num_workers > 0,
                            generator=torch.Generator().manual_seed(opts.seed))
        return loader, sampler

    def _optimizer(self, accelerator: Any, unet: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        from diffusers.optimization import get_scheduler

        opt = self.options.optim
        optimizer = torch.optim.AdamW(lora_parameters(unet), lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2),
                                      weight_decay=opt.weight_decay, eps=opt.adam_epsilon)
        try:
            # accelerate steps a prepared scheduler once per process per optimizer step (split_batches=False)
            scheduler = get_scheduler(opt.scheduler, optimizer, num_warmup_steps=opt.warmup_updates * accelerator.num_processes,
                                      num_training_steps=self.options.updates * accelerator.num_processes)
        except ValueError as exc:
            raise InputError(f"optim.scheduler: {str(exc).splitlines()[0]}") from None
        return optimizer, scheduler

    def _write_delta(self, out: Path, unet: torch.nn.Module, base: BaseModel, hashes: BackgroundHashes | None) -> Path:
        sha = hashes.result(base.path) if hashes is not None else None
        metadata = delta_metadata(self.options, self.objective, BaseFingerprint(base.architecture, sha, base.path.name),
                                  updates=self.state.step, processes=self.num_processes, data=self.data_metadata,
                                  recipe_text=self.recipe_text)
        return write_delta(out, unet, self.options, base.architecture, metadata)

    # ---------------------------------------------------------------------------------- the loop

    def _check_inputs(self) -> Path:
        """Resolve the model and fail before loading anything when a data path or the output is unusable."""
        for key in ("pairs", "images", "captions"):
            spec = getattr(self.options.data, key)
            if spec and self.objective.data == ("pairs" if key == "pairs" else "captions") and not self.path(spec).exists():
                raise InputError(f"data.{key}: {self.path(spec)} does not exist")
        model = self.model_path(self.options.model)
        check_output_path(self.out, [model])
        return model

    def run(self) -> TrainResult:
        opts = self.options
        model_path = self._check_inputs()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        accelerator = self._accelerator()
        self.num_processes = accelerator.num_processes
        base, encoders, unet = self._model(accelerator, model_path)
        with ExitStack() as stack:
            hashes = stack.enter_context(BackgroundHashes([base.path])) if accelerator.is_main_process else None
            loader, sampler = self._data(accelerator, base, encoders)
            optimizer, lr_scheduler = self._optimizer(accelerator, unet)
            params = lora_parameters(unet)
            ema = None
            if self.objective.name == "self-npo" and opts.self_npo.teacher == "ema":
                ema = EmaLora(params, opts.self_npo.ema_decay)
            model, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
            unet = accelerator.unwrap_model(model)
            register_lora_checkpointing(accelerator, unet, [self.state] + ([ema] if ema is not None else []),
                                        on_save=lambda folder: self._write_delta(folder / self.out.name, unet, base, hashes))
            if opts.resume:
                checkpoint = find_checkpoint(self.output_dir, opts.resume, self.base_dir)
                if checkpoint is None and accelerator.is_main_process:
                    self.notes(f"resume: no checkpoint in {self.output_dir / 'checkpoints'} yet; starting a new run")
                elif checkpoint is not None:
                    accelerator.load_state(str(checkpoint))
                    if accelerator.is_main_process:
                        self.notes(f"resumed from {checkpoint} at step {self.state.step}")
            if accelerator.is_main_process:
                accelerator.init_trackers("npo_merge_train", config=_flat_config(opts.as_dict()))
            step_fn = self._step_function(model, unet, encoders, base, ema)
            self._loop(accelerator, model, optimizer, loader, lr_scheduler, params, step_fn, ema, base, unet)
            accelerator.wait_for_everyone()
            lines = []
            if accelerator.is_main_process:
                self._write_delta(self.out, unet, base, hashes)
                lines.append(f"wrote {self.out} ({self.objective.role} {self.objective.name} LoRA, rank {opts.lora.rank}, "
                             f"{len(lora_factors(unet))} modules, {self.state.step} updates)")
            accelerator.end_training()
        return TrainResult(self.out, self.output_dir, self.state.step, self.history, lines)

    def _step_function(self, model: torch.nn.Module, unet: torch.nn.Module, encoders: Encoders, base: BaseModel,
                       ema: EmaLora | None) -> tuple[StepFn, Callable[[], ContextManager[Any]]]:
        """(batch -> (loss, metrics), the context to hold open over that call and its backward)."""
        from diffusers import DDPMScheduler

        opts = self.options
        scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
        if self.objective.data == "pairs":
            reference = ReferenceForward(opts.ref_forward, model, unet)
            reverse = self.objective.reverse

            def pairs_step(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                loss, stats = dpo_step(reference, pair_batch(batch, encoders, self.size), scheduler, opts.dpo, reverse=reverse)
                return loss, {"implicit_acc": stats.implicit_accuracy, "margin": stats.margin.mean(),
                              "model_mse": stats.model_mse, "ref_mse": stats.ref_mse}

            return pairs_step, reference.context
        settings = self_npo_settings(opts, base.architecture)
        teacher = Teacher(unet, ema)
        factor = 2 ** (len(base.pipe.vae.config.block_out_channels) - 1)
        latent_shape = (unet.config.in_channels, self.size[0] // factor, self.size[1] // factor)

        def self_npo(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            inputs = image_batch(batch, encoders, self.size, settings.uncond)
            return self_npo_step(model, teacher, inputs, scheduler, settings, latent_shape)

        return self_npo, nullcontext

    def _loop(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, loader: Any, lr_scheduler: Any,
              params: list[torch.nn.Parameter], step: tuple[StepFn, Callable[[], ContextManager[Any]]],
              ema: EmaLora | None, base: BaseModel, unet: torch.nn.Module) -> None:
        from tqdm.auto import tqdm

        opts = self.options
        compute, context = step
        bar = tqdm(total=opts.updates, initial=self.state.step, desc=f"train {self.objective.name}", unit="step",
                   disable=self.quiet or not accelerator.is_main_process, dynamic_ncols=True, leave=False)
        totals: dict[str, torch.Tensor] = {}
        micro = 0
        try:
            while self.state.step < opts.updates:
                set_epoch(loader, self.state.epoch, self.sampler, self.sampler_dataset)
                batches = accelerator.skip_first_batches(loader, self.state.batch_in_epoch) if self.state.batch_in_epoch else loader
                for batch in batches:
                    self.state.batch_in_epoch += 1
                    with accelerator.accumulate(model):
                        with accelerator.autocast(), context():
                            loss, metrics = compute(batch)
                            accelerator.backward(loss)
                        if accelerator.sync_gradients and opts.optim.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, opts.optim.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    for key, value in {"loss": loss.detach(), **metrics}.items():
                        totals[key] = totals.get(key, 0) + value.detach().float()
                    micro += 1
                    if not accelerator.sync_gradients:
                        continue
                    self.state.step += 1
                    if ema is not None:
                        ema.update()
                    self._log(accelerator, totals, micro, lr_scheduler, bar)
                    totals, micro = {}, 0
                    if self.state.step == opts.updates or (opts.checkpoint_every and self.state.step % opts.checkpoint_every == 0):
                        save_checkpoint(accelerator, self.output_dir, self.state.step, self.options.keep_checkpoints)
                    if opts.validation.every and self.state.step % opts.validation.every == 0:
                        self._validate(accelerator, base, unet)
                    if self.state.step >= opts.updates:
                        break
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    continue
                break
        finally:
            bar.close()

    def _log(self, accelerator: Any, totals: dict[str, torch.Tensor], micro: int, lr_scheduler: Any, bar: Any) -> None:
        names = sorted(totals)
        means = accelerator.reduce(torch.stack([totals[k] for k in names]) / micro, reduction="mean")
        metrics = dict(zip(names, means.tolist()))
        metrics["lr"] = float(lr_scheduler.get_last_lr()[0])
        if not all(math.isfinite(v) for v in metrics.values()):
            self.notes(f"warning: non-finite metrics at step {self.state.step}: {metrics}")
        if accelerator.is_main_process:
            self.history.append({"step": self.state.step, **metrics})
            if self.state.step % self.options.log_every == 0 or self.state.step == self.options.updates:
                accelerator.log(metrics, step=self.state.step)
                with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": self.state.step, **metrics}) + "\n")
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "implicit_acc") if k in metrics}
        bar.set_postfix(shown, refresh=False)
        bar.update(1)

    def _validate(self, accelerator: Any, base: BaseModel, unet: torch.nn.Module) -> None:
        from npo_merge.training.validation import write_validation_samples

        if accelerator.is_main_process:
            opts = self.options.validation
            size = (opts.resolution, opts.resolution) if opts.resolution else self.size
            out = self.output_dir / "samples" / f"step-{self.state.step:06d}"
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), accelerator.autocast():
                unet.eval()
                try:
                    write_validation_samples(base.pipe, unet, self.objective.role, opts, size, out)
                finally:
                    unet.train()
            self.notes(f"step {self.state.step}: validation samples in {out}")
        accelerator.wait_for_everyone()


def _flat_config(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as flat scalar entries for trackers (tensorboard hparams take scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(options: TrainOptions, *, base_dir: Path | None = None, recipe_text: str | None = None, quiet: bool = False,
          notes: Callable[[str], None] = _stderr) -> TrainResult:
    """Train the offset `options` describe and write it to `options.out` (see the module docstring)."""
    return Trainer(options, base_dir=base_dir, recipe_text=recipe_text, quiet=quiet, notes=notes).run()
