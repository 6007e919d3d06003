"""The sampler arithmetic the reward-training jobs share: prompt embeddings with classifier-free guidance, one DDIM step
with its Gaussian log-probability (DDPO's stochastic DDIM, eta > 0), decoding, and RAHF heatmaps on the latent grid.

Kept apart from the pipelines so that training can run the denoising loop itself: with gradients through chosen steps
(reward backpropagation) or with per-step log-probabilities (policy gradient), which a pipeline call cannot give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ddim_step",
    "decode_latents",
    "encode_prompts",
    "heatmaps_on_latent_grid",
    "predict_noise",
    "rahf_heatmaps",
    "training_scheduler",
]


def training_scheduler(pipe, num_inference_steps: int):
    """A `DDIMScheduler` built from the pipeline's scheduler config, its timesteps set (the pipeline's own scheduler
    is left untouched, so validation samples as users do)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"`pretrained_model_name_or_path`: the scheduler predicts {scheduler.config.prediction_type!r}; reward "
            "training handles epsilon and v_prediction"
        )
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], guidance_scale: float, device: torch.device) -> torch.Tensor:
    """CLIP embeddings of `prompts`: `[negative; positive]` (2B, L, D) with classifier-free guidance, else (B, L, D)."""
    do_cfg = guidance_scale > 1.0
    positive, negative = pipe.encode_prompt(list(prompts), device, 1, do_cfg)
    return torch.cat([negative, positive]) if do_cfg else positive


def predict_noise(unet, latents: torch.Tensor, t, embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The UNet's output at `t`, classifier-free guided when `embeds` holds the negative half (as `encode_prompts`)."""
    do_cfg = embeds.shape[0] == 2 * latents.shape[0]
    model_input = torch.cat([latents] * 2) if do_cfg else latents
    out = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
    if do_cfg:
        uncond, cond = out.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    return out


def _alphas(scheduler, t) -> tuple[float, float, int]:
    t = int(t)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # as DDIMScheduler.step
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    return a_t, a_prev, prev


def ddim_step(
    scheduler,
    model_output: torch.Tensor,
    t,
    latents: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One DDIM step x_t -> x_{t-1} (`DDIMScheduler.step`'s arithmetic, written out so that it is differentiable and
    gives its log-probability), as DDPO samples.

    With `eta > 0` the step is Gaussian, N(mean, std^2) with std = eta * sigma_t; the new sample is drawn from
    `generator` unless `prev_sample` is given (to re-evaluate the log-probability of a recorded step under a changed
    model). Returns `(prev_sample, log_prob)`, `log_prob` per element (same shape as the latents; `None` at eta 0).
    """
    a_t, a_prev, _ = _alphas(scheduler, t)
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
        pred_x0 = (latents - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    else:  # v_prediction
        pred_x0 = math.sqrt(a_t) * latents - math.sqrt(1.0 - a_t) * model_output
        eps = math.sqrt(a_t) * model_output + math.sqrt(1.0 - a_t) * latents
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * math.sqrt(max(variance, 0.0))
    mean = math.sqrt(a_prev) * pred_x0 + math.sqrt(max(1.0 - a_prev - std**2, 0.0)) * eps
    if eta == 0.0 or std == 0.0:
        return mean, None
    if prev_sample is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        prev_sample = mean + std * noise
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in [0, 1], differentiable."""
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def rahf_heatmaps(predictor, images: torch.Tensor, prompts: Sequence[str], name: str) -> torch.Tensor:
    """RAHF's predicted heatmap `name` (implausibility or misalignment) of images (B, 3, H, W) in [0, 1]: (B, S, S),
    heat in [0, 1], at the model's heatmap size."""
    from rahf.reward import rahf_pixel_values

    model, processor = predictor.model, predictor.processor
    config = model.config
    if name not in config.heatmap_names:
        raise ValueError(
            f"`heatmap` must be one of the reward model's heatmaps {list(config.heatmap_names)}, got {name!r}"
        )
    param = next(model.parameters())
    pixel_values = rahf_pixel_values(images.to(param.device, torch.float32), processor).to(param.dtype)
    encoded = {k: v.to(param.device) for k, v in processor.encode_prompts(list(prompts), [name]).items()}
    out = model(pixel_values=pixel_values, **encoded)
    return out.heatmaps[:, config.heatmap_names.index(name)].float()


def heatmaps_on_latent_grid(heatmaps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Heatmaps (B, S, S) -> (B, h, w) on the latent grid, by area averaging (each latent position gets the mean heat
    of the pixels it decodes to)."""
    return F.interpolate(heatmaps[:, None].float(), size=size, mode="area" if heatmaps.shape[-1] >= size[-1]
                         else "bilinear").squeeze(1).clamp(0.0, 1.0)  # fmt: skip
