"""Stable Diffusion sampling steered by a differentiable RAHF score (classifier guidance, as in the paper's Fig. 8c-d).

The reward is `rahf.reward.RAHFReward` (RAHF as a differentiable reward on image tensors);
`RAHFGuidedStableDiffusionPipeline` runs its own denoising loop so that, at the guided steps, the noise prediction moves along the reward's gradient (forward universal
guidance, Bansal et al. 2023), optionally with recurrence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from rahf.modeling_rahf import RAHFModel
from rahf.processing_rahf import RAHFProcessor
from rahf.reward import RAHFReward, RewardFn

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_SCHEDULERS",
    "RAHFGuidedStableDiffusionPipeline",
    "RAHFGuidedStableDiffusionPipelineOutput",
]

# The schedulers whose noise level at each step we know how to read; the guidance formula needs it.
SUPPORTED_SCHEDULERS = (
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
)
# Euler works on x = x0 + sigma * eps (variance exploding); the others on z = sqrt(a) x0 + sqrt(1 - a) eps.
_SIGMA_SPACE_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DDIMScheduler, StableDiffusionPipeline
        >>> from rahf import RAHFModel, RAHFProcessor
        >>> from rahf.pipelines.rahf_guided import RAHFGuidedStableDiffusionPipeline

        >>> sd = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> pipe = RAHFGuidedStableDiffusionPipeline.from_pipe(
        ...     sd, reward_model=RAHFModel.from_pretrained("rahf-base"), reward_processor=RAHFProcessor.from_pretrained("rahf-base")
        ... )
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # SD 1.5 ships PNDM, which is not supported
        >>> out = pipe("a macro lens closeup of a paperclip", reward="aesthetics", reward_guidance_scale=0.5,
        ...            guidance_decode_scale=0.75, generator=torch.manual_seed(0))
        >>> out.images[0], out.reward_scores[0]["aesthetics"]
        ```
"""


# --------------------------------------------------------------------------------------------------------------------
# The pipeline


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


def _scheduler_state(scheduler) -> dict[str, Any]:
    # What `step` mutates (step index, DPM-Solver's history of model outputs, ...): lists are copied because
    # DPM-Solver shifts its history in place.
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(scheduler).items()}


def _restore_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    vars(scheduler).update({k: (list(v) if isinstance(v, list) else v) for k, v in state.items()})


def _per_image_rms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, ...) -> (x scaled to max |x| = 1 per image, RMS of that scaled x), both computed without overflow."""
    peak = x.flatten(1).abs().amax(dim=1)  # (B,)
    shape = (-1,) + (1,) * (x.ndim - 1)
    unit = torch.where(peak.view(shape) > 0, x / peak.clamp_min(torch.finfo(x.dtype).tiny).view(shape), 0.0)
    return unit, unit.flatten(1).pow(2).mean(dim=1).sqrt()


class RAHFGuidedStableDiffusionPipeline(StableDiffusionPipeline):
    r"""
    Text-to-image generation with Stable Diffusion, guided by a differentiable RAHF reward (classifier guidance).

    At the guided steps (a window `guidance_start`..`guidance_end` of the schedule, every `guide_every` steps) the
    pipeline predicts the clean latents x0 from the noise prediction, decodes them with the VAE (at a reduced
    resolution if `guidance_decode_scale < 1`), scores the image with the reward, and shifts the noise prediction along
    the reward's gradient with respect to the latents (forward universal guidance):
    `eps <- eps - reward_guidance_scale * sqrt(1 - alpha_bar_t) * grad`. With `num_recurrence_steps > 1` each guided
    step is repeated, the result re-noised back to the current noise level in between (Universal Guidance's
    recurrence). Classifier-free guidance is kept. With `reward_guidance_scale=0` the output is exactly that of
    [`StableDiffusionPipeline`] with the same scheduler and seed.

    Supported schedulers: [`DDIMScheduler`], [`EulerDiscreteScheduler`], [`EulerAncestralDiscreteScheduler`] and
    [`DPMSolverMultistepScheduler`] (others raise a `ValueError` when guidance is on).

    Build it from any Stable Diffusion pipeline with
    `RAHFGuidedStableDiffusionPipeline.from_pipe(sd_pipe, reward_model=..., reward_processor=...)`; `save_pretrained`
    / `from_pretrained` carry the reward model and its processor (in `reward_model/` and `reward_processor/`).

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder:
            as in [`StableDiffusionPipeline`].
        reward_model ([`RAHFModel`], *optional*): the reward model; frozen (`requires_grad_(False)`) and put in eval mode.
        reward_processor ([`RAHFProcessor`], *optional*): its processor.
        requires_safety_checker (`bool`, *optional*, defaults to `True`): as in [`StableDiffusionPipeline`].
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae->reward_model"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "reward_model", "reward_processor"]
    _exclude_from_cpu_offload = ["safety_checker"]
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

    # ----------------------------------------------------------------------------------------------------------------
    # Inputs

    def check_inputs(
        self,
        prompt,
        height,
        width,
        callback_steps,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        reward=None,
        reward_prompt=None,
        reward_guidance_scale=0.0,
        guidance_start=0.0,
        guidance_end=1.0,
        guide_every=1,
        num_recurrence_steps=1,
        guidance_decode_scale=1.0,
        grad_clip=1.0,
    ):
        super().check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        if not isinstance(reward_guidance_scale, (int, float)) or not math.isfinite(reward_guidance_scale):
            raise ValueError(
                f"`reward_guidance_scale` must be a finite number (0 turns guidance off), got {reward_guidance_scale!r}"
            )
        for name, value in (("guidance_start", guidance_start), ("guidance_end", guidance_end)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a fraction of the schedule in [0, 1], got {value!r}")
        if guidance_start > guidance_end:
            raise ValueError(
                f"`guidance_start` ({guidance_start}) must not be greater than `guidance_end` ({guidance_end}): guidance "
                "runs on the steps from guidance_start to guidance_end (fractions of the schedule, 0 = first step)"
            )
        if not isinstance(guide_every, int) or guide_every < 1:
            raise ValueError(
                f"`guide_every` must be a positive integer (1 = every step in the window), got {guide_every!r}"
            )
        if not isinstance(num_recurrence_steps, int) or num_recurrence_steps < 1:
            raise ValueError(
                f"`num_recurrence_steps` must be a positive integer (1 = no recurrence), got {num_recurrence_steps!r}"
            )
        if not isinstance(guidance_decode_scale, (int, float)) or not 0.0 < guidance_decode_scale <= 1.0:
            raise ValueError(
                f"`guidance_decode_scale` must be in (0, 1] (1 = decode at full size), got {guidance_decode_scale!r}"
            )
        if grad_clip is not None and (
            not isinstance(grad_clip, (int, float)) or not grad_clip > 0 or not math.isfinite(grad_clip)
        ):
            raise ValueError(f"`grad_clip` must be a positive number or None (no clipping), got {grad_clip!r}")
        if reward_prompt is not None and not isinstance(reward_prompt, (str, list)):
            raise ValueError(f"`reward_prompt` must be a str or a list of str, got {type(reward_prompt).__name__}")
        if reward_guidance_scale == 0:
            return
        if not isinstance(self.scheduler, SUPPORTED_SCHEDULERS):
            names = ", ".join(s.__name__ for s in SUPPORTED_SCHEDULERS)
            raise ValueError(
                f"RAHF guidance does not support the scheduler {type(self.scheduler).__name__}; the supported ones are "
                f"{names}. Swap it, e.g. `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`"
            )
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"RAHF guidance supports prediction_type {list(_PREDICTION_TYPES)}, the scheduler has {prediction_type!r}"
            )
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            raise ValueError("RAHF guidance does not support `use_flow_sigmas=True` schedulers (flow matching)")
        if not callable(reward):
            if self.reward_model is None or self.reward_processor is None:
                raise ValueError(
                    f"`reward={reward!r}` needs the pipeline's `reward_model` and `reward_processor`; build it with "
                    "`RAHFGuidedStableDiffusionPipeline.from_pipe(pipe, reward_model=..., reward_processor=...)` or pass a "
                    "callable reward"
                )
            RAHFReward.from_target(self.reward_model, self.reward_processor, reward)  # raises on an unknown target
        if prompt is None and reward_prompt is None:
            raise ValueError(
                "with `prompt_embeds` and no `prompt`, pass `reward_prompt`: the text RAHF rates the images against"
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Guidance

    def _noise_levels(self, step_index: int, timestep: torch.Tensor) -> tuple[float, float, float, float]:
        """(alpha_bar_t, alpha_bar_prev, c_t, c_prev): cumulative signal levels of this step and the next, and the
        factor c that maps the scheduler's latents to variance-preserving ones (z = c * latents)."""
        scheduler = self.scheduler
        if isinstance(scheduler, DDIMScheduler):
            t = int(timestep)
            prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # as DDIMScheduler.step
            a_t = float(scheduler.alphas_cumprod[t])
            a_prev = float(scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod)
            return a_t, a_prev, 1.0, 1.0
        k = scheduler.step_index if scheduler.step_index is not None else step_index
        sigma, sigma_prev = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
        a_t, a_prev = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_prev**2)
        if isinstance(scheduler, _SIGMA_SPACE_SCHEDULERS):
            return a_t, a_prev, math.sqrt(a_t), math.sqrt(a_prev)
        return a_t, a_prev, 1.0, 1.0

    def _predict_noise(self, latents, t, prompt_embeds, timestep_cond, added_cond_kwargs) -> torch.Tensor:
        # The same operations, in the same order, as StableDiffusionPipeline's loop (scale 0 must match it exactly).
        latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
        if hasattr(self.scheduler, "scale_model_input"):
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
        noise_pred = self.unet(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        if self.do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
            noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)
        return noise_pred

    def _pred_original_sample(self, z: torch.Tensor, model_output: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """x0 from variance-preserving latents z and the model output, for each prediction type."""
        prediction_type = self.scheduler.config.prediction_type
        a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        if prediction_type == "epsilon":
            return (z - s * model_output) / a
        if prediction_type == "v_prediction":
            return a * z - s * model_output
        return model_output

    def _decode_for_reward(self, pred_x0: torch.Tensor, decode_scale: float) -> torch.Tensor:
        """Latents -> images (B, 3, H', W') in [0, 1], decoded at `decode_scale` of the output size."""
        if decode_scale < 1.0:
            size = [max(1, round(s * decode_scale)) for s in pred_x0.shape[-2:]]
            pred_x0 = F.interpolate(pred_x0, size=size, mode="bilinear", align_corners=False, antialias=True)
        image = self.vae.decode(pred_x0.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.enable_grad()
    def compute_reward_gradient(
        self,
        latents: torch.Tensor,
        noise_pred: torch.Tensor,
        alpha_bar: float,
        latent_scale: float,
        reward_fn: RewardFn,
        reward_prompts: list[str],
        metadata: dict[str, Any] | None = None,
        guidance_decode_scale: float = 1.0,
        unet_inputs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient of the reward of the predicted clean image with respect to the scheduler's latents.

        The noise prediction is treated as a constant (no backward pass through the UNet) unless `unet_inputs` (the
        UNet's other inputs: `t`, `prompt_embeds`, `timestep_cond`, `added_cond_kwargs`) is given, in which case the
        noise is predicted again with gradients (Universal Guidance's full gradient, several times slower).

        Returns:
            `(grad, rewards)`: `grad` has the latents' shape (float32), `rewards` is `(B,)`, detached.
        """
        latents = latents.detach().requires_grad_(True)
        if unet_inputs is not None:
            noise_pred = self._predict_noise(latents, **unet_inputs)
        else:
            noise_pred = noise_pred.detach()
        pred_x0 = self._pred_original_sample(latents * latent_scale, noise_pred, alpha_bar)
        images = self._decode_for_reward(pred_x0, guidance_decode_scale)
        rewards, _ = reward_fn(images, reward_prompts, metadata)
        if not isinstance(rewards, torch.Tensor) or rewards.shape != (latents.shape[0],):
            raise ValueError(
                f"the reward must return scores of shape ({latents.shape[0]},), one per image, got "
                f"{getattr(rewards, 'shape', type(rewards).__name__)}"
            )
        if not rewards.requires_grad:
            raise ValueError(
                "the reward is not differentiable with respect to the images: guidance needs its gradient"
            )
        (grad,) = torch.autograd.grad(rewards.sum(), latents)
        return grad.float(), rewards.detach()

    def _guidance_shift(
        self,
        grad: torch.Tensor,
        alpha_bar: float,
        latent_scale: float,
        scale: float,
        normalize_grad: bool,
        grad_clip: float | None,
    ) -> tuple[torch.Tensor, int]:
        """The shift of the noise (in noise units, per image) for the gradient w.r.t. the scheduler's latents, and how
        many gradient entries were not finite (they are zeroed)."""
        grad_z = grad.double() / latent_scale  # gradient w.r.t. the variance-preserving latents
        finite = torch.isfinite(grad_z)
        num_nonfinite = int((~finite).sum())
        grad_z = torch.where(finite, grad_z, 0.0)
        # The shift is -scale * sqrt(1 - alpha_bar) * grad_z, assembled as direction * RMS so that no product overflows
        # however large the scale or the gradient.
        unit, unit_rms = _per_image_rms(grad_z)  # (B, ...), (B,)
        if normalize_grad:
            rms = torch.full_like(unit_rms, abs(scale) * math.sqrt(1.0 - alpha_bar))
        else:
            peak = grad_z.flatten(1).abs().amax(dim=1)
            rms = abs(scale) * math.sqrt(1.0 - alpha_bar) * peak * unit_rms
        if grad_clip is not None:
            rms = rms.clamp(max=grad_clip)
        factor = torch.where(unit_rms > 0, rms / unit_rms.clamp_min(torch.finfo(unit_rms.dtype).tiny), 0.0)
        factor = torch.where(torch.isfinite(factor), factor, 0.0)  # only without grad_clip can this overflow
        shift = -math.copysign(1.0, scale) * unit * factor.view((-1,) + (1,) * (unit.ndim - 1))
        return shift, num_nonfinite

    def _shift_to_model_output(self, shift_eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """A shift of eps (z fixed) expressed in the model's output space."""
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return shift_eps
        if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0, x0 = (z - sqrt(1 - a) eps) / sqrt(a)
            return shift_eps / math.sqrt(alpha_bar)
        return -math.sqrt(1.0 - alpha_bar) / math.sqrt(alpha_bar) * shift_eps

    def _renoise(self, latents_prev, levels, generator) -> torch.Tensor:
        """x_{t-1} -> x_t: adds back the noise of one step (Universal Guidance's recurrence)."""
        a_t, a_prev, c_t, c_prev = levels
        ratio = a_t / a_prev
        noise = randn_tensor(
            latents_prev.shape, generator=generator, device=latents_prev.device, dtype=latents_prev.dtype
        )
        z = math.sqrt(ratio) * (latents_prev * c_prev) + math.sqrt(max(0.0, 1.0 - ratio)) * noise
        return z / c_t

    def guided_step_indices(
        self, num_steps: int, guidance_start: float, guidance_end: float, guide_every: int
    ) -> list[int]:
        """Indices of the guided steps among `num_steps`: step i is in the window when
        guidance_start <= i / num_steps < guidance_end, and every `guide_every`-th step of the window is guided."""
        window = [i for i in range(num_steps) if guidance_start <= i / num_steps < guidance_end]
        return window[::guide_every]

    @property
    def reward_guidance_scale(self) -> float:
        return self._reward_guidance_scale

    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        reward: str | dict[str, float] | RewardFn = "aesthetics",
        reward_prompt: str | list[str] | None = None,
        reward_guidance_scale: float = 0.0,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        guide_every: int = 1,
        num_recurrence_steps: int = 1,
        guidance_decode_scale: float = 1.0,
        normalize_grad: bool = True,
        grad_clip: float | None = 1.0,
        backprop_through_unet: bool = False,
    ):
        r"""
        Generates images; the arguments up to `callback_on_step_end_tensor_inputs` are those of
        [`StableDiffusionPipeline.__call__`].

        Args:
            reward (`str`, `dict[str, float]` or callable, *optional*, defaults to `"aesthetics"`):
                What to increase: a RAHF score name (`"plausibility"`, `"alignment"`, `"aesthetics"`, `"overall"`),
                minus a heatmap's mean (`"-implausibility"`, `"-misalignment"`), a dict of weights, or any callable
                `fn(images, prompts, metadata) -> (scores, info)` differentiable in `images` (B, 3, H, W) in [0, 1]
                (e.g. from `rahf.reward.get_reward`).
            reward_prompt (`str` or `list[str]`, *optional*): the text RAHF rates the images against; defaults to
                `prompt`.
            reward_guidance_scale (`float`, *optional*, defaults to 0.0): strength of the guidance; 0 turns it off
                (the output is then exactly StableDiffusionPipeline's). With `normalize_grad`, the noise prediction
                moves by `reward_guidance_scale * sqrt(1 - alpha_bar_t)` (root-mean-square, noise units) per guided step.
            guidance_start (`float`, *optional*, defaults to 0.0), guidance_end (`float`, *optional*, defaults to 1.0):
                the window of guided steps as fractions of the schedule (step i is in it when
                `guidance_start <= i / num_steps < guidance_end`).
            guide_every (`int`, *optional*, defaults to 1): guide every n-th step of the window.
            num_recurrence_steps (`int`, *optional*, defaults to 1): how many times each guided step is taken; between
                two takes the result is re-noised to the step's noise level (1 = no recurrence).
            guidance_decode_scale (`float`, *optional*, defaults to 1.0): decode the predicted x0 at this fraction of
                the output size for the reward (e.g. 0.75 turns 512 px into 384 px, RAHF's input size, for less work).
            normalize_grad (`bool`, *optional*, defaults to `True`): rescale each image's gradient to unit
                root-mean-square, so that the scale means the same for any reward model and resolution.
            grad_clip (`float`, *optional*, defaults to 1.0): clip each image's shift of the noise prediction to this
                root-mean-square (noise units; the noise itself has about 1); `None` turns clipping off. Non-finite
                gradient entries are always zeroed, with a warning.
            backprop_through_unet (`bool`, *optional*, defaults to `False`): differentiate through the UNet's noise
                prediction too (Universal Guidance's exact gradient); several times slower and far more memory.

        Examples:

        Returns:
            [`RAHFGuidedStableDiffusionPipelineOutput`] or `tuple`: with `return_dict=False`, the tuple
            `(images, nsfw_content_detected, rewards, reward_scores, num_nonfinite_grads)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        if not height or not width:
            sample_size = self.unet.config.sample_size
            height = sample_size if self._is_unet_config_sample_size_int else sample_size[0]
            width = sample_size if self._is_unet_config_sample_size_int else sample_size[1]
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
            reward=reward,
            reward_prompt=reward_prompt,
            reward_guidance_scale=reward_guidance_scale,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            guide_every=guide_every,
            num_recurrence_steps=num_recurrence_steps,
            guidance_decode_scale=guidance_decode_scale,
            grad_clip=grad_clip,
        )

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        self._reward_guidance_scale = reward_guidance_scale

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        reward_prompts = self._reward_prompts(reward_prompt if reward_prompt is not None else prompt, batch_size)
        if reward_prompts is not None:
            reward_prompts = [p for p in reward_prompts for _ in range(num_images_per_prompt)]

        # 3. Encode input prompt
        lora_scale = (
            self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        )
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 4. Prepare timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )

        # 5. Prepare latent variables
        num_channels_latents = self.unet.config.in_channels
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs, IP-Adapter embeds, guidance-scale embedding
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        added_cond_kwargs = {"image_embeds": image_embeds} if image_embeds is not None else None
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 7. Choose the guided steps and the reward
        reward_fn = None
        if callable(reward):
            reward_fn = reward
        elif self.reward_model is not None and self.reward_processor is not None:
            reward_fn = RAHFReward.from_target(
                self.reward_model, self.reward_processor, reward, report_all_scores=False
            )
        guided = set()
        if reward_guidance_scale != 0:
            guided = set(self.guided_step_indices(len(timesteps), guidance_start, guidance_end, guide_every))
        num_nonfinite = 0

        # 8. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                repeats = num_recurrence_steps if i in guided else 1
                state = _scheduler_state(self.scheduler) if repeats > 1 else None
                for r in range(repeats):
                    if r > 0:
                        _restore_scheduler_state(self.scheduler, state)
                    # 8.1 predict the noise residual (with classifier-free guidance)
                    noise_pred = self._predict_noise(latents, t, prompt_embeds, timestep_cond, added_cond_kwargs)
                    levels = None
                    # 8.2 shift it along the reward's gradient
                    if i in guided:
                        levels = self._noise_levels(i, t)
                        alpha_bar, _, latent_scale, _ = levels
                        unet_inputs = None
                        if backprop_through_unet:
                            unet_inputs = {
                                "t": t,
                                "prompt_embeds": prompt_embeds,
                                "timestep_cond": timestep_cond,
                                "added_cond_kwargs": added_cond_kwargs,
                            }
                        grad, _ = self.compute_reward_gradient(
                            latents,
                            noise_pred,
                            alpha_bar,
                            latent_scale,
                            reward_fn,
                            reward_prompts,
                            metadata={"step": i, "timestep": t, "num_inference_steps": len(timesteps)},
                            guidance_decode_scale=guidance_decode_scale,
                            unet_inputs=unet_inputs,
                        )
                        shift, bad = self._guidance_shift(
                            grad, alpha_bar, latent_scale, reward_guidance_scale, normalize_grad, grad_clip
                        )
                        if bad:
                            num_nonfinite += bad
                            logger.warning("step %d: %d non-finite reward-gradient entries were zeroed", i, bad)
                        noise_pred = noise_pred + self._shift_to_model_output(shift, alpha_bar).to(noise_pred.dtype)
                    # 8.3 compute the previous noisy sample x_t -> x_t-1
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    # 8.4 recurrence: back to x_t, and once more
                    if r < repeats - 1:
                        latents = self._renoise(latents, levels, generator)

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                        "noise_pred": noise_pred,
                    }
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 9. Decode, safety check, final rewards
        rewards = reward_scores = None
        if not output_type == "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[
                0
            ]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
            if reward_prompts is not None:
                rewards, reward_scores = self._final_rewards(image, reward, reward_fn, reward_prompts)
        else:
            image = latents
            has_nsfw_concept = None

        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept, rewards, reward_scores, num_nonfinite)
        return RAHFGuidedStableDiffusionPipelineOutput(
            images=image,
            nsfw_content_detected=has_nsfw_concept,
            rewards=rewards,
            reward_scores=reward_scores,
            num_nonfinite_grads=num_nonfinite,
        )

    @staticmethod
    def _reward_prompts(prompt: str | list[str] | None, batch_size: int) -> list[str] | None:
        if prompt is None:
            return None
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch_size:
            raise ValueError(
                f"`reward_prompt` has {len(prompts)} prompts for a batch of {batch_size}: pass one per prompt"
            )
        return prompts

    def _final_rewards(
        self, image: torch.Tensor, reward, reward_fn: RewardFn | None, prompts: list[str]
    ) -> tuple[list[float] | None, list[dict[str, float]] | None]:
        """Scores the final images (decoded, in [-1, 1]): the guidance reward and, with a reward model, every score."""
        images01 = (image.float() / 2 + 0.5).clamp(0, 1)
        rewards = reward_scores = None
        if self.reward_model is not None and self.reward_processor is not None:
            weights = {}
            if not callable(reward):
                weights = RAHFReward.from_target(self.reward_model, self.reward_processor, reward).weights
            # With a callable reward only the reported scores are wanted from RAHF: a zero weight asks for none.
            any_score = self.reward_model.config.score_names[0]
            scorer = RAHFReward(
                self.reward_model, self.reward_processor, weights or {any_score: 0.0}, report_all_scores=True
            )
            values, info = scorer(images01, prompts)
            names = list(info["scores"])
            reward_scores = [{n: float(info["scores"][n][k]) for n in names} for k in range(len(prompts))]
            if weights:
                rewards = [float(v) for v in values]
        if rewards is None and reward_fn is not None:
            values, _ = reward_fn(images01, prompts, {"final": True})
            rewards = [float(v) for v in values.detach().float().cpu()]
        return rewards, reward_scores
