"""rahf._testing_diffusers: the tiny pipelines run, are seeded, condition on the prompt and survive a save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rahf._testing_diffusers import (
    TINY_AMUSED_IMAGE_SIZE,
    TINY_SD_IMAGE_SIZE,
    tiny_amused_inpaint_pipeline,
    tiny_amused_pipeline,
    tiny_clip_tokenizer,
    tiny_flux_fill_pipeline,
    tiny_flux_inpaint_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_inpaint_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_inpaint_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_inpaint_pipeline,
    tiny_sdxl_pipeline,
    tiny_t5_tokenizer,
)

BUILDERS = {
    "sd": tiny_sd_pipeline,
    "sd_inpaint": tiny_sd_inpaint_pipeline,
    "amused": tiny_amused_pipeline,
    "amused_inpaint": tiny_amused_inpaint_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sdxl_inpaint": tiny_sdxl_inpaint_pipeline,
    "sd3": tiny_sd3_pipeline,
    "sd3_inpaint": tiny_sd3_inpaint_pipeline,
    "flux": tiny_flux_pipeline,
    "flux_inpaint": tiny_flux_inpaint_pipeline,
    "flux_fill": tiny_flux_fill_pipeline,
}
PROMPT = "A squirrel's café, 3 burgers & unknown-wörds: zxqv?! 🐿"


def _inputs(name: str, size: int, seed: int = 0, prompt: str = PROMPT) -> dict:
    kwargs = {
        "prompt": prompt,
        "num_inference_steps": 2,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
    }
    if name.endswith(("inpaint", "fill")):
        rng = np.random.default_rng(0)
        image = torch.from_numpy(rng.random((1, 3, size, size), dtype=np.float32))
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
        kwargs.update(image=image, mask_image=mask)
    if not name.startswith("amused_inpaint"):  # aMUSEd inpainting takes its size from the image; SD needs it passed
        kwargs.update(height=size, width=size)
    if name.startswith(("sd3", "flux")):  # the tiny T5's window (the pipelines' defaults are 256 / 512 tokens)
        kwargs.update(max_sequence_length=32)
    return kwargs


def _run(pipe, name: str, size: int, **kw) -> np.ndarray:
    return pipe(**_inputs(name, size, **kw)).images


@pytest.mark.parametrize("name", list(BUILDERS))
def test_two_steps_give_images_of_the_expected_size(name: str) -> None:
    pipe = BUILDERS[name](seed=0)
    assert getattr(pipe, "safety_checker", None) is None
    for size in (32, 64):
        images = _run(pipe, name, size)
        assert images.shape == (1, size, size, 3)
        assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    # a prompt longer than the 77-token window is truncated (character-level tokens), not an error
    assert _run(pipe, name, 32, prompt="a very long prompt, " * 10).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(("name", "default"), [("sd", TINY_SD_IMAGE_SIZE), ("amused", TINY_AMUSED_IMAGE_SIZE)])
def test_default_size_and_pil_output(name: str, default: int) -> None:
    pipe = BUILDERS[name](seed=0)
    out = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (default, default)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_same_seed_same_output_and_prompt_matters(name: str) -> None:
    a = _run(BUILDERS[name](seed=0), name, 32)
    pipe = BUILDERS[name](seed=0)
    np.testing.assert_array_equal(a, _run(pipe, name, 32))
    # the text conditioning is live: another prompt changes the image
    assert not np.array_equal(a, _run(pipe, name, 32, prompt="a completely different prompt"))
    # another weight seed gives other weights
    other = BUILDERS[name](seed=1)
    first = next(iter(pipe.text_encoder.parameters()))
    assert not torch.equal(first, next(iter(other.text_encoder.parameters())))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_save_pretrained_from_pretrained_round_trip(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = BUILDERS[name](seed=0)
    expected = _run(pipe, name, 32)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "tokenizer").is_dir()
    reloaded = type(pipe).from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.tokenizer) is type(pipe.tokenizer)
    assert reloaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    for extra in ("tokenizer_2", "tokenizer_3"):
        if getattr(pipe, extra, None) is not None:
            assert getattr(reloaded, extra)(PROMPT).input_ids == getattr(pipe, extra)(PROMPT).input_ids
    np.testing.assert_array_equal(expected, _run(reloaded, name, 32))


def test_tokenizer_covers_any_string_and_reloads(tmp_path) -> None:
    tok = tiny_clip_tokenizer()
    specials = {tok.bos_token_id, tok.eos_token_id}
    assert tok.unk_token_id in specials  # so "no unk" below means "no special id inside the text"
    for text in [
        PROMPT,
        "",
        "   ",
        "日本語のテキスト",
        "tabs\tand\nnewlines",
        "<html> {json: [1, 2]} ~`|\\",
        "\x00\x7f",
    ]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert not specials & set(ids[1:-1]), text  # every character mapped to a real token
    padded = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == tok.model_max_length == 77
    tok.save_pretrained(tmp_path)
    reloaded = type(tok).from_pretrained(tmp_path)
    assert reloaded(PROMPT).input_ids == tok(PROMPT).input_ids
    assert reloaded.model_max_length == 77


def test_t5_tokenizer_round_trips_any_text_with_t5_special_ids() -> None:
    tok = tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for text in [PROMPT, "a red circle above two blue squares", "日本語"]:
        ids = tok(text).input_ids
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_t5_families_run_with_the_pipelines_default_sequence_length(name: str) -> None:
    pipe = BUILDERS[name](seed=0)
    kwargs = _inputs(name, 32)
    kwargs.pop("max_sequence_length")
    assert pipe(**kwargs).images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_generator_family_reads_the_components(name: str) -> None:
    from rahf.pipelines.families import generator_family

    pipe = BUILDERS[name](seed=0)
    assert generator_family(pipe) == name.split("_")[0]


def test_generator_family_error_names_the_supported_families() -> None:
    from rahf.pipelines.families import generator_family

    class NotAPipeline:
        components = {"unet": torch.nn.Linear(2, 2)}

    with pytest.raises(
        ValueError, match=r"`pipe` is a NotAPipeline \(Linear.*supported: Stable Diffusion.*SDXL.*FLUX"
    ):
        generator_family(NotAPipeline())
