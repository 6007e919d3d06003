"""RAHFGuidedStableDiffusionPipeline and `python -m rahf.improve.guided_sample`, with tiny random components (32 px, 4 steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from rahf.pipelines.rahf_guided import RAHFGuidedStableDiffusionPipeline

from rahf.reward import RAHFReward, get_reward
from rahf.testing import tiny_rahf_model, tiny_rahf_processor, tiny_sd_pipeline

SCHEDULERS = [DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler]
SCHEDULER_IDS = ["ddim", "euler", "euler_ancestral", "dpm_solver"]
STEPS = 4
SEEDS = list(range(6))
PROMPT = "a red cat on a wooden table"


def _pipes(scheduler_cls=DDIMScheduler, variant="multi_head", **scheduler_kwargs):
    sd = tiny_sd_pipeline(seed=0)
    sd.scheduler = scheduler_cls.from_config(sd.scheduler.config, **scheduler_kwargs)
    pipe = RAHFGuidedStableDiffusionPipeline.from_pipe(
        sd, reward_model=tiny_rahf_model(variant), reward_processor=tiny_rahf_processor(variant)
    )
    pipe.set_progress_bar_config(disable=True)
    return sd, pipe


def _run(pipe, seeds=SEEDS, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe([PROMPT] * len(seeds), generator=generators, **kwargs)


@pytest.fixture(scope="module")
def ddim_pipes():
    return _pipes(DDIMScheduler)


def test_from_pipe_registers_the_reward_components(ddim_pipes):
    sd, pipe = ddim_pipes
    assert pipe.components["reward_model"] is not None and pipe.components["reward_processor"] is not None
    assert pipe.unet is sd.unet and pipe.vae is sd.vae  # shared, not copied
    assert pipe.config.reward_model == ("rahf.modeling_rahf", "RAHFModel")
    assert all(not p.requires_grad for p in pipe.reward_model.parameters()) and not pipe.reward_model.training


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=SCHEDULER_IDS)
def test_scale_zero_reproduces_the_plain_pipeline_exactly(scheduler_cls):
    sd, pipe = _pipes(scheduler_cls)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS[:3]]
    plain = sd([PROMPT] * 3, num_inference_steps=STEPS, generator=generators, output_type="np").images
    guided = _run(pipe, seeds=SEEDS[:3], reward_guidance_scale=0.0)
    assert np.array_equal(plain, guided.images)
    # a window with no step in it is no guidance either
    empty = _run(pipe, seeds=SEEDS[:3], reward_guidance_scale=1.0, guidance_start=0.5, guidance_end=0.5)
    assert np.array_equal(plain, empty.images)
    assert len(guided.reward_scores) == 3 and set(guided.reward_scores[0]) == set(pipe.reward_model.config.score_names)


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=SCHEDULER_IDS)
def test_no_nan_or_inf_over_seeds_and_scales(scheduler_cls):
    _, pipe = _pipes(scheduler_cls)
    for scale in (1e-3, 0.5, 3.0, -2.0, 1e6, 1e30, 1e300):
        out = _run(pipe, reward_guidance_scale=scale, num_recurrence_steps=2 if scale == 3.0 else 1)
        assert np.isfinite(out.images).all(), f"scale {scale}"
        assert np.isfinite(out.rewards).all() and out.num_nonfinite_grads == 0
    # v-prediction models (SD 2.x) too
    _, pipe_v = _pipes(scheduler_cls, prediction_type="v_prediction")
    out = _run(pipe_v, reward_guidance_scale=1e6)
    assert np.isfinite(out.images).all() and out.num_nonfinite_grads == 0
    # raw (unnormalised) gradients, unclipped: still finite for moderate scales
    out = _run(pipe, reward_guidance_scale=100.0, normalize_grad=False, grad_clip=None)
    assert np.isfinite(out.images).all()


def test_non_finite_gradients_are_zeroed_with_a_warning(ddim_pipes, caplog):
    _, pipe = ddim_pipes

    def poisoned(images, prompts, metadata):  # a differentiable reward whose gradient is NaN
        return (images * float("nan")).mean(dim=(1, 2, 3)), {}

    with caplog.at_level("WARNING", logger="rahf.pipelines.rahf_guided"):
        out = _run(pipe, seeds=SEEDS[:2], reward=poisoned, reward_guidance_scale=1.0)
    assert out.num_nonfinite_grads > 0 and "non-finite" in caplog.text
    assert np.isfinite(out.images).all()
    plain = _run(pipe, seeds=SEEDS[:2], reward_guidance_scale=0.0)
    assert np.array_equal(out.images, plain.images)  # zeroed gradient = no shift


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=SCHEDULER_IDS)
@pytest.mark.parametrize("reward", ["aesthetics", "-implausibility"])
def test_guidance_increases_the_target_and_grows_with_the_scale(scheduler_cls, reward):
    """Over 6 fixed seeds, the mean target reward of the final images rises with the scale (0 < 0.1 < 0.25 < 0.5).

    The tiny RAHF is random, but its scores are smooth functions of the image, so their gradient is well defined;
    `rahf demo` re-runs this with the tiny RAHF trained on the synthetic set.
    """
    _, pipe = _pipes(scheduler_cls)
    means = [float(np.mean(_run(pipe, reward=reward, reward_guidance_scale=s).rewards)) for s in (0.0, 0.1, 0.25, 0.5)]
    assert all(b > a for a, b in zip(means, means[1:])), means


def test_guidance_works_with_the_augmented_variant():
    _, pipe = _pipes(DDIMScheduler, variant="augmented_prompt")
    base = np.mean(_run(pipe, reward_guidance_scale=0.0).rewards)
    guided = _run(pipe, reward_guidance_scale=0.5)
    assert np.mean(guided.rewards) > base and np.isfinite(guided.images).all()


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=SCHEDULER_IDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_matches_the_scheduler(scheduler_cls, prediction_type):
    """The guidance reads the noise level of each step right (Euler's latents are sigma-scaled, the others' are not)."""
    _, pipe = _pipes(scheduler_cls, prediction_type=prediction_type)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(latents.shape, generator=g)
        scheduler.scale_model_input(latents, t)
        alpha_bar, _, latent_scale, _ = pipe._noise_levels(i, t)
        ours = pipe._pred_original_sample(latents * latent_scale, model_output, alpha_bar)
        if isinstance(scheduler, DPMSolverMultistepScheduler):
            if scheduler.step_index is None:
                scheduler._init_step_index(t)
            theirs = scheduler.convert_model_output(model_output, sample=latents)  # dpmsolver++: the x0 prediction
            latents = scheduler.step(model_output, t, latents, return_dict=False)[0]
        else:
            step = (
                scheduler.step(model_output, t, latents, generator=g)
                if scheduler_cls is not DDIMScheduler
                else scheduler.step(model_output, t, latents)
            )
            theirs, latents = step.pred_original_sample, step.prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_noise_shift_moves_x0_alike_for_every_prediction_type(prediction_type):
    _, pipe = _pipes(DDIMScheduler, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(2)
    z, output, shift = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    alpha_bar = 0.3
    moved = pipe._pred_original_sample(z, output + pipe._shift_to_model_output(shift, alpha_bar), alpha_bar)
    expected = -(((1 - alpha_bar) / alpha_bar) ** 0.5) * shift  # what eps <- eps + shift does to x0 with z fixed
    torch.testing.assert_close(moved - pipe._pred_original_sample(z, output, alpha_bar), expected)


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=SCHEDULER_IDS)
def test_the_shift_moves_the_predicted_image_up_the_reward(scheduler_cls):
    _, pipe = _pipes(scheduler_cls)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(3, 4, 16, 16, generator=g) * scheduler.init_noise_sigma
    noise = torch.randn(latents.shape, generator=g)
    t = scheduler.timesteps[1]
    scheduler.scale_model_input(latents, t)
    alpha_bar, _, c, _ = pipe._noise_levels(1, t)
    reward = RAHFReward.from_target(pipe.reward_model, pipe.reward_processor, "aesthetics")
    prompts = [PROMPT] * 3
    grad, before = pipe.compute_reward_gradient(latents, noise, alpha_bar, c, reward, prompts)
    shift, bad = pipe._guidance_shift(grad, alpha_bar, c, 0.05, normalize_grad=True, grad_clip=1.0)
    assert bad == 0 and shift.shape == latents.shape
    rms = shift.flatten(1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full((3,), 0.05 * (1 - alpha_bar) ** 0.5, dtype=rms.dtype))
    x0 = pipe._pred_original_sample(latents * c, noise + shift.float(), alpha_bar)
    with torch.no_grad():
        after, _ = reward(pipe._decode_for_reward(x0, 1.0), prompts)
    assert (after > before).all(), (before, after)
    # clipping bounds the shift whatever the scale
    shift, _ = pipe._guidance_shift(grad, alpha_bar, c, 1e300, normalize_grad=False, grad_clip=0.7)
    torch.testing.assert_close(shift.flatten(1).pow(2).mean(1).sqrt(), torch.full((3,), 0.7, dtype=torch.float64))


def test_guided_steps_window_every_and_recurrence(ddim_pipes, monkeypatch):
    _, pipe = ddim_pipes
    assert pipe.guided_step_indices(10, 0.0, 1.0, 1) == list(range(10))
    assert pipe.guided_step_indices(10, 0.2, 0.7, 2) == [2, 4, 6]
    assert pipe.guided_step_indices(10, 0.5, 0.5, 1) == []
    calls = []
    original = pipe.compute_reward_gradient

    def spy(*args, **kwargs):
        calls.append(kwargs["metadata"]["step"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "compute_reward_gradient", spy)
    _run(pipe, seeds=[0], num_inference_steps=8, reward_guidance_scale=1.0, guidance_start=0.25, guidance_end=0.75)
    assert calls == [2, 3, 4, 5]
    calls.clear()
    _run(pipe, seeds=[0], num_inference_steps=8, reward_guidance_scale=1.0, guide_every=3, num_recurrence_steps=2)
    assert calls == [0, 0, 3, 3, 6, 6]


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler], ids=["euler", "dpm"])
def test_recurrence_restores_the_scheduler_state(scheduler_cls):
    _, pipe = _pipes(scheduler_cls)
    out = _run(pipe, seeds=SEEDS[:2], reward_guidance_scale=0.5, num_recurrence_steps=3)
    assert np.isfinite(out.images).all()
    assert pipe.scheduler.step_index == STEPS  # one step per timestep, whatever the recurrence


def test_options_decode_scale_and_backprop_through_unet(ddim_pipes):
    _, pipe = ddim_pipes
    base = _run(pipe, seeds=SEEDS[:2], reward_guidance_scale=0.5)
    small = _run(pipe, seeds=SEEDS[:2], reward_guidance_scale=0.5, guidance_decode_scale=0.5)
    full = _run(pipe, seeds=SEEDS[:2], reward_guidance_scale=0.5, backprop_through_unet=True)
    for out in (small, full):
        assert np.isfinite(out.images).all() and not np.array_equal(out.images, base.images)
    plain = _run(pipe, seeds=SEEDS[:2], reward_guidance_scale=0.0)
    assert np.mean(full.rewards) > np.mean(plain.rewards) and np.mean(small.rewards) > np.mean(plain.rewards)


def test_callable_reward_from_the_registry_and_outputs(ddim_pipes):
    _, pipe = ddim_pipes
    reward = get_reward("rahf_mix", reward_model=pipe.reward_model, reward_processor=pipe.reward_processor)
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {}

    images, nsfw, rewards, scores, bad = _run(
        pipe,
        seeds=[0, 1],
        reward=reward,
        reward_guidance_scale=0.5,
        return_dict=False,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "noise_pred"],
    )
    assert images.shape == (2, 32, 32, 3) and nsfw is None and bad == 0
    assert rewards == pytest.approx([float(np.mean(list(s.values()))) for s in scores], abs=1e-5)
    assert seen == [(i, ["latents", "noise_pred"]) for i in range(STEPS)]
    # prompt_embeds without a prompt: RAHF reads reward_prompt
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    out = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        reward_prompt=PROMPT,
        reward_guidance_scale=0.5,
        num_inference_steps=2,
        generator=torch.manual_seed(0),
        output_type="pil",
    )
    assert out.images[0].size == (32, 32) and len(out.reward_scores) == 1
    with pytest.raises(ValueError, match="reward_prompt"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, reward_guidance_scale=0.5, num_inference_steps=2)


@pytest.mark.parametrize("scheduler_cls", [PNDMScheduler, LMSDiscreteScheduler], ids=["pndm", "lms"])
def test_unsupported_scheduler_names_the_supported_ones(scheduler_cls):
    sd, pipe = _pipes(scheduler_cls)
    with pytest.raises(ValueError, match=scheduler_cls.__name__) as err:
        _run(pipe, seeds=[0], reward_guidance_scale=1.0)
    for cls in SCHEDULERS:
        assert cls.__name__ in str(err.value)
    # without guidance it is the plain pipeline, whatever the scheduler
    plain = sd(PROMPT, num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="np").images
    assert np.array_equal(
        pipe(PROMPT, num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="np").images, plain
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"guidance_start": 0.8, "guidance_end": 0.2},
            r"`guidance_start` \(0.8\) must not be greater than `guidance_end` \(0.2\)",
        ),
        ({"guidance_end": 1.5}, "guidance_end"),
        ({"guide_every": 0}, "guide_every"),
        ({"num_recurrence_steps": 0}, "num_recurrence_steps"),
        ({"guidance_decode_scale": 0.0}, "guidance_decode_scale"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"reward_guidance_scale": float("nan")}, "reward_guidance_scale"),
        ({"reward": "beauty"}, "unknown RAHF reward 'beauty'.*aesthetics"),
    ],
)
def test_bad_input_is_a_clear_value_error(ddim_pipes, kwargs, match):
    _, pipe = ddim_pipes
    kwargs = {"reward_guidance_scale": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        _run(pipe, seeds=[0], **kwargs)


def test_guidance_without_a_reward_model_says_how_to_add_one():
    sd = tiny_sd_pipeline(0)
    pipe = RAHFGuidedStableDiffusionPipeline.from_pipe(sd)
    with pytest.raises(ValueError, match="from_pipe"):
        _run(pipe, seeds=[0], reward_guidance_scale=1.0)
    out = _run(pipe, seeds=[0], reward_guidance_scale=0.0)
    assert out.reward_scores is None


def test_save_and_load_round_trip(ddim_pipes, tmp_path):
    _, pipe = ddim_pipes
    pipe.save_pretrained(tmp_path / "guided")
    assert (tmp_path / "guided" / "reward_model" / "config.json").is_file()
    assert (tmp_path / "guided" / "reward_processor" / "processor_config.json").is_file()
    assert pipe.config.reward_processor == ("rahf.processing_rahf", "RAHFProcessor")  # not changed by saving
    loaded = RAHFGuidedStableDiffusionPipeline.from_pretrained(tmp_path / "guided")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.reward_processor).__name__ == "RAHFProcessor"
    a = _run(pipe, seeds=SEEDS[:2], reward_guidance_scale=0.5)
    b = _run(loaded, seeds=SEEDS[:2], reward_guidance_scale=0.5)
    assert np.array_equal(a.images, b.images) and a.rewards == b.rewards


def test_guided_sample_job_writes_grid_and_summary(tmp_path):
    from rahf.improve.guided_sample import main

    tiny_sd_pipeline(0).save_pretrained(tmp_path / "sd")
    tiny_rahf_model().save_pretrained(tmp_path / "rahf")
    tiny_rahf_processor().save_pretrained(tmp_path / "rahf")
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "--config",
                "configs/improve/guidance.yaml",
                "--pretrained_model_name_or_path",
                str(tmp_path / "sd"),
                "--reward_model",
                str(tmp_path / "rahf"),
                "--prompts_file",
                str(tmp_path / "prompts.jsonl"),
                "--output_dir",
                str(out),
                "--num_inference_steps",
                "3",
                "--seeds",
                "0",
                "1",
                "--reward_guidance_scale",
                "0.5",
                "1",
                "--guidance_decode_scale",
                "1.0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [row["scale"] for row in summary["per_scale"]] == [0.0, 0.5, 1.0]
    for row in summary["per_scale"]:
        assert row["num_images"] == 4 and row["nan_count"] == 0
        assert set(row["mean_others"]) == {"plausibility", "alignment", "overall"}
    assert summary["per_scale"][1]["mean_target"] > summary["per_scale"][0]["mean_target"]
    assert len(summary["images"]) == 12 and all((out / r["path"]).is_file() for r in summary["images"])
    assert (out / "grid.png").is_file()
