"""FLUX.1 sampling steered by a differentiable RAHF score: `FluxPipeline`'s own loop with the shared guidance of
`rahf.pipelines.guidance` (flow matching on packed latents, unpacked to decode)."""

from __future__ import annotations

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from rahf.pipelines.guidance import GUIDANCE_DOC, RAHFGuidanceMixin
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from rahf.modeling_rahf import RAHFModel
from rahf.processing_rahf import RAHFProcessor

__all__ = ["RAHFGuidedFluxPipeline"]


class RAHFGuidedFluxPipeline(RAHFGuidanceMixin, FluxPipeline):
    r"""
    Text-to-image generation with FLUX.1 (dev: guidance embedding; schnell: none), guided by a differentiable RAHF
    reward.

    The transformer predicts the flow-matching velocity v on 2x2-packed latent tokens; at a guided step
    `x0 = x_t - sigma_t * v` is unpacked, decoded with the VAE's shift and scaling factors and scored, and v moves by
    `-reward_guidance_scale * sigma_t` (RMS) along the normalised reward gradient. With `true_cfg_scale > 1` and a
    negative prompt the same shift goes to both transformer calls, so the true-CFG combination moves by it too.
    Scheduler: [`FlowMatchEulerDiscreteScheduler`]. With `reward_guidance_scale=0` the output is exactly
    [`FluxPipeline`]'s. `enable_model_cpu_offload` offloads the text encoders and the transformer; the VAE and the
    reward model stay on the device.

    Args:
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, image_encoder,
        feature_extractor: as in [`FluxPipeline`].
        reward_model ([`RAHFModel`], *optional*): the reward model; frozen and put in eval mode.
        reward_processor ([`RAHFProcessor`], *optional*): its processor.

    Call arguments: those of [`FluxPipeline.__call__`], and
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
        >>> from diffusers import FluxPipeline
        >>> from rahf import RAHFModel, RAHFProcessor
        >>> from rahf.pipelines import AutoRAHFGuidedPipeline

        >>> flux = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16)
        >>> flux.enable_model_cpu_offload()  # the VAE and RAHF stay on the GPU
        >>> pipe = AutoRAHFGuidedPipeline.from_pipe(
        ...     flux, reward_model=RAHFModel.from_pretrained("rahf-base"), reward_processor=RAHFProcessor.from_pretrained("rahf-base")
        ... )
        >>> out = pipe("a macro lens closeup of a paperclip", num_inference_steps=4, guidance_scale=0.0,
        ...            reward="aesthetics", reward_guidance_scale=0.5, guidance_decode_scale=0.375,
        ...            generator=torch.manual_seed(0))
        ```
    """
    )

    _rahf_family = "flux"
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer"
    _optional_components = ["image_encoder", "feature_extractor", "reward_model", "reward_processor"]
    _exclude_from_cpu_offload = ["vae", "reward_model"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        reward_model: RAHFModel | None = None,
        reward_processor: RAHFProcessor | None = None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        if reward_model is not None:
            reward_model.requires_grad_(False).eval()
        self.register_modules(reward_model=reward_model, reward_processor=reward_processor)
