"""extract -> apply round trips, applying LoRAs the way diffusers does, combine over files, bad input."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from npo_merge import tiny
from npo_merge.apply import Term, apply_plan, plan_apply
from npo_merge.cli import main
from npo_merge.delta.files import open_delta
from npo_merge.delta.lowrank import concat
from npo_merge.delta.types import LowRank
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.lora_writer import write_lora


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD1.5 base and a 'fine-tune' of it (fp32 single files), plus the same in fp16."""
    folder = tmp_path_factory.mktemp("pair")
    files = {
        "base": tiny.write_single_file(folder / "base.safetensors", "sd1", seed=0),
        "tuned": tiny.write_single_file(folder / "tuned.safetensors", "sd1", seed=1),
        "base16": tiny.write_single_file(folder / "base16.safetensors", "sd1", seed=0, dtype=torch.float16),
        "tuned16": tiny.write_single_file(folder / "tuned16.safetensors", "sd1", seed=1, dtype=torch.float16),
    }
    return files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_extract_then_apply_reproduces_the_tuned_model_exactly(pair: dict[str, Path], tmp_path: Path) -> None:
    assert main(["extract", "--base", str(pair["base16"]), "--tuned", str(pair["tuned16"]), "--out",
                 str(tmp_path / "full.safetensors"), "-q"]) == 0
    assert main(["apply", "--target", str(pair["base16"]), "--delta", str(tmp_path / "full.safetensors"),
                 "--out", str(tmp_path / "rebuilt.safetensors"), "-q"]) == 0
    with open_checkpoint(tmp_path / "rebuilt.safetensors") as rebuilt, open_checkpoint(pair["tuned16"]) as tuned:
        assert set(rebuilt.keys()) == set(tuned.keys())
        for key in tuned.keys():
            assert torch.equal(rebuilt.tensor(key), tuned.tensor(key)), key
        assert rebuilt.dtype("unet.conv_in.weight") == torch.float16  # the target's dtype is kept
        assert [name for _, name in rebuilt.extras] == [name for _, name in tuned.extras]  # extras carried over
        applied = json.loads(rebuilt.metadata["npo_merge.applied"])
        assert applied["target"]["sha256"] == _sha(pair["base16"])
        assert applied["deltas"][0]["sha256"] == _sha(tmp_path / "full.safetensors")


def test_lowrank_extract_error_equals_the_discarded_singular_values(pair: dict[str, Path], tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--base", str(pair["base"]), "--tuned", str(pair["tuned"]), "--out", str(lora),
                 "--rank", "6", "--conv-rank", "3", "--components", "unet", "--dtype", "fp32", "--svd", "exact", "-q"]) == 0
    assert main(["apply", "--target", str(pair["base"]), "--delta", str(lora), "--out", str(tmp_path / "approx.safetensors"), "-q"]) == 0
    with open_delta(lora) as delta:
        fidelity = json.loads(delta.metadata["npo_merge.fidelity"])["layers"]
    with open_checkpoint(tmp_path / "approx.safetensors") as approx, open_checkpoint(pair["tuned"]) as tuned, \
            open_checkpoint(pair["base"]) as base:
        for module in ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "unet.mid_block.resnets.0.conv1"):
            key = f"{module}.weight"
            exact = (tuned.tensor(key) - base.tensor(key)).double()
            matrix = exact.reshape(exact.shape[0], -1)
            rank = 3 if module.endswith("conv1") else 6
            singular = torch.linalg.svdvals(matrix)
            discarded = float(singular[rank:].square().sum().sqrt())
            error = float((approx.tensor(key).double() - tuned.tensor(key).double()).norm())
            assert error == pytest.approx(discarded, rel=1e-4)
            assert fidelity[module][0] == rank
            assert fidelity[module][1] == pytest.approx(float((singular[:rank].square().sum() / singular.square().sum()).sqrt()), abs=1e-5)
        # norms and biases cannot ride in a LoRA: they stay as in the base
        assert torch.equal(approx.tensor("unet.conv_in.bias"), base.tensor("unet.conv_in.bias"))


def _diffusers_fused_unet(lora_file: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(lora_file))
    unet = copy.deepcopy(tiny.tiny_models("sd1")["unet"])
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="judge")
    unet.fuse_lora(lora_scale=scale)
    fused = {}
    for name, module in unet.named_modules():
        layer = getattr(module, "base_layer", None)
        if layer is not None:
            fused[f"unet.{name}.weight"] = layer.weight.detach()
    return fused


@pytest.mark.parametrize("writer", ["diffusers-kohya-converter", "npo-merge-kohya"])
def test_kohya_lora_on_single_file_matches_diffusers_fuse(writer: str, tmp_path: Path) -> None:
    target = tiny.write_single_file(tmp_path / "target.safetensors", "sd1")
    unet = copy.deepcopy(tiny.tiny_models("sd1")["unet"])
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"],
                                init_lora_weights="gaussian"))
    peft_state = get_peft_model_state_dict(unet)
    lora = tmp_path / "lora.safetensors"
    if writer == "diffusers-kohya-converter":
        save_file(convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()}), lora)
    else:
        modules = {}
        for key, value in peft_state.items():
            module, side = key.rsplit(".lora_", 1)
            modules.setdefault(f"unet.{module}", {})[side[0]] = value
        write_lora(lora, ((m, LowRank(f["A"], f["B"], alpha=2.0)) for m, f in sorted(modules.items())),
                   layout="kohya", architecture="sd1", dtype=torch.float32)
    out = tmp_path / "applied.safetensors"
    assert main(["apply", "--target", str(target), "--delta", str(lora), "--scale", "0.7", "--out", str(out), "-q"]) == 0
    fused = _diffusers_fused_unet(lora, scale=0.7)
    assert len(fused) > 40
    with open_checkpoint(out) as applied:
        for key, weight in fused.items():
            torch.testing.assert_close(applied.tensor(key), weight, rtol=1e-5, atol=1e-6)


def test_apply_to_diffusers_folder_keeps_the_folder_layout(diffusers_folders: dict[str, Path], tmp_path: Path) -> None:
    source = diffusers_folders["sdxl"]
    with open_checkpoint(source) as checkpoint:
        key = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"
        shape = checkpoint.shape(key)
        before = checkpoint.tensor(key)
    gen = torch.Generator().manual_seed(3)
    factors = LowRank(torch.randn(2, shape[1], generator=gen), torch.randn(shape[0], 2, generator=gen), alpha=2.0)
    write_lora(tmp_path / "xl.safetensors", [(key[:-7], factors)], layout="diffusers", architecture="sdxl", dtype=torch.float32)
    out = tmp_path / "merged"
    assert main(["apply", "--target", str(source), "--delta", str(tmp_path / "xl.safetensors"), "--out", str(out), "-q"]) == 0
    assert (out / "model_index.json").read_bytes() == (source / "model_index.json").read_bytes()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (source / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    with open_checkpoint(out) as merged:
        assert merged.layout == "diffusers" and merged.architecture == "sdxl"
        torch.testing.assert_close(merged.tensor(key), before + factors.to_dense())


def test_combine_files_exact_lora_sum_ties_and_dare(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a = LowRank(torch.randn(3, 16, generator=gen), torch.randn(16, 3, generator=gen), alpha=1.5)
    b = LowRank(torch.randn(2, 16, generator=gen), torch.randn(16, 2, generator=gen), alpha=4.0)
    for name, factors in (("a", a), ("b", b)):
        write_lora(tmp_path / f"{name}.safetensors", [(module, factors)], layout="kohya", architecture="sd1", dtype=torch.float32)
    args = ["--delta", str(tmp_path / "a.safetensors"), "--weight", "0.5", "--delta", str(tmp_path / "b.safetensors"), "--weight", "-1"]
    assert main(["combine", *args, "--out", str(tmp_path / "sum.safetensors"), "--dtype", "fp32", "-q"]) == 0
    with open_delta(tmp_path / "sum.safetensors") as summed:
        assert summed.kind == "lowrank" and summed.lowrank(module).rank == 5
        torch.testing.assert_close(summed.dense(f"{module}.weight"), 0.5 * a.to_dense() - b.to_dense())
    torch.testing.assert_close(concat([(a, 0.5), (b, -1.0)]).to_dense(), 0.5 * a.to_dense() - b.to_dense())
    from npo_merge.delta import ops

    for method, extra, expected in (
        ("ties", ["--density", "0.5"], ops.ties([a.to_dense(), b.to_dense()], [0.5, -1.0], density=0.5)),
        ("dare", ["--drop-rate", "0.5", "--seed", "7"], None),
    ):
        out = tmp_path / f"{method}.safetensors"
        assert main(["combine", *args, "--method", method, *extra, "--out", str(out), "-q"]) == 0
        merged = load_file(out)[f"{module}.weight"]
        if expected is not None:
            torch.testing.assert_close(merged, expected)
        else:  # seeded: the same command gives the same file, and about half the entries survive
            assert main(["combine", *args, "--method", method, *extra, "--out", str(tmp_path / "again.safetensors"), "-q"]) == 0
            assert out.read_bytes() == (tmp_path / "again.safetensors").read_bytes()
            assert 0.3 < float((merged != 0).float().mean()) < 0.95


def test_convert_round_trip_keeps_every_scale(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    modules = [
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", LowRank(torch.randn(4, 16, generator=gen), torch.randn(16, 4, generator=gen), 2.0)),
        ("unet.down_blocks.0.resnets.0.conv1", LowRank(torch.randn(2, 16, 3, 3, generator=gen), torch.randn(16, 2, 1, 1, generator=gen), 8.0)),
    ]
    write_lora(tmp_path / "k.safetensors", modules, layout="kohya", architecture="sd1", dtype=torch.float32)
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"), "--layout", "diffusers", "-q"]) == 0
    assert main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "p"), "--layout", "peft", "-q"]) == 0
    assert main(["convert", str(tmp_path / "p"), str(tmp_path / "k2.safetensors"), "--layout", "kohya", "-q"]) == 0
    with open_delta(tmp_path / "k2.safetensors") as back:
        for module, factors in modules:
            torch.testing.assert_close(back.dense(f"{module}.weight"), factors.to_dense())


# ----------------------------------------------------------------------------------- bad input


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_wrong_architecture_shape_mismatch_nan_and_no_match(pair: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    xl = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"  # only SDXL has transformer_blocks.1
    write_lora(tmp_path / "xl.safetensors", [(xl, LowRank(torch.randn(2, 32, generator=gen), torch.randn(32, 2, generator=gen), 2.0))],
               layout="kohya", architecture="sdxl", dtype=torch.float32)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    write_lora(tmp_path / "shape.safetensors", [(q, LowRank(torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), 2.0))],
               layout="kohya", architecture="sd1", dtype=torch.float32)
    nan = LowRank(torch.full((2, 16), float("nan")), torch.randn(16, 2, generator=gen), 2.0)
    write_lora(tmp_path / "nan.safetensors", [(q, nan)], layout="kohya", architecture="sd1", dtype=torch.float32)
    inf = LowRank(torch.randn(2, 16, generator=gen), torch.full((16, 2), float("-inf")), 2.0)
    write_lora(tmp_path / "inf.safetensors", [(q, inf)], layout="kohya", architecture="sd1", dtype=torch.float32)
    # finite factors whose product overflows fp32: the factor check cannot vouch for it, the product check finds it
    huge = LowRank(torch.full((2, 16), 1e30), torch.full((16, 2), 1e30), 2.0)
    write_lora(tmp_path / "overflow.safetensors", [(q, huge)], layout="kohya", architecture="sd1", dtype=torch.float32)
    cases = {
        "xl.safetensors": "delta is for sdxl, target",
        "shape.safetensors": "shape mismatch",
        "nan.safetensors": "NaN or Inf",
        "inf.safetensors": "NaN or Inf",
        "overflow.safetensors": "NaN or Inf",
    }
    for name, message in cases.items():
        out = tmp_path / f"out-{name}"
        code, err = _err(capsys, ["apply", "--target", str(pair["base"]), "--delta", str(tmp_path / name), "--out", str(out)])
        assert code == 1 and message in err and err.count("\n") == 1, err
        assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))] == []
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4), "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)},
              tmp_path / "none.safetensors")
    code, err = _err(capsys, ["apply", "--target", str(pair["base"]), "--delta", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o.safetensors")])
    assert code == 1 and "matches no SD1/SD2/SDXL module" in err


def test_output_equal_to_an_input_is_refused(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _sha(pair["base"])
    lora = tmp_path / "l.safetensors"
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    write_lora(lora, [(q, LowRank(torch.ones(1, 16), torch.ones(16, 1), 1.0))], layout="kohya", architecture="sd1")
    code, err = _err(capsys, ["apply", "--target", str(pair["base"]), "--delta", str(lora), "--out", str(pair["base"])])
    assert code == 1 and "would overwrite" in err
    code, err = _err(capsys, ["extract", "--base", str(pair["base"]), "--tuned", str(pair["tuned"]), "--out", str(pair["tuned"])])
    assert code == 1 and "would overwrite" in err
    assert _sha(pair["base"]) == before


def test_disk_full_leaves_no_partial_output_and_inputs_intact(pair: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    lora = tmp_path / "l.safetensors"
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    write_lora(lora, [(q, LowRank(torch.ones(1, 16), torch.ones(16, 1), 1.0))], layout="kohya", architecture="sd1")
    hashes = {p: _sha(p) for p in (pair["base"], lora)}
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an older result")
    from npo_merge.io import block_file

    monkeypatch.setattr(block_file, "BLOCK", 4 * block_file.ALIGN)  # many blocks: two fit, then the disk is full
    calls, pwrite_all = {"n": 0}, block_file.pwrite_all

    def failing_write(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite_all(fd, data, offset)

    monkeypatch.setattr(block_file, "pwrite_all", failing_write)
    with open_checkpoint(pair["base"]) as target, open_delta(lora) as delta:
        with pytest.raises(OSError):
            apply_plan(plan_apply(target, [Term(delta)]), out)
    assert out.read_bytes() == b"an older result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors", "out.safetensors"]
    assert {p: _sha(p) for p in hashes} == hashes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_in_place_reduced_precision_add_equals_the_fp32_path(dtype: torch.dtype) -> None:
    """apply's fast path relies on this: x.add_(d) in fp16/bf16 rounds x + d (computed in fp32) once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 20, generator=gen).to(dtype)
    d = (torch.randn(1 << 20, generator=gen) * 1e-3).to(dtype)
    assert torch.equal(x.clone().add_(d), (x.float() + d.float()).to(dtype))
