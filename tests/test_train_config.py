"""Train recipes and `--set`: the shipped recipes carry the paper's settings; overrides are typed; bad keys are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from npo_merge.errors import InputError
from npo_merge.training.config import ATTENTION_TARGETS, TrainOptions, load_train_recipe, options_from_mapping, set_option
from npo_merge.training.losses import beta_multiplier, convert_beta
from npo_merge.training.objectives import PAPER_BETA

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_sd15_recipe_has_the_paper_settings():
    opts = load_train_recipe(RECIPES / "sd15-dpo-npo.yaml").options
    assert (opts.objective, opts.model) == ("dpo-npo", "sd15-diffusers")
    assert (opts.dpo.beta, opts.dpo.convention) == (PAPER_BETA["sd1"].value, PAPER_BETA["sd1"].convention) == (500, "diffusers")
    assert (opts.optim.lr, opts.optim.scheduler, opts.optim.warmup_updates) == (5e-6, "constant", 0)
    assert (opts.lora.rank, opts.lora.alpha, opts.lora.targets) == (8, 8, ATTENTION_TARGETS)
    assert opts.batch_size * opts.gradient_accumulation == 64
    assert (opts.data.resolution, opts.updates, opts.save_dtype, opts.layout) == (512, 2000, "fp32", "diffusers")
    assert not opts.data.keep_ties


def test_sdxl_recipe_has_the_paper_settings_in_the_official_beta_form():
    opts = load_train_recipe(RECIPES / "sdxl-dpo-npo.yaml").options
    assert (opts.dpo.beta, opts.dpo.convention) == (PAPER_BETA["sdxl"].value, PAPER_BETA["sdxl"].convention) == (2000, "official")
    assert (opts.batch_size, opts.gradient_accumulation, opts.data.resolution) == (30, 2, 1024)
    assert opts.lora.rank == 8 and opts.optim.lr == 5e-6 and opts.gradient_checkpointing
    # both papers' strengths are the same multiplier once written in one convention
    assert beta_multiplier(opts.dpo.beta, opts.dpo.convention) == beta_multiplier(1000, "diffusers")
    assert convert_beta(2000, "official", "diffusers") == 1000


def test_self_npo_and_tiny_recipes_load():
    self_npo = load_train_recipe(RECIPES / "sd15-self-npo.yaml").options
    assert self_npo.objective == "self-npo" and self_npo.self_npo.w == -1 and self_npo.self_npo.teacher == "ema"
    assert self_npo.data.images and self_npo.updates == 1000
    tiny = load_train_recipe(RECIPES / "tiny-ci.yaml").options
    assert tiny.cpu and tiny.data.resolution == 32 and tiny.updates <= 10


def test_set_values_are_typed_by_the_options():
    data: dict = {"model": "m", "data": {"pairs": "p.jsonl"}}
    for assignment in ("updates=10", "optim.lr=1e-5", "lora.targets=[to_q, conv1]", "validation.prompts=a cat",
                       "data.cache=null", "dpo.convention=official", "gradient_checkpointing=true", "lora.alpha=16"):
        set_option(data, assignment)
    opts = options_from_mapping(data)
    assert opts.updates == 10 and isinstance(opts.updates, int)
    assert opts.optim.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; the float field takes it
    assert opts.lora.targets == ["to_q", "conv1"] and opts.validation.prompts == ["a cat"]
    assert opts.data.cache is None and opts.dpo.convention == "official" and opts.gradient_checkpointing
    assert opts.lora.alpha == 16.0 and isinstance(opts.lora.alpha, float)


@pytest.mark.parametrize("assignment,message", [
    ("dpo.bta=3", "--set dpo.bta: unknown option 'bta'; dpo options are beta, convention, loss_type"),
    ("stepz=3", "--set stepz: unknown option 'stepz'; train options are model,"),
    ("updates.x=1", "--set updates.x: updates is not a section"),
    ("updates", "--set needs key=value"),
])
def test_bad_set_keys_name_the_problem(assignment, message):
    with pytest.raises(InputError) as err:
        set_option({"model": "m"}, assignment)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("data,message", [
    ({"model": "m", "updates": "many"}, "option updates must be int, got 'many'"),
    ({"model": "m", "objective": "npo"}, "option objective must be one of dpo, dpo-npo, self-npo"),
    ({"model": "m", "lora": {"rank": 8, "alhpa": 8}}, "unknown option lora.alhpa; lora options are rank, alpha"),
    ({"objective": "dpo"}, "missing option model"),
])
def test_bad_recipe_values_are_one_line_errors(data, message):
    with pytest.raises(InputError, match=message):
        options_from_mapping(data)


def test_validation_of_combinations():
    with pytest.raises(InputError, match="needs data.pairs"):
        TrainOptions(model="m", objective="dpo").validate()
    with pytest.raises(InputError, match="needs data.images .* or data.captions"):
        TrainOptions(model="m", objective="self-npo").validate()
    opts = TrainOptions(model="m")
    opts.data.pairs, opts.data.resolution = "p", 30
    with pytest.raises(InputError, match="multiple of 8"):
        opts.validate()


def test_merge_recipes_are_not_train_recipes(tmp_path):
    merge = tmp_path / "merge.yaml"
    merge.write_text("version: 1\nsteps:\n  - extract: {base: a, tuned: b, out: c}\n")
    with pytest.raises(InputError, match="top-level 'train:' section .*npo-merge merge"):
        load_train_recipe(merge)
    with pytest.raises(InputError, match="cannot read recipe"):
        load_train_recipe(tmp_path / "missing.yaml")


def test_train_recipes_do_not_trip_the_merge_recipe_check():
    # tests/test_recipes.py parses every shipped file that mentions "steps:" as a merge recipe
    for name in ("sd15-dpo-npo.yaml", "sdxl-dpo-npo.yaml", "sd15-self-npo.yaml", "tiny-ci.yaml"):
        assert "steps:" not in (RECIPES / name).read_text(), name
