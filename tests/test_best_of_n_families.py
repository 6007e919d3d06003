"""Best-of-N with SDXL, SD3 and FLUX text-to-image pipelines: the kept image is the best-scoring of N and is what the
pipeline gives for its recorded seed; a checkpoint saved from another pipeline of the family generates through the
family's text-to-image class; inpainting and unsupported pipelines are refused naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from improve_utils import PROMPTS, read_jsonl, save_tiny_rahf, write_prompts
from PIL import Image
from rahf.improve.best_of_n import (
    as_text_to_image_pipeline,
    load_text_to_image_pipeline,
    parse_best_of_n_args,
    run_best_of_n,
    text_to_image_call_kwargs,
)

from rahf._testing_diffusers import (
    TINY_FAMILY_BUILDERS,
    tiny_flux_fill_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_inpaint_pipeline,
)
from rahf.reward import load_reward

FAMILIES = ("sdxl", "sd3", "flux")
N = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bon_families")
    rahf = save_tiny_rahf(root / "rahf")
    return {
        "root": root,
        "rahf": rahf,
        "reward_fn": load_reward("overall", str(rahf), device="cpu"),  # loaded once for every family
        "prompts": write_prompts(root / "prompts.txt", PROMPTS[:2]),
    }


def _argv(pipeline_path, assets, out) -> list[str]:
    return [
        str(a)
        for a in (
            "--pretrained_model_name_or_path",
            pipeline_path,
            "--reward_model",
            assets["rahf"],
            "--prompts_file",
            assets["prompts"],
            "--num_images_per_prompt",
            N,
            "--num_inference_steps",
            2,
            "--resolution",
            32,
            "--max_sequence_length",
            32,  # the tiny T5's window; SDXL does not take it
            "--batch_size",
            2,  # N = 3: one call of 2 images and one of 1, each image from its own seed
            "--seed",
            5,
            "--output_dir",
            out,
        )
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_best_of_n_keeps_the_best_scoring_of_n(family, assets):
    path = assets["root"] / family
    TINY_FAMILY_BUILDERS[family][0](seed=0).save_pretrained(path)
    out = assets["root"] / f"out-{family}"
    summary = run_best_of_n(parse_best_of_n_args(_argv(path, assets, out)), reward_fn=assets["reward_fn"])
    assert (summary["num_prompts"], summary["num_images"], summary["num_kept"]) == (2, 2 * N, 2)
    rows = read_jsonl(out / "all_scores.jsonl")
    kept = read_jsonl(out / "kept" / "metadata.jsonl")
    for p in range(2):
        mine = [r for r in rows if r["prompt_index"] == p]
        assert len({r["reward"] for r in mine}) == N  # N different images, N different scores
        best = max(mine, key=lambda r: r["reward"])
        (k,) = [k for k in kept if k["prompt_index"] == p]
        assert (k["image_index"], k["rank"], k["reward"]) == (best["image_index"], 1, best["reward"])
    # The kept image is what the family's pipeline gives for the recorded seed, with the job's settings.
    pipe = load_text_to_image_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    k = kept[0]
    kwargs = text_to_image_call_kwargs(pipe, 2, height=32, width=32, max_sequence_length=32)
    assert ("max_sequence_length" in kwargs) == (family != "sdxl")
    again = pipe(k["prompt"], generator=torch.Generator().manual_seed(k["seed"]), **kwargs).images[0]
    assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(Image.open(out / "kept" / k["file_name"])))


def test_another_pipeline_of_the_family_generates_as_its_text_to_image_pipeline():
    from diffusers import StableDiffusionXLPipeline

    inpaint = tiny_sdxl_inpaint_pipeline(seed=0, unet_in_channels=4)  # a text-to-image UNet in the inpainting class
    pipe = as_text_to_image_pipeline(inpaint)
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.unet is inpaint.unet
    reference = TINY_FAMILY_BUILDERS["sdxl"][0](seed=0)
    assert as_text_to_image_pipeline(reference) is reference
    kwargs = text_to_image_call_kwargs(pipe, 2, height=32, width=32, max_sequence_length=32)
    images = [
        np.asarray(p("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images[0])
        for p in (pipe, reference)
    ]
    assert np.array_equal(images[0], images[1])


def test_inpainting_and_unsupported_pipelines_are_refused(assets, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    inpaint = tmp_path / "sdxl-inpaint"
    tiny_sdxl_inpaint_pipeline(seed=0, unet_in_channels=9).save_pretrained(inpaint)
    with pytest.raises(
        ValueError, match=r"`pretrained_model_name_or_path` is a StableDiffusionXLInpaintPipeline.*9 input"
    ):
        run_best_of_n(parse_best_of_n_args(_argv(inpaint, assets, tmp_path / "a")), reward_fn=assets["reward_fn"])
    with pytest.raises(ValueError, match=r"`pipe` is a FluxFillPipeline.*input channels"):
        run_best_of_n(
            parse_best_of_n_args(_argv(inpaint, assets, tmp_path / "b")),
            pipe=tiny_flux_fill_pipeline(),
            reward_fn=assets["reward_fn"],
        )
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    with pytest.raises(ValueError, match=r"`pipe` is a DDPMPipeline.*supported: .*SDXL, SD3/SD3.5, FLUX"):
        as_text_to_image_pipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), "pipe")
    with pytest.raises(ValueError, match="max_sequence_length"):
        parse_best_of_n_args(["--max_sequence_length", "0"])
    # The SD pipelines of before keep their call: no T5 argument.
    assert "max_sequence_length" not in text_to_image_call_kwargs(tiny_sd_pipeline(), 2, max_sequence_length=32)


def test_flux_config_parses():
    args = parse_best_of_n_args(["--config", "configs/improve/best_of_n_flux.yaml", "--num_images_per_prompt", "2"])
    assert (args.num_images_per_prompt, args.num_inference_steps, args.max_sequence_length) == (2, 4, 256)
