"""The per-family training losses of `rahf.improve.finetune`, each as diffusers' own LoRA script for that family
computes it: encode a batch once without gradients (`encode_batch`), then the denoiser's per-image loss
(`denoising_loss`).

| family   | script it follows                     | loss                                                               |
|----------|---------------------------------------|--------------------------------------------------------------------|
| `sd`     | `train_text_to_image_lora.py`         | epsilon / v-prediction MSE, uniform timesteps                      |
| `sdxl`   | `train_text_to_image_lora_sdxl.py`    | the same, two text encoders, size and crop conditioning (time ids) |
| `sd3`    | `train_dreambooth_lora_sd3.py`        | flow matching: velocity `noise - x0`, density-sampled timesteps    |
| `flux`   | `train_dreambooth_lora_flux.py`       | the same on 2x2-packed latents, image/text ids, guidance embedding |
| `amused` | `train_amused.py`                     | masked-token cross-entropy                                         |

Examples:

```python
>>> scheduler = training_noise_scheduler(pipe, "flux")
>>> encoded = encode_batch(batch, pipe, "flux", args, torch.float32, torch.device("cpu"))
>>> per_image = denoising_loss(encoded, pipe.transformer, "flux", scheduler, args)  # (B,)
```
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "FLOW_WEIGHTING_SCHEMES",
    "LORA_TARGET_MODULES",
    "denoising_loss",
    "encode_batch",
    "flow_max_sequence_length",
    "flow_weighting_scheme",
    "training_noise_scheduler",
]

# The modules each family's diffusers script puts LoRA on by default.
LORA_TARGET_MODULES: dict[str, list[str]] = {
    "sd": ["to_k", "to_q", "to_v", "to_out.0"],
    "sdxl": ["to_k", "to_q", "to_v", "to_out.0"],
    "sd3": [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ],
    "flux": [
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ],
    "amused": ["to_k", "to_q", "to_v", "to_out.0"],
}
# `--weighting_scheme` choices of the SD3 / FLUX scripts ("none": uniform timesteps, unweighted loss).
FLOW_WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
# The scripts' defaults where the flags are unset.
_DEFAULT_WEIGHTING = {"sd3": "logit_normal", "flux": "none"}
_DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 77, "flux": 512}


def flow_weighting_scheme(family: str, weighting_scheme: str | None) -> str:
    """`weighting_scheme`, or the family's script default when unset (SD3: logit_normal, FLUX: none)."""
    return weighting_scheme or _DEFAULT_WEIGHTING.get(family, "none")


def flow_max_sequence_length(family: str, max_sequence_length: int | None) -> int:
    """T5 tokens of a training caption: `max_sequence_length`, or the script default (SD3: 77, FLUX: 512)."""
    return max_sequence_length or _DEFAULT_MAX_SEQUENCE_LENGTH[family]


def training_noise_scheduler(pipe, family: str, prediction_type: str | None = None):
    """The scheduler training draws noise levels from: DDPM (from the pipeline's scheduler config, as the SD/SDXL
    scripts load it) for `sd` / `sdxl`, a fresh `FlowMatchEulerDiscreteScheduler` (its full training schedule, shift
    included) for `sd3` / `flux`, None for `amused`."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if family in ("sd", "sdxl"):
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if prediction_type is not None:
            scheduler.register_to_config(prediction_type=prediction_type)
        return scheduler
    if family in ("sd3", "flux"):
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return None


def _config(module: torch.nn.Module):
    return module.module.config if hasattr(module, "module") else module.config  # DDP wraps the model


@torch.no_grad()
def encode_batch(batch: dict[str, Any], pipe, family: str, args, weight_dtype: torch.dtype, device) -> dict[str, Any]:
    """The frozen part of a step: the images' latents (or VQ tokens) and the captions' conditioning.

    Args:
        batch: `pixel_values` (B, 3, R, R), `input_ids` (B, L) of `pipe.tokenizer`, `caption` (B strings),
            `original_size` and `crop_top_left` (B, 2) as (height, width) / (top, left).
        args: reads `resolution` (SDXL's target size) and `max_sequence_length` (SD3, FLUX).
    """
    pixel_values = batch["pixel_values"].to(device)
    if family == "amused":
        vqvae = pipe.vqvae
        bsz = pixel_values.shape[0]
        image_tokens = vqvae.quantize(vqvae.encode(pixel_values.to(vqvae.dtype)).latents)[2][2].reshape(bsz, -1)
        out = pipe.text_encoder(batch["input_ids"].to(device), return_dict=True, output_hidden_states=True)
        return {
            "image_tokens": image_tokens,
            "encoder_hidden_states": out.hidden_states[-2],
            "cond_embeds": out.text_embeds,
        }
    vae = pipe.vae
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    if family in ("sd3", "flux"):
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    else:
        latents = latents * vae.config.scaling_factor
    encoded: dict[str, Any] = {"latents": latents.to(weight_dtype)}
    captions = list(batch["caption"])
    if family == "sd":
        encoded["encoder_hidden_states"] = pipe.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    elif family == "sdxl":
        # Both CLIP encoders' penultimate states side by side, the second one's pooled projection (the pipeline's own
        # encode_prompt, as the script's), and the size/crop numbers of each image: (original, crop top-left, target).
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        original_size, crop_top_left = batch["original_size"].float(), batch["crop_top_left"].float()
        target = original_size.new_tensor([args.resolution, args.resolution]).expand(len(captions), 2)
        time_ids = torch.cat([original_size, crop_top_left, target], dim=1)
        encoded.update(
            encoder_hidden_states=prompt_embeds.to(weight_dtype),
            text_embeds=pooled.to(weight_dtype),
            time_ids=time_ids.to(device, weight_dtype),  # (B, 6)
        )
    elif family == "sd3":
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            captions,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=flow_max_sequence_length(family, args.max_sequence_length),
        )
        encoded.update(prompt_embeds=prompt_embeds.to(weight_dtype), pooled_projections=pooled.to(weight_dtype))
    elif family == "flux":
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            captions,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=flow_max_sequence_length(family, args.max_sequence_length),
        )
        encoded.update(
            prompt_embeds=prompt_embeds.to(weight_dtype),
            pooled_projections=pooled.to(weight_dtype),
            text_ids=text_ids,
            vae_scale_factor=pipe.vae_scale_factor,
        )
    else:
        raise ValueError(f"unknown generator family {family!r}")
    return encoded


def denoising_loss(encoded: dict[str, Any], denoiser: torch.nn.Module, family: str, noise_scheduler, args):
    """The per-image training loss (B,) of `denoiser` on `encode_batch`'s output; draws its noise and timesteps from
    torch's global generator (restored on resume).

    Args:
        args: reads `noise_offset` (SD, SDXL); `weighting_scheme`, `logit_mean`, `logit_std`, `mode_scale`,
            `precondition_outputs`, `guidance_scale` (SD3, FLUX); `min_masking_rate`, `resolution` (aMUSEd).
    """
    if family in ("sd", "sdxl"):
        return _epsilon_or_v_loss(encoded, denoiser, family, noise_scheduler, args)
    if family in ("sd3", "flux"):
        return _flow_matching_loss(encoded, denoiser, family, noise_scheduler, args)
    if family == "amused":
        return _masked_token_loss(encoded, denoiser, args)
    raise ValueError(f"unknown generator family {family!r}")


def _epsilon_or_v_loss(encoded, denoiser, family, noise_scheduler, args) -> torch.Tensor:
    latents = encoded["latents"]
    noise = torch.randn_like(latents)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), device=latents.device, dtype=latents.dtype
        )
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {noise_scheduler.config.prediction_type!r}")
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": encoded["text_embeds"], "time_ids": encoded["time_ids"]}
    model_pred = denoiser(noisy_latents, timesteps, encoded["encoder_hidden_states"], return_dict=False, **kwargs)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)


def _flow_matching_loss(encoded, denoiser, family, noise_scheduler, args) -> torch.Tensor:
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    latents = encoded["latents"]  # (B, C, h, w), shifted and scaled
    bsz, channels, height, width = latents.shape
    noise = torch.randn_like(latents)
    weighting_scheme = flow_weighting_scheme(family, args.weighting_scheme)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=bsz,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
    )
    indices = (u * noise_scheduler.config.num_train_timesteps).long()
    timesteps = noise_scheduler.timesteps[indices].to(device=latents.device)
    # The scripts' get_sigmas looks each timestep up in the schedule: the sigma at the same index.
    sigmas = noise_scheduler.sigmas[indices].to(device=latents.device, dtype=latents.dtype).reshape(bsz, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    if family == "sd3":
        model_pred = denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=encoded["prompt_embeds"],
            pooled_projections=encoded["pooled_projections"],
            return_dict=False,
        )[0]
    else:
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)  # (B, h/2 * w/2, 4C)
        image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, latents.device, latents.dtype)
        guidance = None
        if _config(denoiser).guidance_embeds:  # guidance-distilled (FLUX.1 dev): conditioned on a fixed scale
            guidance = torch.full((bsz,), float(args.guidance_scale), device=latents.device, dtype=torch.float32)
        model_pred = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=encoded["pooled_projections"],
            encoder_hidden_states=encoded["prompt_embeds"],
            txt_ids=encoded["text_ids"],
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = encoded["vae_scale_factor"]
        model_pred = FluxPipeline._unpack_latents(model_pred, height * scale, width * scale, scale)  # (B, C, h, w)
    if args.precondition_outputs:  # EDM-style: the prediction turned into one of x0
        model_pred = model_pred * (-sigmas) + noisy
        target = latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    return (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1)  # (B,)


def _masked_token_loss(encoded, denoiser, args) -> torch.Tensor:
    config = _config(denoiser)
    image_tokens, encoder_hidden_states = encoded["image_tokens"], encoded["encoder_hidden_states"]
    bsz, seq_len = image_tokens.shape
    timesteps = torch.rand(bsz, device=image_tokens.device)
    mask_prob = torch.cos(timesteps * math.pi * 0.5).clip(args.min_masking_rate)
    num_masked = (seq_len * mask_prob).round().clamp(min=1)
    mask = torch.rand(bsz, seq_len, device=image_tokens.device).argsort(dim=-1) < num_masked.unsqueeze(-1)
    mask_id = config.vocab_size - 1
    input_ids = torch.where(mask, mask_id, image_tokens)
    labels = torch.where(mask, image_tokens, -100)
    side = int(math.isqrt(seq_len))
    resolution = args.resolution
    micro_conds = torch.tensor(
        [resolution, resolution, 0, 0, 6], device=image_tokens.device, dtype=encoder_hidden_states.dtype
    ).expand(bsz, -1)
    logits = denoiser(
        input_ids.reshape(bsz, side, side),
        encoder_hidden_states=encoder_hidden_states,
        micro_conds=micro_conds,
        pooled_text_emb=encoded["cond_embeds"],
    )
    logits = logits.reshape(bsz, config.codebook_size, -1).permute(0, 2, 1)  # (B, L, codebook)
    ce = F.cross_entropy(
        logits.reshape(-1, config.codebook_size).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(bsz, seq_len)
    return ce.sum(1) / mask.sum(1).clamp(min=1)  # (B,)
