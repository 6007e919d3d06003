"""`accelerate launch -m rahf.improve.reward_finetune`: LoRA fine-tuning of a Stable Diffusion UNet by backpropagating
a differentiable RAHF reward through the last K sampler steps (DRaFT-K; K = 1 is DRaFT-1 / ReFL's single-step
gradient), with a reference-output penalty against drifting.

Each step samples the training prompts with DDIM (eta 0): the first T - K steps without gradients, the last K with
gradients through the LoRA UNet; the final latents are decoded by the VAE and scored by the reward from rahf's one
registry (`--reward`, a RAHF score, `-implausibility` or a mix). The reward's gradient with respect to the decoded
images is checked for NaN/inf (zeroed and counted) and clipped per image (`--reward_grad_clip`), as guidance does,
before it flows back into the UNet. `--reference_weight` adds the mean squared difference between the LoRA's noise
predictions and the original UNet's at the backpropagated steps (the KL between the two models' Gaussian DDIM
transitions, up to a constant). `--gradient_checkpointing` and `--vae_gradient_checkpointing` trade compute for memory.

Everything else (checkpoints, `--resume_from_checkpoint`, validation with RAHF's four scores and the judge, the
reward-hacking monitor, the LoRA in `output_dir/pytorch_lora_weights.safetensors` that `pipe.load_lora_weights` reads)
is shared with `rahf.improve.policy_gradient`.

Examples:

```bash
accelerate launch -m rahf.improve.reward_finetune --config configs/improve/reward_finetune.yaml
accelerate launch --multi_gpu --num_processes 4 -m rahf.improve.reward_finetune \\
    --config configs/improve/reward_finetune.yaml --backprop_steps 3 --resume_from_checkpoint latest
```
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from rahf.job_args import check_int_fields, parse_job_args

from ._reward_job import RewardJob, RewardTrainingArguments, reward_and_scores, run_job
from ._sampling import ddim_step, predict_noise, training_scheduler

logger = logging.getLogger(__name__)

__all__ = ["RewardFinetuneArguments", "main", "parse_reward_finetune_args", "train_reward_backprop"]


@dataclass
class RewardFinetuneArguments(RewardTrainingArguments):
    """Arguments of `rahf.improve.reward_finetune`: the shared reward-training flags plus the backpropagation's own.

    Examples:

    ```python
    >>> args = RewardFinetuneArguments(pretrained_model_name_or_path="runs/generator", reward_model="runs/rahf",
    ...                                prompts_file="prompts.txt", backprop_steps=1, max_train_steps=200)
    >>> summary = train_reward_backprop(args)  # reward-lora/pytorch_lora_weights.safetensors
    ```
    """

    backprop_steps: int = field(
        default=1, metadata={"help": "K: the last K sampler steps carry gradients (1: DRaFT-1 / ReFL)"}
    )
    reward_grad_clip: float = field(
        default=1.0,
        metadata={"help": "clip each image's reward gradient (w.r.t. its pixels) to this L2 norm (0: none)"},
    )
    reference_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the penalty ||eps_lora - eps_original||^2 at the backpropagated steps (0: off)"},
    )
    vae_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute the VAE decoder's activations in the backward pass"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int_fields(self, positive=("backprop_steps",))
        if self.backprop_steps > self.num_inference_steps:
            raise ValueError(
                f"`backprop_steps` ({self.backprop_steps}) must be at most `num_inference_steps` "
                f"({self.num_inference_steps})"
            )
        if self.reward_grad_clip < 0:
            raise ValueError(f"`reward_grad_clip` must be >= 0 (0 turns clipping off), got {self.reward_grad_clip!r}")
        if self.reference_weight < 0:
            raise ValueError(f"`reference_weight` must be >= 0, got {self.reference_weight!r}")


def parse_reward_finetune_args(argv: list[str] | None = None) -> RewardFinetuneArguments:
    """`--config file.yaml` gives the defaults, the other flags override them."""
    return parse_job_args(RewardFinetuneArguments, argv, prog="accelerate launch -m rahf.improve.reward_finetune",
                          description="LoRA fine-tuning by backpropagating a RAHF reward through the last sampler "
                                      "steps.")  # fmt: skip


def forward_passes_per_image(args: RewardFinetuneArguments) -> int:
    """Generator forward passes one training image costs: its T sampler steps, plus the K reference predictions."""
    return args.num_inference_steps + (args.backprop_steps if args.reference_weight > 0 else 0)


def reward_backprop_step(job: RewardJob, step: int) -> dict[str, Any]:
    """One optimizer step: `gradient_accumulation_steps` micro-batches of sampled, decoded, scored images."""
    args = job.args
    scheduler = job.scheduler
    timesteps = list(scheduler.timesteps)
    k = args.backprop_steps
    sums: dict[str, float] = {}
    seen: list[str] = []
    for micro in range(args.gradient_accumulation_steps):
        prompts = job.prompts_for(step, micro, args.train_batch_size)
        seen += prompts
        latents = job.initial_latents(len(prompts), job.generator(step, micro))
        embeds = job.embeds(prompts)
        with job.accelerator.autocast():
            with torch.no_grad():
                for t in timesteps[:-k]:
                    eps = predict_noise(job.unet, latents, t, embeds, args.guidance_scale)
                    latents, _ = ddim_step(scheduler, eps, t, latents)
            penalty = latents.new_zeros(len(prompts), dtype=torch.float32)
            for t in timesteps[-k:]:
                eps = predict_noise(job.unet, latents, t, embeds, args.guidance_scale)
                if args.reference_weight > 0:
                    with torch.no_grad():
                        job.unet.disable_adapters()
                        reference = predict_noise(job.unet, latents, t, embeds, args.guidance_scale)
                        job.unet.enable_adapters()
                    penalty = penalty + (eps.float() - reference.float()).pow(2).flatten(1).mean(1)
                latents, _ = ddim_step(scheduler, eps, t, latents)
            images = job.decode(latents)
        # The reward's gradient w.r.t. the pixels first, checked and clipped, then through the decoder and UNet.
        leaf = images.detach().requires_grad_(True)
        with torch.enable_grad():
            rewards, info = reward_and_scores(job, leaf, prompts)
            if not rewards.requires_grad:
                raise ValueError(f"the reward {args.reward!r} is not differentiable w.r.t. the images")
            (grad,) = torch.autograd.grad(rewards.sum(), leaf)
        raw_norm = grad.flatten(1).norm(dim=1)
        grad = job.sanitize_reward_grad(grad, args.reward_grad_clip or None)
        surrogate = -(images * grad).sum() / len(prompts) + args.reference_weight * penalty.mean() / k
        job.backward(surrogate / args.gradient_accumulation_steps)
        job.forward_passes += len(prompts) * forward_passes_per_image(args)
        values = {"train/reward": float(rewards.detach().mean()), "train/penalty": float(penalty.detach().mean()),
                  "train/reward_grad_norm": float(torch.nan_to_num(raw_norm, nan=0.0).mean())}  # fmt: skip
        for name, v in info.get("scores", {}).items():
            values[f"train/{name}"] = float(v.float().mean())
        for name, v in values.items():
            sums[name] = sums.get(name, 0.0) + v / args.gradient_accumulation_steps
    job.apply_gradients()
    return {**sums, "_prompts": seen}


def train_reward_backprop(args: RewardFinetuneArguments, pipe=None) -> dict[str, Any]:
    """Runs one reward-backpropagation job on this process (one of many under `accelerate launch`); returns a summary
    (`global_step`, `lora_path`, `validation`, `forward_passes`, `history`, `resumed_from`).

    Args:
        pipe: a loaded Stable Diffusion pipeline to fine-tune in place, instead of `args.pretrained_model_name_or_path`.
    """
    job = RewardJob(args, "rahf-reward-backprop", pipe=pipe)
    job.scheduler = training_scheduler(job.pipe, args.num_inference_steps)
    if args.vae_gradient_checkpointing:
        job.pipe.vae.enable_gradient_checkpointing()
        job.pipe.vae.train()  # (no dropout in the decoder: train mode only turns the checkpointing on)
    return run_job(job, reward_backprop_step)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m rahf.improve.reward_finetune` / `accelerate launch -m rahf.improve.reward_finetune`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_reward_backprop(parse_reward_finetune_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
