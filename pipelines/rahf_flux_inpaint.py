"""`RAHFFluxInpaintPipeline`: the RAHF repair flow with FLUX.1 (heatmap -> mask -> K candidates from one
`FluxFillPipeline` or `FluxInpaintPipeline` call -> pasted back outside the mask -> rescored -> best).

A FLUX.1 Fill transformer (it reads the mask and the masked image) generates through `FluxFillPipeline`; the
transformer of any text-to-image checkpoint (dev, schnell, ...) through `FluxInpaintPipeline`, which blends the input's
latents in outside the mask.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxInpaintPipeline,
    FluxTransformer2DModel,
)
from rahf.pipelines.rahf_inpaint import RAHFLatentInpaintMixin
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from rahf import RAHFModel, RAHFProcessor

__all__ = ["RAHFFluxInpaintPipeline"]


class RAHFFluxInpaintPipeline(RAHFLatentInpaintMixin, DiffusionPipeline):
    r"""
    Repairs what RAHF flags in an image with FLUX.1: RAHF heatmap -> mask -> K candidates in one batched
    [`FluxFillPipeline`] (a Fill transformer) or [`FluxInpaintPipeline`] (any text-to-image transformer) call on this
    pipeline's components -> the input pasted back outside the mask -> RAHF rescoring of candidates and input in one
    batch -> the best, or the input. `__call__` is [`RAHFInpaintPipeline.__call__`]; FLUX's own arguments
    (`prompt_2`, `max_sequence_length`, `sigmas`, `joint_attention_kwargs`, and `true_cfg_scale` with
    `negative_prompt` for `FluxInpaintPipeline`) pass through to the wrapped pipeline's `__call__`, whose defaults
    apply (`guidance_scale` 30 and 50 steps for Fill; 7.0 and 28 steps otherwise).

    Args:
        transformer ([`FluxTransformer2DModel`]):
            A FLUX.1 Fill transformer (input channels: packed latents, packed masked-image latents and the packed
            mask, 384 for FLUX.1-Fill-dev) or the transformer of any FLUX.1 text-to-image checkpoint (packed latents
            only, 64).
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, image_encoder, feature_extractor:
            As in [`FluxInpaintPipeline`] (`image_encoder` and `feature_extractor` are not used by Fill).
        reward_model ([`rahf.RAHFModel`]), reward_processor ([`rahf.RAHFProcessor`]):
            The trained RAHF model and its processor.

    Examples:

    ```python
    >>> from PIL import Image
    >>> from rahf._testing_diffusers import tiny_flux_pipeline
    >>> from rahf.pipelines.rahf_flux_inpaint import RAHFFluxInpaintPipeline
    >>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor
    >>> pipe = RAHFFluxInpaintPipeline.from_pipe(
    ...     tiny_flux_pipeline(), reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    ... )
    >>> pipe.inpaint_pipeline_class().__name__
    'FluxInpaintPipeline'
    >>> out = pipe("a red cat", Image.new("RGB", (32, 32)), threshold=0.5, num_inference_steps=2, max_sequence_length=32)
    ```
    """

    # The reward model stays on the accelerator under `enable_model_cpu_offload` (see `RAHFInpaintPipeline`).
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components = ["image_encoder", "feature_extractor"]
    _exclude_from_cpu_offload = ["reward_model"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]  # both wrapped pipelines'

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        reward_model: RAHFModel,
        reward_processor: RAHFProcessor,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            reward_model=reward_model,
            reward_processor=reward_processor,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8

    def _denoiser_channels(self) -> dict[int, type[DiffusionPipeline]]:
        # FLUX packs 2x2 latent patches into tokens; Fill adds the packed masked-image latents and the mask folded to
        # the latent grid (vae_scale_factor**2 values per latent pixel, packed 2x2 as well).
        packed = 4 * self.vae.config.latent_channels
        return {packed: FluxInpaintPipeline, 2 * packed + 4 * self.vae_scale_factor**2: FluxFillPipeline}

    def inpaint_pipeline_class(self) -> type[DiffusionPipeline]:
        """[`FluxFillPipeline`] for a Fill transformer, else [`FluxInpaintPipeline`]."""
        self._check_denoiser()
        return self._denoiser_channels()[self.transformer.config.in_channels]

    @property
    def generation_multiple(self) -> int:
        """Generation sizes are multiples of this: the VAE's factor times 2 (the 2x2 packing; 16 for FLUX.1)."""
        return 2 * self.vae_scale_factor

    def _check_denoiser(self) -> None:
        in_channels = self.transformer.config.in_channels
        inpaint, fill = self._denoiser_channels()
        if in_channels not in (inpaint, fill):
            raise ValueError(
                f"`transformer` must be a FLUX.1 text-to-image transformer ({inpaint} input channels: packed latents) "
                f"or a Fill one ({fill}: packed latents, masked-image latents and mask), got in_channels={in_channels}"
            )
