"""YAML recipes: run extract -> combine -> apply with provenance; dry run writes nothing; bad recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from npo_merge import tiny
from npo_merge.cli import main
from npo_merge.io.checkpoint import open_checkpoint
from npo_merge.io.hashing import sha256_file
from npo_merge.recipes import load_recipe

RECIPE = """\
version: 1
steps:
  - extract: {base: base.safetensors, tuned: tuned.safetensors, rank: 4, components: [unet], dtype: fp32, out: d.safetensors}
  - combine:
      deltas: [{path: d.safetensors, weight: 0.5}, {path: d.safetensors, weight: 0.25}]
      out: d2.safetensors
      dtype: fp32
  - apply:
      target: base.safetensors
      deltas: [d2.safetensors]
      out: merged.safetensors
"""


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    tiny.write_single_file(tmp_path / "base.safetensors", "sd1", seed=0)
    tiny.write_single_file(tmp_path / "tuned.safetensors", "sd1", seed=1)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path


def test_dry_run_prints_the_plan_and_writes_nothing(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in workdir.iterdir())
    assert main(["merge", str(workdir / "recipe.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in workdir.iterdir()) == before
    assert "step 1: extract" in out and "step 3: apply" in out
    assert "reads 1130 shared tensors" in out and "peak memory about" in out
    assert "[output of step 1]" in out and "[output of step 2]" in out


def test_recipe_runs_and_every_output_carries_its_provenance(workdir: Path) -> None:
    assert main(["merge", str(workdir / "recipe.yaml"), "-q"]) == 0
    with open_checkpoint(workdir / "merged.safetensors") as merged, open_checkpoint(workdir / "base.safetensors") as base:
        meta = merged.metadata
        assert meta["npo_merge.recipe"] == RECIPE and meta["npo_merge.recipe_step"] == "3"
        inputs = json.loads(meta["npo_merge.inputs"])
        assert inputs[str(workdir / "base.safetensors")] == sha256_file(workdir / "base.safetensors")
        assert inputs[str(workdir / "d2.safetensors")] == sha256_file(workdir / "d2.safetensors")
        key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        from npo_merge.delta.files import open_delta

        with open_delta(workdir / "d.safetensors") as delta:
            expected = base.tensor(key) + 0.75 * delta.dense(key)
        torch.testing.assert_close(merged.tensor(key), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text,message", [
    ("steps: []", "non-empty 'steps'"),
    ("steps:\n  - bake: {}", "unknown step 'bake'"),
    ("steps:\n  - apply: {target: x, deltas: [a], outt: y}", "no option 'outt'"),
    ("steps: [\n", "not valid YAML"),
    ("version: 9\nsteps:\n  - apply: {target: x, deltas: [a]}", "version 9"),
])
def test_bad_recipes_are_one_line_errors(tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "r.yaml")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_shipped_recipes_parse() -> None:
    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        text = path.read_text()
        if "steps:" in text:
            assert load_recipe(path).steps, path
