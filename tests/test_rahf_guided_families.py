"""RAHF guidance for every family through the one mechanism (pipelines/guidance.py): SD, SDXL, SD3 and FLUX with tiny
offline components (32 px, 3 steps, 3 seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from rahf.pipelines import (
    AutoRAHFGuidedPipeline,
    RAHFGuidedFluxPipeline,
    RAHFGuidedStableDiffusion3Pipeline,
    RAHFGuidedStableDiffusionPipeline,
    RAHFGuidedStableDiffusionXLPipeline,
)
from rahf.pipelines.guidance import RAHFGuidedDenoiser

from rahf._testing_diffusers import TINY_FAMILY_BUILDERS, tiny_amused_pipeline, tiny_sd_inpaint_pipeline
from rahf.testing import tiny_rahf_model, tiny_rahf_processor

FAMILIES = {
    "sd": RAHFGuidedStableDiffusionPipeline,
    "sdxl": RAHFGuidedStableDiffusionXLPipeline,
    "sd3": RAHFGuidedStableDiffusion3Pipeline,
    "flux": RAHFGuidedFluxPipeline,
}
NAMES = list(FAMILIES)
# The tiny T5 tokenizer holds 32 tokens (the pipelines default to 256 / 512).
EXTRA = {"sd": {}, "sdxl": {}, "sd3": {"max_sequence_length": 32}, "flux": {"max_sequence_length": 32}}
PROMPT = "a red cat on a wooden table"
STEPS = 3
SEEDS = [0, 1, 2]


def _guided(name: str, base=None):
    base = base if base is not None else TINY_FAMILY_BUILDERS[name][0](0)
    pipe = AutoRAHFGuidedPipeline.from_pipe(
        base, reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    )
    pipe.set_progress_bar_config(disable=True)
    return base, pipe


def _run(pipe, name, seeds=SEEDS, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "height": 32, "width": 32, "output_type": "np", **EXTRA[name], **kwargs}
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe([PROMPT] * len(seeds), generator=generators, **kwargs)


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    name = request.param
    base, pipe = _guided(name)
    return name, base, pipe


def test_auto_picks_the_family_class_and_shares_the_components(family):
    name, base, pipe = family
    assert type(pipe) is FAMILIES[name]
    denoiser = "unet" if name in ("sd", "sdxl") else "transformer"
    assert getattr(pipe, denoiser) is getattr(base, denoiser) and pipe.vae is base.vae
    assert pipe.config.reward_model == ("rahf.modeling_rahf", "RAHFModel")
    assert all(not p.requires_grad for p in pipe.reward_model.parameters()) and not pipe.reward_model.training


def test_scale_zero_is_the_plain_pipeline_bit_for_bit(family):
    name, base, pipe = family
    plain = _run(base, name, seeds=SEEDS[:2]).images
    guided = _run(pipe, name, seeds=SEEDS[:2], reward_guidance_scale=0.0)
    assert np.array_equal(plain, guided.images)
    empty = _run(pipe, name, seeds=SEEDS[:2], reward_guidance_scale=1.0, guidance_start=0.5, guidance_end=0.5)
    assert np.array_equal(plain, empty.images)
    assert set(guided.reward_scores[0]) == set(pipe.reward_model.config.score_names)
    assert not isinstance(getattr(pipe, "unet", None) or pipe.transformer, RAHFGuidedDenoiser)  # uninstalled


def test_the_target_score_rises_with_the_scale(family):
    """Over 3 fixed seeds the mean aesthetics score of the final images rises with the scale (0 < 0.05 < 0.15);
    the tiny RAHF is random but smooth, so its gradient is a fixed direction in which the score rises."""
    name, _, pipe = family
    means = [float(np.mean(_run(pipe, name, reward_guidance_scale=s).rewards)) for s in (0.0, 0.05, 0.15)]
    assert all(b > a for a, b in zip(means, means[1:])), means


def test_no_nan_or_inf_at_any_scale(family):
    name, base, pipe = family
    for scale, options in (
        (1e300, {"num_recurrence_steps": 2, "guidance_decode_scale": 0.5}),
        (-3.0, {"backprop_through_denoiser": True, "guide_every": 2}),
        (50.0, {"normalize_grad": False, "grad_clip": None, "guidance_scale": 1.0}),  # no CFG batch
    ):
        out = _run(pipe, name, seeds=SEEDS[:2], reward_guidance_scale=scale, **options)
        assert np.isfinite(out.images).all(), (scale, options)
        assert np.isfinite(out.rewards).all() and out.num_nonfinite_grads == 0
        if "num_recurrence_steps" in options:  # one scheduler step per timestep, whatever the recurrence
            assert getattr(pipe.scheduler, "step_index", STEPS) == STEPS


def test_non_finite_gradients_are_zeroed_and_counted(family):
    name, base, pipe = family

    def poisoned(images, prompts, metadata):
        return (images * float("nan")).mean(dim=(1, 2, 3)), {}

    out = _run(pipe, name, seeds=SEEDS[:1], reward=poisoned, reward_guidance_scale=1.0)
    assert out.num_nonfinite_grads > 0 and np.isfinite(out.images).all()
    assert np.array_equal(out.images, _run(base, name, seeds=SEEDS[:1]).images)  # zeroed gradient = no shift


def test_save_and_load_round_trip(family, tmp_path):
    name, _, pipe = family
    pipe.save_pretrained(tmp_path / name)
    assert (tmp_path / name / "reward_model" / "config.json").is_file()
    loaded = FAMILIES[name].from_pretrained(tmp_path / name)
    loaded.set_progress_bar_config(disable=True)
    a = _run(pipe, name, seeds=SEEDS[:2], reward_guidance_scale=0.4, guide_every=2)
    b = _run(loaded, name, seeds=SEEDS[:2], reward_guidance_scale=0.4, guide_every=2)
    assert np.array_equal(a.images, b.images) and a.rewards == b.rewards


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guide_every": 0}, "`guide_every`"),
        ({"guidance_decode_scale": 1.5}, "`guidance_decode_scale`"),
        ({"reward_guidance_scale": float("inf")}, "`reward_guidance_scale`"),
        ({"guidance_start": 0.9, "guidance_end": 0.1}, "`guidance_start`"),
        ({"grad_clip": 0.0}, "`grad_clip`"),
        ({"reward": "beauty"}, "unknown RAHF reward 'beauty'"),
        ({"reward_prompt": ["one", "two", "three"]}, "`reward_prompt` has 3 prompts"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_field(family, kwargs, match):
    name, _, pipe = family
    with pytest.raises(ValueError, match=match):
        _run(pipe, name, seeds=SEEDS[:2], **{"reward_guidance_scale": 1.0, **kwargs})


def test_a_scheduler_of_the_other_parameterisation_is_refused_by_name():
    for name, wrong, right in (("sd3", DDIMScheduler, "FlowMatchEulerDiscreteScheduler"), ("sdxl", None, "DDIM")):
        _, pipe = _guided(name)
        if wrong is None:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler()
        else:
            pipe.scheduler = wrong.from_config(pipe.scheduler.config)
        with pytest.raises(ValueError, match=f"does not support the scheduler.*{right}"):
            _run(pipe, name, seeds=[0], reward_guidance_scale=1.0)


def test_auto_refuses_what_it_cannot_guide_naming_the_supported_families():
    reward = {"reward_model": tiny_rahf_model(), "reward_processor": tiny_rahf_processor()}
    with pytest.raises(ValueError, match=r"amused.*supported: sd, sdxl, sd3, flux"):
        AutoRAHFGuidedPipeline.from_pipe(tiny_amused_pipeline(), **reward)
    with pytest.raises(ValueError, match="supported"):
        AutoRAHFGuidedPipeline.from_pipe(object(), **reward)
    with pytest.raises(ValueError, match="9 input channels.*text-to-image"):
        AutoRAHFGuidedPipeline.from_pipe(tiny_sd_inpaint_pipeline(), **reward)
    with pytest.raises(OSError, match="from_pipe"):
        AutoRAHFGuidedPipeline()


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_auto_takes_the_components_of_an_inpainting_pipeline(name):
    inpaint = TINY_FAMILY_BUILDERS[name][1](0)  # a text-to-image checkpoint loaded into the inpainting pipeline
    _, pipe = _guided(name, base=inpaint)
    assert type(pipe) is FAMILIES[name] and pipe.vae is inpaint.vae and pipe.text_encoder is inpaint.text_encoder


def test_flux_dev_guidance_embedding_and_true_cfg():
    """FLUX.1-dev's transformer reads a guidance embedding; true CFG calls it twice per step: the same shift goes to
    both calls, so the combination moves by it too."""
    base = TINY_FAMILY_BUILDERS["flux"][0](0)
    torch.manual_seed(0)
    base.transformer = FluxTransformer2DModel.from_config({**base.transformer.config, "guidance_embeds": True}).eval()
    _, pipe = _guided("flux", base=base)
    for options in ({"guidance_scale": 3.5}, {"negative_prompt": "blurry", "true_cfg_scale": 2.0}):
        plain = _run(base, "flux", seeds=SEEDS[:2], **options)
        scaled = [_run(pipe, "flux", seeds=SEEDS[:2], reward_guidance_scale=s, **options) for s in (0.0, 0.4)]
        assert np.array_equal(plain.images, scaled[0].images)
        assert np.isfinite(scaled[1].images).all() and np.mean(scaled[1].rewards) > np.mean(scaled[0].rewards)
    with pytest.raises(ValueError, match="num_recurrence_steps"):
        _run(pipe, "flux", reward_guidance_scale=1.0, num_recurrence_steps=2, negative_prompt="x", true_cfg_scale=2.0)


def test_callbacks_and_outputs_pass_through():
    _, pipe = _guided("sd3")
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {}

    images, rewards, scores, bad = _run(
        pipe,
        "sd3",
        seeds=[0, 1],
        reward_guidance_scale=0.5,
        return_dict=False,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        output_type="pil",
    )
    assert seen == [(i, ["prompt_embeds"]) for i in range(STEPS)]
    assert [im.size for im in images] == [(32, 32)] * 2 and len(rewards) == len(scores) == 2 and bad == 0
    latents = _run(pipe, "sd3", seeds=[0], reward_guidance_scale=0.5, output_type="latent")
    assert latents.images.shape == (1, 16, 16, 16) and latents.rewards is None


# ---------------------------------------------------------------------------------------------------------------------
# Fitting where users run them: offload, VAE slicing / tiling, bf16


@pytest.mark.parametrize("name", ["flux"])
def test_model_cpu_offload_keeps_the_vae_and_reward_model_on_the_device(name):
    """On CPU the offload call path runs with the execution device set to the CPU: the text encoders and the
    denoiser get hooks, the VAE and the reward model (used at every guided step) none, and guidance gives the same
    images as without offloading."""
    _, pipe = _guided(name)
    before = _run(pipe, name, seeds=[0, 1], reward_guidance_scale=0.4)
    pipe.enable_model_cpu_offload(device="cpu")
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert not hasattr(pipe.reward_model, "_hf_hook") and not hasattr(pipe.vae, "_hf_hook")
    assert all(hasattr(m, "_hf_hook") for k, m in modules.items() if k not in ("vae", "reward_model"))
    after = _run(pipe, name, seeds=[0, 1], reward_guidance_scale=0.4)
    assert np.array_equal(before.images, after.images) and before.rewards == after.rewards
    denoiser = pipe.unet if name == "sdxl" else pipe.transformer
    assert hasattr(denoiser, "_hf_hook") and not isinstance(denoiser, RAHFGuidedDenoiser)  # hooks on the real one
    pipe.remove_all_hooks()


def test_vae_slicing_and_tiling_carry_the_gradient():
    _, pipe = _guided("sdxl")
    pipe.vae.enable_slicing()  # diffusers 0.42's pipelines have no enable_vae_*: the VAE's own switch
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 16, 8  # tiles smaller than the 32 px image
    base = _run(pipe, "sdxl", seeds=SEEDS[:2], reward_guidance_scale=0.0)
    guided = _run(pipe, "sdxl", seeds=SEEDS[:2], reward_guidance_scale=0.4)
    assert np.isfinite(guided.images).all() and np.mean(guided.rewards) > np.mean(base.rewards)
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()


def test_bf16_generator_with_a_float32_reward_model():
    """bf16 runs on CPU (fp16 would be emulated and slow, so it is left to accelerators); the reward model keeps its
    own dtype and the gradient reaches the bf16 latents."""
    base = TINY_FAMILY_BUILDERS["flux"][0](0).to(torch.bfloat16)
    _, pipe = _guided("flux", base=base)
    pipe.reward_model.float()
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    scaled = [_run(pipe, "flux", seeds=SEEDS[:2], reward_guidance_scale=s, output_type="pt") for s in (0.0, 0.4)]
    assert scaled[1].images.dtype == torch.bfloat16 and torch.isfinite(scaled[1].images).all()  # as FluxPipeline's
    assert np.mean(scaled[1].rewards) > np.mean(scaled[0].rewards)


# ---------------------------------------------------------------------------------------------------------------------
# The guidance job with a checkpoint of each family


@pytest.fixture(scope="module")
def saved_rahf(tmp_path_factory):
    root = tmp_path_factory.mktemp("rahf")
    tiny_rahf_model().save_pretrained(root)
    tiny_rahf_processor().save_pretrained(root)
    (root / "prompts.txt").write_text(PROMPT + "\n")
    return root


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_guided_sample_job_with_a_checkpoint_of_each_family(name, saved_rahf, tmp_path):
    import json

    from rahf.improve.guided_sample import main

    TINY_FAMILY_BUILDERS[name][0](0).save_pretrained(tmp_path / "generator")
    argv = [
        "--config",
        "configs/improve/guidance.yaml",
        "--pretrained_model_name_or_path",
        str(tmp_path / "generator"),
    ]
    argv += ["--reward_model", str(saved_rahf), "--prompts_file", str(saved_rahf / "prompts.txt")]
    argv += ["--output_dir", str(tmp_path / "out"), "--num_inference_steps", "3", "--seeds", "0", "1"]
    argv += ["--reward_guidance_scale", "0.15", "--guidance_decode_scale", "1.0", "--height", "32", "--width", "32"]
    argv += ["--guidance_scale", "0" if name == "flux" else "5", "--device", "cpu"]
    if name in ("sd3", "flux"):
        argv += ["--max_sequence_length", "32"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["family"] == name and [row["scale"] for row in summary["per_scale"]] == [0.0, 0.15]
    assert all(row["nan_count"] == 0 for row in summary["per_scale"])
    assert summary["per_scale"][1]["mean_target"] > summary["per_scale"][0]["mean_target"]
    # SD 1.5's PNDM would be swapped for DDIM; these checkpoints' own schedulers are kept
    assert summary["scheduler"] == ("EulerDiscreteScheduler" if name == "sdxl" else "FlowMatchEulerDiscreteScheduler")


def test_guided_sample_job_refuses_a_scheduler_of_the_other_kind(saved_rahf, tmp_path):
    from rahf.improve.guided_sample import main

    TINY_FAMILY_BUILDERS["sd3"][0](0).save_pretrained(tmp_path / "generator")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "generator"), "--reward_model", str(saved_rahf)]
    argv += ["--prompts_file", str(saved_rahf / "prompts.txt"), "--scheduler", "ddim", "--device", "cpu"]
    with pytest.raises(ValueError, match=r"`--scheduler ddim` does not fit a sd3 pipeline.*flow_match_euler"):
        main(argv + ["--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--cpu_offload"):
        main(argv[:-4] + ["--cpu_offload", "--device", "cpu", "--output_dir", str(tmp_path / "out")])
