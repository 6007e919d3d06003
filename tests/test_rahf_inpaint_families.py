"""RAHF repair with SDXL, SD3 and FLUX (text-to-image checkpoints through the latent-blending path, SDXL's 9-channel
UNet, FLUX.1 Fill): K candidates from one call, the input's pixels exactly outside the mask, bad input, save/load,
`AutoRAHFInpaintPipeline` and its error, offloading, VAE slicing/tiling, bf16 and the `rahf inpaint` CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    FluxFillPipeline,
    FluxInpaintPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DModel,
)
from PIL import Image
from rahf.improve.inpaint import main as inpaint_main
from rahf.pipelines import (
    AutoRAHFInpaintPipeline,
    RAHFAmusedInpaintPipeline,
    RAHFFluxInpaintPipeline,
    RAHFInpaintPipeline,
    RAHFStableDiffusion3InpaintPipeline,
    RAHFStableDiffusionXLInpaintPipeline,
    from_inpaint_pipe,
)

from rahf import RichFeedbackPredictor
from rahf._testing_diffusers import (
    TINY_FAMILY_BUILDERS,
    tiny_flux_fill_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_inpaint_pipeline,
    tiny_sdxl_pipeline,
)
from rahf.testing import tiny_rahf_model, tiny_rahf_processor

PROMPT = "a red cat on a blue sofa"
STEPS = 2
K = 2
HEIGHT, WIDTH = 37, 29  # odd: generation rounds to the family's multiple and the candidates are resized back
T5 = {"max_sequence_length": 32}  # the tiny T5 tokenizer's length (the pipelines default to 256 / 512 tokens)


# name -> (builder, RAHF class, wrapped inpainting class, extra call kwargs, denoiser passes per candidate (CFG = 2))
FAMILIES = {
    "sdxl": (tiny_sdxl_pipeline, RAHFStableDiffusionXLInpaintPipeline, StableDiffusionXLInpaintPipeline, {}, 2),
    "sdxl-inpaint": (
        functools.partial(tiny_sdxl_inpaint_pipeline, unet_in_channels=9),
        RAHFStableDiffusionXLInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        {},
        2,
    ),
    "sd3": (tiny_sd3_pipeline, RAHFStableDiffusion3InpaintPipeline, StableDiffusion3InpaintPipeline, T5, 2),
    "flux": (tiny_flux_pipeline, RAHFFluxInpaintPipeline, FluxInpaintPipeline, T5, 1),
    "flux-fill": (tiny_flux_fill_pipeline, RAHFFluxInpaintPipeline, FluxFillPipeline, T5, 1),
}
# The families whose text-to-image denoiser inpaints by blending the input's latents in outside the mask.
FOUR_CHANNEL = ("sdxl", "sd3", "flux")


def _image(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _square_heat(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    heat = np.zeros((height, width), dtype=np.float32)
    heat[10:24, 8:20] = 0.9
    return heat


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.fixture(scope="module")
def reward():
    return {"reward_model": tiny_rahf_model(seed=1), "reward_processor": tiny_rahf_processor()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, reward):
    builder, rahf_class, wrapped, extra, passes = FAMILIES[request.param]
    pipe = rahf_class.from_pipe(builder(), **reward)
    pipe.set_progress_bar_config(disable=True)
    return {"name": request.param, "pipe": pipe, "wrapped": wrapped, "extra": extra, "passes": passes}


def _repair(pipe, extra, seed: int = 0, **kwargs):
    call = dict(heatmap=_square_heat(), threshold=0.5, num_candidates=K, num_inference_steps=STEPS, **extra)
    call.update(kwargs)
    return pipe(PROMPT, _image(), generator=torch.manual_seed(seed), **call)


class CallCounter:
    """Counts calls of an inpainting pipeline class's __call__, the denoiser's batch sizes and RAHF predictions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, wrapped: type, denoiser: torch.nn.Module):
        self.generator_calls: list[dict] = []
        self.denoiser_batches: list[int] = []
        self.predictor_batches: list[int] = []
        original = wrapped.__call__

        @functools.wraps(original)  # keeps the signature the RAHF pipeline checks pass-through arguments against
        def call(pipe, *args, **kwargs):
            self.generator_calls.append(kwargs)
            return original(pipe, *args, **kwargs)

        monkeypatch.setattr(wrapped, "__call__", call)
        original_predict = RichFeedbackPredictor.__call__

        def predict(predictor, images, *args, **kwargs):
            self.predictor_batches.append(len(images))
            return original_predict(predictor, images, *args, **kwargs)

        monkeypatch.setattr(RichFeedbackPredictor, "__call__", predict)

        def hook(module, args, kwargs, out):
            sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            self.denoiser_batches.append(sample.shape[0])

        self._hook = denoiser.register_forward_hook(hook, with_kwargs=True)

    def remove(self) -> None:
        self._hook.remove()


# ---------------------------------------------------------------------------------------------------------------------
# The flow, per family


def test_k_candidates_in_one_call_and_the_input_exactly_outside_the_mask(family, monkeypatch) -> None:
    pipe = family["pipe"]
    counter = CallCounter(monkeypatch, family["wrapped"], _denoiser(pipe))
    out = _repair(pipe, family["extra"], output_type="np")
    counter.remove()

    assert type(pipe.inpaint_pipeline()) is family["wrapped"]
    if family["name"] in FOUR_CHANNEL:  # a text-to-image denoiser: it takes the latents only
        packed = 4 if family["name"] == "flux" else 1  # FLUX packs 2x2 latent patches into one token
        assert _denoiser(pipe).config.in_channels == packed * pipe.vae.config.latent_channels
    assert len(counter.generator_calls) == 1 and counter.generator_calls[0]["num_images_per_prompt"] == K
    assert counter.denoiser_batches == [family["passes"] * K] * STEPS  # every denoiser pass on the whole batch
    assert counter.predictor_batches == [1, K + 1]  # the heatmap pass, then the input and the K candidates at once

    assert out.images.shape == (1, HEIGHT, WIDTH, 3) and out.candidates.shape == (K, HEIGHT, WIDTH, 3)
    assert out.images.dtype == out.candidates.dtype == np.float32
    assert 0.0 <= out.candidates.min() and out.candidates.max() <= 1.0
    assert out.heatmap.shape == out.mask.shape == (HEIGHT, WIDTH) and out.mask.dtype == np.bool_
    assert len(out.candidate_scores) == K and all(0.0 <= s <= 1.0 for s in [out.original_score, *out.candidate_scores])
    assert list(out.scores) == ["plausibility"] and len(out.scores["plausibility"]) == K + 1

    original, outside = np.asarray(_image()), ~out.mask
    assert out.mask.any() and outside.any()
    for candidate in [*out.candidates, out.images[0]]:
        pixels = np.round(candidate * 255).astype(np.uint8)
        assert np.array_equal(pixels[outside], original[outside])  # bit-identical to the input
    assert all(
        (np.round(c * 255).astype(np.uint8)[out.mask] != original[out.mask]).mean() > 0.5 for c in out.candidates
    )


def test_bad_input_raises_a_value_error_naming_the_argument(family, monkeypatch) -> None:
    pipe = family["pipe"]
    counter = CallCounter(monkeypatch, family["wrapped"], _denoiser(pipe))
    cases = {
        "`num_candidates`": {"num_candidates": 0},
        "`heatmap`": {"heatmap": np.zeros((8, 8), np.float32)},
        "`height`": {"height": pipe.generation_multiple + 1},
        "`threshold`": {"threshold": 1.5},
        "`not_an_argument`": {"not_an_argument": 1},
        "`num_images_per_prompt`": {"num_images_per_prompt": 3},
        "`callback_on_step_end_tensor_inputs`": {"callback_on_step_end_tensor_inputs": ["noise_pred"]},
    }
    if family["wrapped"] is FluxFillPipeline:
        cases["`negative_prompt`"] = {"negative_prompt": "blurry"}  # FLUX.1 Fill has no negative prompt
    for name, overrides in cases.items():
        with pytest.raises(ValueError, match=name):
            _repair(pipe, family["extra"], **overrides)
    counter.remove()
    assert counter.predictor_batches == [] and counter.generator_calls == [] and counter.denoiser_batches == []

    # a denoiser that fits neither inpainting path
    denoiser = _denoiser(pipe)
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    wrong = type(denoiser).from_config({**denoiser.config, "in_channels": denoiser.config.in_channels + 3})
    bad = type(pipe).from_pipe(pipe, **{name: wrong})
    with pytest.raises(ValueError, match=rf"`{name}` must be .*in_channels={denoiser.config.in_channels + 3}"):
        _repair(bad, family["extra"])


def test_save_pretrained_from_pretrained_round_trip(family, tmp_path) -> None:
    pipe, wrapped, extra, rahf_class = family["pipe"], family["wrapped"], family["extra"], type(family["pipe"])
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == rahf_class.__name__
    assert index["reward_model"] == ["rahf.modeling_rahf", "RAHFModel"]
    assert index["reward_processor"] == ["rahf.processing_rahf", "RAHFProcessor"]

    loaded = AutoRAHFInpaintPipeline.from_pretrained(tmp_path)  # the saved class, reward model included
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is rahf_class and type(loaded.inpaint_pipeline()) is wrapped
    a, b = _repair(pipe, extra, num_inference_steps=1), _repair(loaded, extra, num_inference_steps=1)
    assert a.original_score == b.original_score and a.candidate_scores == b.candidate_scores
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.candidates, b.candidates))


# ---------------------------------------------------------------------------------------------------------------------
# The front door


_BUILDERS = {
    **{
        f"{family}-{kind}": TINY_FAMILY_BUILDERS[family][i]
        for family in TINY_FAMILY_BUILDERS
        for i, kind in enumerate(["text-to-image", "inpaint"])
    },  # fmt: skip
    "sdxl-inpaint-9ch": functools.partial(tiny_sdxl_inpaint_pipeline, unet_in_channels=9),
    "flux-fill": tiny_flux_fill_pipeline,
}
_EXPECTED = {
    "sd": RAHFInpaintPipeline,
    "sdxl": RAHFStableDiffusionXLInpaintPipeline,
    "sd3": RAHFStableDiffusion3InpaintPipeline,
    "flux": RAHFFluxInpaintPipeline,
    "amused": RAHFAmusedInpaintPipeline,
}


@pytest.mark.parametrize("source", list(_BUILDERS))
def test_auto_pipeline_picks_the_family_class(source, reward) -> None:
    base = _BUILDERS[source]()
    pipe = AutoRAHFInpaintPipeline.from_pipe(base, **reward)
    assert type(pipe) is _EXPECTED[source.split("-")[0]]
    assert _denoiser(pipe) is _denoiser(base)  # the components are shared, not copied
    assert pipe.reward_model is reward["reward_model"] and pipe.dtype == base.dtype
    if source == "flux-fill":
        assert pipe.inpaint_pipeline_class() is FluxFillPipeline
    elif source.startswith("flux"):
        assert pipe.inpaint_pipeline_class() is FluxInpaintPipeline
    # the older helper goes through the same front door
    assert type(from_inpaint_pipe(base, **reward)) is type(pipe)


def test_auto_pipeline_refuses_what_it_cannot_repair_with(reward) -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"DDPMPipeline.*supported: Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, FLUX"):
        AutoRAHFInpaintPipeline.from_pipe(ddpm, **reward)
    with pytest.raises(ValueError, match="`reward_model` is required"):
        AutoRAHFInpaintPipeline.from_pipe(tiny_flux_pipeline())
    with pytest.raises(OSError, match="from_pipe"):
        AutoRAHFInpaintPipeline()


# ---------------------------------------------------------------------------------------------------------------------
# Fitting where users run them: offload, VAE slicing / tiling, bf16


@pytest.mark.parametrize("name", list(TINY_FAMILY_BUILDERS))
def test_model_cpu_offload_leaves_the_reward_model_alone(name, reward) -> None:
    """accelerate's offload hooks need an accelerator to be worth anything; on CPU the call path is shown with the
    execution device set to the CPU: every generator model gets a hook, the reward model none (it stays on its
    device), and the repair is the same as without offloading."""
    extra = T5 if name in ("sd3", "flux") else {}
    pipe = AutoRAHFInpaintPipeline.from_pipe(
        TINY_FAMILY_BUILDERS[name][0](),
        reward_model=tiny_rahf_model(seed=1),
        reward_processor=reward["reward_processor"],
    )  # from each family's text-to-image pipeline
    pipe.set_progress_bar_config(disable=True)
    plain = _repair(pipe, extra, num_inference_steps=1)
    pipe.enable_model_cpu_offload(device="cpu")
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert not hasattr(pipe.reward_model, "_hf_hook")
    assert all(hasattr(m, "_hf_hook") for k, m in modules.items() if k != "reward_model")
    offloaded = _repair(pipe, extra, num_inference_steps=1)
    assert offloaded.candidate_scores == plain.candidate_scores
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(plain.candidates, offloaded.candidates))
    pipe.remove_all_hooks()
    from diffusers.utils.torch_utils import get_device

    if get_device() == "cpu":  # no accelerator: diffusers refuses, saying why
        with pytest.raises(RuntimeError, match="accelerator"):
            pipe.enable_model_cpu_offload()


def test_vae_slicing_and_tiling_pass_through(reward) -> None:
    """The switches reach the VAE the wrapped pipeline decodes with (the mixin's, so one family shows it)."""
    pipe = RAHFFluxInpaintPipeline.from_pipe(tiny_flux_pipeline(), **reward)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.inpaint_pipeline().vae is pipe.vae
    plain = _repair(pipe, T5, num_inference_steps=1)
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    sliced = _repair(pipe, T5, num_inference_steps=1)  # the K candidates decoded one at a time: the same images
    pipe.disable_vae_slicing()
    pipe.enable_vae_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 16, 8  # tiles smaller than the 40x28 generation
    tiled = _repair(pipe, T5, num_inference_steps=1)
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling
    original, outside = np.asarray(_image()), ~plain.mask
    for x, y, z in zip(plain.candidates, sliced.candidates, tiled.candidates):
        x, y, z = np.asarray(x), np.asarray(y), np.asarray(z)
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
        assert not np.array_equal(x, z) and np.array_equal(z[outside], original[outside])


def test_bf16_pipeline_repairs_and_keeps_its_dtype() -> None:
    """bf16 runs on CPU (fp16 would be emulated and slow, so it is left to accelerators)."""
    base = tiny_flux_pipeline().to(torch.bfloat16)
    pipe = AutoRAHFInpaintPipeline.from_pipe(
        base, reward_model=tiny_rahf_model(seed=1), reward_processor=tiny_rahf_processor()
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    out = _repair(pipe, T5, num_inference_steps=1)
    original, outside = np.asarray(_image()), ~out.mask
    assert all(np.array_equal(np.asarray(c)[outside], original[outside]) for c in out.candidates)
    assert all(np.isfinite(s) and 0.0 <= s <= 1.0 for s in out.candidate_scores)


# ---------------------------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inpaint_families_cli")
    tiny_rahf_model(seed=1).save_pretrained(root / "rahf")
    tiny_rahf_processor().save_pretrained(root / "rahf")
    _image().save(root / "image.png")
    return {"root": root, "rahf": root / "rahf", "image": root / "image.png"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sdxl", "RAHFStableDiffusionXLInpaintPipeline"),
        ("sd3", "RAHFStableDiffusion3InpaintPipeline"),
        ("flux", "RAHFFluxInpaintPipeline"),
    ],
)
def test_cli_repairs_with_a_checkpoint_of_each_family(saved, tmp_path, name, expected) -> None:
    FAMILIES[name][0]().save_pretrained(tmp_path / "generator")
    out = tmp_path / "out"
    argv = ["--model", str(saved["rahf"]), "--inpainter", str(tmp_path / "generator"), "--image", str(saved["image"]),
            "--prompt", PROMPT, "--out", str(out), "--threshold_quantile", "0.7", "--num_candidates", str(K),
            "--num_inference_steps", "1", "--device", "cpu", "--vae_slicing"]  # fmt: skip
    if FAMILIES[name][3]:
        argv += ["--max_sequence_length", "32"]
    assert inpaint_main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["settings"]["pipeline"] == expected and len(result["candidate_scores"]) == K
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    original, best = np.asarray(Image.open(saved["image"])), np.asarray(Image.open(out / "best.png"))
    assert best.shape == original.shape and np.array_equal(best[~mask], original[~mask])


def test_cli_refuses_cpu_offload_on_a_cpu(saved, tmp_path) -> None:
    argv = ["--model", str(saved["rahf"]), "--inpainter", str(tmp_path), "--image", str(saved["image"]),
            "--prompt", PROMPT, "--out", str(tmp_path / "out"), "--device", "cpu", "--cpu_offload"]  # fmt: skip
    with pytest.raises(ValueError, match="--cpu_offload"):
        inpaint_main(argv)
