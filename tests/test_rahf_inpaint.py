"""RAHF inpainting pipelines: exact pixels outside the mask, one batched generator call, best-of-K by RAHF, empty masks,
dilation, bad input, saving/loading (incl. custom_pipeline), aMUSEd, the CLI and the demo's repair report."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import AmusedInpaintPipeline, DiffusionPipeline, StableDiffusionInpaintPipeline
from PIL import Image
from rahf.improve.inpaint import main as inpaint_main
from rahf.improve.inpaint import parse_rescore_with
from rahf.pipelines.masks import MaskConfig, disk_kernel, heatmap_to_mask
from rahf.pipelines.rahf_amused_inpaint import RAHFAmusedInpaintPipeline, pixel_mask_to_token_mask
from rahf.pipelines.rahf_inpaint import RAHFInpaintPipeline, RAHFInpaintPipelineOutput

from rahf import RichFeedbackPredictor, pipelines
from rahf.testing import (
    tiny_amused_inpaint_pipeline,
    tiny_rahf_model,
    tiny_rahf_processor,
    tiny_sd_inpaint_pipeline,
    tiny_sd_pipeline,
)

PROMPT = "a red cat on a blue sofa"
STEPS = 2


def _image(height: int = 32, width: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _square_heat(height: int = 32, width: int = 32, box=(10, 20, 8, 16), value: float = 0.9) -> np.ndarray:
    heat = np.zeros((height, width), dtype=np.float32)
    y0, y1, x0, x1 = box
    heat[y0:y1, x0:x1] = value
    return heat


@pytest.fixture(scope="module")
def reward():
    return {"reward_model": tiny_rahf_model(seed=1), "reward_processor": tiny_rahf_processor()}


@pytest.fixture
def sd_pipe(reward) -> RAHFInpaintPipeline:
    pipe = RAHFInpaintPipeline.from_pipe(tiny_sd_inpaint_pipeline(seed=0), **reward)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def amused_pipe(reward) -> RAHFAmusedInpaintPipeline:
    pipe = RAHFAmusedInpaintPipeline.from_pipe(tiny_amused_inpaint_pipeline(seed=0), **reward)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CallCounter:
    """Counts calls of the inpainting pipelines' __call__, the UNet / transformer batch sizes and RAHF predictions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, denoiser: torch.nn.Module):
        self.generator_calls: list[dict] = []
        self.denoiser_batches: list[int] = []
        self.predictor_batches: list[int] = []
        for cls in (StableDiffusionInpaintPipeline, AmusedInpaintPipeline):
            original = cls.__call__

            # `functools.wraps` keeps the signature, which the RAHF pipelines read to check pass-through arguments.
            @functools.wraps(original)
            def wrapped(pipe, *args, _original=original, **kwargs):
                self.generator_calls.append(kwargs)
                return _original(pipe, *args, **kwargs)

            monkeypatch.setattr(cls, "__call__", wrapped)
        original_predict = RichFeedbackPredictor.__call__

        def predict(predictor, images, *args, **kwargs):
            self.predictor_batches.append(len(images))
            return original_predict(predictor, images, *args, **kwargs)

        monkeypatch.setattr(RichFeedbackPredictor, "__call__", predict)
        self._hook = denoiser.register_forward_hook(
            lambda m, args, out: self.denoiser_batches.append(args[0].shape[0])
        )

    def remove(self) -> None:
        self._hook.remove()


# ---------------------------------------------------------------------------------------------------------------------
# The guarantees


@pytest.mark.parametrize("size", [(32, 32), (37, 29)], ids=["32x32", "odd-37x29"])
@pytest.mark.parametrize("output_type", ["pil", "np"])
def test_pixels_outside_the_mask_are_the_input_exactly(sd_pipe, size, output_type) -> None:
    height, width = size
    image = _image(height, width)
    out = sd_pipe(
        PROMPT,
        image,
        heatmap=_square_heat(height, width),
        threshold=0.5,
        dilation=0.05,
        feather=0.1,
        num_candidates=3,
        num_inference_steps=STEPS,
        generator=torch.manual_seed(0),
        output_type=output_type,
    )
    original = np.asarray(image)
    assert out.mask.shape == (height, width) and out.mask.any() and not out.mask.all()
    outside = ~out.mask
    candidates = out.candidates
    if output_type == "np":
        assert out.images.shape == (1, height, width, 3) and candidates.shape == (3, height, width, 3)
        candidates = [np.round(c * 255).astype(np.uint8) for c in candidates]
        best = np.round(out.images[0] * 255).astype(np.uint8)
    else:
        assert [c.size for c in candidates] == [image.size] * 3
        candidates = [np.asarray(c) for c in candidates]
        best = np.asarray(out.images[0])
    for candidate in [*candidates, best]:
        assert candidate.dtype == np.uint8
        assert np.array_equal(candidate[outside], original[outside])
    # ...and the inside was actually repainted
    assert all((c[out.mask] != original[out.mask]).mean() > 0.5 for c in candidates)


def test_k_candidates_come_from_one_batched_generator_call(sd_pipe, monkeypatch) -> None:
    counter = CallCounter(monkeypatch, sd_pipe.unet)
    k = 4
    out = sd_pipe(
        PROMPT,
        _image(),
        heatmap=_square_heat(),
        threshold=0.5,
        num_candidates=k,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.manual_seed(0),
    )
    counter.remove()
    assert len(out.candidates) == len(out.candidate_scores) == k
    assert len(counter.generator_calls) == 1 and counter.generator_calls[0]["num_images_per_prompt"] == k
    # one UNet pass per step, each on the whole batch (x2 for classifier-free guidance)
    assert counter.denoiser_batches == [2 * k] * STEPS
    # RAHF: the heatmap pass on the input, then one batch of the input and the K candidates
    assert counter.predictor_batches == [1, k + 1]


def test_returns_the_candidate_rahf_scores_best(sd_pipe, reward) -> None:
    image = _image(seed=3)
    weights = {"plausibility": 2.0, "aesthetics": 1.0}
    out = sd_pipe(
        PROMPT,
        image,
        mask_config={"threshold_quantile": 0.8},
        num_candidates=3,
        rescore_with=weights,
        num_inference_steps=STEPS,
        generator=torch.manual_seed(0),
    )
    assert isinstance(out, RAHFInpaintPipelineOutput)
    # rescore the input and the candidates independently
    predictor = RichFeedbackPredictor(reward["reward_model"], reward["reward_processor"])
    feedback = predictor([image, *out.candidates], [PROMPT] * 4, outputs=list(weights))
    mine = [(2 * f.scores["plausibility"] + f.scores["aesthetics"]) / 3 for f in feedback]
    np.testing.assert_allclose([out.original_score, *out.candidate_scores], mine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.scores["aesthetics"], [f.scores["aesthetics"] for f in feedback], atol=1e-5)
    best = int(np.argmax(mine[1:]))
    assert mine[1 + best] > mine[0], "this seed must exercise the repaired branch"
    assert out.repaired is True
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(out.candidates[best]))


@pytest.mark.parametrize("input_score", [1.0, 0.5], ids=["input-best", "tie"])
def test_returns_the_input_when_no_candidate_beats_it(sd_pipe, monkeypatch, input_score) -> None:
    def rescore(image, candidates, prompt, weights):
        return [input_score] + [0.5] * len(candidates), {"plausibility": [input_score] + [0.5] * len(candidates)}

    monkeypatch.setattr(sd_pipe, "_rescore", rescore)
    image = _image()
    out = sd_pipe(PROMPT, image, heatmap=_square_heat(), threshold=0.5, num_candidates=2, num_inference_steps=STEPS)
    assert out.repaired is False and len(out.candidates) == 2
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(image))


@pytest.mark.parametrize("how", ["threshold=1", "zero-heatmap"])
def test_empty_mask_returns_the_input_without_calling_the_generator(sd_pipe, monkeypatch, how) -> None:
    counter = CallCounter(monkeypatch, sd_pipe.unet)
    image = _image(37, 29)
    kwargs = {"threshold": 1.0} if how == "threshold=1" else {"heatmap": np.zeros((37, 29), np.float32)}
    out = sd_pipe(PROMPT, image, num_candidates=3, num_inference_steps=STEPS, **kwargs)
    counter.remove()
    assert counter.generator_calls == [] and counter.denoiser_batches == []
    assert out.repaired is False and not out.mask.any() and out.mask.shape == (37, 29)
    assert out.candidates == [] and out.candidate_scores == []
    assert out.images[0] is not image and np.array_equal(np.asarray(out.images[0]), np.asarray(image))
    assert 0.0 <= out.original_score <= 1.0 and list(out.scores) == ["plausibility"]


def test_dilation_grows_the_mask_as_specified(sd_pipe) -> None:
    heat = _square_heat(box=(12, 16, 12, 16))
    square = heat > 0.5
    common = dict(heatmap=heat, threshold=0.5, num_candidates=1, num_inference_steps=1)
    undilated = sd_pipe(PROMPT, _image(), dilation=0.0, mask_config={"min_area": 0.0}, **common).mask
    assert np.array_equal(undilated, square)
    radius = 4  # 0.125 of the 32 px side
    dilated = sd_pipe(PROMPT, _image(), dilation=0.125, mask_config={"min_area": 0.0}, **common).mask
    expected = cv2.dilate(square.astype(np.uint8), disk_kernel(radius)).astype(bool)
    assert np.array_equal(dilated, expected)
    ys, xs = np.nonzero(dilated)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12 - radius, 15 + radius, 12 - radius, 15 + radius)
    twice = sd_pipe(
        PROMPT, _image(), mask_config=MaskConfig(threshold=0.5, dilation=0.125, dilation_iterations=2), **common
    ).mask
    ys, xs = np.nonzero(twice)
    assert (ys.min(), xs.max()) == (12 - 2 * radius, 15 + 2 * radius) and twice.sum() > dilated.sum()


def test_predicted_misalignment_heatmap_drives_the_mask(reward) -> None:
    model, processor = tiny_rahf_model("augmented_prompt", seed=2), tiny_rahf_processor("augmented_prompt")
    pipe = RAHFInpaintPipeline.from_pipe(tiny_sd_inpaint_pipeline(), reward_model=model, reward_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    image = _image(40, 24, seed=5)
    config = MaskConfig(threshold_quantile=0.9, dilation=0.0)
    out = pipe(PROMPT, image, heatmap="misalignment", mask_config=config, num_candidates=2, num_inference_steps=STEPS)
    [feedback] = RichFeedbackPredictor(model, processor)([image], [PROMPT], outputs=["misalignment"])
    np.testing.assert_allclose(out.heatmap, feedback.heatmaps["misalignment"], atol=1e-6)
    assert np.array_equal(out.mask, heatmap_to_mask(feedback.heatmaps["misalignment"], config))


def test_callback_on_step_end_is_called_each_step(sd_pipe) -> None:
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((type(pipe).__name__, step, tuple(tensors["latents"].shape)))
        return tensors

    sd_pipe(
        PROMPT,
        _image(),
        heatmap=_square_heat(),
        threshold=0.5,
        num_candidates=2,
        num_inference_steps=STEPS,
        callback_on_step_end=callback,
    )
    assert seen == [("StableDiffusionInpaintPipeline", i, (2, 4, 16, 16)) for i in range(STEPS)]


def test_return_dict_false_gives_the_fields_in_order(sd_pipe) -> None:
    out = sd_pipe(
        PROMPT,
        _image(),
        heatmap=_square_heat(),
        threshold=0.5,
        num_candidates=2,
        num_inference_steps=1,
        return_dict=False,
    )
    images, candidates, candidate_scores, original_score, heat, mask, repaired, scores = out
    assert len(images) == 1 and len(candidates) == 2 and mask.dtype == np.bool_ and isinstance(repaired, bool)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before RAHF or the generator runs


BAD_INPUTS = {
    "heatmap-size": ({"heatmap": np.zeros((16, 16), np.float32)}, "`heatmap`"),
    "heatmap-range": ({"heatmap": np.full((32, 32), 2.0, np.float32)}, "`heatmap`"),
    "heatmap-name": ({"heatmap": "blurriness"}, "`heatmap`"),
    "k=0": ({"num_candidates": 0}, "`num_candidates`"),
    "k=-1": ({"num_candidates": -1}, "`num_candidates`"),
    "k=2.5": ({"num_candidates": 2.5}, "`num_candidates`"),
    "threshold<0": ({"threshold": -0.1}, "`threshold`"),
    "threshold>1": ({"threshold": 1.5}, "`threshold`"),
    "dilation<0": ({"dilation": -0.1}, "`dilation`"),
    "rescore-name": ({"rescore_with": "sharpness"}, "`rescore_with`"),
    "rescore-weights": ({"rescore_with": {"plausibility": 0.0}}, "`rescore_with`"),
    "mask-config": ({"mask_config": {"radius": 3}}, "`mask_config`"),
    "output-type": ({"output_type": "latent"}, "`output_type`"),
    "generators": ({"generator": [torch.manual_seed(0)] * 2, "num_candidates": 3}, "`generator`"),
    "height": ({"height": 30}, "`height`"),
    "strength": ({"strength": 0.0}, "`strength`"),
    "prompt": ({"prompt": ""}, "`prompt`"),
    "image-list": ({"image": [_image(), _image()]}, "`image`"),
    "unknown-argument": (
        {"not_an_argument": 1},
        "`not_an_argument` is not an argument of StableDiffusionInpaintPipeline",
    ),
    "reserved-argument": ({"num_images_per_prompt": 2}, "`num_images_per_prompt` is set by the repair flow"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_value_error_naming_the_argument(sd_pipe, monkeypatch, case) -> None:
    overrides, name = BAD_INPUTS[case]
    kwargs = {"prompt": PROMPT, "image": _image(), "num_inference_steps": STEPS, **overrides}
    counter = CallCounter(monkeypatch, sd_pipe.unet)
    with pytest.raises(ValueError, match=name):
        sd_pipe(**kwargs)
    counter.remove()
    assert counter.predictor_batches == [] and counter.generator_calls == []


def test_a_text_to_image_unet_inpaints_through_the_blended_latent_path(reward, monkeypatch) -> None:
    """Any text-to-image checkpoint inpaints (4-channel UNet, latents blended outside the mask, as diffusers does):
    one batched generator call, the input's pixels exactly outside the mask, new pixels inside it."""
    pipe = RAHFInpaintPipeline.from_pipe(tiny_sd_pipeline(), **reward)  # text-to-image UNet: 4 input channels
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels
    counter = CallCounter(monkeypatch, pipe.unet)
    image = _image()
    out = pipe(PROMPT, image, heatmap=_square_heat(), threshold=0.5, num_candidates=3, num_inference_steps=STEPS,
               generator=torch.manual_seed(0))  # fmt: skip
    counter.remove()
    assert len(counter.generator_calls) == 1 and counter.generator_calls[0]["num_images_per_prompt"] == 3
    original = np.asarray(image)
    outside = ~out.mask
    assert out.mask.any() and outside.any()
    for candidate in out.candidates:
        candidate = np.asarray(candidate)
        assert np.array_equal(candidate[outside], original[outside])
        assert not np.array_equal(candidate[out.mask], original[out.mask])


def test_a_unet_of_another_channel_count_is_rejected(reward) -> None:
    from diffusers import UNet2DConditionModel

    pipe = RAHFInpaintPipeline.from_pipe(tiny_sd_pipeline(), **reward)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 5})
    with pytest.raises(ValueError, match=r"`unet` must be a text-to-image UNet \(4 input channels\).*in_channels=5"):
        pipe(PROMPT, _image(), heatmap=_square_heat(), threshold=0.5)


def test_amused_rejects_bad_input_too(amused_pipe) -> None:
    with pytest.raises(ValueError, match="`num_candidates`"):
        amused_pipe(PROMPT, _image(), num_candidates=0)
    with pytest.raises(ValueError, match="`heatmap`"):
        amused_pipe(PROMPT, _image(), heatmap=np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="`threshold`"):
        amused_pipe(PROMPT, _image(), threshold=2)


# ---------------------------------------------------------------------------------------------------------------------
# Building and loading


def test_from_pipe_shares_the_inpainting_components(reward) -> None:
    sd = tiny_sd_inpaint_pipeline()
    pipe = RAHFInpaintPipeline.from_pipe(sd, **reward)
    assert pipe.unet is sd.unet and pipe.vae is sd.vae and pipe.text_encoder is sd.text_encoder
    assert pipe.reward_model is reward["reward_model"] and pipe.reward_processor is reward["reward_processor"]
    assert pipe.config.reward_model == ("rahf.modeling_rahf", "RAHFModel")
    assert pipe.config.reward_processor == ("rahf.processing_rahf", "RAHFProcessor")
    assert pipe.inpaint_pipeline().unet is sd.unet


def _reward_outputs(model, processor, image: Image.Image) -> dict[str, torch.Tensor]:
    inputs = processor(images=[image], text=[PROMPT])
    with torch.no_grad():
        out = model(**inputs)
    return {"heatmaps": out.heatmaps, "scores": out.scores}


def _assert_same_reward(a, b) -> None:
    assert type(b.reward_model).__name__ == "RAHFModel" and type(b.reward_processor).__name__ == "RAHFProcessor"
    assert a.reward_processor.to_dict() == b.reward_processor.to_dict()
    image = _image(seed=9)
    for key, value in _reward_outputs(a.reward_model, a.reward_processor, image).items():
        assert torch.equal(value, _reward_outputs(b.reward_model, b.reward_processor, image)[key]), key


@pytest.mark.parametrize("variant", ["sd", "amused"])
def test_save_pretrained_from_pretrained_carries_the_reward_model(tmp_path, variant, sd_pipe, amused_pipe) -> None:
    pipe = sd_pipe if variant == "sd" else amused_pipe
    cls = type(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["reward_model"] == ["rahf.modeling_rahf", "RAHFModel"]
    assert index["reward_processor"] == ["rahf.processing_rahf", "RAHFProcessor"]
    assert (tmp_path / "reward_model" / "model.safetensors").is_file()
    assert (tmp_path / "reward_processor" / "processor_config.json").is_file()
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    _assert_same_reward(pipe, loaded)
    kwargs = dict(heatmap=_square_heat(), threshold=0.5, num_candidates=2, num_inference_steps=STEPS)
    a = pipe(PROMPT, _image(), generator=torch.manual_seed(0), **kwargs)
    b = loaded(PROMPT, _image(), generator=torch.manual_seed(0), **kwargs)
    assert a.candidate_scores == b.candidate_scores and a.original_score == b.original_score
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.candidates, b.candidates))


@pytest.mark.parametrize("variant", ["sd", "amused"])
def test_custom_pipeline_loading(tmp_path, variant, sd_pipe, amused_pipe) -> None:
    pipe = sd_pipe if variant == "sd" else amused_pipe
    file = "rahf_inpaint.py" if variant == "sd" else "rahf_amused_inpaint.py"
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=str(Path(pipelines.__file__).parent / file), trust_remote_code=True
    )
    assert type(loaded).__name__ == type(pipe).__name__
    _assert_same_reward(pipe, loaded)
    loaded.set_progress_bar_config(disable=True)
    out = loaded(PROMPT, _image(), heatmap=_square_heat(), threshold=0.5, num_candidates=2, num_inference_steps=1)
    assert len(out.candidates) == 2


# ---------------------------------------------------------------------------------------------------------------------
# aMUSEd


@pytest.mark.parametrize("size", [(32, 32), (37, 29)], ids=["32x32", "odd-37x29"])
def test_amused_variant_runs_in_one_call_and_keeps_outside_pixels(amused_pipe, monkeypatch, size) -> None:
    height, width = size
    counter = CallCounter(monkeypatch, amused_pipe.transformer)
    image = _image(height, width, seed=4)
    k = 3
    out = amused_pipe(
        PROMPT,
        image,
        heatmap=_square_heat(height, width),
        threshold=0.5,
        num_candidates=k,
        num_inference_steps=STEPS,
        generator=torch.manual_seed(0),
    )
    counter.remove()
    assert len(counter.generator_calls) == 1 and counter.generator_calls[0]["num_images_per_prompt"] == k
    assert counter.denoiser_batches == [2 * k] * STEPS  # guidance 10 -> conditional + unconditional
    original, outside = np.asarray(image), ~out.mask
    assert len(out.candidates) == k
    for candidate in [*out.candidates, out.images[0]]:
        assert candidate.size == image.size
        assert np.array_equal(np.asarray(candidate)[outside], original[outside])
    assert all((np.asarray(c)[out.mask] != original[out.mask]).mean() > 0.5 for c in out.candidates)


def test_pixel_mask_maps_to_every_token_it_touches() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 1] = True  # one pixel of token (0, 0)
    mask[4:8, 6] = True  # the right half of tokens (2, 3) and (3, 3)
    tokens = pixel_mask_to_token_mask(mask, 2)
    expected = np.zeros((4, 4), dtype=bool)
    expected[0, 0] = expected[2, 3] = expected[3, 3] = True
    assert np.array_equal(tokens, expected)
    with pytest.raises(ValueError, match="multiple of the VQ factor"):
        pixel_mask_to_token_mask(np.zeros((7, 8), dtype=bool), 2)


# ---------------------------------------------------------------------------------------------------------------------
# The CLI and the demo's repair report


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inpaint_cli")
    tiny_rahf_model(seed=1).save_pretrained(root / "rahf")
    tiny_rahf_processor().save_pretrained(root / "rahf")
    tiny_sd_inpaint_pipeline().save_pretrained(root / "sd_inpaint")
    tiny_amused_inpaint_pipeline().save_pretrained(root / "amused_inpaint")
    _image(37, 29, seed=6).save(root / "image.png")
    return {"root": root, "rahf": root / "rahf", "sd": root / "sd_inpaint", "amused": root / "amused_inpaint"}


@pytest.mark.parametrize("inpainter", ["sd", "amused"])
def test_cli_writes_all_files(saved, tmp_path, inpainter) -> None:
    out = tmp_path / "out"
    argv = [
        "--model",
        str(saved["rahf"]),
        "--inpainter",
        str(saved[inpainter]),
        "--image",
        str(saved["root"] / "image.png"),
        "--prompt",
        PROMPT,
        "--out",
        str(out),
        "--threshold_quantile",
        "0.7",
        "--dilation",
        "0.05",
        "--num_candidates",
        "3",
        "--num_inference_steps",
        "2",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--rescore_with",
        "plausibility=1,overall=1",
    ]
    assert inpaint_main(argv) == 0
    for name in ("best.png", "candidates.png", "heatmap.png", "overlay.png", "mask.png", "result.json"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert len(result["candidate_scores"]) == 3 and isinstance(result["repaired"], bool)
    assert set(result["scores"]) == {"plausibility", "overall"} and len(result["scores"]["overall"]) == 4
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    assert result["mask_area_fraction"] == pytest.approx(mask.mean())
    assert result["settings"]["mask"]["threshold_quantile"] == 0.7 and result["settings"]["seed"] == 1
    assert Image.open(out / "best.png").size == (29, 37)
    original, best = np.asarray(Image.open(saved["root"] / "image.png")), np.asarray(Image.open(out / "best.png"))
    assert np.array_equal(best[~mask], original[~mask])
    # the saved RAHF inpainting pipeline works as --inpainter on its own (no --model)
    if inpainter == "sd":
        pipe = RAHFInpaintPipeline.from_pipe(
            DiffusionPipeline.from_pretrained(saved["sd"]),
            **{"reward_model": tiny_rahf_model(seed=1), "reward_processor": tiny_rahf_processor()},
        )
        pipe.save_pretrained(tmp_path / "rahf_pipe")
        argv2 = [
            "--inpainter",
            str(tmp_path / "rahf_pipe"),
            "--image",
            str(saved["root"] / "image.png"),
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path / "out2"),
            "--threshold",
            "1.0",
            "--device",
            "cpu",
        ]
        assert inpaint_main(argv2) == 0
        assert json.loads((tmp_path / "out2" / "result.json").read_text())["repaired"] is False


def test_cli_flags_are_checked(saved, tmp_path) -> None:
    assert parse_rescore_with("plausibility") == "plausibility"
    assert parse_rescore_with("plausibility=1, aesthetics=0.5") == {"plausibility": 1.0, "aesthetics": 0.5}
    with pytest.raises(ValueError, match="--rescore_with"):
        parse_rescore_with("plausibility=high")
    base = [
        "--inpainter",
        str(saved["sd"]),
        "--image",
        str(saved["root"] / "image.png"),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(ValueError, match="--model"):
        inpaint_main(base)
    with pytest.raises(ValueError, match="--threshold"):
        inpaint_main([*base, "--model", str(saved["rahf"]), "--threshold", "0.3", "--threshold_quantile", "0.9"])
