"""benchmarks/train_step.py --smoke: the GPU benchmark's rows run end to end on tiny CPU models and agree."""

from __future__ import annotations

import json

import pytest
from tiny_models import load_benchmark


@pytest.fixture(scope="module")
def train_step():
    return load_benchmark("train_step")


def test_smoke_run_times_every_row_and_they_agree(train_step, tmp_path, capsys):
    results = train_step.main(["--smoke", "--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    names = ["script", "cached", "cached batched"]
    assert [r["row"] for r in results] == names + [f"{name} +ckpt" for name in names]
    for row in results:
        assert f"| {row['row']} |" in table
        assert row["ms"] > 0 and row["pairs_per_s"] > 0
        # cached encodings and the batched reference are the same math as encoding every step, separately
        assert row["rel_loss_err"] < 1e-5 and row["rel_grad_err"] < 1e-3, row
    assert results[0]["x_script"] == 1.0 and results[3]["x_script"] == 1.0
    assert results[0]["grad_norm"] > 1e-3  # the agreement is over gradients that are there
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["environment"]["smoke"] is True and len(saved["results"]) == 6


def test_needs_a_gpu_without_smoke(train_step, monkeypatch):
    monkeypatch.setattr(train_step.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train_step.parse_args([])
