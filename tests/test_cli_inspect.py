"""`npo-merge inspect` and the CLI's error contract: exit codes 0/1/2, one line on stderr, --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from npo_merge.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_inspect_json_for_single_files(arch: str, single_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "inspect", str(single_files[arch]), "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["layout"] == "single-file" and report["architecture"] == arch
    assert report["dtype"] == "F32"
    expected = {"sd1": ["unet", "text_encoder", "vae"], "sd2": ["unet", "text_encoder", "vae"],
                "sdxl": ["unet", "text_encoder", "text_encoder_2", "vae"]}[arch]
    assert list(report["components"]) == expected
    assert report["tensors"] == sum(c["tensors"] for c in report["components"].values()) + len(report["extra_tensors"])
    assert report["parameters"] > report["components"]["unet"]["parameters"] > 0
    assert report["file_size"] == single_files[arch].stat().st_size


def test_inspect_text_for_diffusers_folder_and_lora(
    diffusers_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "inspect", str(diffusers_folders["sdxl"]))
    assert code == 0
    assert "layout         diffusers" in out and "sdxl (Stable Diffusion XL)" in out and "text_encoder_2" in out
    gen = torch.Generator().manual_seed(0)
    save_file({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 16, 1, 1, generator=gen),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(16, 4, 1, 1, generator=gen),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }, tmp_path / "lora.safetensors", metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "lora.safetensors"), "--json")
    report = json.loads(out)
    assert (report["kind"], report["layout"], report["rank"], report["alpha"]) == ("lora", "kohya", 4, 2.0)
    assert report["mapped_modules"] == ["unet.down_blocks.0.attentions.0.proj_in"]
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "lora.safetensors"))
    assert "ss_network_dim = 4    # kohya sd-scripts: LoRA rank" in out


def test_bad_input_gives_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    for path, message in (
        (tmp_path / "empty.safetensors", "empty or truncated"),
        (tmp_path / "nothing", "holds no model"),
        (tmp_path / "missing.safetensors", "no such file"),
    ):
        code, out, err = _run(capsys, "inspect", str(path))
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and err.startswith("npo-merge: error: ") and message in err and str(path) in err


def test_every_bad_file_is_exit_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_safetensors_stream import BAD_FILES

    from npo_merge import tiny

    cases = {name: (make(tmp_path / f"{i}.safetensors"), message) for i, (name, (make, message)) in enumerate(BAD_FILES.items())}

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"a": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.ckpt")
    cases["unsafe pickle"] = (tmp_path / "evil.ckpt", "needs full unpickling")
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "nomatch.safetensors")
    cases["lora matching no module"] = (tmp_path / "nomatch.safetensors", "matches no SD1/SD2/SDXL module")
    state = tiny.to_single_file_state("sd1", tiny.canonical_state("sd1"))
    state["model.diffusion_model.input_blocks.1.1.bogus.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "extra.safetensors")
    cases["unmapped key"] = (tmp_path / "extra.safetensors", "model.diffusion_model.input_blocks.1.1.bogus.weight")
    for name, (path, message) in cases.items():
        code, out, err = _run(capsys, "inspect", str(path))
        assert code == 1 and out == "", name
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (name, err)


def test_usage_error_exit_2_and_debug_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "inspect")
    assert code == 2 and "usage:" in err
    code, _, err = _run(capsys, "no-such-command")
    assert code == 2
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    code, _, err = _run(capsys, "inspect", str(tmp_path / "bad.safetensors"), "--debug")
    assert code == 1 and "Traceback" in err and "not valid JSON" in err.splitlines()[-1]


def test_python_dash_m_entry_point(single_files: dict[str, Path]) -> None:
    result = subprocess.run([sys.executable, "-m", "npo_merge", "inspect", str(single_files["sd1"]), "--json"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "sd1"
