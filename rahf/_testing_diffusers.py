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
import functools
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
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UVit2DModel,
    VQModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

__all__ = [
    "TINY_AMUSED_IMAGE_SIZE",
    "TINY_FAMILY_BUILDERS",
    "TINY_SD_IMAGE_SIZE",
    "tiny_amused_inpaint_pipeline",
    "tiny_amused_pipeline",
    "tiny_clip_tokenizer",
    "tiny_flux_fill_pipeline",
    "tiny_flux_inpaint_pipeline",
    "tiny_flux_pipeline",
    "tiny_sd3_inpaint_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_inpaint_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_inpaint_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_tokenizer",
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


# --- SDXL, SD3 and FLUX ------------------------------------------------------------------------------------------------
# Sizes follow the families' layouts at toy widths: SDXL's UNet reads two CLIP encoders' hidden states side by side
# and the second one's pooled projection plus six size/crop numbers ("text_time" conditioning); SD3's and FLUX's
# transformers patchify the latents (FLUX packs 2x2 latent patches into tokens) and read a T5 encoder's states. The
# tiny T5 uses the project's offline byte-level tokenizer (T5's special ids), so every prompt tokenizes offline.

_T5_VOCAB_SIZE = 512
_T5_MAX_LENGTH = (
    32  # prompts are padded to this many T5 tokens (the pipelines' `max_sequence_length` default is larger)
)


@functools.lru_cache(maxsize=1)
def _tiny_t5_tokenizer_json() -> str:
    from rahf.tokenization import build_offline_tokenizer

    # Training the BPE takes a few seconds; the JSON is cached so each pipeline gets its own tokenizer cheaply.
    return build_offline_tokenizer(
        vocab_size=_T5_VOCAB_SIZE, model_max_length=_T5_MAX_LENGTH
    ).backend_tokenizer.to_str()


def tiny_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with T5's special ids (pad 0, eos 1, unk 2), 512 tokens, `model_max_length` 32."""
    from tokenizers import Tokenizer

    from rahf.tokenization import EOS, PAD, UNK

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_t5_tokenizer_json()),
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=_T5_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def _tiny_t5_encoder(seed: int, d_model: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=_T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _tiny_flow_vae(seed: int, latent_channels: int) -> AutoencoderKL:
    # SD3 / FLUX VAEs: no quant convs, a shift as well as a scale (the values are the real SD3 VAE's).
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=TINY_SD_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def _tiny_sdxl_components(seed: int, unet_in_channels: int) -> dict[str, Any]:
    hidden = 16  # each CLIP encoder's width; the UNet attends to both side by side
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD_IMAGE_SIZE // 2,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * hidden,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 size/crop numbers (original size, crop top-left, target size), each embedded, plus the pooled projection.
        projection_class_embeddings_input_dim=6 * time_embed_dim + hidden,
    )
    components = _tiny_sd_components(seed, unet_in_channels=4)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(hidden_size=hidden, projection_dim=hidden))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "vae": components["vae"],
        "text_encoder": components["text_encoder"],
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny random `StableDiffusionXLPipeline` (two CLIP encoders, size/crop conditioning, Euler, 32x32 default).

    Args:
        seed (`int`, *optional*, defaults to 0): seeds the initialisation of each model; equal seeds give equal weights.

    Returns:
        `diffusers.StableDiffusionXLPipeline` on CPU, in eval mode, without the invisible watermark.
    """
    pipe = StableDiffusionXLPipeline(**_tiny_sdxl_components(seed, unet_in_channels=4), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_inpaint_pipeline(seed: int = 0, unet_in_channels: int = 4) -> StableDiffusionXLInpaintPipeline:
    """A tiny random `StableDiffusionXLInpaintPipeline`; `unet_in_channels` 4 (text-to-image UNet) or 9 (inpainting).

    With 4 channels the components equal `tiny_sdxl_pipeline(seed)`'s, the case of a text-to-image checkpoint
    loaded into the inpainting pipeline (latents blended with the input's outside the mask at every step).
    """
    if unet_in_channels not in (4, 9):
        raise ValueError(f"`unet_in_channels` must be 4 or 9, got {unet_in_channels}")
    pipe = StableDiffusionXLInpaintPipeline(
        **_tiny_sdxl_components(seed, unet_in_channels=unet_in_channels),
        requires_aesthetics_score=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sd3_components(seed: int) -> dict[str, Any]:
    hidden = 16  # each CLIP encoder's width; SD3 concatenates both and pads them to the T5 width
    joint_dim = 32  # T5 width
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_SD_IMAGE_SIZE // 2,
        patch_size=1,
        # 16 latent channels as the real SD3 VAE: diffusers' SD3 inpainting blends latents only for 16-channel models.
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        caption_projection_dim=16,
        pooled_projection_dim=2 * hidden,
        pos_embed_max_size=64,  # latent grids up to 64x64 (128-pixel images)
    )
    text_encoders = []
    for offset in (1, 2):
        torch.manual_seed(seed + offset)
        config = _tiny_clip_text_config(hidden_size=hidden, projection_dim=hidden)
        text_encoders.append(CLIPTextModelWithProjection(config).eval())
    return {
        "transformer": transformer.eval(),
        "vae": _tiny_flow_vae(seed, latent_channels=16),
        "text_encoder": text_encoders[0],
        "text_encoder_2": text_encoders[1],
        "text_encoder_3": _tiny_t5_encoder(seed + 3, d_model=joint_dim),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "tokenizer_3": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny random `StableDiffusion3Pipeline` (two CLIP encoders and a T5, flow matching, 16 latent channels).

    Args:
        seed (`int`, *optional*, defaults to 0): seeds the initialisation of each model; equal seeds give equal weights.

    Returns:
        `diffusers.StableDiffusion3Pipeline` on CPU, in eval mode, default 32x32 output.
    """
    pipe = StableDiffusion3Pipeline(**_tiny_sd3_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_inpaint_pipeline(seed: int = 0) -> StableDiffusion3InpaintPipeline:
    """A tiny random `StableDiffusion3InpaintPipeline` with `tiny_sd3_pipeline(seed)`'s (text-to-image) components."""
    components = _tiny_sd3_components(seed)
    components.pop("image_encoder")
    components.pop("feature_extractor")
    pipe = StableDiffusion3InpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_flux_components(seed: int, fill: bool) -> dict[str, Any]:
    hidden = 32  # CLIP width (its pooled output conditions FLUX) and T5 width
    latent_channels = 4
    packed = 4 * latent_channels  # FLUX packs 2x2 latent patches into one token
    # FLUX.1 Fill reads the packed latents, the packed masked-image latents and the mask folded to the latent grid
    # (vae_scale_factor**2 = 4 values per latent pixel, packed 2x2 as well).
    in_channels = packed + packed + 4 * 4 if fill else packed
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=packed,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        pooled_projection_dim=hidden,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=False,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(hidden_size=hidden)).eval()
    return {
        "transformer": transformer.eval(),
        "vae": _tiny_flow_vae(seed, latent_channels=latent_channels),
        "text_encoder": text_encoder,
        "text_encoder_2": _tiny_t5_encoder(seed + 2, d_model=hidden),
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A tiny random `FluxPipeline` (CLIP + T5, flow matching, 2x2-packed 4-channel latents, 32x32 default).

    Call it with `max_sequence_length` at most 32 (the tiny T5 tokenizer's length), e.g. `max_sequence_length=32`.

    Args:
        seed (`int`, *optional*, defaults to 0): seeds the initialisation of each model; equal seeds give equal weights.

    Returns:
        `diffusers.FluxPipeline` on CPU, in eval mode.
    """
    pipe = FluxPipeline(**_tiny_flux_components(seed, fill=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_inpaint_pipeline(seed: int = 0) -> FluxInpaintPipeline:
    """A tiny random `FluxInpaintPipeline` with `tiny_flux_pipeline(seed)`'s (text-to-image) components."""
    pipe = FluxInpaintPipeline(**_tiny_flux_components(seed, fill=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_fill_pipeline(seed: int = 0) -> FluxFillPipeline:
    """A tiny random `FluxFillPipeline` (a FLUX.1 Fill-style transformer reading mask and masked-image latents)."""
    pipe = FluxFillPipeline(**_tiny_flux_components(seed, fill=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Family -> (text-to-image builder, inpainting builder); the inpainting builders reuse the text-to-image components.
TINY_FAMILY_BUILDERS = {
    "sd": (tiny_sd_pipeline, tiny_sd_inpaint_pipeline),
    "sdxl": (tiny_sdxl_pipeline, tiny_sdxl_inpaint_pipeline),
    "sd3": (tiny_sd3_pipeline, tiny_sd3_inpaint_pipeline),
    "flux": (tiny_flux_pipeline, tiny_flux_inpaint_pipeline),
    "amused": (tiny_amused_pipeline, tiny_amused_inpaint_pipeline),
}
