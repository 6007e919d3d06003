"""`accelerate launch -m rahf.improve.policy_gradient`: online policy-gradient LoRA training of a Stable Diffusion UNet
on a RAHF reward: DDPO for the sampler (stochastic DDIM, eta > 0, with each step's Gaussian log-probability; clipped
importance ratios), GRPO's group advantages (`--group_size` images per prompt, rewards normalised within the group),
and a dense advantage that RAHF's heatmaps place where the flaw is.

A step samples `group_size` images for each of `train_batch_size` prompts with the current LoRA, recording every
latent and log-probability; scores them with the reward from rahf's one registry; turns the rewards into advantages,
(r - mean of the group) / std of the group; then runs `ppo_epochs` x `num_minibatches` optimizer updates in which each
recorded transition is re-evaluated under the LoRA being trained and the clipped surrogate
`-min(A * ratio, A * clip(ratio, 1 - clip_range, 1 + clip_range))` is minimised, over a `train_timestep_fraction` of
the steps.

Ratios and advantages live on the latent grid: a transition's log-probability is a sum over latent positions (a
diagonal Gaussian), so each position has its own ratio (as GRPO clips per token). `--advantage scalar` gives every
position its image's advantage; `--advantage dense` modulates it by RAHF's heatmap (`--heatmap implausibility` or
`misalignment`) resized to the latent grid: a below-average image's (negative) advantage goes where the heat is, an
above-average image's (positive) advantage where it is not, each weight map with mean 1 over the image (mixed with the
uniform map by `--dense_mix`), so that the two runs differ only in where the same advantage lands.

Examples:

```bash
accelerate launch -m rahf.improve.policy_gradient --config configs/improve/policy_gradient.yaml
accelerate launch -m rahf.improve.policy_gradient --config configs/improve/policy_gradient.yaml --advantage dense \\
    --heatmap implausibility --resume_from_checkpoint latest
```
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from rahf.job_args import check_int_fields, parse_job_args

from ._reward_job import RewardJob, RewardTrainingArguments, _seed, reward_and_scores, run_job
from ._sampling import ddim_step, heatmaps_on_latent_grid, predict_noise, rahf_heatmaps, training_scheduler

logger = logging.getLogger(__name__)

__all__ = [
    "ADVANTAGES",
    "PolicyGradientArguments",
    "dense_weights",
    "group_advantages",
    "main",
    "parse_policy_gradient_args",
    "train_policy_gradient",
]

ADVANTAGES = ("scalar", "dense")


@dataclass
class PolicyGradientArguments(RewardTrainingArguments):
    """Arguments of `rahf.improve.policy_gradient`: the shared reward-training flags plus DDPO's and GRPO's.

    Examples:

    ```python
    >>> args = PolicyGradientArguments(pretrained_model_name_or_path="runs/generator", reward_model="runs/rahf",
    ...                                prompts_file="prompts.txt", group_size=4, advantage="dense")
    >>> summary = train_policy_gradient(args)
    ```
    """

    group_size: int = field(default=4, metadata={"help": "G: images per prompt; advantages normalised in the group"})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta of the sampler (> 0: stochastic, with log-probs)"})
    clip_range: float = field(default=1e-4, metadata={"help": "importance ratios clipped to 1 +- this (DDPO's 1e-4)"})
    adv_clip_max: float = field(default=5.0, metadata={"help": "advantages clipped to +- this"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each sampled batch"})
    num_minibatches: int = field(default=2, metadata={"help": "optimizer updates per pass (the batch split in parts)"})
    train_timestep_fraction: float = field(
        default=1.0, metadata={"help": "share of the sampler steps trained on per update (at random)"}
    )
    advantage: str = field(
        default="scalar",
        metadata={"help": "scalar: one advantage per image; dense: modulated by RAHF's heatmap per latent position",
                  "choices": list(ADVANTAGES)},
    )  # fmt: skip
    heatmap: str = field(default="implausibility", metadata={"help": "the heatmap of the dense advantage"})
    dense_mix: float = field(
        default=1.0, metadata={"help": "dense weights = (1 - mix) + mix * heatmap weights (0: the scalar advantage)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int_fields(self, positive=("group_size", "ppo_epochs", "num_minibatches"))
        if self.group_size < 2:
            raise ValueError(
                f"`group_size` must be >= 2 (advantages are normalised within a group), got {self.group_size}"
            )
        if not self.eta > 0:
            raise ValueError(f"`eta` must be > 0 (a deterministic sampler has no log-probabilities), got {self.eta!r}")
        if not self.clip_range > 0:
            raise ValueError(f"`clip_range` must be > 0, got {self.clip_range!r}")
        if not self.adv_clip_max > 0:
            raise ValueError(f"`adv_clip_max` must be > 0, got {self.adv_clip_max!r}")
        if not 0.0 < self.train_timestep_fraction <= 1.0:
            raise ValueError(f"`train_timestep_fraction` must lie in (0, 1], got {self.train_timestep_fraction!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"`advantage` must be one of {list(ADVANTAGES)}, got {self.advantage!r}")
        if not 0.0 <= self.dense_mix <= 1.0:
            raise ValueError(f"`dense_mix` must lie in [0, 1], got {self.dense_mix!r}")
        images = self.train_batch_size * self.group_size * self.gradient_accumulation_steps
        if self.num_minibatches > images:
            raise ValueError(f"`num_minibatches` ({self.num_minibatches}) exceeds the {images} images of a step")

    def train_timesteps(self) -> int:
        return max(1, math.ceil(self.num_inference_steps * self.train_timestep_fraction))


def parse_policy_gradient_args(argv: list[str] | None = None) -> PolicyGradientArguments:
    """`--config file.yaml` gives the defaults, the other flags override them."""
    return parse_job_args(PolicyGradientArguments, argv, prog="accelerate launch -m rahf.improve.policy_gradient",
                          description="DDPO / GRPO policy-gradient LoRA training on a RAHF reward, scalar or "
                                      "heatmap-weighted.")  # fmt: skip


def forward_passes_per_image(args: PolicyGradientArguments) -> int:
    """Generator forward passes one training image costs: T sampler steps, then each pass's re-evaluated steps."""
    return args.num_inference_steps + args.ppo_epochs * args.train_timesteps()


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float | None = None) -> torch.Tensor:
    """GRPO's advantages: rewards (N,) in consecutive groups of `group_size` -> (r - group mean) / group std
    (0 for a group whose rewards are all equal), clipped to +- `clip`."""
    r = rewards.float().view(-1, group_size)
    std = r.std(dim=1, keepdim=True)
    adv = torch.where(std > 1e-8, (r - r.mean(dim=1, keepdim=True)) / std.clamp_min(1e-8), 0.0).reshape(-1)
    return adv.clamp(-clip, clip) if clip else adv


def dense_weights(advantages: torch.Tensor, heat: torch.Tensor, mix: float = 1.0) -> torch.Tensor:
    """Per-position weights (N, h, w), mean 1 over each image, from heat (N, h, w) in [0, 1]: where the heat is for a
    negative advantage (the flawed region is what to do less of), where it is not for a positive one (the clean
    region is what to do more of); mixed with the uniform map: `(1 - mix) + mix * weights`."""
    flawed = heat / heat.mean(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    clean = (1.0 - heat) / (1.0 - heat).mean(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    weights = torch.where((advantages < 0).view(-1, 1, 1), flawed, clean)
    return (1.0 - mix) + mix * weights


def _rows(embeds: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The rows `index` of embeddings laid out as `[negative (n); positive (n)]` (or positive only)."""
    if embeds.shape[0] == 2 * n:
        return torch.cat([embeds[:n][index], embeds[n:][index]])
    return embeds[index]


def policy_gradient_step(job: RewardJob, step: int) -> dict[str, Any]:
    """One step: sample G images per prompt with log-probs, score, advantages, clipped-surrogate updates."""
    args = job.args
    scheduler = job.scheduler
    timesteps = list(scheduler.timesteps)
    G = args.group_size
    # 1. Sample with the current LoRA, recording every transition.
    prompts, trajectory, log_probs, embeds_all, rewards_all, heats, infos = [], [], [], [], [], [], []
    job.unet.eval()
    for micro in range(args.gradient_accumulation_steps):
        group_prompts = job.prompts_for(step, micro, args.train_batch_size)
        expanded = [p for p in group_prompts for _ in range(G)]
        generator = job.generator(step, micro)
        latents = job.initial_latents(len(expanded), generator)
        embeds = job.embeds(expanded)
        traj, lps = [latents], []
        with torch.no_grad(), job.accelerator.autocast():
            for t in timesteps:
                eps = predict_noise(job.unet, latents, t, embeds, args.guidance_scale)
                latents, lp = ddim_step(scheduler, eps, t, latents, eta=args.eta, generator=generator)
                traj.append(latents)
                lps.append(lp.float().mean(dim=1))  # (N, h, w): per position, averaged over channels as DDPO does
            images = job.decode(latents)
            rewards, info = reward_and_scores(job, images, expanded)
        heat = rahf_heatmaps(job.predictor, images, expanded, args.heatmap if args.advantage == "dense"
                             else args.monitor_heatmap)  # fmt: skip
        job.forward_passes += len(expanded) * args.num_inference_steps
        prompts += expanded
        trajectory.append(torch.stack(traj, dim=1))  # (N, T + 1, C, h, w)
        log_probs.append(torch.stack(lps, dim=1))  # (N, T, h, w)
        embeds_all.append(embeds)
        rewards_all.append(rewards.detach().float())
        heats.append(heat)
        infos.append(info)
    job.unet.train()
    n = len(prompts)
    trajectory, log_probs = torch.cat(trajectory), torch.cat(log_probs)
    if args.guidance_scale > 1.0:  # keep the [negative; positive] layout over all micro-batches
        halves = [e.chunk(2) for e in embeds_all]
        embeds = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    else:
        embeds = torch.cat(embeds_all)
    rewards = torch.cat(rewards_all)
    heat = torch.cat(heats)
    grid = trajectory.shape[-2:]

    # 2. Advantages: normalised within each prompt's group; dense: placed by the heatmap on the latent grid.
    advantages = group_advantages(rewards, G, args.adv_clip_max).to(job.device)
    if args.advantage == "dense":
        weights = dense_weights(advantages, heatmaps_on_latent_grid(heat, grid).to(job.device), args.dense_mix)
    else:
        weights = torch.ones((n, *grid), device=job.device)
    position_advantages = advantages.view(-1, 1, 1) * weights  # (N, h, w)

    # 3. Clipped-surrogate updates on the recorded transitions.
    clipped, total, kl_sum, updates = 0.0, 0.0, 0.0, 0
    gain, gain_count = 0.0, 0  # from the second pass on: how much the updates raised the surrogate on these samples
    num_train = args.train_timesteps()
    for epoch in range(args.ppo_epochs):
        order_gen = torch.Generator().manual_seed(_seed(args.seed, step, epoch, job.accelerator.process_index, 7))
        order = torch.randperm(n, generator=order_gen)
        for part in order.chunk(args.num_minibatches):
            steps = torch.randperm(len(timesteps), generator=order_gen)[:num_train].sort().values.tolist()
            part_embeds = _rows(embeds, part.to(embeds.device), n)
            for j in steps:
                t = timesteps[j]
                with job.accelerator.autocast():
                    eps = predict_noise(job.unet, trajectory[part, j], t, part_embeds, args.guidance_scale)
                    _, lp = ddim_step(scheduler, eps, t, trajectory[part, j], eta=args.eta,
                                      prev_sample=trajectory[part, j + 1])  # fmt: skip
                log_ratio = lp.float().mean(dim=1) - log_probs[part, j]
                ratio = torch.exp(log_ratio)
                adv = position_advantages[part]
                loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - args.clip_range, 1.0 + args.clip_range))
                job.backward(loss.mean() / len(steps))
                with torch.no_grad():
                    clipped += float(((ratio - 1.0).abs() > args.clip_range).float().mean())
                    kl_sum += float((0.5 * log_ratio.pow(2)).mean())
                    total += 1
                    if epoch > 0:
                        gain += float((adv * (ratio - 1.0)).mean())
                        gain_count += 1
            job.forward_passes += len(part) * len(steps)
            job.apply_gradients()
            updates += 1
    metrics = {"train/reward": float(rewards.mean()), "train/reward_std_in_group": float(rewards.view(-1, G).std(1).mean()),
               "train/clip_fraction": clipped / max(total, 1), "train/approx_kl": kl_sum / max(total, 1),
               "train/surrogate_gain": gain / max(gain_count, 1),
               f"train/{args.heatmap if args.advantage == 'dense' else args.monitor_heatmap}_mean": float(heat.mean())}  # fmt: skip
    for name in infos[0].get("scores", {}):
        metrics[f"train/{name}"] = float(torch.cat([i["scores"][name].float() for i in infos]).mean())
    metrics["_prompts"] = prompts
    return metrics


def train_policy_gradient(args: PolicyGradientArguments, pipe=None) -> dict[str, Any]:
    """Runs one policy-gradient job on this process (one of many under `accelerate launch`); returns a summary
    (`global_step`, `lora_path`, `validation`, `forward_passes`, `history`, `resumed_from`).

    Args:
        pipe: a loaded Stable Diffusion pipeline to fine-tune in place, instead of `args.pretrained_model_name_or_path`.
    """
    job = RewardJob(args, f"rahf-policy-gradient-{args.advantage}", updates_per_step=args.ppo_epochs * args.num_minibatches,
                    pipe=pipe)  # fmt: skip
    if args.heatmap not in job.predictor.model.config.heatmap_names:
        raise ValueError(
            f"`heatmap` must be one of the reward model's heatmaps {list(job.predictor.model.config.heatmap_names)}, "
            f"got {args.heatmap!r}"
        )
    job.scheduler = training_scheduler(job.pipe, args.num_inference_steps)
    return run_job(job, policy_gradient_step)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m rahf.improve.policy_gradient` / `accelerate launch -m rahf.improve.policy_gradient`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_policy_gradient(parse_policy_gradient_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
