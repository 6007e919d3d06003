"""Stable Diffusion sampling steered by a differentiable RAHF score (classifier guidance, as in the paper's Fig. 8c-d).

The reward is `rahf.reward.RAHFReward` (RAHF as a differentiable reward on image tensors);
`RAHFGuidedStableDiffusionPipeline` is `StableDiffusionPipeline`'s own loop with the guidance of
`rahf.pipelines.guidance` (forward universal guidance, Bansal et al. 2023, optionally with recurrence), the mechanism
the SDXL, SD3 and FLUX guided pipelines share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from rahf.pipelines.guidance import GUIDANCE_DOC, SUPPORTED_SCHEDULERS, RAHFGuidanceMixin
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from rahf.modeling_rahf import RAHFModel
from rahf.processing_rahf import RAHFProcessor

__all__ = [
    "SUPPORTED_SCHEDULERS",
    "RAHFGuidedStableDiffusionPipeline",
    "RAHFGuidedStableDiffusionPipelineOutput",
]


@dataclass
class RAHFGuidedStableDiffusionPipelineOutput(BaseOutput):
    """
    Output of [`RAHFGuidedStableDiffusionPipeline`].

    Args:
        images (`list[PIL.Image.Image]` or `np.ndarray` or `torch.Tensor`):
            The generated images (`batch_size * num_images_per_prompt` of them), as `output_type` asks.
        nsfw_content_detected (`list[bool]`, *optional*):
            Per image, whether the safety checker flagged it; `None` without a safety checker.
        rewards (`list[float]`, *optional*):
            Per image, the guidance reward of the final image (the `reward` target); `None` for `output_type="latent"`
            or when there is neither a reward model nor a callable reward.
        reward_scores (`list[dict[str, float]]`, *optional*):
            Per image, every RAHF score of the final image (plausibility, alignment, aesthetics, overall), so that a
            gain in the target can be weighed against the others; `None` without a reward model.
        num_nonfinite_grads (`int`):
            How many gradient entries were NaN or inf and were zeroed (they are also logged as a warning).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    rewards: list[float] | None = None
    reward_scores: list[dict[str, float]] | None = None
    num_nonfinite_grads: int = 0


class RAHFGuidedStableDiffusionPipeline(RAHFGuidanceMixin, StableDiffusionPipeline):
    r"""
    Text-to-image generation with Stable Diffusion 1.x/2.x, guided by a differentiable RAHF reward (classifier
    guidance).

    At the guided steps (a window `guidance_start`..`guidance_end` of the schedule, every `guide_every` steps) the
    pipeline predicts the clean latents x0 from the noise prediction, decodes them with the VAE (at a reduced
    resolution if `guidance_decode_scale < 1`), scores the image with the reward, and shifts the noise prediction along
    the reward's gradient with respect to the latents (forward universal guidance):
    `eps <- eps - reward_guidance_scale * sqrt(1 - alpha_bar_t) * grad`. With `num_recurrence_steps > 1` each guided
    step is repeated, the result re-noised back to the current noise level in between (Universal Guidance's
    recurrence). Classifier-free guidance is kept. With `reward_guidance_scale=0` the output is exactly that of
    [`StableDiffusionPipeline`] with the same scheduler and seed.

    Supported schedulers: [`DDIMScheduler`], [`EulerDiscreteScheduler`], [`EulerAncestralDiscreteScheduler`] and
    [`DPMSolverMultistepScheduler`], with epsilon, v or sample prediction (others raise a `ValueError` when guidance
    is on).

    Build it from any Stable Diffusion pipeline with
    `RAHFGuidedStableDiffusionPipeline.from_pipe(sd_pipe, reward_model=..., reward_processor=...)` (or
    `rahf.pipelines.AutoRAHFGuidedPipeline.from_pipe` for any family); `save_pretrained` / `from_pretrained` carry the
    reward model and its processor (in `reward_model/` and `reward_processor/`). `enable_model_cpu_offload` offloads
    the text encoder and the UNet; the VAE and the reward model, used at every guided step, stay on the device.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder:
            as in [`StableDiffusionPipeline`].
        reward_model ([`RAHFModel`], *optional*): the reward model; frozen (`requires_grad_(False)`) and put in eval mode.
        reward_processor ([`RAHFProcessor`], *optional*): its processor.
        requires_safety_checker (`bool`, *optional*, defaults to `True`): as in [`StableDiffusionPipeline`].

    Call arguments: those of [`StableDiffusionPipeline.__call__`], and
    """

    __doc__ += (
        GUIDANCE_DOC
        + r"""
    Returns:
        [`RAHFGuidedStableDiffusionPipelineOutput`] or `tuple`: with `return_dict=False`, the tuple
        `(images, nsfw_content_detected, rewards, reward_scores, num_nonfinite_grads)`.

    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DDIMScheduler, StableDiffusionPipeline
        >>> from rahf import RAHFModel, RAHFProcessor
        >>> from rahf.pipelines import RAHFGuidedStableDiffusionPipeline

        >>> sd = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> pipe = RAHFGuidedStableDiffusionPipeline.from_pipe(
        ...     sd, reward_model=RAHFModel.from_pretrained("rahf-base"), reward_processor=RAHFProcessor.from_pretrained("rahf-base")
        ... )
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # SD 1.5 ships PNDM, which is not supported
        >>> out = pipe("a macro lens closeup of a paperclip", reward="aesthetics", reward_guidance_scale=0.5,
        ...            guidance_decode_scale=0.75, guide_every=2, generator=torch.manual_seed(0))
        >>> out.images[0], out.reward_scores[0]["aesthetics"]
        ```
    """
    )

    _rahf_family = "sd"
    model_cpu_offload_seq = "text_encoder->image_encoder->unet"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "reward_model", "reward_processor"]
    _exclude_from_cpu_offload = ["safety_checker", "vae", "reward_model"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "noise_pred"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        reward_model: RAHFModel | None = None,
        reward_processor: RAHFProcessor | None = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        if reward_model is not None:
            reward_model.requires_grad_(False).eval()
        self.register_modules(reward_model=reward_model, reward_processor=reward_processor)

    def _guided_output(self, parent_output, images, rewards, reward_scores, num_nonfinite, return_dict):
        nsfw = getattr(parent_output, "nsfw_content_detected", None)
        if not return_dict:
            return (images, nsfw, rewards, reward_scores, num_nonfinite)
        return RAHFGuidedStableDiffusionPipelineOutput(
            images=images,
            nsfw_content_detected=nsfw,
            rewards=rewards,
            reward_scores=reward_scores,
            num_nonfinite_grads=num_nonfinite,
        )
