"""Dual-branch checkpoints end to end: apply a negative LoRA, load with load_pipeline (single file and
folder), sample, compare with two UNets; --layout separate; plain tools still load theta_c."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from npo_merge import disable_npo, enable_npo, load_pipeline, tiny
from npo_merge.cli import main
from npo_merge.delta.files import LOWRANK, provenance
from npo_merge.delta.types import BaseFingerprint, LowRank
from npo_merge.guidance.reference import uncond_unet
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.dual_checkpoint import load_branch
from npo_merge.io.lora_writer import write_lora

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _npo_lora(path: Path, arch: str = "sd1", rank: int = 4, seed: int = 3) -> dict[str, LowRank]:
    """A random negative-role LoRA on every attention projection, strong enough to change images."""
    unet = tiny.tiny_models(arch)["unet"]
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION):
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=gen) * 3.0
            modules[f"unet.{name}"] = LowRank(down, up, alpha=float(rank))
    meta = provenance(LOWRANK, "negative", BaseFingerprint(arch))
    write_lora(path, sorted(modules.items()), layout="kohya", architecture=arch, metadata=meta, dtype=torch.float32)
    return modules


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("npo")
    files = {
        "config": tiny.tiny_pipeline_folder(root / "config", "sd1"),
        "single": tiny.write_single_file(root / "model.safetensors", "sd1"),
        "lora": root / "npo.safetensors",
    }
    _npo_lora(files["lora"])
    assert main(["apply", "--target", str(files["single"]), "--delta", str(files["lora"]), "--eta", "0.5",
                 "--guidance-scale", "6", "--out", str(root / "dual.safetensors"), "-q"]) == 0
    assert main(["apply", "--target", str(files["config"]), "--delta", str(files["lora"]), "--eta", "0.5",
                 "--out", str(root / "dual-folder"), "-q"]) == 0
    files["dual"], files["dual_folder"] = root / "dual.safetensors", root / "dual-folder"
    return files


def _run(pipe, seed: int = 0, output_type: str = "np"):
    out = pipe("a cat", negative_prompt="the", num_inference_steps=4, guidance_scale=6.0, output_type=output_type,
               generator=torch.Generator().manual_seed(seed))
    return out.images[0]


def test_dual_branch_file_keeps_theta_c_loadable_by_diffusers(sd1: dict[str, Path]) -> None:
    unet = UNet2DConditionModel.from_single_file(str(sd1["dual"]), config=str(sd1["config"]), subfolder="unet")
    reference = tiny.tiny_models("sd1")["unet"].state_dict()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in reference.items())  # theta_c untouched
    branch = load_branch(sd1["dual"])
    assert branch.eta == 0.5 and branch.guidance_scale == 6.0 and len(branch.modules) == 128
    with open_checkpoint(sd1["dual"]) as checkpoint:
        assert checkpoint.architecture == "sd1" and len(checkpoint.branch_names) == 3 * 128


def test_load_pipeline_matches_two_unets(sd1: dict[str, Path]) -> None:
    pipe = load_pipeline(sd1["dual"], config=str(sd1["config"]))
    pipe.set_progress_bar_config(disable=True)
    ours = _run(pipe)
    # reference: the official approach, two UNets (theta_u = theta_c + eta * delta) and two passes
    modules = {k[len("unet."):]: v for k, v in _npo_lora(sd1["lora"].with_name("again.safetensors")).items()}
    plain = StableDiffusionPipeline.from_single_file(str(sd1["single"]), config=str(sd1["config"]))
    plain.set_progress_bar_config(disable=True)
    theta_u = uncond_unet(plain.unet, modules, eta=0.5)
    from npo_merge.guidance.reference import TwoPassCFG

    plain.unet = TwoPassCFG(plain.unet, theta_u)
    reference = _run(plain)
    assert np.abs(ours - reference).mean() < 1 / 255
    # the folder form gives the same images, and NPO changes them compared to plain CFG
    folder_pipe = load_pipeline(sd1["dual_folder"])
    folder_pipe.set_progress_bar_config(disable=True)
    assert np.abs(_run(folder_pipe) - ours).mean() < 1 / 255
    npo_latents = _run(folder_pipe, output_type="latent")
    disable_npo(folder_pipe)
    plain_latents = _run(folder_pipe, output_type="latent")
    assert float((npo_latents - plain_latents).abs().mean()) > 1e-2 * float(plain_latents.abs().mean())


def test_enable_npo_from_a_lora_file_equals_the_dual_file(sd1: dict[str, Path]) -> None:
    pipe = StableDiffusionPipeline.from_single_file(str(sd1["single"]), config=str(sd1["config"]))
    pipe.set_progress_bar_config(disable=True)
    enable_npo(pipe, sd1["lora"], eta=0.5)
    from_lora = _run(pipe)
    dual = load_pipeline(sd1["dual"], config=str(sd1["config"]))
    dual.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(from_lora, _run(dual), atol=1e-5)
    # eta at load time means the same as at apply time: eta 1.0 here equals enable_npo with eta 1.0
    stronger = load_pipeline(sd1["dual"], config=str(sd1["config"]), eta=1.0)
    stronger.set_progress_bar_config(disable=True)
    disable_npo(pipe)
    enable_npo(pipe, sd1["lora"], eta=1.0)
    np.testing.assert_allclose(_run(pipe), _run(stronger), atol=1e-5)


def test_sample_cli_compare_writes_pngs_and_grid(sd1: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(sd1["dual"]), "--config", str(sd1["config"]), "--prompt", "a cat",
                 "--prompt", "the cat", "--steps", "3", "--compare", "--out", str(out), "-q"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-cfg.png", "000-npo.png", "001-cfg.png", "001-npo.png", "compare.png"]
    from PIL import Image

    grid = Image.open(out / "compare.png")
    assert grid.size == (2 * 64, 24 + 2 * 64)
    assert Image.open(out / "000-cfg.png").size == Image.open(out / "000-npo.png").size == (64, 64)


def test_layout_separate_writes_theta_c_and_a_companion_lora(sd1: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sep.safetensors"
    assert main(["apply", "--target", str(sd1["single"]), "--delta", str(sd1["lora"]), "--layout", "separate",
                 "--out", str(out), "-q"]) == 0
    companion = tmp_path / "sep.npo-uncond.safetensors"
    assert not load_branch(out) and companion.is_file()
    pipe = load_pipeline(out, config=str(sd1["config"]), npo=companion)
    pipe.set_progress_bar_config(disable=True)
    dual = load_pipeline(sd1["dual"], config=str(sd1["config"]), eta=1.0)
    dual.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(pipe), _run(dual), atol=1e-5)


def test_beta_needs_base_and_a_stated_compression(sd1: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["apply", "--target", str(sd1["single"]), "--delta", str(sd1["lora"]), "--out", str(tmp_path / "b.safetensors")]
    assert main([*args, "--beta", "0.5"]) == 2 and "give --base" in capsys.readouterr().err
    other = tiny.write_single_file(tmp_path / "other.safetensors", "sd1", seed=5)
    assert main([*args, "--beta", "0.5", "--base", str(other)]) == 2
    assert "--branch-rank or --branch-energy" in capsys.readouterr().err
    assert main([*args, "--beta", "0.5", "--base", str(other), "--branch-rank", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "branch compression: retained" in out
    branch = load_branch(tmp_path / "b.safetensors")
    assert json.loads(json.dumps(branch.metadata))["npo_merge.beta"] == "0.5"
    assert all(isinstance(w, LowRank) and w.rank <= 4 for w in branch.weights.values())
    assert len(branch.modules) > 128  # beta touches every layer that differs from the base, not just attention
