"""The one RAHF guidance mechanism of every guided pipeline (SD, SDXL, SD3, FLUX): a wrapper around the denoiser that
moves its output along the reward gradient of the predicted clean sample, inside the family's own diffusers loop.

During a guided call `pipe.unet` (SD, SDXL) or `pipe.transformer` (SD3, FLUX) is replaced by `RAHFGuidedDenoiser`.
At a guided step it forms x0 from the model output (epsilon, v, sample or flow-matching velocity), decodes it (at a
reduced resolution if asked), takes the reward gradient and returns the model output shifted so that x0 moves up the
reward; the family's loop then applies classifier-free guidance and its scheduler step as usual. A step-end callback
counts the steps and runs Universal Guidance's recurrence. With scale 0 nothing is installed: the plain pipeline runs.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from rahf.reward import RAHFReward, RewardFn

__all__ = [
    "FLOW_MATCHING_SCHEDULERS",
    "GUIDANCE_DOC",
    "SUPPORTED_SCHEDULERS",
    "RAHFGuidanceMixin",
    "RAHFGuidedDenoiser",
    "RAHFGuidedPipelineOutput",
]

# Schedulers whose noise level at each step we know how to read, for the epsilon/v/sample families (SD, SDXL).
SUPPORTED_SCHEDULERS = (
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
)
# ... and for the flow-matching families (SD3, FLUX): x_t = (1 - sigma) x0 + sigma * noise, the model predicts
# the velocity v = noise - x0, so x0 = x_t - sigma * v.
FLOW_MATCHING_SCHEDULERS = (FlowMatchEulerDiscreteScheduler,)
# Euler works on x = x0 + sigma * eps (variance exploding); the others on z = sqrt(a) x0 + sqrt(1 - a) eps.
_SIGMA_SPACE_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

GUIDANCE_DOC = r"""
            reward (`str`, `dict[str, float]` or callable, *optional*, defaults to `"aesthetics"`):
                What to increase: a RAHF score name (`"plausibility"`, `"alignment"`, `"aesthetics"`, `"overall"`),
                minus a heatmap's mean (`"-implausibility"`, `"-misalignment"`), a dict of weights, or any callable
                `fn(images, prompts, metadata) -> (scores, info)` differentiable in `images` (B, 3, H, W) in [0, 1]
                (e.g. from `rahf.reward.get_reward`).
            reward_prompt (`str` or `list[str]`, *optional*): the text RAHF rates the images against; defaults to
                `prompt`.
            reward_guidance_scale (`float`, *optional*, defaults to 0.0): strength of the guidance; 0 turns it off
                (the output is then exactly the plain pipeline's). With `normalize_grad`, the model output moves by
                `reward_guidance_scale * noise_level` (root-mean-square, noise units) per guided step, where the noise
                level is `sqrt(1 - alpha_bar_t)` (epsilon/v/sample models) or `sigma_t` (flow matching).
            guidance_start (`float`, *optional*, defaults to 0.0), guidance_end (`float`, *optional*, defaults to 1.0):
                the window of guided steps as fractions of the schedule (step i is in it when
                `guidance_start <= i / num_steps < guidance_end`).
            guide_every (`int`, *optional*, defaults to 1): guide every n-th step of the window.
            num_recurrence_steps (`int`, *optional*, defaults to 1): how many times each guided step is taken; between
                two takes the result is re-noised to the step's noise level (1 = no recurrence).
            guidance_decode_scale (`float`, *optional*, defaults to 1.0): decode the predicted x0 at this fraction of
                the output size for the reward (e.g. 0.375 turns 1024 px into 384 px, RAHF's input size).
            normalize_grad (`bool`, *optional*, defaults to `True`): rescale each image's gradient to unit
                root-mean-square, so that the scale means the same for any reward model and resolution.
            grad_clip (`float`, *optional*, defaults to 1.0): clip each image's shift of the model output to this
                root-mean-square (noise units); `None` turns clipping off. Non-finite gradient entries are always
                zeroed, with a warning.
            backprop_through_denoiser (`bool`, *optional*, defaults to `False`): differentiate through the denoiser's
                prediction too (Universal Guidance's exact gradient); several times slower and far more memory.
                `backprop_through_unet` is the same switch under its older name.
"""


@dataclass
class RAHFGuidedPipelineOutput(BaseOutput):
    """
    Output of the RAHF-guided SDXL, SD3 and FLUX pipelines.

    Args:
        images (`list[PIL.Image.Image]` or `np.ndarray` or `torch.Tensor`):
            The generated images (`batch_size * num_images_per_prompt` of them), as `output_type` asks.
        rewards (`list[float]`, *optional*):
            Per image, the guidance reward of the final image; `None` for `output_type="latent"` or without a reward.
        reward_scores (`list[dict[str, float]]`, *optional*):
            Per image, every RAHF score of the final image; `None` without a reward model.
        num_nonfinite_grads (`int`):
            How many gradient entries were NaN or inf and were zeroed (they are also logged as a warning).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
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


@dataclass
class _GuidanceRun:
    """The state of one guided call, shared by the denoiser wrapper and the step-end callback."""

    reward_fn: RewardFn
    prompts: list[str]
    scale: float
    window: tuple[float, float, int]  # guidance_start, guidance_end, guide_every
    num_recurrence_steps: int
    decode_scale: float
    normalize_grad: bool
    grad_clip: float | None
    backprop: bool
    image_size: tuple[int | None, int | None]  # (height, width) in pixels: FLUX unpacks its latents with it
    generator: Any = None
    extra_step_kwargs: dict[str, Any] = field(default_factory=dict)
    guided: set[int] | None = None  # step indices, known once the pipeline has set its timesteps
    num_steps: int = 0
    step: int = 0  # the step the loop is in (advanced by the step-end callback)
    delta: torch.Tensor | None = None  # this step's shift of the model output, (B, ...)
    first_call: tuple[tuple, dict[str, Any]] | None = None  # the step's first denoiser call, for recurrence
    calls: int = 0  # denoiser calls in this step
    levels: tuple[float, float, float, float] | None = None
    scheduler_state: dict[str, Any] | None = None
    num_nonfinite: int = 0

    def new_step(self) -> None:
        self.delta, self.first_call, self.calls, self.levels, self.scheduler_state = None, None, 0, None, None


def _sample_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["sample"] if "sample" in kwargs else kwargs["hidden_states"]


def _with_sample(args: tuple, kwargs: dict[str, Any], x: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (x, *args[1:]), kwargs
    key = "sample" if "sample" in kwargs else "hidden_states"
    return args, {**kwargs, key: x}


class RAHFGuidedDenoiser(torch.nn.Module):
    """Stands in for a pipeline's `unet` / `transformer` during a guided call: the same module to the pipeline (its
    attributes, `config`, `dtype`, offload hooks are the wrapped model's), whose output at guided steps is shifted
    along the reward gradient of the predicted clean sample."""

    def __init__(self, denoiser: torch.nn.Module, pipe: RAHFGuidanceMixin, run: _GuidanceRun):
        super().__init__()
        self.denoiser = denoiser
        # Not registered as submodules: the pipeline and the run are context, not parts of this module.
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "_run", run)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["denoiser"], name)

    def forward(self, *args, **kwargs):
        result = self.denoiser(*args, **kwargs)
        output = result[0] if isinstance(result, tuple) else result.sample
        shifted = self._pipe._guide_model_output(self, args, kwargs, output)
        if shifted is output:
            return result
        if isinstance(result, tuple):
            return (shifted, *result[1:])
        result.sample = shifted
        return result


class RAHFGuidanceMixin:
    """RAHF classifier guidance for a diffusers text-to-image pipeline class, placed before it in the bases:
    `class RAHFGuidedStableDiffusionXLPipeline(RAHFGuidanceMixin, StableDiffusionXLPipeline)`.

    The subclass sets `_rahf_family` (`"sd"`, `"sdxl"`, `"sd3"` or `"flux"`), registers `reward_model` and
    `reward_processor`, and may override `_guided_output` to shape its output.
    """

    _rahf_family: str = "sd"

    # ----------------------------------------------------------------------------------------------------------------
    # Family details

    @property
    def _denoiser_name(self) -> str:
        return "unet" if self._rahf_family in ("sd", "sdxl") else "transformer"

    def _parameterisation(self) -> str:
        if isinstance(self.scheduler, FLOW_MATCHING_SCHEDULERS):
            return "flow"
        return self.scheduler.config.prediction_type

    def _image_size(self, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        """The output size as the family's loop resolves it (FLUX unpacks its latents with it)."""
        if self._rahf_family == "flux":
            default = self.default_sample_size * self.vae_scale_factor
            return height or default, width or default
        return height, width

    def _latents_to_vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser-space latents (FLUX: packed) -> what `vae.decode` reads, as each family's pipeline decodes."""
        config = self.vae.config
        if self._rahf_family == "flux":
            if latents.ndim == 3:  # (B, tokens, 4 * C) -> (B, C, h, w)
                latents = self._unpack_latents(latents, *self._guidance_image_size, self.vae_scale_factor)
            return latents / config.scaling_factor + config.shift_factor
        if self._rahf_family == "sd3":
            return latents / config.scaling_factor + config.shift_factor
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if self._rahf_family == "sdxl" and mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor

    @property
    def _guidance_image_size(self) -> tuple[int, int]:
        run = getattr(self, "_rahf_run", None)
        if run is None:
            raise ValueError("packed FLUX latents can only be decoded during a call, which knows the image size")
        return run.image_size

    def _combine_cfg(self, output: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The model output the scheduler will step with, from one denoiser call on `k * batch_size` rows: the
        classifier-free guidance of the family's loop for a doubled batch (uncond, text), the output itself else."""
        if output.shape[0] == batch_size:
            return output
        if output.shape[0] != 2 * batch_size:
            raise ValueError(
                f"RAHF guidance expects the denoiser to see {batch_size} or {2 * batch_size} rows (classifier-free "
                f"guidance), got {output.shape[0]}"
            )
        uncond, text = output.chunk(2)
        combined = uncond + self.guidance_scale * (text - uncond)
        if self._rahf_family in ("sd", "sdxl") and self.guidance_rescale > 0.0:
            combined = rescale_noise_cfg(combined, text, guidance_rescale=self.guidance_rescale)
        return combined

    def _model_input(self, latents: torch.Tensor, t: torch.Tensor, copies: int) -> torch.Tensor:
        """The scheduler's latents -> the denoiser's input, as the family's loop builds it (recurrence re-runs it)."""
        x = torch.cat([latents] * copies) if copies > 1 else latents
        if self._rahf_family in ("sd", "sdxl"):
            x = self.scheduler.scale_model_input(x, t)
        return x

    # ----------------------------------------------------------------------------------------------------------------
    # Inputs

    def check_guidance_inputs(
        self,
        prompt,
        reward,
        reward_prompt,
        reward_guidance_scale,
        guidance_start,
        guidance_end,
        guide_every,
        num_recurrence_steps,
        guidance_decode_scale,
        grad_clip,
    ) -> None:
        """Raises a `ValueError` naming the argument for a guidance argument out of range, an unsupported scheduler
        or a reward the pipeline cannot build."""
        if (
            isinstance(reward_guidance_scale, bool)
            or not isinstance(reward_guidance_scale, (int, float))
            or not math.isfinite(reward_guidance_scale)
        ):
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
        if isinstance(guide_every, bool) or not isinstance(guide_every, int) or guide_every < 1:
            raise ValueError(
                f"`guide_every` must be a positive integer (1 = every step in the window), got {guide_every!r}"
            )
        if (
            isinstance(num_recurrence_steps, bool)
            or not isinstance(num_recurrence_steps, int)
            or num_recurrence_steps < 1
        ):
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
        self._check_guidance_scheduler()
        if not callable(reward):
            if self.reward_model is None or self.reward_processor is None:
                raise ValueError(
                    f"`reward={reward!r}` needs the pipeline's `reward_model` and `reward_processor`; build it with "
                    f"`{type(self).__name__}.from_pipe(pipe, reward_model=..., reward_processor=...)` or pass a "
                    "callable reward"
                )
            RAHFReward.from_target(self.reward_model, self.reward_processor, reward)  # raises on an unknown target
        if prompt is None and reward_prompt is None:
            raise ValueError(
                "with `prompt_embeds` and no `prompt`, pass `reward_prompt`: the text RAHF rates the images against"
            )

    def _check_guidance_scheduler(self) -> None:
        scheduler = self.scheduler
        if self._rahf_family in ("sd3", "flux"):
            supported = FLOW_MATCHING_SCHEDULERS
        else:
            supported = SUPPORTED_SCHEDULERS
        if not isinstance(scheduler, supported):
            names = ", ".join(s.__name__ for s in supported)
            raise ValueError(
                f"RAHF guidance does not support the scheduler {type(scheduler).__name__} for this "
                f"{self._rahf_family} pipeline; the supported ones are {names}. Swap it, e.g. "
                f"`pipe.scheduler = {supported[0].__name__}.from_config(pipe.scheduler.config)`"
            )
        if supported is SUPPORTED_SCHEDULERS:
            prediction_type = scheduler.config.prediction_type
            if prediction_type not in _PREDICTION_TYPES:
                raise ValueError(
                    f"RAHF guidance supports prediction_type {list(_PREDICTION_TYPES)}, the scheduler has "
                    f"{prediction_type!r}"
                )
            if getattr(scheduler.config, "use_flow_sigmas", False):
                raise ValueError("RAHF guidance does not support `use_flow_sigmas=True` schedulers (flow matching)")
        elif getattr(scheduler.config, "invert_sigmas", False):
            raise ValueError("RAHF guidance does not support `invert_sigmas=True` flow-matching schedulers")

    # ----------------------------------------------------------------------------------------------------------------
    # Guidance math

    def _noise_levels(self, step_index: int, timestep: torch.Tensor) -> tuple[float, float, float, float]:
        """(alpha_bar_t, alpha_bar_prev, c_t, c_prev): cumulative signal levels of this step and the next, and the
        factor c that maps the scheduler's latents to variance-preserving ones (z = c * latents). For flow matching
        alpha_bar stands for 1 - sigma^2, so that sqrt(1 - alpha_bar) is the noise level in both cases."""
        scheduler = self.scheduler
        if isinstance(scheduler, DDIMScheduler):
            t = int(timestep)
            prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # as DDIMScheduler.step
            a_t = float(scheduler.alphas_cumprod[t])
            a_prev = float(scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod)
            return a_t, a_prev, 1.0, 1.0
        k = scheduler.step_index if scheduler.step_index is not None else step_index
        sigma, sigma_prev = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
        if isinstance(scheduler, FLOW_MATCHING_SCHEDULERS):
            return 1.0 - sigma**2, 1.0 - sigma_prev**2, 1.0, 1.0
        a_t, a_prev = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_prev**2)
        if isinstance(scheduler, _SIGMA_SPACE_SCHEDULERS):
            return a_t, a_prev, math.sqrt(a_t), math.sqrt(a_prev)
        return a_t, a_prev, 1.0, 1.0

    def _pred_original_sample(self, z: torch.Tensor, model_output: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """x0 from the (variance-preserving, or flow-matching) latents z and the model output, for each
        parameterisation."""
        parameterisation = self._parameterisation()
        s = math.sqrt(max(0.0, 1.0 - alpha_bar))
        if parameterisation == "flow":  # x_t = (1 - sigma) x0 + sigma noise, v = noise - x0
            return z - s * model_output
        a = math.sqrt(alpha_bar)
        if parameterisation == "epsilon":
            return (z - s * model_output) / a
        if parameterisation == "v_prediction":
            return a * z - s * model_output
        return model_output

    def _shift_to_model_output(self, shift_eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """A shift of the noise (latents fixed) expressed in the model's output space; for flow matching the shift is
        computed in velocity units already."""
        parameterisation = self._parameterisation()
        if parameterisation in ("epsilon", "flow"):
            return shift_eps
        if (
            parameterisation == "v_prediction"
        ):  # v = sqrt(a) eps - sqrt(1 - a) x0, x0 = (z - sqrt(1 - a) eps) / sqrt(a)
            return shift_eps / math.sqrt(alpha_bar)
        return -math.sqrt(1.0 - alpha_bar) / math.sqrt(alpha_bar) * shift_eps

    def _decode_for_reward(self, pred_x0: torch.Tensor, decode_scale: float) -> torch.Tensor:
        """Latents -> images (B, 3, H', W') in [0, 1], decoded at `decode_scale` of the output size."""
        latents = self._latents_to_vae_input(pred_x0)
        if decode_scale < 1.0:
            # The latent -> VAE-input map is per-channel affine, so resizing after it is resizing before it.
            size = [max(1, round(s * decode_scale)) for s in latents.shape[-2:]]
            latents = F.interpolate(latents, size=size, mode="bilinear", align_corners=False, antialias=True)
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
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
        denoise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient of the reward of the predicted clean image with respect to the latents.

        The model output is treated as a constant (no backward pass through the denoiser) unless `denoise_fn`
        (latents -> the model output, classifier-free guidance applied) is given, in which case the output is
        predicted again with gradients (Universal Guidance's full gradient, several times slower).

        Returns:
            `(grad, rewards)`: `grad` has the latents' shape (float32), `rewards` is `(B,)`, detached.
        """
        latents = latents.detach().requires_grad_(True)
        noise_pred = denoise_fn(latents) if denoise_fn is not None else noise_pred.detach()
        pred_x0 = self._pred_original_sample((latents * latent_scale).float(), noise_pred.float(), alpha_bar)
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
        """The shift of the model output (in noise units, per image) for the gradient w.r.t. the scheduler's latents,
        and how many gradient entries were not finite (they are zeroed)."""
        grad_z = grad.double() / latent_scale  # gradient w.r.t. the variance-preserving latents
        finite = torch.isfinite(grad_z)
        num_nonfinite = int((~finite).sum())
        grad_z = torch.where(finite, grad_z, 0.0)
        # The shift is -scale * noise_level * grad_z, assembled as direction * RMS so that no product overflows
        # however large the scale or the gradient.
        noise_level = math.sqrt(max(0.0, 1.0 - alpha_bar))
        unit, unit_rms = _per_image_rms(grad_z)  # (B, ...), (B,)
        if normalize_grad:
            rms = torch.full_like(unit_rms, abs(scale) * noise_level)
        else:
            peak = grad_z.flatten(1).abs().amax(dim=1)
            rms = abs(scale) * noise_level * peak * unit_rms
        if grad_clip is not None:
            rms = rms.clamp(max=grad_clip)
        factor = torch.where(unit_rms > 0, rms / unit_rms.clamp_min(torch.finfo(unit_rms.dtype).tiny), 0.0)
        factor = torch.where(torch.isfinite(factor), factor, 0.0)  # only without grad_clip can this overflow
        shift = -math.copysign(1.0, scale) * unit * factor.view((-1,) + (1,) * (unit.ndim - 1))
        return shift, num_nonfinite

    def _renoise(self, latents_prev: torch.Tensor, levels, generator) -> torch.Tensor:
        """x_{t-1} -> x_t: adds back the noise of one step (Universal Guidance's recurrence)."""
        a_t, a_prev, c_t, c_prev = levels
        noise = randn_tensor(
            latents_prev.shape, generator=generator, device=latents_prev.device, dtype=latents_prev.dtype
        )
        if self._parameterisation() == "flow":
            sigma, sigma_prev = math.sqrt(max(0.0, 1.0 - a_t)), math.sqrt(max(0.0, 1.0 - a_prev))
            ratio = (1.0 - sigma) / (1.0 - sigma_prev)  # x0 keeps its weight relative to the noise
            return ratio * latents_prev + math.sqrt(max(0.0, sigma**2 - (ratio * sigma_prev) ** 2)) * noise
        ratio = a_t / a_prev
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
        return getattr(self, "_reward_guidance_scale", 0.0)

    # ----------------------------------------------------------------------------------------------------------------
    # The wrapper's and the callback's side

    def _guide_model_output(
        self, wrapper: RAHFGuidedDenoiser, args: tuple, kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor:
        """Called by the wrapper after each denoiser call: the output, shifted at guided steps."""
        run = wrapper._run
        if run.guided is None:  # the first call: the pipeline has set its timesteps by now
            run.num_steps = len(self.scheduler.timesteps)
            run.guided = set(self.guided_step_indices(run.num_steps, *run.window))
        run.calls += 1
        i = run.step
        if i not in run.guided:
            return output
        batch = len(run.prompts)
        if run.calls == 1:
            # The step's first call sees every image (its conditional rows, for FLUX's true CFG; both halves for
            # classifier-free guidance): the shift is computed from it and added to every call of the step, which
            # shifts the guided combination (uncond + g (text - uncond), and FLUX's / SD3's extra terms) alike.
            x = _sample_of(args, kwargs)
            copies = x.shape[0] // batch
            z = x[:batch]
            t = self.scheduler.timesteps[i]
            levels = self._noise_levels(i, t)
            alpha_bar = levels[0]
            if run.num_recurrence_steps > 1:
                run.first_call, run.levels = (args, kwargs), levels
                run.scheduler_state = _scheduler_state(self.scheduler)
            denoise_fn = None
            if run.backprop:

                def denoise_fn(latents: torch.Tensor) -> torch.Tensor:
                    a, k = _with_sample(args, kwargs, torch.cat([latents] * copies) if copies > 1 else latents)
                    result = wrapper.denoiser(*a, **k)
                    return self._combine_cfg(result[0] if isinstance(result, tuple) else result.sample, batch)

            grad, _ = self.compute_reward_gradient(
                z,
                self._combine_cfg(output, batch),
                alpha_bar,
                1.0,  # the denoiser's input is already variance-preserving (or flow-matching) latents
                run.reward_fn,
                run.prompts,
                metadata={"step": i, "timestep": t, "num_inference_steps": run.num_steps},
                guidance_decode_scale=run.decode_scale,
                denoise_fn=denoise_fn,
            )
            shift, bad = self._guidance_shift(grad, alpha_bar, 1.0, run.scale, run.normalize_grad, run.grad_clip)
            if bad:
                run.num_nonfinite += bad
                logging.getLogger(type(self).__module__).warning(
                    "step %d: %d non-finite reward-gradient entries were zeroed", i, bad
                )
            run.delta = self._shift_to_model_output(shift, alpha_bar)
        delta = run.delta.to(output.dtype)
        copies = output.shape[0] // delta.shape[0]
        return output + (torch.cat([delta] * copies) if copies > 1 else delta)

    def _guidance_step_end(self, run: _GuidanceRun, user_callback, user_inputs: list[str]):
        def callback(pipe, i, t, callback_kwargs):
            outputs: dict[str, Any] = {}
            if i in (run.guided or ()) and run.num_recurrence_steps > 1 and run.first_call is not None:
                outputs["latents"] = callback_kwargs["latents"] = self._recur(run, i, t, callback_kwargs["latents"])
            run.step = i + 1
            run.new_step()
            if user_callback is not None:
                user_outputs = user_callback(pipe, i, t, {k: callback_kwargs[k] for k in user_inputs})
                outputs.update(user_outputs or {})
            return outputs

        return callback

    def _recur(self, run: _GuidanceRun, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Universal Guidance's recurrence at step i: back to x_t and the guided step once more, n - 1 times."""
        args, kwargs = run.first_call
        levels, state = run.levels, run.scheduler_state
        batch = len(run.prompts)
        copies = _sample_of(args, kwargs).shape[0] // batch
        wrapper = getattr(self, self._denoiser_name)
        for _ in range(run.num_recurrence_steps - 1):
            latents = self._renoise(latents, levels, run.generator)
            _restore_scheduler_state(self.scheduler, state)
            x = self._model_input(latents, t, copies).to(_sample_of(args, kwargs).dtype)
            a, k = _with_sample(args, kwargs, x)
            run.delta, run.calls = None, 0
            result = wrapper(*a, **k)
            output = self._combine_cfg(result[0] if isinstance(result, tuple) else result.sample, batch)
            latents = self.scheduler.step(output, t, latents, **run.extra_step_kwargs, return_dict=False)[0]
        return latents

    def maybe_free_model_hooks(self):
        # The family's loop calls this at its end, and re-installs the offload hooks on the components it finds:
        # they must be the real denoiser again by then.
        self._uninstall_guidance()
        super().maybe_free_model_hooks()

    def _uninstall_guidance(self) -> None:
        wrapper = self.__dict__.get(self._denoiser_name)
        if isinstance(wrapper, RAHFGuidedDenoiser):
            # Straight into __dict__: DiffusionPipeline.__setattr__ would re-register the module in the config.
            self.__dict__[self._denoiser_name] = wrapper.denoiser

    # ----------------------------------------------------------------------------------------------------------------
    # The call

    def _guided_output(self, parent_output, images, rewards, reward_scores, num_nonfinite: int, return_dict: bool):
        if not return_dict:
            return (images, rewards, reward_scores, num_nonfinite)
        return RAHFGuidedPipelineOutput(
            images=images, rewards=rewards, reward_scores=reward_scores, num_nonfinite_grads=num_nonfinite
        )

    @torch.no_grad()
    def __call__(
        self,
        *args,
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
        backprop_through_denoiser: bool = False,
        backprop_through_unet: bool | None = None,
        **kwargs,
    ):
        """Generates images with the family's own loop; the positional and other keyword arguments are the diffusers
        pipeline's. The guidance arguments are documented in the class docstring."""
        parent_call = super().__call__
        signature = inspect.signature(parent_call)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = dict(bound.arguments)
        for name, parameter in signature.parameters.items():  # SD's **kwargs (deprecated callbacks): flattened
            if parameter.kind is parameter.VAR_KEYWORD:
                params.update(params.pop(name, {}))
        if backprop_through_unet is not None:
            backprop_through_denoiser = bool(backprop_through_unet)
        prompt = params.get("prompt")

        # 1. Check the guidance inputs (the family's own are checked by its loop)
        self.check_guidance_inputs(
            prompt,
            reward,
            reward_prompt,
            reward_guidance_scale,
            guidance_start,
            guidance_end,
            guide_every,
            num_recurrence_steps,
            guidance_decode_scale,
            grad_clip,
        )
        if num_recurrence_steps > 1 and reward_guidance_scale != 0:
            if params.get("skip_guidance_layers") is not None or (
                params.get("true_cfg_scale", 1.0) > 1
                and (params.get("negative_prompt") is not None or params.get("negative_prompt_embeds") is not None)
            ):
                raise ValueError(
                    "`num_recurrence_steps` > 1 re-runs one denoiser call per step; it cannot be combined with "
                    "`skip_guidance_layers` (SD3) or `true_cfg_scale` with a negative prompt (FLUX)"
                )
        self._reward_guidance_scale = reward_guidance_scale

        # 2. The reward and the prompts it rates against
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = params["prompt_embeds"].shape[0] if params.get("prompt_embeds") is not None else 1
        num_images_per_prompt = params.get("num_images_per_prompt") or 1
        reward_prompts = self._reward_prompts(reward_prompt if reward_prompt is not None else prompt, batch_size)
        if reward_prompts is not None:
            reward_prompts = [p for p in reward_prompts for _ in range(num_images_per_prompt)]
        reward_fn = None
        if callable(reward):
            reward_fn = reward
        elif self.reward_model is not None and self.reward_processor is not None:
            reward_fn = RAHFReward.from_target(
                self.reward_model, self.reward_processor, reward, report_all_scores=False
            )

        # 3. Install the guidance (nothing when no step is guided: the plain pipeline runs)
        output_type, return_dict = params.get("output_type", "pil"), params.get("return_dict", True)
        params["output_type"] = "latent" if output_type == "latent" else "pt"
        params["return_dict"] = True
        run = None
        if reward_guidance_scale != 0 and guidance_start < guidance_end:
            generator = params.get("generator")
            extra_step_kwargs = {}
            if hasattr(self, "prepare_extra_step_kwargs") and "eta" in params:
                extra_step_kwargs = self.prepare_extra_step_kwargs(generator, params["eta"])
            run = _GuidanceRun(
                reward_fn=reward_fn,
                prompts=reward_prompts,
                scale=float(reward_guidance_scale),
                window=(guidance_start, guidance_end, guide_every),
                num_recurrence_steps=num_recurrence_steps,
                decode_scale=float(guidance_decode_scale),
                normalize_grad=normalize_grad,
                grad_clip=grad_clip,
                backprop=backprop_through_denoiser,
                image_size=self._image_size(params.get("height"), params.get("width")),
                generator=generator,
                extra_step_kwargs=extra_step_kwargs,
            )
            user_callback = params.get("callback_on_step_end")
            user_inputs = list(params.get("callback_on_step_end_tensor_inputs") or [])
            if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
                user_inputs = list(user_callback.tensor_inputs)
            params["callback_on_step_end"] = self._guidance_step_end(run, user_callback, user_inputs)
            params["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys(["latents", *user_inputs]))
            name = self._denoiser_name
            self.__dict__[name] = RAHFGuidedDenoiser(getattr(self, name), self, run)
            self._rahf_run = run
        try:
            parent_output = parent_call(**params)
        finally:
            self._uninstall_guidance()
            self._rahf_run = None

        # 4. Score the final images and hand them out as asked
        images = parent_output.images
        rewards = reward_scores = None
        if output_type != "latent":
            if reward_prompts is not None:
                rewards, reward_scores = self._final_rewards(images, reward, reward_fn, reward_prompts)
            if output_type != "pt":
                images = self.image_processor.pt_to_numpy(images)
                if output_type == "pil":
                    images = self.image_processor.numpy_to_pil(images)
        num_nonfinite = run.num_nonfinite if run is not None else 0
        return self._guided_output(parent_output, images, rewards, reward_scores, num_nonfinite, return_dict)

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
        self, images01: torch.Tensor, reward, reward_fn: RewardFn | None, prompts: list[str]
    ) -> tuple[list[float] | None, list[dict[str, float]] | None]:
        """Scores the final images (B, 3, H, W) in [0, 1]: the guidance reward and, with a reward model, every
        score."""
        images01 = images01.float().clamp(0, 1)
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
