"""The measuring world's generator trainer, run for a few steps on a tiny set: a loadable StableDiffusionPipeline, its
validation grids and training prompts, and resumption (from the autoencoder stage and from the UNet stage) that ends
bit-identical to an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from rahf.improve.train_generator import main, parse_generator_args, synth_tokenizer, train_generator
from safetensors.torch import load_file
from train_utils import make_tiny_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("gen") / "data", image_size=32)


def _argv(data, out, *extra):
    return [
        "--data_dir", str(data), "--output_dir", str(out), "--resolution", "32",
        "--vae_channels", "8", "16", "--unet_channels", "16", "32", "--text_hidden_size", "32", "--text_layers", "1",
        "--vae_steps", "3", "--unet_steps", "5", "--vae_batch_size", "4", "--train_batch_size", "4",
        "--checkpointing_steps", "2", "--checkpoints_total_limit", "10", "--validation_steps", "4",
        "--num_validation_prompts", "2", "--validation_inference_steps", "2", "--logging_steps", "1",
        "--lr_warmup_steps", "1", *map(str, extra),
    ]  # fmt: skip


def _weights(final):
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        for name, tensor in load_file(str(next((final / part).glob("*.safetensors")))).items():
            out[f"{part}.{name}"] = tensor
    return out


def test_a_few_steps_make_a_loadable_pipeline_and_resuming_changes_nothing(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    full = tmp_path / "full"
    assert main(_argv(data, full)) == 0
    final = full / "final"
    pipe = StableDiffusionPipeline.from_pretrained(str(final))
    image = pipe("a red circle on a wooden table", num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the training latents
    assert (final / "training_prompts.txt").read_text().strip()
    assert (full / "validation" / "step-000004.png").is_file() and (full / "validation" / "final.png").is_file()
    logged = [line for line in (full / "logs" / "train_log.jsonl").read_text().splitlines() if "loss" in line]
    assert len(logged) == 8
    reference = _weights(final)
    for checkpoint in ("checkpoint-2", "checkpoint-6"):  # inside the autoencoder stage, inside the UNet stage
        resumed = tmp_path / f"from-{checkpoint}"
        resumed.mkdir()
        shutil.copytree(full / checkpoint, resumed / checkpoint)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        summary = train_generator(parse_generator_args(_argv(data, resumed, "--resume_from_checkpoint", "latest")))
        assert summary["global_step"] == 8
        weights = _weights(resumed / "final")
        different = [k for k in reference if not torch.equal(reference[k], weights[k])]
        assert not different, f"resumed from {checkpoint}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_the_tokenizer_is_word_level_with_clip_specials():
    tokenizer = synth_tokenizer(max_length=12)
    ids = tokenizer("Two red stars above a zebra", padding="max_length", truncation=True).input_ids
    assert len(ids) == 12 and ids[0] == tokenizer.bos_token_id
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1:7] == ["two", "red", "stars", "above", "a", "<|unk|>"] and tokens[7] == "<|endoftext|>"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unet_channels"):
        parse_generator_args(["--unet_channels", "12", "24"])
    with pytest.raises(ValueError, match="resolution"):
        parse_generator_args(["--resolution", "30", "--vae_channels", "8", "16", "16"])
    with pytest.raises(ValueError, match="both 0"):
        parse_generator_args(["--vae_steps", "0", "--unet_steps", "0"])
