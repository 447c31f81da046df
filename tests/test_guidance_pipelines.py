"""Full 20-step sampling with tiny SD1.5 and SDXL pipelines: NPO in one UNet equals the two-UNet official way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import linear_and_conv_names, one_torch_thread, random_lora, tiny_sd15_pipeline, tiny_sdxl_pipeline

from npo_merge.guidance.install import disable_npo, enable_npo, set_branch_mode
from npo_merge.guidance.reference import two_unet_pipeline

BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    out = {}
    for arch, build in BUILDERS.items():
        pipe = build(tmp_path_factory.mktemp(arch))
        out[arch] = (pipe, random_lora(pipe.unet, linear_and_conv_names(pipe.unet), 4, seed=5))
    return out


def _sample(pipe, **kwargs) -> np.ndarray:
    # 16x16 images (8x8 latents) keep the 20-step runs short; every block still runs.
    args = {"prompt": "a cat at the zoo", "num_inference_steps": 20, "guidance_scale": 5.0, "output_type": "np"}
    args.update(height=16, width=16)
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(0), **args).images


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("arch", BUILDERS)
def test_sampling_matches_two_unet_reference(pipes, arch):
    pipe, deltas = pipes[arch]
    kwargs = {"negative_prompt": "blurry"} if arch == "sd15" else {}
    plain = _sample(pipe, **kwargs)
    with two_unet_pipeline(pipe, deltas):
        reference = _sample(pipe, **kwargs)
    with enable_npo(pipe, deltas):
        got = _sample(pipe, **kwargs)
    assert got.shape == reference.shape == (1, 16, 16, 3)
    assert _mad(plain, reference) > 5 / 255  # NPO changes the images, so the comparison below can fail
    assert _mad(got, reference) < 1 / 255


def test_auto_mode_follows_the_pipelines_guidance_flag(pipes):
    """guidance_scale <= 1: the pipeline sends cond rows only, NPO must step aside; > 1: NPO is back."""
    pipe, deltas = pipes["sd15"]
    prompts = ["a cat at the zoo", "the cat"]  # an even batch: a wrong 'cfg' split would not raise
    plain_no_cfg = _sample(pipe, prompt=prompts, guidance_scale=1.0, num_inference_steps=4)
    plain_cfg = _sample(pipe, num_inference_steps=4)
    with enable_npo(pipe, deltas):
        assert _mad(_sample(pipe, prompt=prompts, guidance_scale=1.0, num_inference_steps=4), plain_no_cfg) == 0
        assert _mad(_sample(pipe, num_inference_steps=4), plain_cfg) > 1 / 255
        set_branch_mode(pipe, "cond")  # explicit mode: plain CFG with theta_c, whatever the guidance
        assert _mad(_sample(pipe, num_inference_steps=4), plain_cfg) == 0
        set_branch_mode(pipe, "auto")
        assert _mad(_sample(pipe, num_inference_steps=4), plain_cfg) > 1 / 255
    assert "encode_prompt" not in pipe.__dict__  # the pipeline's own method again
    assert _mad(_sample(pipe, num_inference_steps=4), plain_cfg) == 0  # disabled: plain images, bit for bit


def test_disable_on_pipeline_restores_everything(pipes):
    pipe, deltas = pipes["sdxl"]
    unet = pipe.unet
    enable_npo(pipe, deltas)
    assert disable_npo(pipe) == len(deltas)
    assert pipe.unet is unet and "encode_prompt" not in pipe.__dict__
