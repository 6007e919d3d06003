"""SDXL sampling steered by a differentiable RAHF score: `StableDiffusionXLPipeline`'s own loop with the shared
guidance of `rahf.pipelines.guidance`."""

from __future__ import annotations

from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from rahf.pipelines.guidance import GUIDANCE_DOC, RAHFGuidanceMixin
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from rahf.modeling_rahf import RAHFModel
from rahf.processing_rahf import RAHFProcessor

__all__ = ["RAHFGuidedStableDiffusionXLPipeline"]


class RAHFGuidedStableDiffusionXLPipeline(RAHFGuidanceMixin, StableDiffusionXLPipeline):
    r"""
    Text-to-image generation with SDXL, guided by a differentiable RAHF reward (classifier guidance on the predicted
    clean sample, epsilon / v / sample prediction, as [`RAHFGuidedStableDiffusionPipeline`]).

    Supported schedulers: [`DDIMScheduler`], [`EulerDiscreteScheduler`] (SDXL's default),
    [`EulerAncestralDiscreteScheduler`] and [`DPMSolverMultistepScheduler`]. With `reward_guidance_scale=0` the
    output is exactly [`StableDiffusionXLPipeline`]'s. `enable_model_cpu_offload` offloads the text encoders and the
    UNet; the VAE and the reward model, used at every guided step, stay on the device.

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
        force_zeros_for_empty_prompt, add_watermarker: as in [`StableDiffusionXLPipeline`].
        reward_model ([`RAHFModel`], *optional*): the reward model; frozen and put in eval mode.
        reward_processor ([`RAHFProcessor`], *optional*): its processor.

    Call arguments: those of [`StableDiffusionXLPipeline.__call__`], and
    """

    __doc__ += (
        GUIDANCE_DOC
        + r"""
    Returns:
        [`~rahf.pipelines.guidance.RAHFGuidedPipelineOutput`] or `tuple`: with `return_dict=False`, the tuple
        `(images, rewards, reward_scores, num_nonfinite_grads)`.

    Examples:
        ```py
        >>> import torch
        >>> from diffusers import StableDiffusionXLPipeline
        >>> from rahf import RAHFModel, RAHFProcessor
        >>> from rahf.pipelines import AutoRAHFGuidedPipeline

        >>> sdxl = StableDiffusionXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> pipe = AutoRAHFGuidedPipeline.from_pipe(
        ...     sdxl, reward_model=RAHFModel.from_pretrained("rahf-base"), reward_processor=RAHFProcessor.from_pretrained("rahf-base")
        ... )
        >>> out = pipe("a macro lens closeup of a paperclip", reward="aesthetics", reward_guidance_scale=0.5,
        ...            guidance_decode_scale=0.375, guide_every=2, generator=torch.manual_seed(0))
        ```
    """
    )

    _rahf_family = "sdxl"
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet"
    _optional_components = [
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
        "reward_model",
        "reward_processor",
    ]
    _exclude_from_cpu_offload = ["vae", "reward_model"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        reward_model: RAHFModel | None = None,
        reward_processor: RAHFProcessor | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        if reward_model is not None:
            reward_model.requires_grad_(False).eval()
        self.register_modules(reward_model=reward_model, reward_processor=reward_processor)
