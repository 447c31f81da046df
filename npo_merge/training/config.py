"""Training options as one typed dataclass tree: the YAML recipe, `--set key=value` and library calls share it.

A train recipe is a YAML mapping with a top-level `train:` key (merge recipes have `steps:`):

    version: 1
    train:
      model: sd15
      objective: dpo-npo
      out: sd15-npo.safetensors
      data: {pairs: pickapic/, resolution: 512}
      dpo: {beta: 500, convention: diffusers}

Every key is a field of `TrainOptions` or of one of its sections (`data`, `lora`, `optim`, `dpo`,
`self_npo`, `validation`); `--set dpo.beta=1000` addresses the same tree with dotted keys. Values
are parsed as YAML and then checked against the field's type, so `--set updates=10`,
`--set lora.targets=[to_q,to_v]` and `--set optim.lr=1e-5` all do what they say (YAML 1.1 reads
`1e-5` as a string; float fields accept it). An unknown key or a value of the wrong type is a
one-line InputError naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from npo_merge.errors import InputError

RECIPE_VERSION = 1
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class DataOptions:
    """Where the training data is and how it is read (paths are relative to the recipe file)."""

    pairs: str | None = None  # Pick-a-Pic parquet/arrow file or folder, or a .jsonl of pairs (dpo, dpo-npo)
    split: str | None = None  # which split of a folder holding several (train, test, ...)
    images: str | None = None  # a folder of images with .txt captions (self-npo)
    captions: str | None = None  # a .txt (one per line) or .jsonl file of captions (self-npo without images)
    resolution: int = 512
    random_flip: bool = False
    keep_ties: bool = False  # keep label-0.5 pairs the way the official scripts did (see objectives.py)
    cache: str | None = None  # a folder for cached VAE latents and text embeddings
    num_workers: int = 0


@dataclass
class LoraOptions:
    """The trained adapter: peft LoRA on the modules whose names end with one of `targets`."""

    rank: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))  # e.g. add conv1, conv2, proj_in
    init: Literal["gaussian", "default"] = "gaussian"  # peft init_lora_weights; B = 0 either way


@dataclass
class OptimOptions:
    """AdamW on the LoRA parameters and a diffusers learning-rate schedule."""

    lr: float = 5e-6
    scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    warmup_updates: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class DpoOptions:
    """Diffusion-DPO / DPO-NPO loss settings (see npo_merge.training.losses for the beta conventions)."""

    beta: float = 500.0
    convention: Literal["diffusers", "official"] = "diffusers"
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid"


@dataclass
class SelfNpoOptions:
    """Self-NPO settings; None means the paper's value for the architecture (objectives.PAPER_SELF_NPO)."""

    teacher: Literal["ema", "base"] = "ema"
    w: float | None = None
    uncond: Literal["empty-prompt", "zeros"] | None = None
    ema_decay: float = 0.999
    num_ddim_steps: int = 25
    teacher_steps: int = 5
    huber_c: float = 1e-3


@dataclass
class ValidationOptions:
    """A sample grid every `every` optimizer updates (0: never): plain CFG vs CFG + the trained offset."""

    every: int = 0
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    resolution: int | None = None  # default: data.resolution


@dataclass
class TrainOptions:
    """Everything `npo-merge train` and `npo_merge.training.trainer.train` take."""

    model: str
    objective: Literal["dpo", "dpo-npo", "self-npo"] = "dpo-npo"
    out: str = "npo-lora.safetensors"
    output_dir: str | None = None  # checkpoints, logs, samples; default "<out stem>-run" beside out
    layout: Literal["diffusers", "kohya"] = "diffusers"
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    updates: int = 2000  # optimizer updates (max_train_steps in the diffusers scripts)
    batch_size: int = 1  # pairs (or images) per device per micro-batch
    gradient_accumulation: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ref_forward: Literal["separate", "batched"] = "separate"  # see training/reference.py; train_step.py measures both
    seed: int = 0
    checkpoint_every: int = 500  # updates; 0: only the final state
    keep_checkpoints: int | None = None
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 1
    report_to: Literal["auto", "tensorboard", "none"] = "auto"
    cpu: bool = False
    vae: str | None = None  # a replacement VAE (diffusers folder or Hub id), e.g. an fp16-safe SDXL VAE
    pipeline_config: str | None = None  # for single-file models: diffusers folder/repo with configs and tokenizers
    data: DataOptions = field(default_factory=DataOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    dpo: DpoOptions = field(default_factory=DpoOptions)
    self_npo: SelfNpoOptions = field(default_factory=SelfNpoOptions)
    validation: ValidationOptions = field(default_factory=ValidationOptions)

    def validate(self) -> None:
        """Reject settings that cannot work together, with a message naming the option."""
        positive = {"updates": self.updates, "batch_size": self.batch_size, "gradient_accumulation": self.gradient_accumulation,
                    "lora.rank": self.lora.rank, "data.resolution": self.data.resolution, "log_every": self.log_every}
        for key, value in positive.items():
            if value <= 0:
                raise InputError(f"{key} must be positive, got {value}")
        if self.data.resolution % 8:
            raise InputError(f"data.resolution must be a multiple of 8 (the VAE's factor), got {self.data.resolution}")
        if not self.lora.targets:
            raise InputError("lora.targets is empty: name the modules to train, e.g. [to_q, to_k, to_v, to_out.0]")
        if self.objective in ("dpo", "dpo-npo"):
            if not self.data.pairs:
                raise InputError(f"objective {self.objective} needs data.pairs (Pick-a-Pic parquet/arrow or a JSONL of pairs)")
        elif not (self.data.images or self.data.captions):
            raise InputError("objective self-npo needs data.images (captioned image folder) or data.captions (a caption file)")
        if self.validation.every and not self.validation.prompts:
            raise InputError("validation.every is set but validation.prompts is empty")

    def as_dict(self) -> dict[str, Any]:
        """The options as plain data (for provenance and trackers)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Building options from mappings, with types checked
# --------------------------------------------------------------------------------------------


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` checked (and, where lossless, converted) against the type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except InputError:
                continue
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list):
            return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(items)]
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif _is_dataclass_type(hint):
        if isinstance(value, dict):
            return _build(hint, value, key)
    raise InputError(f"option {key} must be {_describe(hint)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise InputError(f"unknown option {where}{unknown[0]}; {prefix or 'train'} options are {', '.join(hints)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise InputError(f"missing option {', '.join(missing)}") from None


def options_from_mapping(data: dict[str, Any]) -> TrainOptions:
    """TrainOptions from the `train:` mapping of a recipe (unknown keys and wrong types are InputErrors)."""
    if not isinstance(data, dict):
        raise InputError("the train section must be a mapping of options")
    return _build(TrainOptions, data, "")


def set_option(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a recipe mapping in place; the key must name a TrainOptions field."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--set needs key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    cls: Any = TrainOptions
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            section = ".".join(parts[:depth]) or "train"
            raise InputError(f"--set {key}: unknown option {part!r}; {section} options are {', '.join(hints)}")
        hint = hints[part]
        if depth == len(parts) - 1:
            node[part] = value
            return
        if not _is_dataclass_type(hint):
            raise InputError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a section")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise InputError(f"--set {key}: {'.'.join(parts[:depth + 1])} must be a mapping")
        cls, node = hint, child


@dataclass
class TrainRecipe:
    """A parsed train recipe: its options, text (kept as provenance) and folder (relative paths start there)."""

    options: TrainOptions
    text: str
    base_dir: Path
    path: Path | None = None


def is_train_recipe(data: Any) -> bool:
    """Whether parsed YAML is a train recipe (top-level `train:`) rather than a merge recipe (`steps:`)."""
    return isinstance(data, dict) and "train" in data


def load_train_recipe(path: str | os.PathLike[str], overrides: list[str] = ()) -> TrainRecipe:
    """Parse a train recipe, apply `--set` overrides and check the result."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not is_train_recipe(data):
        hint = " (it looks like a merge recipe: run it with `npo-merge merge`)" if isinstance(data, dict) and "steps" in data else ""
        raise InputError(f"{path}: a train recipe is a mapping with a top-level 'train:' section{hint}")
    extra = sorted(set(data) - {"train", "version"})
    if extra:
        raise InputError(f"{path}: unknown top-level key {extra[0]!r}; a train recipe has version and train")
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise InputError(f"{path}: recipe version {data.get('version')!r} is not supported (this tool reads {RECIPE_VERSION})")
    train = data["train"] if isinstance(data["train"], dict) else {}
    for assignment in overrides:
        set_option(train, assignment)
    try:
        options = options_from_mapping(train)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    options.validate()
    return TrainRecipe(options, text, path.resolve().parent, path)
