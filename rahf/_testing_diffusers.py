"""Seeded builders of tiny, randomly initialised diffusers pipelines, built offline from configs for tests and demos.

They follow diffusers' own `get_dummy_components`: real pipeline classes, real schedulers, components a few thousand
parameters large, so a 2-step 32x32 generation takes milliseconds on CPU. The tokenizer is a genuine `CLIPTokenizer`
whose vocabulary holds every byte (as CLIP's base alphabet, with and without the `</w>` end-of-word suffix) and no
merges, so any prompt tokenizes (one token per character) and the pipeline saves and reloads like a real one.

Examples:
    >>> import torch
    >>> from rahf._testing_diffusers import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline(seed=0)
    >>> out = pipe("a red cat!", num_inference_steps=2, height=32, width=32, generator=torch.manual_seed(0))
    >>> out.images[0].size
    (32, 32)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import (
    AmusedInpaintPipeline,
    AmusedPipeline,
    AmusedScheduler,
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UVit2DModel,
    VQModel,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TINY_AMUSED_IMAGE_SIZE",
    "TINY_SD_IMAGE_SIZE",
    "tiny_amused_inpaint_pipeline",
    "tiny_amused_pipeline",
    "tiny_clip_tokenizer",
    "tiny_sd_inpaint_pipeline",
    "tiny_sd_pipeline",
]

# Default output sizes (pixels, square) when `height` / `width` are not passed to the pipeline.
TINY_SD_IMAGE_SIZE = 32
TINY_AMUSED_IMAGE_SIZE = 32

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# Real CLIP uses 77; kept so that prompt handling (truncation warnings, padding) behaves as with real checkpoints.
_MODEL_MAX_LENGTH = 77


def _tiny_clip_vocab() -> dict[str, int]:
    # Same layout as CLIP's vocab.json: the 256 byte characters, the same with `</w>`, then the two special tokens
    # last, so that `eos` has the largest id (CLIPTextModel's legacy pooling takes the argmax of the input ids).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2/CLIP's printable byte characters
    tokens = alphabet + [c + "</w>" for c in alphabet] + [_BOS, _EOS]
    return {token: i for i, token in enumerate(tokens)}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A character-level `CLIPTokenizer` (514 tokens, no merges) that tokenizes any string without unknown tokens.

    Returns:
        `transformers.CLIPTokenizer`: bos `<|startoftext|>` (id 512), eos = pad = unk `<|endoftext|>` (id 513),
        `model_max_length` 77.
    """
    return CLIPTokenizer(vocab=_tiny_clip_vocab(), merges=[], model_max_length=_MODEL_MAX_LENGTH)


def _tiny_clip_text_config(hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    vocab = _tiny_clip_vocab()
    kwargs = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab[_BOS],
        eos_token_id=vocab[_EOS],
        pad_token_id=vocab[_EOS],
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=_MODEL_MAX_LENGTH,
        layer_norm_eps=1e-5,
        **kwargs,
    )


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # aMUSEd pipelines live under diffusers' `deprecated` package and log a warning on every construction; the builders
    # are called many times in tests, so the warning is silenced while they construct (and only then).
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _tiny_sd_components(seed: int, unet_in_channels: int) -> dict[str, Any]:
    cross_attention_dim = 16
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD_IMAGE_SIZE // 2,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=TINY_SD_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(hidden_size=cross_attention_dim)).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tiny_clip_tokenizer(),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny random `StableDiffusionPipeline` (DDIM, VAE scale factor 2, default 32x32 output, no safety checker).

    Args:
        seed (`int`, *optional*, defaults to 0): seeds the initialisation of each model; equal seeds give equal weights.

    Returns:
        `diffusers.StableDiffusionPipeline` on CPU, in eval mode.
    """
    pipe = StableDiffusionPipeline(**_tiny_sd_components(seed, unet_in_channels=4))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_inpaint_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """A tiny random `StableDiffusionInpaintPipeline` (UNet with 9 input channels: latents, mask, masked-image latents).

    Args:
        seed (`int`, *optional*, defaults to 0): seeds the initialisation of each model; equal seeds give equal weights.

    Returns:
        `diffusers.StableDiffusionInpaintPipeline` on CPU, in eval mode, default 32x32 output.
    """
    pipe = StableDiffusionInpaintPipeline(**_tiny_sd_components(seed, unet_in_channels=9))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_amused_components(seed: int) -> dict[str, Any]:
    codebook_size = 32
    hidden_size = 8
    torch.manual_seed(seed)
    transformer = UVit2DModel(
        hidden_size=hidden_size,
        use_bias=False,
        hidden_dropout=0.0,
        cond_embed_dim=hidden_size,
        # 5 micro-conditioning values (size, crop, aesthetic score), each encoded to 2 numbers.
        micro_cond_encode_dim=2,
        micro_cond_embed_dim=10,
        encoder_hidden_size=hidden_size,
        vocab_size=codebook_size + 1,  # one extra id for the mask token
        codebook_size=codebook_size,
        in_channels=8,
        block_out_channels=8,
        num_res_blocks=1,
        downsample=True,
        upsample=True,
        block_num_heads=1,
        num_hidden_layers=1,
        num_attention_heads=1,
        attention_dropout=0.0,
        intermediate_size=8,
        layer_norm_eps=1e-6,
        ln_elementwise_affine=True,
        sample_size=TINY_AMUSED_IMAGE_SIZE // 2,
    )
    torch.manual_seed(seed)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=8,
        norm_num_groups=8,
        num_vq_embeddings=codebook_size,
        sample_size=TINY_AMUSED_IMAGE_SIZE,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=False,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        _tiny_clip_text_config(hidden_size=hidden_size, projection_dim=hidden_size)
    )
    return {
        "vqvae": vqvae.eval(),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder": text_encoder.eval(),
        "transformer": transformer.eval(),
        "scheduler": AmusedScheduler(mask_token_id=codebook_size),
    }


def tiny_amused_pipeline(seed: int = 0) -> AmusedPipeline:
    """A tiny random `AmusedPipeline` (VQ scale factor 2, 32-token codebook, default 32x32 output).

    Args:
        seed (`int`, *optional*, defaults to 0): seeds the initialisation of each model; equal seeds give equal weights.

    Returns:
        `diffusers.AmusedPipeline` on CPU, in eval mode.
    """
    with _quiet_deprecation():
        pipe = AmusedPipeline(**_tiny_amused_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_amused_inpaint_pipeline(seed: int = 0) -> AmusedInpaintPipeline:
    """A tiny random `AmusedInpaintPipeline`, with the same components as `tiny_amused_pipeline(seed)`.

    Args:
        seed (`int`, *optional*, defaults to 0): seeds the initialisation of each model; equal seeds give equal weights.

    Returns:
        `diffusers.AmusedInpaintPipeline` on CPU, in eval mode; the output size is the input image's size.
    """
    with _quiet_deprecation():
        pipe = AmusedInpaintPipeline(**_tiny_amused_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
