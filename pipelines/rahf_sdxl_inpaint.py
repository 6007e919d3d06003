"""`RAHFStableDiffusionXLInpaintPipeline`: the RAHF repair flow with SDXL (heatmap -> mask -> K candidates from one
`StableDiffusionXLInpaintPipeline` call -> pasted back outside the mask -> rescored -> best).

Any SDXL checkpoint works: an inpainting UNet (9 input channels) or a text-to-image one (4 channels, latents blended
outside the mask as diffusers does).
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from rahf.pipelines.rahf_inpaint import RAHFLatentInpaintMixin, check_unet_channels
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from rahf import RAHFModel, RAHFProcessor

__all__ = ["RAHFStableDiffusionXLInpaintPipeline"]


class RAHFStableDiffusionXLInpaintPipeline(RAHFLatentInpaintMixin, DiffusionPipeline):
    r"""
    Repairs what RAHF flags in an image with SDXL: RAHF heatmap -> mask -> K candidates in one batched
    [`StableDiffusionXLInpaintPipeline`] call on this pipeline's components -> the input pasted back outside the mask
    -> RAHF rescoring of candidates and input in one batch -> the best, or the input. `__call__` is
    [`RAHFInpaintPipeline.__call__`]; SDXL's own arguments (`prompt_2`, `negative_prompt_2`, `aesthetic_score`,
    `original_size`, `denoising_end`, ...) pass through to [`StableDiffusionXLInpaintPipeline.__call__`].

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor:
            As in [`StableDiffusionXLInpaintPipeline`]; `unet` may be an inpainting UNet (9 input channels) or the
            UNet of any SDXL text-to-image checkpoint (4).
        reward_model ([`rahf.RAHFModel`]), reward_processor ([`rahf.RAHFProcessor`]):
            The trained RAHF model and its processor.
        requires_aesthetics_score (`bool`, *optional*, defaults to `False`), force_zeros_for_empty_prompt (`bool`,
        *optional*, defaults to `True`), add_watermarker (`bool`, *optional*):
            As in [`StableDiffusionXLInpaintPipeline`].

    Examples:

    ```python
    >>> from PIL import Image
    >>> from rahf._testing_diffusers import tiny_sdxl_pipeline
    >>> from rahf.pipelines.rahf_sdxl_inpaint import RAHFStableDiffusionXLInpaintPipeline
    >>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor
    >>> pipe = RAHFStableDiffusionXLInpaintPipeline.from_pipe(
    ...     tiny_sdxl_pipeline(), reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    ... )  # a text-to-image SDXL pipeline inpaints through the 4-channel path
    >>> out = pipe("a red cat", image=Image.new("RGB", (32, 32)), threshold=0.5, num_inference_steps=2)
    >>> out.repaired, out.mask.shape
    ```
    """

    # The reward model stays on the accelerator under `enable_model_cpu_offload` (see `RAHFInpaintPipeline`).
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = [
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
    ]
    _exclude_from_cpu_offload = ["reward_model"]
    _callback_tensor_inputs = StableDiffusionXLInpaintPipeline._callback_tensor_inputs
    _inpaint_pipeline_cls = StableDiffusionXLInpaintPipeline

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        reward_model: RAHFModel,
        reward_processor: RAHFProcessor,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            reward_model=reward_model,
            reward_processor=reward_processor,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(
            requires_aesthetics_score=requires_aesthetics_score,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )
        # Not saved, as in diffusers: None adds the invisible watermark when that package is installed.
        self._add_watermarker = add_watermarker
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8

    def _inpaint_pipeline_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": self._add_watermarker}

    @property
    def generation_multiple(self) -> int:
        """Generation sizes are rounded to multiples of this (8, or the VAE's factor when larger)."""
        return max(8, self.vae_scale_factor)

    def _check_denoiser(self) -> None:
        check_unet_channels(self.unet, self.vae)
