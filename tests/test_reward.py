"""rahf.reward: RAHF as a differentiable reward on image tensors, and the reward registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RichFeedbackPredictor
from rahf.reward import RAHFReward, get_reward, images_to_tensor, list_rewards, rahf_pixel_values, register_reward
from rahf.testing import tiny_rahf_model, tiny_rahf_processor

VARIANTS = ("multi_head", "augmented_prompt")
PROMPTS = ["a red cat on a mat", "a blue square above a circle"]


@pytest.fixture(scope="module", params=VARIANTS)
def rahf(request):
    return tiny_rahf_model(request.param, seed=0), tiny_rahf_processor(request.param)


def _images(seed: int = 0, size: int = 48, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth images (low-frequency noise, upsampled): resizing them is well defined
    low = torch.rand(batch, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def test_registry_names():
    names = list_rewards()
    for name in ("plausibility", "alignment", "aesthetics", "overall", "rahf_mix", "-implausibility", "-misalignment"):
        assert name in names
    assert names == sorted(names)


def test_unknown_name_lists_known_ones(rahf):
    model, processor = rahf
    with pytest.raises(ValueError, match="unknown reward 'beauty'") as err:
        get_reward("beauty", reward_model=model, reward_processor=processor)
    for name in ("aesthetics", "-implausibility", "rahf_mix"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown RAHF output 'beauty'.*aesthetics"):
        get_reward({"beauty": 1.0}, reward_model=model, reward_processor=processor)
    with pytest.raises(ValueError, match="reward_model"):
        get_reward("aesthetics")


@pytest.mark.parametrize("name", ["aesthetics", "plausibility", "-implausibility", "rahf_mix"])
def test_gradients_reach_images_not_the_frozen_model(rahf, name):
    model, processor = rahf
    reward = get_reward(name, reward_model=model, reward_processor=processor)
    images = _images().requires_grad_(True)
    scores, info = reward(images, PROMPTS, None)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not model.training
    # every score of every image is reported, whatever the target (reward hacking stays visible)
    assert sorted(info["scores"]) == sorted(model.config.score_names)
    for values in info["scores"].values():
        assert values.shape == (2,) and not values.requires_grad and ((values >= 0) & (values <= 1)).all()


def test_weighted_mix_is_the_weighted_sum(rahf):
    model, processor = rahf
    weights = {"aesthetics": 0.7, "plausibility": 0.2, "implausibility": -1.5}
    images = _images(1)
    mix, _ = get_reward(weights, reward_model=model, reward_processor=processor)(images, PROMPTS, None)
    aesthetics, _ = get_reward("aesthetics", reward_model=model, reward_processor=processor)(images, PROMPTS, None)
    plausibility, _ = get_reward("plausibility", reward_model=model, reward_processor=processor)(images, PROMPTS, None)
    heat, _ = get_reward("-implausibility", reward_model=model, reward_processor=processor)(images, PROMPTS, None)
    expected = 0.7 * aesthetics + 0.2 * plausibility + 1.5 * heat
    torch.testing.assert_close(mix, expected, rtol=1e-5, atol=1e-6)
    # the default mix: equal weights over the four scores = their mean
    from_string, _ = get_reward(
        "aesthetics=0.7, plausibility=0.2,-implausibility=1.5", reward_model=model, reward_processor=processor
    )(images, PROMPTS, None)
    torch.testing.assert_close(from_string, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not NAME=WEIGHT"):
        get_reward("aesthetics=high", reward_model=model, reward_processor=processor)
    default, info = get_reward("rahf_mix", reward_model=model, reward_processor=processor)(images, PROMPTS, None)
    torch.testing.assert_close(default, torch.stack(list(info["scores"].values())).mean(0), rtol=1e-5, atol=1e-6)


def test_heatmap_reward_is_minus_the_mean_heat(rahf):
    model, processor = rahf
    images = _images(2, size=processor.image_size)
    reward, info = get_reward("-implausibility", reward_model=model, reward_processor=processor)(images, PROMPTS, None)
    enc = processor.encode_prompts(PROMPTS, ["implausibility"])
    with torch.no_grad():
        heat = model(pixel_values=rahf_pixel_values(images, processor), **enc).heatmaps[:, 0]
    torch.testing.assert_close(reward, -heat.mean(dim=(1, 2)))
    torch.testing.assert_close(info["heatmap_means"]["implausibility"], heat.mean(dim=(1, 2)))
    assert ((reward <= 0) & (reward >= -1)).all()


def test_augmented_variant_runs_only_the_needed_rows():
    model, processor = tiny_rahf_model("augmented_prompt"), tiny_rahf_processor("augmented_prompt")
    seen = []
    original = processor.encode_prompts

    def spy(prompts, tasks=None):
        seen.append(list(tasks))
        return original(prompts, tasks)

    processor.encode_prompts = spy
    reward = get_reward("aesthetics", reward_model=model, reward_processor=processor, report_all_scores=False)
    scores, info = reward(_images(), PROMPTS, None)
    assert seen == [["aesthetics"]] and list(info["scores"]) == ["aesthetics"]
    torch.testing.assert_close(scores, info["scores"]["aesthetics"])
    # with the other scores reported, their rows are added, and the target is unchanged
    full = get_reward("aesthetics", reward_model=model, reward_processor=processor)
    scores_full, info_full = full(_images(), PROMPTS, None)
    assert seen[-1] == list(model.config.score_names)
    torch.testing.assert_close(scores_full, scores)
    assert len(info_full["scores"]) == 4


def test_pil_images_score_as_the_predictor_does(rahf):
    model, processor = rahf
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in PROMPTS]
    reward = get_reward("aesthetics", reward_model=model, reward_processor=processor)
    scores, info = reward(images, PROMPTS, None)
    feedback = RichFeedbackPredictor(model, processor)(images, PROMPTS, outputs="scores")
    for k, fb in enumerate(feedback):
        assert scores[k].item() == pytest.approx(fb.scores["aesthetics"], abs=1e-5)
        for name, value in fb.scores.items():
            assert info["scores"][name][k].item() == pytest.approx(value, abs=1e-5)
    # a saved model folder or a predictor works as reward_model too
    scores_p, _ = get_reward("aesthetics", reward_model=RichFeedbackPredictor(model, processor))(images, PROMPTS, None)
    torch.testing.assert_close(scores_p, scores)


def test_tensor_resize_matches_the_processor():
    processor = tiny_rahf_processor()
    images = _images(3, size=96)
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    expected = processor.preprocess_images(pil)
    got = rahf_pixel_values(images, processor)
    assert got.shape == expected.shape
    # bicubic with antialiasing vs PIL's bicubic (and its 8-bit rounding): close, not bit-equal
    assert (got - expected).abs().max() < 0.05
    back = images_to_tensor(pil)
    assert back.shape == images.shape and (back - images).abs().max() <= 0.5 / 255 + 1e-6
    assert images_to_tensor(pil, size=32).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        rahf_pixel_values(images[0], processor)


def test_register_custom_reward():
    @register_reward("test_brightness")
    def brightness(reward_model=None, reward_processor=None):
        return lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {"mean": images.mean()})

    try:
        assert "test_brightness" in list_rewards()
        scores, _ = get_reward("test_brightness")(torch.ones(3, 3, 8, 8), ["a"] * 3, None)
        torch.testing.assert_close(scores, torch.ones(3))
    finally:
        from rahf import reward as module

        module._REWARDS.pop("test_brightness")


def test_reward_target_parsing():
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    assert RAHFReward.from_target(model, processor, "-implausibility").weights == {"implausibility": -1.0}
    assert RAHFReward.from_target(model, processor, "overall").weights == {"overall": 1.0}
    with pytest.raises(ValueError, match="unknown RAHF reward 'nice'.*-misalignment"):
        RAHFReward.from_target(model, processor, "nice")
    with pytest.raises(ValueError, match="finite"):
        RAHFReward(model, processor, {"overall": float("nan")})
    with pytest.raises(ValueError, match="one prompt per image"):
        RAHFReward(model, processor, {"overall": 1.0})(_images(), PROMPTS[:1])
