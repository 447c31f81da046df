"""benchmarks/cfg_step.py --smoke: the GPU benchmark's rows run end to end on tiny CPU models and agree."""

from __future__ import annotations

import json

import pytest
from tiny_models import load_benchmark, one_torch_thread


@pytest.fixture(scope="module")
def cfg_step():
    return load_benchmark("cfg_step")


def test_smoke_run_times_every_row_and_rows_agree(cfg_step, tmp_path, capsys):
    with one_torch_thread():
        results = cfg_step.main(["--smoke", "--models", "sd15,sdxl", "--lora", "attn-r8", "--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    assert len(results) == 2 * len(cfg_step.ROWS)
    for row in cfg_step.ROWS:
        assert f"| {row} |" in table
    by_key = {(r["model"], r["row"]): r for r in results}
    for model in ("sd15", "sdxl"):
        assert by_key[model, "plain"]["eager_x_plain"] == 1.0
        assert by_key[model, "two_unets"]["weights_mb"] > 1.9 * by_key[model, "plain"]["weights_mb"]
        assert by_key[model, "plain"]["err_vs_two_unets"] > 1e-3  # NPO changes the output
        for row in ("peft_toggle", "peft_mixed", "npo_lowrank", "npo_stacked"):
            assert "eager_error" not in by_key[model, row]
            assert by_key[model, row]["err_vs_two_unets"] < 1e-4, row
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["environment"]["smoke"] is True and len(saved["results"]) == len(results)
