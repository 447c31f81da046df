"""apply's streamed single-file path (kernel copies of untouched runs, row chunks through reused
buffers) writes the same bytes as the whole-tensor path, and both equal the explicit fp32 sum."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from npo_merge import apply as apply_module
from npo_merge import tiny
from npo_merge.apply import Term, apply_plan, plan_apply
from npo_merge.delta.files import FULL, open_delta, provenance
from npo_merge.delta.types import BaseFingerprint, LowRank
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.lora_writer import write_lora
from npo_merge.io.safetensors_stream import SafetensorsReader, SafetensorsWriter, save_tensors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD1.5 targets (fp32, fp16), a full fp16 delta on every other UNet/text tensor, a LoRA."""
    folder = tmp_path_factory.mktemp("stream")
    files = {
        "t32": tiny.write_single_file(folder / "t32.safetensors", "sd1", seed=0),
        "t16": tiny.write_single_file(folder / "t16.safetensors", "sd1", seed=0, dtype=torch.float16),
    }
    gen = torch.Generator().manual_seed(3)
    with open_checkpoint(files["t32"]) as target:
        keys = [k for k in sorted(target.keys()) if k.startswith(("unet.", "text_encoder.")) and target.shape(k)]
        full = {k: (torch.randn(target.shape(k), generator=gen) * 1e-2).half() for k in keys[::2]}
        matrices = [k for k in keys[1::2] if k.startswith("unet.") and k.endswith(".weight") and len(target.shape(k)) in (2, 4)]
        modules = []
        for key in matrices[:12]:
            shape = target.shape(key)
            down = torch.randn(4, *shape[1:], generator=gen) * 0.1
            up = torch.randn(shape[0], 4, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.1
            modules.append((key[: -len(".weight")], LowRank(down, up, 2.0)))
    save_tensors(folder / "full.safetensors", full, provenance(FULL, "positive", BaseFingerprint("sd1")))
    write_lora(folder / "lora.safetensors", modules, layout="kohya", architecture="sd1", dtype=torch.float16)
    files["full"], files["lora"] = folder / "full.safetensors", folder / "lora.safetensors"
    return files


def _apply(target: Path, deltas: list[tuple[Path, float]], out: Path, dtype: torch.dtype | None) -> Path:
    with open_checkpoint(target) as checkpoint:
        opened = [open_delta(path) for path, _ in deltas]
        try:
            return apply_plan(plan_apply(checkpoint, [Term(d, s) for d, (_, s) in zip(opened, deltas)]), out, dtype=dtype)
        finally:
            for delta in opened:
                delta.close()


def _explicit(target: Path, deltas: list[tuple[Path, float]], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """target + scale * delta (one term) or target + sum(scale * delta) (several), in fp32, rounded
    once to the output dtype; tensors no delta touches only change dtype (if told to)."""
    expected = {}
    with open_checkpoint(target) as checkpoint:
        opened = [(open_delta(path), scale) for path, scale in deltas]
        for key in checkpoint.keys():
            value = checkpoint.tensor(key)
            out_dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
            terms = [(delta.dense(key).float(), scale) for delta, scale in opened if key in delta.keys]
            if len(terms) == 1:
                value = value.float().add_(terms[0][0], alpha=terms[0][1])
            elif terms:
                total = terms[0][0].mul_(terms[0][1])
                for term, scale in terms[1:]:
                    total.add_(term, alpha=scale)
                value = value.float().add_(total)
            expected[key] = value.to(out_dtype)
        for delta, _ in opened:
            delta.close()
    return expected


def _use_the_whole_tensor_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make apply treat safetensors files like any other source: read each tensor, add, write it whole."""
    monkeypatch.setattr(apply_module, "SafetensorsReader", type("NotAReader", (), {}))


CASES = {
    "full fp16 on fp16, scale 1": ("t16", [("full", 1.0)], None),
    "full fp16 on fp16, scale 0.7": ("t16", [("full", 0.7)], None),
    "lora on fp16, scale -1.5": ("t16", [("lora", -1.5)], None),
    "full + lora on fp32, to fp16": ("t32", [("full", 0.5), ("lora", 2.0)], torch.float16),
    "lora on fp16, to bf16": ("t16", [("lora", 1.0)], torch.bfloat16),
    "full on fp32, scale 1": ("t32", [("full", 1.0)], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_output_equals_whole_tensor_path_and_fp32_sum(inputs: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    target_name, terms, dtype = CASES[case]
    target, deltas = inputs[target_name], [(inputs[name], scale) for name, scale in terms]
    monkeypatch.setattr(apply_module, "_CHUNK_ELEMENTS", 700)  # several row chunks per larger tensor
    monkeypatch.setattr(apply_module, "_READ_CHUNK_ELEMENTS", 300)
    calls = {"copy": 0, "write_part": 0}
    for method in calls:
        original = getattr(SafetensorsWriter, method)

        def counted(self, *args, _original=original, _method=method):  # type: ignore[no-untyped-def]
            calls[_method] += 1
            return _original(self, *args)

        monkeypatch.setattr(SafetensorsWriter, method, counted)
    streamed = _apply(target, deltas, tmp_path / "streamed.safetensors", dtype)
    assert calls["write_part"] > 0 and (calls["copy"] > 0 or dtype is not None)  # a dtype change converts floats
    _use_the_whole_tensor_path(monkeypatch)
    whole = _apply(target, deltas, tmp_path / "whole.safetensors", dtype)
    assert streamed.read_bytes() == whole.read_bytes()

    expected = _explicit(target, deltas, dtype)
    with open_checkpoint(streamed) as out, open_checkpoint(target) as original:
        assert set(out.keys()) == set(expected)
        changed = 0
        for key, value in expected.items():
            got = out.tensor(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key
            changed += not torch.equal(got, original.tensor(key).to(got.dtype))
        assert 0 < changed < len(expected)  # touched and untouched tensors both present
    with SafetensorsReader(streamed) as reader, SafetensorsReader(target) as source:
        extras = [name for name in source if not name.startswith("model.diffusion_model.")
                  and not name.startswith(("cond_stage_model.", "first_stage_model."))]
        for name in extras:  # tensors without a canonical name are carried over as they are
            expected_extra = source.tensor(name)
            if dtype is not None and expected_extra.is_floating_point():
                expected_extra = expected_extra.to(dtype)
            assert torch.equal(reader.tensor(name), expected_extra), name


def test_a_replaced_branch_in_the_middle_of_the_file_is_left_out_of_the_copied_runs(
        inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-applying an NPO delta drops the old branch tensors; where they sat between other tensors,
    the byte copies must skip them (the whole-tensor path is the reference)."""
    from npo_merge.cli import main
    from npo_merge.io.safetensors_stream import TensorSpec

    dual = tmp_path / "dual.safetensors"
    assert main(["apply", "--target", str(inputs["t16"]), "--delta", str(inputs["lora"]), "--role", "negative",
                 "--out", str(dual), "-q"]) == 0
    middle = tmp_path / "branch-in-the-middle.safetensors"
    with SafetensorsReader(dual) as reader:
        branch = [n for n in reader if n.startswith("npo_uncond.")]
        rest = [n for n in reader if n not in branch]
        order = rest[: len(rest) // 2] + branch + rest[len(rest) // 2:]
        with SafetensorsWriter(middle, [TensorSpec(n, reader[n].dtype, reader[n].shape) for n in order],
                               reader.metadata) as writer:
            for name in order:
                writer.write(name, reader.tensor(name))
    outputs = []
    for label in ("streamed", "whole"):
        if label == "whole":
            _use_the_whole_tensor_path(monkeypatch)
        out = tmp_path / f"{label}.safetensors"
        assert main(["apply", "--target", str(middle), "--delta", str(inputs["lora"]), "--role", "negative",
                     "--eta", "0.5", "--out", str(out), "-q"]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    with SafetensorsReader(tmp_path / "streamed.safetensors") as out, SafetensorsReader(middle) as target:
        for name in rest:
            assert torch.equal(out.tensor(name), target.tensor(name)), name  # theta_c unchanged by an NPO delta
