"""Every layout, synthesized in-process with real key names, opens and is detected correctly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from npo_merge import tiny
from npo_merge.errors import FormatError, InputError, KeyMappingError
from npo_merge.inspect import inspect_path
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.lora import read_lora

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _check_model(path: Path, arch: str, layout: str) -> None:
    reference = tiny.canonical_state(arch)
    with open_checkpoint(path) as checkpoint:
        assert (checkpoint.layout, checkpoint.architecture) == (layout, arch)
        keys = set(checkpoint.keys())
        assert keys == {k for k in reference if k.split(".")[0] in checkpoint.components}
        for key in sorted(keys)[::37]:  # a spread of tensors, every transform included below
            assert torch.equal(checkpoint.tensor(key).float(), reference[key].float().to(checkpoint.tensor(key).dtype).float())


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_layout(arch: str, single_files: dict[str, Path]) -> None:
    _check_model(single_files[arch], arch, "single-file")
    with open_checkpoint(single_files[arch]) as checkpoint:
        reference = tiny.canonical_state(arch)
        special = [k for k in checkpoint.keys() if checkpoint.entry(k).link.transform != "same"]
        if arch != "sd1":
            assert any(checkpoint.entry(k).link.transform == "split3" for k in special)
        assert any(checkpoint.entry(k).link.transform == "squeeze" for k in special)  # VAE attention
        for key in special:
            assert torch.equal(checkpoint.tensor(key), reference[key]), key


def test_fp16_single_file_and_unet_only_file(tmp_path: Path) -> None:
    half = tiny.write_single_file(tmp_path / "half.safetensors", "sd1", dtype=torch.float16)
    with open_checkpoint(half) as checkpoint:
        assert checkpoint.dtype("unet.conv_in.weight") == torch.float16
    unet_only = tiny.write_single_file(tmp_path / "unet.safetensors", "sdxl", components=("unet",))
    _check_model(unet_only, "sdxl", "single-file")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_folder(arch: str, diffusers_folders: dict[str, Path]) -> None:
    _check_model(diffusers_folders[arch], arch, "diffusers")
    _check_model(diffusers_folders[arch] / "unet", arch, "diffusers-unet")


def test_diffusers_fp16_variant_and_shards(tmp_path: Path) -> None:
    folder = tiny.write_diffusers_folder(tmp_path / "sd2", "sd2", variant="fp16", shard_unet=True)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    with open_checkpoint(folder) as checkpoint:
        assert checkpoint.architecture == "sd2" and checkpoint.dtype("unet.conv_in.weight") == torch.float16
        assert len(checkpoint.sources) == 3 and len(checkpoint.files) > 3
    with pytest.raises(InputError, match="no bf16 weights"):
        open_checkpoint(folder, variant="bf16")


def test_pickle_checkpoint_loads_weights_only_and_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    state = tiny.to_single_file_state("sd1", tiny.canonical_state("sd1"))
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "model.ckpt")
    _check_model(tmp_path / "model.ckpt", "sd1", "single-file")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": state, "evil": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(FormatError, match="needs full unpickling"):
        open_checkpoint(tmp_path / "evil.ckpt")


def _peft_unet(arch: str, targets: list[str], rank: int = 4, alpha: int = 8) -> tuple[torch.nn.Module, LoraConfig]:
    unet = copy.deepcopy(tiny.tiny_models(arch)["unet"])
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    unet.add_adapter(config)
    return unet, config


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lora_saved_by_diffusers_is_read(arch: str, tmp_path: Path) -> None:
    unet, config = _peft_unet(arch, ATTENTION + ["conv1"])
    peft_state = get_peft_model_state_dict(unet)
    pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(tmp_path / "new", unet_lora_layers=peft_state, unet_lora_adapter_metadata=config.to_dict())
    pipeline.save_lora_weights(tmp_path / "old", unet_lora_layers=convert_state_dict_to_diffusers(peft_state))
    expected = {f"unet.{k[: -len('.lora_A.weight')]}" for k in peft_state if k.endswith("lora_A.weight")}
    for folder, alpha in ((tmp_path / "new", 8.0), (tmp_path / "old", 4.0)):
        with read_lora(folder) as lora:
            assert lora.layout == "diffusers" and set(lora.modules) == expected
            assert arch in lora.architectures
            module = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
            factors = lora.lowrank(module)
            assert factors.alpha == alpha and factors.rank == 4
            down = peft_state[module[5:] + ".lora_A.weight"]
            assert torch.equal(factors.down, down)
            conv = lora.lowrank("unet.down_blocks.0.resnets.0.conv1")
            assert conv.down.shape[1:] == (16, 3, 3) and conv.up.shape[2:] == (1, 1)


def test_peft_save_pretrained_folder_is_read(tmp_path: Path) -> None:
    unet = copy.deepcopy(tiny.tiny_models("sd1")["unet"])
    config = LoraConfig(r=4, lora_alpha=2, target_modules=ATTENTION, init_lora_weights="gaussian",
                        rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_k": 6})
    model = get_peft_model(unet, config)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    with read_lora(tmp_path / "adapter") as lora:
        assert lora.layout == "peft"
        plain = lora.lowrank("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        patterned = lora.lowrank("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
        assert (plain.rank, plain.scale) == (4, 0.5)
        assert (patterned.rank, patterned.scale) == (2, 3.0)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_kohya_lora_and_locon_are_read(arch: str, tmp_path: Path) -> None:
    unet, _ = _peft_unet(arch, ATTENTION + ["conv1", "proj_in"])
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    kohya = convert_state_dict_to_kohya(peft_state)  # diffusers' own kohya writer (diffusers-style names)
    save_file(kohya, tmp_path / "diffusers_names.safetensors")
    with read_lora(tmp_path / "diffusers_names.safetensors") as lora:
        assert lora.layout == "kohya" and len(lora.modules) == len(kohya) // 3
    # kohya sd-scripts' own spelling: SGM names for SDXL, plus text encoder modules and alphas
    from npo_merge.io.lora import kohya_name

    gen = torch.Generator().manual_seed(0)
    te = "lora_te1_" if arch == "sdxl" else "lora_te_"
    state = {
        f"{te}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32, generator=gen),
        f"{te}text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2, generator=gen),
        f"{te}text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
    }
    conv = "unet.down_blocks.1.resnets.0.conv1"
    name = kohya_name(arch, conv)
    state[f"{name}.lora_down.weight"] = torch.randn(2, 16, 3, 3, generator=gen)
    state[f"{name}.lora_up.weight"] = torch.randn(32, 2, 1, 1, generator=gen)
    state[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    save_file(state, tmp_path / "kohya.safetensors")
    with read_lora(tmp_path / "kohya.safetensors") as lora:
        assert lora.layout == "kohya" and arch in lora.architectures
        assert set(lora.modules) == {conv, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
        assert lora.lowrank(conv).scale == 1.0
        assert lora.lowrank("text_encoder.text_model.encoder.layers.0.self_attn.q_proj").scale == 0.5


def test_official_npo_release_layout_is_recognised(tmp_path: Path) -> None:
    unet, _ = _peft_unet("sd1", ATTENTION, rank=8, alpha=8)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers={k: v.float() for k, v in state.items()})
    report = inspect_path(tmp_path / "pytorch_lora_weights.safetensors")
    assert report["variant"].startswith("official Diffusion-NPO release")
    assert report["rank"] == 8 and report["dtype"] == "F32"


def test_legacy_attention_processor_names(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    state = {}
    for proj, width in (("to_q", 16), ("to_out", 16)):
        state[f"{block}.{proj}_lora.down.weight"] = torch.randn(4, width, generator=gen)
        state[f"{block}.{proj}_lora.up.weight"] = torch.randn(width, 4, generator=gen)
    save_file(state, tmp_path / "legacy.safetensors")
    with read_lora(tmp_path / "legacy.safetensors") as lora:
        assert set(lora.modules) == {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        }


def test_lora_that_matches_no_module_and_lycoris_are_errors(tmp_path: Path) -> None:
    save_file({"lora_unet_not_a_block_0.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_not_a_block_0.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(KeyMappingError, match="lora_unet_not_a_block_0"):
        read_lora(tmp_path / "bad.safetensors")
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(2, 4)}, tmp_path / "loha.safetensors")
    with pytest.raises(FormatError, match="LoHa"):
        read_lora(tmp_path / "loha.safetensors")
