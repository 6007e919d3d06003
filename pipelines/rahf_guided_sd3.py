"""SD3 / SD3.5 sampling steered by a differentiable RAHF score: `StableDiffusion3Pipeline`'s own loop with the shared
guidance of `rahf.pipelines.guidance` (flow matching: x0 = x_t - sigma * v)."""

from __future__ import annotations

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from rahf.pipelines.guidance import GUIDANCE_DOC, RAHFGuidanceMixin
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from rahf.modeling_rahf import RAHFModel
from rahf.processing_rahf import RAHFProcessor

__all__ = ["RAHFGuidedStableDiffusion3Pipeline"]


class RAHFGuidedStableDiffusion3Pipeline(RAHFGuidanceMixin, StableDiffusion3Pipeline):
    r"""
    Text-to-image generation with Stable Diffusion 3 / 3.5, guided by a differentiable RAHF reward.

    The transformer predicts the flow-matching velocity v; at a guided step the clean sample is
    `x0 = x_t - sigma_t * v`, decoded with the VAE's shift and scaling factors, and v moves by
    `-reward_guidance_scale * sigma_t` (RMS) along the normalised reward gradient, so that x0 moves up the reward.
    Scheduler: [`FlowMatchEulerDiscreteScheduler`]. With `reward_guidance_scale=0` the output is exactly
    [`StableDiffusion3Pipeline`]'s. `enable_model_cpu_offload` offloads the text encoders and the transformer; the
    VAE and the reward model stay on the device.

    Args:
        transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
        tokenizer_3, image_encoder, feature_extractor: as in [`StableDiffusion3Pipeline`].
        reward_model ([`RAHFModel`], *optional*): the reward model; frozen and put in eval mode.
        reward_processor ([`RAHFProcessor`], *optional*): its processor.

    Call arguments: those of [`StableDiffusion3Pipeline.__call__`], and
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
        >>> from diffusers import StableDiffusion3Pipeline
        >>> from rahf import RAHFModel, RAHFProcessor
        >>> from rahf.pipelines import AutoRAHFGuidedPipeline

        >>> sd3 = StableDiffusion3Pipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> pipe = AutoRAHFGuidedPipeline.from_pipe(
        ...     sd3, reward_model=RAHFModel.from_pretrained("rahf-base"), reward_processor=RAHFProcessor.from_pretrained("rahf-base")
        ... )
        >>> out = pipe("a macro lens closeup of a paperclip", reward="aesthetics", reward_guidance_scale=0.5,
        ...            guidance_decode_scale=0.375, guide_every=2, generator=torch.manual_seed(0))
        ```
    """
    )

    _rahf_family = "sd3"
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->image_encoder->transformer"
    _optional_components = ["image_encoder", "feature_extractor", "reward_model", "reward_processor"]
    _exclude_from_cpu_offload = ["vae", "reward_model"]

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
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
        reward_model: RAHFModel | None = None,
        reward_processor: RAHFProcessor | None = None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        if reward_model is not None:
            reward_model.requires_grad_(False).eval()
        self.register_modules(reward_model=reward_model, reward_processor=reward_processor)
