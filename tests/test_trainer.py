"""The trainer end to end on a tiny SD1.5-structure pipeline, on the CPU through accelerate.

The tiny pipeline of npo_merge.tiny has 0.05-scaled random weights everywhere (GroupNorm gains
included), which wash out image content and learn nothing in a few steps. For the learning tests
its UNet and VAE are re-initialised from their own configs with the libraries' default init, and
the VAE's posterior is made near-deterministic (logvar bias -20) and its latents unit-scaled
(scaling_factor 4), as a real SD VAE's are. The synthetic pairs prefer a clean bright scene over a
dark grainy copy of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from npo_merge import enable_npo, load_pipeline
from npo_merge.cli import main
from npo_merge.delta.files import open_delta
from npo_merge.guidance.install import set_branch_mode
from npo_merge.io.hashing import fingerprint
from npo_merge.tiny import tiny_pipeline_folder
from npo_merge.training import datasets
from npo_merge.training.config import ATTENTION_TARGETS, DataOptions, DpoOptions, LoraOptions, OptimOptions, TrainOptions
from npo_merge.training.datasets import PairDataset
from npo_merge.training.dpo import pair_batch, dpo_step
from npo_merge.training.encoding import Encoders
from npo_merge.training.loader import EpochSampler, set_epoch
from npo_merge.training.lora import add_lora, load_lora_state_dict, lora_parameters
from npo_merge.training.pair_sources import open_pair_jsonl
from npo_merge.training.reference import ReferenceForward, adapters_disabled, lora_on_first_half
from npo_merge.training.synthetic import write_brightness_pairs, write_captioned_images
from npo_merge.training.checkpoints import LORA_STATE
from npo_merge.training.trainer import train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TARGETS = [*ATTENTION_TARGETS, "conv_out"]  # attention projections plus a conv layer
SIZE = 32


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("train")
    model = tiny_pipeline_folder(root / "tiny-sd1", "sd1")
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet")).save_pretrained(model / "unet")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model / "vae"), scaling_factor=4.0)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -20.0
    vae.save_pretrained(model / "vae")
    pairs = write_brightness_pairs(root / "pairs", count=8, size=SIZE, ties=2)
    return SimpleNamespace(root=root, model=model, pairs=pairs)


def _options(ws: SimpleNamespace, objective: str, out: Path, **changes) -> TrainOptions:
    opts = TrainOptions(
        model=str(ws.model), objective=objective, out=str(out), cpu=True, report_to="none", batch_size=8, updates=40,
        checkpoint_every=0, data=DataOptions(pairs=str(ws.pairs), resolution=SIZE), lora=LoraOptions(targets=TARGETS),
        optim=OptimOptions(lr=1e-2), dpo=DpoOptions(beta=200.0),
    )
    return dataclasses.replace(opts, **changes)


def _final_lora(result) -> dict[str, torch.Tensor]:
    folder = sorted((result.output_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(folder / LORA_STATE)


def _trained_unet(ws: SimpleNamespace, lora: dict[str, torch.Tensor] | None):
    pipe = StableDiffusionPipeline.from_pretrained(ws.model, safety_checker=None, requires_safety_checker=False)
    add_lora(pipe.unet, LoraOptions(targets=TARGETS))
    if lora is not None:
        load_lora_state_dict(pipe.unet, lora)
    return pipe


@torch.no_grad()
def _implicit_accuracy(ws: SimpleNamespace, pipe, draws: int = 24) -> float:
    """Implicit accuracy on the original (unreversed) pairs, averaged over fixed noise and timestep draws."""
    encoders = Encoders(pipe, "sd1", torch.device("cpu"), torch.float32, torch.float32)
    batch = next(iter(DataLoader(PairDataset(open_pair_jsonl(ws.pairs), SIZE), batch_size=8)))
    reference = ReferenceForward("separate", pipe.unet, pipe.unet)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(0)
    accuracy = [dpo_step(reference, pair_batch(batch, encoders, (SIZE, SIZE)), scheduler, DpoOptions(500.0), reverse=False)[1]
                .implicit_accuracy for _ in range(draws)]
    return float(torch.stack(accuracy).mean())


@pytest.fixture(scope="module")
def runs(ws: SimpleNamespace) -> dict[str, object]:
    notes: list[str] = []
    out = {}
    # the batched reference forward (cheaper for a model this small) and the encoding cache (shared by both runs)
    data = DataOptions(pairs=str(ws.pairs), resolution=SIZE, cache=str(ws.root / "cache"))
    for objective in ("dpo", "dpo-npo"):
        out[objective] = train(_options(ws, objective, ws.root / f"{objective}.safetensors", ref_forward="batched", data=data),
                               quiet=True, notes=notes.append)
    out["notes"] = notes
    return out


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------


def test_dpo_and_npo_move_implicit_accuracy_apart(ws, runs):
    assert any("10 rows: 8 pairs, 2 ties dropped" in line for line in runs["notes"])
    accuracy = {}
    for objective in ("dpo", "dpo-npo"):
        result = runs[objective]
        assert result.steps == 40 and len(result.history) == 40
        assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference
        assert all(math.isfinite(row["loss"]) for row in result.history)
        assert (result.output_dir / "metrics.jsonl").read_text().count("\n") == 40
        accuracy[objective] = _implicit_accuracy(ws, _trained_unet(ws, _final_lora(result)))
    # on the original (unreversed) pairs: DPO prefers the winners more than the reference does, NPO less
    assert accuracy["dpo"] > 0.5 > accuracy["dpo-npo"] and accuracy["dpo"] - accuracy["dpo-npo"] > 0.15, accuracy


def test_loss_goes_down_on_a_fixed_batch(ws):
    pipe = _trained_unet(ws, None)
    encoders = Encoders(pipe, "sd1", torch.device("cpu"), torch.float32, torch.float32)
    batch = next(iter(DataLoader(PairDataset(open_pair_jsonl(ws.pairs), SIZE), batch_size=8)))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    reference = ReferenceForward("batched", pipe.unet, pipe.unet)
    optimizer = torch.optim.AdamW(lora_parameters(pipe.unet), lr=1e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same latents, noise and timesteps every step
        with reference.context():
            loss, _ = dpo_step(reference, pair_batch(batch, encoders, (SIZE, SIZE)), scheduler, DpoOptions(500.0), reverse=True)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < 0.5 * losses[0] and losses == sorted(losses, reverse=True), losses


# --------------------------------------------------------------------------------------------
# The batched reference forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_batched_and_separate_reference_give_the_same_loss_and_grads(ws, checkpointing):
    pipe = _trained_unet(ws, None)
    unet = pipe.unet.train()
    params = lora_parameters(unet)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so the reference half and the policy half differ
        for param in params:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    encoders = Encoders(pipe, "sd1", torch.device("cpu"), torch.float32, torch.float32)
    batch = next(iter(DataLoader(PairDataset(open_pair_jsonl(ws.pairs), SIZE), batch_size=4)))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    results = {}
    for mode in ("separate", "batched"):
        reference = ReferenceForward(mode, unet, unet)
        torch.manual_seed(7)
        with reference.context():
            loss, stats = dpo_step(reference, pair_batch(batch, encoders, (SIZE, SIZE)), scheduler, DpoOptions(500.0), reverse=True)
            loss.backward()
        results[mode] = (loss.detach(), stats.ref_diff, [p.grad.clone() for p in params])
        for param in params:
            param.grad = None
    (loss_s, ref_s, grads_s), (loss_b, ref_b, grads_b) = results["separate"], results["batched"]
    assert float(loss_s) != pytest.approx(math.log(2))  # the adapter matters
    torch.testing.assert_close(loss_b, loss_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref_b, ref_s, rtol=1e-5, atol=1e-7)
    # equal up to fp32 summation order (GEMMs over a batch twice as tall): about 1e-5 of the largest gradient
    got, want = torch.cat([g.flatten() for g in grads_b]), torch.cat([g.flatten() for g in grads_s])
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert all("forward" not in vars(module) for module in unet.modules())  # the context restored every layer


def test_first_half_rows_get_the_lora_and_the_rest_match_the_base(ws):
    pipe = _trained_unet(ws, None)
    unet = pipe.unet
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.add_(0.05)
    gen = torch.Generator().manual_seed(2)
    x, t, text = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        with_lora = unet(x, t, encoder_hidden_states=text).sample
        with adapters_disabled(unet):
            base = unet(x, t, encoder_hidden_states=text).sample
        with lora_on_first_half(unet):
            split = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text, text])).sample
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(split[:2], with_lora, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split[2:], base, rtol=1e-5, atol=1e-6)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its mixed-precision setting per process; reset it around a test that changes it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_with_checkpointing_and_batched_reference_keeps_lora_in_fp32(ws, tmp_path, fresh_accelerate_state):
    opts = _options(ws, "dpo-npo", tmp_path / "bf16.safetensors", mixed_precision="bf16", gradient_checkpointing=True,
                    ref_forward="batched", batch_size=2, gradient_accumulation=2, updates=2)
    result = train(opts, quiet=True, notes=lambda _: None)
    assert all(math.isfinite(row["loss"]) for row in result.history)
    lora = _final_lora(result)
    assert {t.dtype for t in lora.values()} == {torch.float32}  # cast_training_params: fp32 master weights
    assert any(float(t.abs().max()) > 0 for k, t in lora.items() if "lora_B" in k)  # and they were updated
    with open_delta(result.out) as delta:
        assert delta.metadata["npo_merge.mixed_precision"] == "bf16"


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def test_resume_equals_an_uninterrupted_run_and_skips_seen_batches_unread(ws, tmp_path, monkeypatch):
    # 8 pairs, 2 per micro-batch, 2 micro-batches per update: the checkpoint after update 3 sits in epoch 1
    common = dict(batch_size=2, gradient_accumulation=2, checkpoint_every=3, ref_forward="separate",
                  data=DataOptions(pairs=str(ws.pairs), resolution=SIZE, random_flip=True))
    (tmp_path / "full").mkdir()
    (tmp_path / "part").mkdir()
    full = train(_options(ws, "dpo-npo", tmp_path / "full" / "npo.safetensors", updates=5, **common), quiet=True, notes=lambda _: None)
    train(_options(ws, "dpo-npo", tmp_path / "part" / "npo.safetensors", updates=3, **common), quiet=True, notes=lambda _: None)
    reads = []
    original = datasets.PairDataset.__getitem__
    monkeypatch.setattr(datasets.PairDataset, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    notes: list[str] = []
    resumed = train(_options(ws, "dpo-npo", tmp_path / "part" / "npo.safetensors", updates=5, resume="latest", **common),
                    quiet=True, notes=notes.append)
    assert any("resumed from" in line and "step-000003" in line for line in notes)
    # only the batches still to train on were loaded: the rest of epoch 1, then epoch 2 (plus the one batch
    # accelerate's loader fetches ahead); the first half of epoch 1 was seen before the checkpoint
    order = EpochSampler(8, 0)
    order.set_epoch(1)
    epoch1 = list(order)
    order.set_epoch(2)
    assert reads[:8] == epoch1[4:] + list(order)[:4] and len(reads) <= 8 + 2, reads
    want, got = _final_lora(full), _final_lora(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert [row["loss"] for row in resumed.history] == [row["loss"] for row in full.history[3:]]


def test_encoding_cache_is_filled_once_and_then_read_without_images(ws, tmp_path, monkeypatch):
    reads = []
    original = datasets.read_image_bytes
    monkeypatch.setattr(datasets, "read_image_bytes", lambda source, where: reads.append(where) or original(source, where))
    data = DataOptions(pairs=str(ws.pairs), resolution=SIZE, cache=str(tmp_path / "cache"))
    notes: list[str] = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        result = train(_options(ws, "dpo-npo", tmp_path / name / "npo.safetensors", data=data, batch_size=4, updates=2),
                       quiet=True, notes=notes.append)
        assert all(math.isfinite(row["loss"]) for row in result.history)
        if name == "first":
            assert len(reads) == 2 * 8  # every image of the 8 pairs, once
            reads.clear()
    assert reads == []  # the second run reused the index: no image read, decoded or encoded
    assert any("items encoded or found" in line for line in notes) and any("reused index-" in line for line in notes)


def test_sharded_loaders_get_the_epoch_into_the_dataset(ws):
    from accelerate.data_loader import prepare_data_loader

    dataset = PairDataset(open_pair_jsonl(ws.pairs), SIZE, random_flip=True)
    sampler = EpochSampler(len(dataset), 0)
    loader = prepare_data_loader(DataLoader(dataset, batch_size=2, sampler=sampler), num_processes=2, process_index=1,
                                 put_on_device=False)
    loader.set_epoch(3)
    assert sampler.epoch == 3 and dataset.epoch == 0  # accelerate leaves a sharded loader's dataset behind
    set_epoch(loader, 5, sampler, dataset)
    assert sampler.epoch == dataset.epoch == 5
    batch = next(iter(loader))
    assert batch["flip"].tolist() == [dataset.flip_for(i) for i in batch["index"].tolist()]


# --------------------------------------------------------------------------------------------
# The written file
# --------------------------------------------------------------------------------------------


def test_npo_file_carries_provenance_and_matches_the_trained_adapter(ws, runs, tmp_path):
    result = runs["dpo-npo"]
    with open_delta(result.out) as delta:
        meta = delta.metadata
        assert delta.role == "negative" and delta.kind == "lowrank" and len(delta.modules) == 129  # 128 attention + conv_out
        assert meta["npo_merge.objective"] == "dpo-npo" and meta["npo_merge.base_sha256"] == fingerprint(ws.model)
        assert (meta["npo_merge.dpo_beta"], meta["npo_merge.dpo_beta_convention"]) == ("200", "diffusers")
        assert json.loads(meta["npo_merge.train_options"])["lora"]["targets"] == TARGETS
        assert meta["npo_merge.train_ties_dropped"] == "2"
    # diffusers itself loads the file; fused, it gives the same UNet as the trained peft adapter
    trained = _trained_unet(ws, _final_lora(result)).unet
    pipe = StableDiffusionPipeline.from_pretrained(ws.model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(result.out))
    pipe.fuse_lora()
    gen = torch.Generator().manual_seed(3)
    x, t, text = torch.randn(1, 4, 4, 4, generator=gen), torch.tensor([300]), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        want = trained(x, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=text).sample, want, rtol=1e-4, atol=1e-5)
        # and in the dual-branch sampler the uncond rows get exactly that model
        plain = StableDiffusionPipeline.from_pretrained(ws.model, safety_checker=None, requires_safety_checker=False)
        handle = enable_npo(plain, result.out)
        assert len(handle.modules) == 129
        set_branch_mode(plain, "uncond")
        torch.testing.assert_close(plain.unet(x, t, encoder_hidden_states=text).sample, want, rtol=1e-4, atol=1e-5)


def test_npo_file_applies_as_a_dual_branch_checkpoint_and_samples(ws, runs, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["apply", "--target", str(ws.model), "--delta", str(runs["dpo-npo"].out), "--out", str(merged), "-q"]) == 0
    assert "dual-branch checkpoint" in capsys.readouterr().out
    pipe = load_pipeline(merged)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a scene", num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (SIZE, SIZE)


# --------------------------------------------------------------------------------------------
# Self-NPO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,teacher", [("images", "ema"), ("captions", "base")])
def test_self_npo_trains_from_images_or_captions(ws, tmp_path, source, teacher):
    data = DataOptions(resolution=SIZE)
    if source == "images":
        data.images = str(write_captioned_images(tmp_path / "images", count=4, size=SIZE))
    else:
        (tmp_path / "captions.txt").write_text("a scene\nanother scene\n")
        data.captions = str(tmp_path / "captions.txt")
    opts = _options(ws, "self-npo", tmp_path / "self.safetensors", data=data, batch_size=2, updates=2,
                    optim=OptimOptions(lr=1e-3))
    opts.self_npo.teacher = teacher
    opts.self_npo.num_ddim_steps, opts.self_npo.teacher_steps = 10, 2
    result = train(opts, quiet=True, notes=lambda _: None)
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in result.history)
    with open_delta(result.out) as delta:
        assert delta.role == "negative" and delta.metadata["npo_merge.self_npo_teacher"] == teacher
        assert json.loads(delta.metadata["npo_merge.self_npo"])["w"] == -1.0
        assert any(delta.lowrank(m).up.abs().max() > 0 for m in delta.modules)  # the adapter moved off zero


def test_sdxl_trains_with_per_image_micro_conditioning(ws, tmp_path):
    model = tiny_pipeline_folder(tmp_path / "tiny-sdxl", "sdxl")
    opts = _options(ws, "dpo-npo", tmp_path / "xl.safetensors", model=str(model), batch_size=2, updates=2,
                    ref_forward="batched", lora=LoraOptions(), dpo=DpoOptions(beta=2000.0, convention="official"))
    result = train(opts, quiet=True, notes=lambda _: None)
    assert all(math.isfinite(row["loss"]) for row in result.history)
    with open_delta(result.out) as delta:
        assert delta.architectures == ("sdxl",) and delta.metadata["npo_merge.dpo_beta_convention"] == "official"
    # winner and loser carry their own original size in time_ids
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    encoders = Encoders(pipe, "sdxl", torch.device("cpu"), torch.float32, torch.float32)
    cond = encoders.conditioning(encoders.text(["a", "b"]), (SIZE, SIZE), torch.tensor([[48, 64], [32, 32]]),
                                 torch.tensor([[8, 0], [0, 0]]))
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[48, 64, 8, 0, SIZE, SIZE], [32, 32, 0, 0, SIZE, SIZE]]
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 32) and cond.encoder_hidden_states.shape == (2, 77, 64)
    assert float(encoders.uncond_text(2, "zeros")["pooled_prompt_embeds"].abs().max()) == 0.0


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def test_cli_runs_the_tiny_ci_recipe_with_overrides(ws, tmp_path, capsys):
    out = tmp_path / "ci.safetensors"
    code = main(["train", str(RECIPES / "tiny-ci.yaml"), "--set", f"model={ws.model}", "--set", f"data.pairs={ws.pairs}",
                 "--set", f"out={out}", "--set", "layout=kohya", "--set", "validation.steps=2", "--set", "ref_forward=batched",
                 "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {out}" in captured.out
    with open_delta(out) as delta:  # kohya layout, read back as a negative delta
        assert delta.role == "negative" and any(m.startswith("unet.") for m in delta.modules)
        assert "updates: 4" in delta.metadata["npo_merge.recipe"]
    run_dir = tmp_path / "ci-run"
    assert (run_dir / "samples" / "step-000004" / "compare.png").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (run_dir / "checkpoints" / "step-000002" / "ci.safetensors").is_file()


@pytest.mark.parametrize("overrides,message", [
    (["data.pairs=missing.jsonl"], "data.pairs: .*missing.jsonl does not exist"),
    (["objective=npo"], "option objective must be one of dpo, dpo-npo, self-npo"),
    (["dpo.bta=1"], r"--set dpo.bta: unknown option 'bta'"),
    (["updates=0"], "updates must be positive"),
])
def test_bad_inputs_are_one_line_errors(ws, tmp_path, capsys, overrides, message):
    args = ["train", str(RECIPES / "tiny-ci.yaml"), "--set", f"model={ws.model}", "--set", f"out={tmp_path / 'x.safetensors'}"]
    if not any(o.startswith("data.pairs") for o in overrides):
        args += ["--set", f"data.pairs={ws.pairs}"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("npo-merge: error: ")
    assert re.search(message, err), err
