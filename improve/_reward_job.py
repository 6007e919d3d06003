"""What the two online reward-training jobs (`rahf.improve.reward_finetune`, `rahf.improve.policy_gradient`) share:
their common flags, the accelerate set-up of a LoRA on a Stable Diffusion UNet, the prompt stream, gradient
averaging across processes, checkpoints and resume, validation with RAHF's four scores and the judge, and the
reward-hacking monitor.

Each job gives a `step_fn(job, step) -> metrics` that samples, scores and calls `job.backward` / `job.apply_gradients`;
`run_job` does everything around it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rahf.constants import SCORE_NAMES
from rahf.fileio import append_jsonl
from rahf.job_args import check_finite_numbers, check_int_fields, read_prompt_records, uses_cpu_processes
from rahf.precision import MIXED_PRECISIONS, resolve_mixed_precision, torch_dtype
from rahf.training_utils import (
    DIFFUSERS_LR_SCHEDULES,
    NonFiniteGuard,
    build_lr_scheduler,
    build_optimizer,
    build_trackers,
    check_finite_parameters,
    checkpoint_step,
    resolve_resume_checkpoint,
    save_checkpoint,
)

from ._sampling import decode_latents, encode_prompts, rahf_heatmaps

logger = logging.getLogger(__name__)

LR_SCHEDULERS = tuple(DIFFUSERS_LR_SCHEDULES)
DEFAULT_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class RewardTrainingArguments:
    """The flags both online reward-training jobs take; names follow diffusers' training scripts where one exists."""

    config: str | None = field(
        default=None, metadata={"help": "YAML file of arguments (keys = flag names); flags on the command line win"}
    )
    # ---- model and prompts
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "a Stable Diffusion (1.x/2.x) pipeline: hub id or folder"}
    )
    revision: str | None = field(default=None, metadata={"help": "hub revision of the pipeline"})
    variant: str | None = field(default=None, metadata={"help": "weights variant of the pipeline, e.g. fp16"})
    prompts_file: str | None = field(
        default=None, metadata={"help": "training prompts: .txt (one a line) or .jsonl (a `prompt` field)"}
    )
    resolution: int | None = field(
        default=None, metadata={"help": "image side (default: the UNet's sample_size x the VAE's scale factor)"}
    )
    num_inference_steps: int = field(default=20, metadata={"help": "DDIM steps of each training sample"})
    guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance while sampling (1: off)"})
    # ---- reward
    reward_model: str | None = field(default=None, metadata={"help": "a RAHF model folder (the reward)"})
    reward: str = field(
        default="plausibility",
        metadata={"help": "the reward from the registry: a name or 'a=0.5,-implausibility=0.5'"},
    )
    # ---- LoRA
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank, scale 1)"})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "module names that get LoRA (default: to_k to_q to_v to_out.0)"}
    )
    # ---- schedule and optimizer
    train_batch_size: int = field(default=4, metadata={"help": "prompts per process per micro-batch"})
    max_train_steps: int = field(default=100, metadata={"help": "training steps"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "diffusers' get_scheduler names", "choices": list(LR_SCHEDULERS)}
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up (optimizer steps)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (pip install bitsandbytes)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clipping of the LoRA gradient's norm (0: none)"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute the UNet's activations in the backward pass (less memory)"}
    )
    # ---- precision, reproducibility, outputs
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "auto, no, fp16 or bf16; default: what `accelerate launch` says, else no",
                  "choices": list(MIXED_PRECISIONS)},
    )  # fmt: skip
    allow_tf32: bool = field(default=False, metadata={"help": "TF32 matmuls on Ampere+ GPUs"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA init, the prompt order and all sampling noise"})
    output_dir: str = field(default="reward-lora", metadata={"help": "checkpoints, logs, validation, final LoRA"})
    logging_dir: str = field(default="logs", metadata={"help": "log folder, relative to output_dir"})
    report_to: str = field(
        default="jsonl",
        metadata={"help": "jsonl, tensorboard (when installed) or all", "choices": ["jsonl", "tensorboard", "all"]},
    )
    logging_steps: int = field(default=1, metadata={"help": "write a log line every N steps"})
    checkpointing_steps: int = field(
        default=500, metadata={"help": "save checkpoint-{step}/ every N steps (0: never)"}
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (the newest checkpoint-* in output_dir, if any) or a path"}
    )
    # ---- validation and the reward-hacking monitor
    validation_prompts: list[str] | None = field(
        default=None, metadata={"help": "held-out prompts generated at validation (also: --validation_prompts_file)"}
    )
    validation_prompts_file: str | None = field(default=None, metadata={"help": "held-out prompts, one a line"})
    num_validation_images: int = field(default=1, metadata={"help": "images per validation prompt"})
    validation_steps: int | None = field(
        default=None, metadata={"help": "validate every N steps (always before training and at the end)"}
    )
    judge: str | None = field(
        default=None, metadata={"help": "a judge folder (rahf.improve.judge): its scores are logged beside RAHF's"}
    )
    monitor_heatmap: str = field(
        default="implausibility", metadata={"help": "the RAHF heatmap whose area the monitor logs"}
    )
    monitor_threshold: float = field(default=0.5, metadata={"help": "heat above this counts into the area"})
    debug_check_sync: bool = field(
        default=False,
        metadata={"help": "each process writes a checksum of its LoRA after each step (output_dir/debug_sync)"},
    )

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        check_int_fields(
            self,
            positive=("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "rank", "logging_steps",
                      "num_validation_images", "num_inference_steps"),
            positive_or_unset=("validation_steps", "checkpoints_total_limit", "lora_alpha", "resolution"),
            non_negative=("checkpointing_steps", "lr_warmup_steps"),
        )  # fmt: skip
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"`lr_scheduler` must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"`mixed_precision` must be one of {list(MIXED_PRECISIONS)}, got {self.mixed_precision!r}"
            )
        if self.max_grad_norm < 0:
            raise ValueError(f"`max_grad_norm` must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"`guidance_scale` must be >= 1 (1 turns guidance off), got {self.guidance_scale!r}")
        if not 0.0 <= self.monitor_threshold <= 1.0:
            raise ValueError(f"`monitor_threshold` must lie in [0, 1], got {self.monitor_threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def sanitize_reward_grad(grad: torch.Tensor, clip: float | None) -> tuple[torch.Tensor, int]:
    """The reward's gradient w.r.t. the images, as guidance treats it: non-finite entries zeroed (and counted), then
    each image's gradient clipped to L2 norm `clip` (None or 0: no clipping). Returns `(grad, how many were zeroed)`."""
    finite = torch.isfinite(grad)
    nonfinite = int((~finite).sum())
    grad = torch.where(finite, grad, 0.0)
    if clip:
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        grad = grad * (clip / norm).clamp(max=1.0).view(-1, *([1] * (grad.ndim - 1)))
    return grad, nonfinite


def _is_text_to_image_sd(pipe) -> bool:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    return (isinstance(unet, UNet2DConditionModel) and getattr(pipe, "text_encoder_2", None) is None
            and hasattr(pipe, "vae") and unet.config.in_channels == pipe.vae.config.latent_channels)  # fmt: skip


class RewardJob:
    """The state of one run on this process: the pipeline with its LoRA, the optimizer, the reward, the prompts."""

    def __init__(self, args: RewardTrainingArguments, name: str, updates_per_step: int = 1, pipe=None):
        from accelerate import Accelerator, PartialState
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from rahf.predictor import RichFeedbackPredictor
        from rahf.reward import get_reward

        from .best_of_n import load_text_to_image_pipeline
        from .finetune import save_lora

        self.args, self.name = args, name
        if not args.prompts_file:
            raise ValueError("`prompts_file` is not set; pass a .txt (one prompt a line) or .jsonl file of prompts")
        self.prompts = [r["prompt"] for r in read_prompt_records(args.prompts_file, "--prompts_file")]
        if not args.reward_model:
            raise ValueError("`reward_model` is not set; pass a RAHF model folder (written by `rahf train`)")
        self.output_dir = Path(args.output_dir)
        logging_dir = self.output_dir / args.logging_dir
        PartialState(cpu=uses_cpu_processes())  # the process group first (gloo when there is no GPU)
        log_with = build_trackers(args.report_to, logging_dir)
        # Accumulation is done here (gradients are averaged across processes by hand, see `apply_gradients`).
        self.accelerator = accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(args.mixed_precision),
            log_with=log_with or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(logging_dir),
                                                automatic_checkpoint_naming=False),
            cpu=uses_cpu_processes(),
        )  # fmt: skip
        if not accelerator.is_local_main_process:
            logger.setLevel(logging.WARNING)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.device = accelerator.device
        self.weight_dtype = torch_dtype(accelerator.mixed_precision)

        # 1. The frozen pipeline; a LoRA on its UNet, the same initial LoRA on every process.
        if pipe is None:
            pipe = load_text_to_image_pipeline(args.pretrained_model_name_or_path, revision=args.revision,
                                               variant=args.variant)  # fmt: skip
        if not _is_text_to_image_sd(pipe):
            raise ValueError(
                f"`pretrained_model_name_or_path` is a {type(pipe).__name__}; reward training samples with DDIM and "
                "handles text-to-image Stable Diffusion 1.x/2.x pipelines (one CLIP text encoder, a 4-channel "
                "UNet2DConditionModel)"
            )
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.to(self.device) if self.weight_dtype == torch.float32 else component.to(
                    self.device, dtype=self.weight_dtype
                )
        unet = pipe.unet
        set_seed(args.seed)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian",
                                    target_modules=list(args.lora_target_modules or DEFAULT_TARGET_MODULES)))  # fmt: skip
        if accelerator.mixed_precision == "fp16":
            cast_training_params(unet, dtype=torch.float32)
        self.lora_params = [p for p in unet.parameters() if p.requires_grad]
        if not self.lora_params:
            raise ValueError(f"`lora_target_modules` {args.lora_target_modules!r} matched no module of the UNet")
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
        if self.resolution % pipe.vae_scale_factor:
            raise ValueError(
                f"`resolution` must be a multiple of the VAE's scale factor {pipe.vae_scale_factor}, got {args.resolution}"
            )
        self.latent_shape = (unet.config.in_channels, self.resolution // pipe.vae_scale_factor,
                             self.resolution // pipe.vae_scale_factor)  # fmt: skip

        # 2. Checkpoints hold the LoRA as pytorch_lora_weights.safetensors (diffusers' format); loading restores it.
        from .finetune import restore_lora

        def save_model_hook(models, weights, ckpt_dir):
            if accelerator.is_main_process:
                for model in models:
                    save_lora(accelerator.unwrap_model(model), "sd", ckpt_dir)
            weights.clear()

        def load_model_hook(models, ckpt_dir):
            while models:
                restore_lora(accelerator.unwrap_model(models.pop()), "sd", ckpt_dir)

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

        optimizer = build_optimizer(self.lora_params, learning_rate=args.learning_rate,
                                    betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                    eps=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam)  # fmt: skip
        # The UNet is prepared (DDP) so that checkpoints carry it, but called unwrapped: one backward pass per
        # sampler step and several forwards per backward are outside what DDP's reducer allows, so the LoRA
        # gradients are averaged across processes in `apply_gradients`, once per optimizer step.
        self.unet_prepared, self.optimizer = accelerator.prepare(unet, optimizer)
        self.unet = unet
        self.updates_per_step = int(updates_per_step)
        self.lr_scheduler = accelerator.prepare(
            build_lr_scheduler(self.optimizer, args.lr_scheduler, args.lr_warmup_steps,
                               args.max_train_steps * self.updates_per_step, num_processes=accelerator.num_processes,
                               schedule_names=DIFFUSERS_LR_SCHEDULES)
        )  # fmt: skip

        # 3. The reward, differentiable, from the one registry; RAHF's predictor for heatmaps and validation.
        self.predictor = RichFeedbackPredictor.from_pretrained(args.reward_model, device=self.device)
        self.reward_fn = get_reward(args.reward, reward_model=self.predictor)
        self.scores_fn = get_reward("overall", reward_model=self.predictor)  # all four RAHF scores, for validation
        if args.monitor_heatmap not in self.predictor.model.config.heatmap_names:
            raise ValueError(
                f"`monitor_heatmap` must be one of {list(self.predictor.model.config.heatmap_names)}, got "
                f"{args.monitor_heatmap!r}"
            )
        self.validation_prompts = list(args.validation_prompts or [])
        if args.validation_prompts_file:
            self.validation_prompts += [r["prompt"] for r in read_prompt_records(args.validation_prompts_file,
                                                                                 "--validation_prompts_file")]  # fmt: skip
        self.judge = None
        if args.judge and self.validation_prompts and accelerator.is_main_process:
            from .judge import SynthJudge

            self.judge = SynthJudge.from_pretrained(args.judge, device=str(self.device))
        self.guard = NonFiniteGuard(self.device, hint="lower --learning_rate or --reward_grad_clip")
        self.optimizer_steps = 0  # of this run (a resumed run counts from its resume)
        self.forward_passes = 0  # generator forward passes (one denoising step of one image, guidance included)
        self.nonfinite_reward_grads = 0

    # ----------------------------------------------------------------------------------------------------------------

    def prompts_for(self, step: int, micro: int, count: int) -> list[str]:
        """The `count` prompts of this process at (`step`, `micro`): a stream of epoch-wise permutations by the seed,
        cut in the same place on every process and after a resume (the data position is a function of the step)."""
        p, n = self.accelerator.num_processes, len(self.prompts)
        start = ((step * self.args.gradient_accumulation_steps + micro) * p + self.accelerator.process_index) * count
        out = []
        for k in range(start, start + count):
            epoch, i = divmod(k, n)
            out.append(self.prompts[int(np.random.default_rng([self.args.seed, epoch]).permutation(n)[i])])
        return out

    def generator(self, step: int, micro: int, *salt: int) -> torch.Generator:
        """This process's noise at (`step`, `micro`): seeded, so that a resumed run draws what the uninterrupted one
        drew, whatever else used the global RNG."""
        gen_device = "cpu" if self.device.type == "mps" else self.device
        seed = _seed(self.args.seed, step, micro, self.accelerator.process_index, *salt)
        return torch.Generator(gen_device).manual_seed(seed)

    def initial_latents(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((count, *self.latent_shape), generator=generator, device=generator.device,
                           dtype=self.weight_dtype).to(self.device)  # fmt: skip

    def embeds(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.pipe, prompts, self.args.guidance_scale, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        self.guard.observe(loss)
        self.accelerator.backward(loss)

    def apply_gradients(self) -> torch.Tensor | None:
        """Averages the LoRA gradients across processes (one all-reduce), clips them, steps, zeroes them."""
        params = self.lora_params
        if self.accelerator.num_processes > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            flat = self.accelerator.reduce(flat, reduction="mean")
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        grad_norm = None
        if self.args.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.end_step(grad_norm if self.accelerator.mixed_precision != "fp16" else None)
        self.optimizer_steps += 1
        self.guard.check_learning_rate(self.lr_scheduler.get_last_lr()[0], self.optimizer_steps)
        return grad_norm

    def sanitize_reward_grad(self, grad: torch.Tensor, clip: float | None) -> torch.Tensor:
        grad, nonfinite = sanitize_reward_grad(grad, clip)
        self.nonfinite_reward_grads += nonfinite
        return grad

    # ----------------------------------------------------------------------------------------------------------------
    # Validation and the reward-hacking monitor

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Generates the held-out prompts at fixed seeds with the current LoRA; logs RAHF's four scores and reward,
        the monitored heatmap's area, and the judge's scores (the reward-hacking monitor). Main process only."""
        metrics: dict[str, float] = {}
        if not self.validation_prompts or not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return metrics
        start = time.perf_counter()
        args = self.args
        was_training = self.unet.training
        self.unet.eval()
        folder = self.output_dir / "validation" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        prompts = [p for p in self.validation_prompts for _ in range(args.num_validation_images)]
        seeds = [args.seed + 1000 * i + j for i in range(len(self.validation_prompts))
                 for j in range(args.num_validation_images)]  # fmt: skip
        images = []
        gen_device = "cpu" if self.device.type == "mps" else self.device
        for k in range(0, len(prompts), 16):
            gens = [torch.Generator(gen_device).manual_seed(s) for s in seeds[k : k + 16]]
            with self.accelerator.autocast():
                images += self.pipe(prompts[k : k + 16], num_inference_steps=args.num_inference_steps,
                                    guidance_scale=args.guidance_scale, height=self.resolution, width=self.resolution,
                                    generator=gens, output_type="pil").images  # fmt: skip
        from rahf.reward import images_to_tensor

        tensor = images_to_tensor(images)
        rewards, _ = self.reward_fn(tensor, prompts, None)
        _, info = self.scores_fn(tensor, prompts, None)
        heat = rahf_heatmaps(self.predictor, tensor, prompts, args.monitor_heatmap)
        area = (heat > args.monitor_threshold).float().flatten(1).mean(1)
        verdicts = self.judge(images, prompts) if self.judge is not None else None
        rows = []
        for j, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
            name = f"{j:03d}.png"
            image.save(folder / name)
            row = {"step": step, "prompt": prompt, "seed": seed, "file_name": f"validation/{folder.name}/{name}",
                   "reward": float(rewards[j]), f"{args.monitor_heatmap}_area": float(area[j]),
                   f"{args.monitor_heatmap}_mean": float(heat[j].mean())}  # fmt: skip
            row.update({k: float(v[j]) for k, v in info["scores"].items()})
            if verdicts is not None:
                row.update({f"judge_{k}": float(v) for k, v in verdicts[j].scores.items()})
            rows.append(row)
            append_jsonl(self.output_dir / args.logging_dir / "validation_log.jsonl", row)
        metrics["val/reward"] = float(np.mean([r["reward"] for r in rows]))
        for name in SCORE_NAMES:
            if name in rows[0]:
                metrics[f"val/{name}"] = float(np.mean([r[name] for r in rows]))
        metrics[f"monitor/{args.monitor_heatmap}_area"] = float(
            np.mean([r[f"{args.monitor_heatmap}_area"] for r in rows])
        )
        if verdicts is not None:
            for name in verdicts[0].scores:
                metrics[f"monitor/judge_{name}"] = float(np.mean([r[f"judge_{name}"] for r in rows]))
        self.accelerator.log(metrics, step=step)
        logger.info("step %d validation (%.1fs): %s", step, time.perf_counter() - start, metrics)
        if was_training:
            self.unet.train()
        self.accelerator.wait_for_everyone()
        return metrics

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe.vae, latents)


def run_job(job: RewardJob, step_fn: Callable[[RewardJob, int], dict[str, float]]) -> dict[str, Any]:
    """The loop around a job's step: resume, validation before/at intervals/at the end, logging, per-step LoRA
    checksums (`--debug_check_sync`), checkpoints, the final LoRA; returns a summary."""
    from tqdm.auto import tqdm

    from .finetune import LORA_WEIGHT_NAME, lora_checksum, save_lora

    args, accelerator = job.args, job.accelerator
    output_dir = job.output_dir
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
        accelerator.init_trackers(job.name, config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                    for k, v in args.to_dict().items()})  # fmt: skip

    # Resume: LoRA (through the hook), optimizer, scheduler, RNG states; the prompt position and every noise are
    # functions of the step, so nothing else is needed to replay the rest exactly.
    global_step = 0
    resume_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
        accelerator.load_state(str(resume_from))
        global_step = checkpoint_step(resume_from)
        state = json.loads((Path(resume_from) / "training_state.json").read_text())
        job.forward_passes = int(state.get("forward_passes", 0))
    job.guard.start_step = global_step
    sync_file = output_dir / "debug_sync" / f"rank{accelerator.process_index}.jsonl"
    if args.debug_check_sync:
        if resume_from is None and sync_file.exists():
            sync_file.unlink()
        if resume_from is not None:
            append_jsonl(sync_file, {"step": global_step, "event": "resumed", "sha256": lora_checksum(job.unet)})

    last_validation: dict[str, float] = {}
    first_validation: dict[str, float] = {}
    if resume_from is None:
        first_validation = last_validation = job.validate(0)
    logger.info("%s: LoRA rank %d (%.3fM trainable), %d prompts, %d steps x %d process(es) x %d prompts x %d "
                "accumulation", job.name, args.rank, sum(p.numel() for p in job.lora_params) / 1e6, len(job.prompts),
                args.max_train_steps, accelerator.num_processes, args.train_batch_size,
                args.gradient_accumulation_steps)  # fmt: skip
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc=job.name, unit="step",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    job.unet.train()
    start_time = time.perf_counter()
    history: list[dict[str, float]] = []
    pending: list[dict[str, float]] = []
    while global_step < args.max_train_steps:
        metrics = step_fn(job, global_step)
        global_step += 1
        progress.update(1)
        pending.append(metrics)
        if args.debug_check_sync:
            append_jsonl(sync_file, {"step": global_step, "num_processes": accelerator.num_processes,
                                      "sha256": lora_checksum(job.unet), "prompts": metrics.get("_prompts")})  # fmt: skip
        if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
            job.guard.check(accelerator, f"at the log of step {global_step}")
            record = {k: float(np.mean([m[k] for m in pending])) for k in pending[0] if not k.startswith("_")}
            # every process's rewards, averaged (one collective per log line)
            keys = sorted(record)
            values = accelerator.reduce(torch.tensor([record[k] for k in keys], dtype=torch.float64,
                                                     device=job.device), reduction="mean").cpu().tolist()  # fmt: skip
            record = dict(zip(keys, values))
            record.update({"lr": job.lr_scheduler.get_last_lr()[0], "forward_passes": job.forward_passes,
                           "nonfinite_reward_grads": job.nonfinite_reward_grads})  # fmt: skip
            accelerator.log(record, step=global_step)
            history.append({"step": global_step, **record})
            progress.set_postfix(reward=f"{record.get('train/reward', float('nan')):.4f}")
            pending = []
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            last_validation = job.validate(global_step)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            job.guard.check(accelerator, f"before saving checkpoint-{global_step}")
            save_checkpoint(accelerator, output_dir, global_step, total_limit=args.checkpoints_total_limit,
                            training_state={"forward_passes": job.forward_passes})  # fmt: skip
    progress.close()

    job.guard.check(accelerator, "at the end of training")
    check_finite_parameters(job.unet, f"the LoRA in {output_dir}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora(job.unet, "sd", output_dir)
    last_validation = job.validate(global_step) or last_validation
    summary = {
        "global_step": global_step,
        "lora_path": str(output_dir / LORA_WEIGHT_NAME),
        "resumed_from": str(resume_from) if resume_from else None,
        "validation_start": first_validation,
        "validation": last_validation,
        "train_seconds": time.perf_counter() - start_time,
        # every process's generator forward passes (one denoising step of one image, guidance included)
        "forward_passes": int(job.forward_passes * accelerator.num_processes),
        "nonfinite_reward_grads": job.nonfinite_reward_grads,
        "history": history,
    }
    if accelerator.is_main_process:
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("saved the LoRA to %s (%d steps)", output_dir / LORA_WEIGHT_NAME, global_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def reward_and_scores(job: RewardJob, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """The registry reward of decoded images (differentiable when they are), checked for shape."""
    rewards, info = job.reward_fn(images, prompts, None)
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (images.shape[0],):
        raise ValueError(f"the reward {job.args.reward!r} must return ({images.shape[0]},) scores, got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}")  # fmt: skip
    return rewards, info
