"""`RAHFStableDiffusion3InpaintPipeline`: the RAHF repair flow with SD3 / SD3.5 (heatmap -> mask -> K candidates from one
`StableDiffusion3InpaintPipeline` call -> pasted back outside the mask -> rescored -> best).

Any SD3 checkpoint works: the text-to-image transformer (16 input channels, latents blended outside the mask as
diffusers does) or an inpainting one (33).
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3InpaintPipeline,
)
from rahf.pipelines.rahf_inpaint import RAHFLatentInpaintMixin
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from rahf import RAHFModel, RAHFProcessor

__all__ = ["RAHFStableDiffusion3InpaintPipeline"]


class RAHFStableDiffusion3InpaintPipeline(RAHFLatentInpaintMixin, DiffusionPipeline):
    r"""
    Repairs what RAHF flags in an image with Stable Diffusion 3 / 3.5: RAHF heatmap -> mask -> K candidates in one
    batched [`StableDiffusion3InpaintPipeline`] call on this pipeline's components -> the input pasted back outside
    the mask -> RAHF rescoring of candidates and input in one batch -> the best, or the input. `__call__` is
    [`RAHFInpaintPipeline.__call__`]; SD3's own arguments (`prompt_2`, `prompt_3`, `max_sequence_length`, `sigmas`,
    `joint_attention_kwargs`, ...) pass through to [`StableDiffusion3InpaintPipeline.__call__`].

    Args:
        transformer ([`SD3Transformer2DModel`]):
            The text-to-image transformer of any SD3 checkpoint (16 input channels) or an inpainting one (33: latents,
            mask, masked-image latents).
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3,
        image_encoder, feature_extractor:
            As in [`StableDiffusion3InpaintPipeline`].
        reward_model ([`rahf.RAHFModel`]), reward_processor ([`rahf.RAHFProcessor`]):
            The trained RAHF model and its processor.

    Examples:

    ```python
    >>> from PIL import Image
    >>> from rahf._testing_diffusers import tiny_sd3_pipeline
    >>> from rahf.pipelines.rahf_sd3_inpaint import RAHFStableDiffusion3InpaintPipeline
    >>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor
    >>> pipe = RAHFStableDiffusion3InpaintPipeline.from_pipe(
    ...     tiny_sd3_pipeline(), reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    ... )
    >>> out = pipe("a red cat", Image.new("RGB", (32, 32)), threshold=0.5, num_inference_steps=2, max_sequence_length=32)
    ```
    """

    # The reward model stays on the accelerator under `enable_model_cpu_offload` (see `RAHFInpaintPipeline`).
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->image_encoder->transformer->vae"
    _optional_components = ["image_encoder", "feature_extractor"]
    _exclude_from_cpu_offload = ["reward_model"]
    _callback_tensor_inputs = StableDiffusion3InpaintPipeline._callback_tensor_inputs
    _inpaint_pipeline_cls = StableDiffusion3InpaintPipeline

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
        reward_model: RAHFModel,
        reward_processor: RAHFProcessor,
        image_encoder: SiglipVisionModel | None = None,
        feature_extractor: SiglipImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            reward_model=reward_model,
            reward_processor=reward_processor,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8

    @property
    def generation_multiple(self) -> int:
        """Generation sizes are multiples of this: the VAE's factor times the transformer's patch size (16 for SD3)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    def _check_denoiser(self) -> None:
        # diffusers' SD3 inpainting takes exactly these two layouts.
        in_channels = self.transformer.config.in_channels
        if in_channels not in (16, 33):
            raise ValueError(
                "`transformer` must be an SD3 text-to-image transformer (16 input channels, as many as the latents) or "
                f"an inpainting one (33: latents, mask, masked-image latents), got in_channels={in_channels}"
            )
