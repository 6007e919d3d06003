"""`accelerate launch -m rahf.improve.train_generator`: trains a tiny text-to-image `StableDiffusionPipeline` from
scratch on a rich-feedback data set (by default the synthetic one), flawed images included, so that the generator
inherits the data's artifacts and misalignments and makes its own: the generator of the measuring world in which
rahf's loops are shown to make images better.

Two stages in one job: first the autoencoder (`AutoencoderKL`, L1 + L2 reconstruction and a small KL term), then the
UNet and the CLIP text encoder together on the autoencoder's latents (noise prediction, classifier-free guidance by
dropping the prompt, min-SNR loss weighting, an EMA of the UNet). Checkpoints through the shared crash-safe
checkpointing (`--resume_from_checkpoint latest` restores every model, optimizer, schedule, the EMA and the data
position), validation grids at intervals, and the final pipeline in `output_dir/final` (`save_pretrained`), which
every pipeline and job of rahf takes as `--pretrained_model_name_or_path`.

The tokenizer is word-level over the synthetic prompts' vocabulary (`rahf.data.synth_scenes.prompt_vocabulary`), a
`PreTrainedTokenizerFast` with CLIP's special tokens; other words map to `<|unk|>`.

Examples:

```bash
accelerate launch -m rahf.improve.train_generator --config configs/improve/generator_synth.yaml
accelerate launch -m rahf.improve.train_generator --config configs/improve/generator_synth.yaml \\
    --resume_from_checkpoint latest
```

```python
>>> from diffusers import StableDiffusionPipeline
>>> pipe = StableDiffusionPipeline.from_pretrained("runs/generator_synth/final")
>>> pipe("two red stars above a blue hexagon on a wooden table", num_inference_steps=25).images[0]
```
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

from rahf.job_args import check_finite_numbers, check_int_fields, parse_job_args, uses_cpu_processes
from rahf.precision import MIXED_PRECISIONS, resolve_mixed_precision
from rahf.training_utils import (
    EpochShuffleSampler,
    NonFiniteGuard,
    atomic_directory,
    build_lr_scheduler,
    build_optimizer,
    build_trackers,
    check_finite_parameters,
    checkpoint_step,
    resolve_resume_checkpoint,
    save_checkpoint,
    truncate_log,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GeneratorTrainingArguments",
    "build_generator_components",
    "build_generator_pipeline",
    "main",
    "parse_generator_args",
    "synth_tokenizer",
    "train_generator",
]

TRAIN_LOG_NAME = "train_log.jsonl"
BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"


@dataclass
class GeneratorTrainingArguments:
    """Everything `rahf.improve.train_generator` needs. Each field is a `--flag`; `--config` YAML sets defaults."""

    config: str | None = field(default=None, metadata={"help": "YAML file of arguments (keys = flag names)"})
    data_dir: str | None = field(default=None, metadata={"help": "canonical data set folder (`rahf data synth`)"})
    train_split: str = field(default="train", metadata={"help": "split to train on (flawed images included)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    output_dir: str = field(default="generator-output", metadata={"help": "checkpoints, logs, validation, final/"})
    logging_dir: str = field(default="logs", metadata={"help": "log folder, relative to output_dir"})
    resolution: int = field(default=64, metadata={"help": "image side in pixels (images are resized to it)"})
    # ---- architecture
    vae_channels: list[int] = field(
        default_factory=lambda: [16, 32, 64], metadata={"help": "autoencoder block widths (len - 1 halvings)"}
    )
    latent_channels: int = field(default=4, metadata={"help": "channels of the latent"})
    unet_channels: list[int] = field(
        default_factory=lambda: [48, 96, 96],
        metadata={"help": "UNet block widths (cross-attention in all but the first)"},
    )
    unet_layers_per_block: int = field(default=1, metadata={"help": "resnet layers per UNet block"})
    attention_head_dim: int = field(default=8, metadata={"help": "UNet attention head width"})
    text_hidden_size: int = field(default=128, metadata={"help": "CLIP text encoder width (= cross-attention width)"})
    text_layers: int = field(default=2, metadata={"help": "CLIP text encoder layers"})
    max_prompt_length: int = field(default=32, metadata={"help": "prompt tokens, BOS and EOS included"})
    # ---- schedule
    vae_steps: int = field(default=2000, metadata={"help": "optimizer steps of the autoencoder stage"})
    unet_steps: int = field(default=8000, metadata={"help": "optimizer steps of the UNet + text encoder stage"})
    vae_batch_size: int = field(default=32, metadata={"help": "images per device per autoencoder step"})
    train_batch_size: int = field(default=64, metadata={"help": "images per device per UNet step"})
    vae_learning_rate: float = field(default=5e-4, metadata={"help": "autoencoder peak learning rate"})
    learning_rate: float = field(default=5e-4, metadata={"help": "UNet and text encoder peak learning rate"})
    lr_warmup_steps: int = field(default=200, metadata={"help": "linear warm-up of each stage"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "cosine (to lr_end), constant, linear or rsqrt"})
    lr_end_ratio: float = field(default=0.1, metadata={"help": "cosine: the last learning rate over the peak"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: none)"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the autoencoder's KL term"})
    prompt_dropout: float = field(
        default=0.1, metadata={"help": "share of prompts replaced by the empty prompt (classifier-free guidance)"}
    )
    snr_gamma: float | None = field(default=5.0, metadata={"help": "min-SNR loss weighting gamma (None: plain MSE)"})
    ema_decay: float | None = field(default=0.999, metadata={"help": "EMA of the UNet's weights (None: no EMA)"})
    num_train_timesteps: int = field(default=1000, metadata={"help": "diffusion steps of the noise schedule"})
    # ---- validation, checkpoints, logs
    validation_steps: int = field(default=1000, metadata={"help": "write a validation grid every N steps (0: never)"})
    num_validation_prompts: int = field(default=8, metadata={"help": "validation prompts (from the validation split)"})
    validation_inference_steps: int = field(default=25, metadata={"help": "denoising steps of the validation grid"})
    guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance of the validation grid"})
    checkpointing_steps: int = field(
        default=1000, metadata={"help": "save checkpoint-{step}/ every N steps (0: never)"}
    )
    checkpoints_total_limit: int | None = field(default=2, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    logging_steps: int = field(default=50, metadata={"help": "write a log line every N steps"})
    report_to: str = field(default="jsonl", metadata={"help": "jsonl, tensorboard or all"})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "auto, no, fp16 or bf16", "choices": list(MIXED_PRECISIONS)}
    )
    seed: int = field(default=0, metadata={"help": "seed of the weights, data order, noise and prompt dropout"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading worker processes"})

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        check_int_fields(
            self,
            positive=(
                "resolution", "latent_channels", "unet_layers_per_block", "attention_head_dim", "text_hidden_size",
                "text_layers", "max_prompt_length", "vae_batch_size", "train_batch_size", "num_validation_prompts",
                "validation_inference_steps", "logging_steps", "num_train_timesteps",
            ),
            positive_or_unset=("max_train_samples", "checkpoints_total_limit"),
            non_negative=(
                "vae_steps", "unet_steps", "lr_warmup_steps", "checkpointing_steps", "validation_steps",
                "dataloader_num_workers",
            ),
        )  # fmt: skip
        if self.vae_steps + self.unet_steps == 0:
            raise ValueError("`vae_steps` and `unet_steps` are both 0: give a stage some steps")
        for name in ("vae_channels", "unet_channels"):
            widths = getattr(self, name)
            if not widths or any(not isinstance(w, int) or w < 8 or w % 8 for w in widths):
                raise ValueError(f"`{name}` must be a list of widths that are multiples of 8, got {widths!r}")
        if self.resolution % 2 ** (len(self.vae_channels) - 1):
            raise ValueError(
                f"`resolution` {self.resolution} must be divisible by {2 ** (len(self.vae_channels) - 1)}, the "
                "autoencoder's downsampling"
            )
        for name in ("learning_rate", "vae_learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)!r}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"`prompt_dropout` must lie in [0, 1), got {self.prompt_dropout!r}")
        if not 0.0 <= self.lr_end_ratio <= 1.0:
            raise ValueError(f"`lr_end_ratio` must lie in [0, 1], got {self.lr_end_ratio!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must lie in (0, 1) or be unset, got {self.ema_decay!r}")
        if self.text_hidden_size % self.attention_head_dim:
            raise ValueError(
                f"`text_hidden_size` {self.text_hidden_size} must be a multiple of `attention_head_dim` "
                f"{self.attention_head_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_generator_args(argv: list[str] | None = None) -> GeneratorTrainingArguments:
    """`--config file.yaml` gives the defaults, the other flags override them."""
    return parse_job_args(
        GeneratorTrainingArguments,
        argv,
        prog="accelerate launch -m rahf.improve.train_generator",
        description="Train a tiny text-to-image Stable Diffusion pipeline from scratch on a rich-feedback data set.",
    )


# --------------------------------------------------------------------------------------------------------------------
# Components


def synth_tokenizer(words: list[str] | None = None, max_length: int = 32):
    """A word-level tokenizer over `words` (default: the synthetic prompts' vocabulary) with CLIP's special tokens:
    `<|startoftext|> words <|endoftext|>`, padded with `<|pad|>`; lower-cased, split on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from rahf.data.synth_scenes import prompt_vocabulary

    words = sorted(set(words if words is not None else prompt_vocabulary()))
    vocab = {PAD: 0, UNK: 1, BOS: 2, EOS: 3, **{w: 4 + i for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length,
    )  # fmt: skip


def build_generator_components(args: GeneratorTrainingArguments) -> dict[str, Any]:
    """The untrained autoencoder, UNet, text encoder, tokenizer and noise schedule that `args` describe."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = synth_tokenizer(max_length=args.max_prompt_length)
    groups = min(8, *args.vae_channels)
    vae = AutoencoderKL(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(args.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(args.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(args.vae_channels),
        latent_channels=args.latent_channels,
        layers_per_block=1,
        norm_num_groups=groups,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.text_hidden_size,
            intermediate_size=4 * args.text_hidden_size,
            num_hidden_layers=args.text_layers,
            num_attention_heads=max(1, args.text_hidden_size // 32),
            max_position_embeddings=args.max_prompt_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n = len(args.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=args.resolution // 2 ** (len(args.vae_channels) - 1),
        in_channels=args.latent_channels,
        out_channels=args.latent_channels,
        block_out_channels=tuple(args.unet_channels),
        layers_per_block=args.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=args.text_hidden_size,
        attention_head_dim=args.attention_head_dim,
        norm_num_groups=min(16, *args.unet_channels),
    )
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
        clip_sample=False,
    )  # fmt: skip
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "noise_scheduler": noise_scheduler}  # fmt: skip


def build_generator_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler):
    """A `StableDiffusionPipeline` of the components, sampling with DDIM (which rahf's guidance supports)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------------------------
# Data


class ImagePromptDataset(Dataset):
    """Rows of a canonical split -> `pixel_values` (3, R, R) in [-1, 1], `input_ids` and the row `index`."""

    def __init__(self, split, tokenizer, resolution: int):
        self.split, self.tokenizer, self.resolution = split, tokenizer, resolution

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        row = self.split[int(index)]
        image = row["image"].convert("RGB")
        if image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        ids = self.tokenizer(row["prompt"], padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids, "index": torch.tensor(int(index))}


def _collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


# --------------------------------------------------------------------------------------------------------------------
# Training


def _latents(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixel_values).latent_dist.mean


class AutoencoderLoss(torch.nn.Module):
    """The autoencoder stage's loss as one module, so that DDP (which syncs gradients through `forward`) wraps it:
    L1 + L2 reconstruction of a posterior sample, plus `kl_weight` x KL to the unit Gaussian."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(pixel_values).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return (
            F.l1_loss(recon, pixel_values) + F.mse_loss(recon, pixel_values) + self.kl_weight * posterior.kl().mean()
        )


class DenoiserLoss(torch.nn.Module):
    """The UNet stage's loss as one module over the UNet and the text encoder (trained together): noise-prediction
    MSE per image, weighted by min-SNR when `snr_gamma` is set."""

    def __init__(self, unet, text_encoder, noise_scheduler, snr_gamma: float | None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.noise_scheduler, self.snr_gamma = noise_scheduler, snr_gamma

    def forward(self, latents, input_ids, noise, timesteps) -> torch.Tensor:
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = self.text_encoder(input_ids, return_dict=False)[0]
        pred = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        per_image = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma:
            per_image = per_image * _min_snr_weights(self.noise_scheduler, timesteps, self.snr_gamma)
        return per_image.mean()


@torch.no_grad()
def _encode_split(vae, dataset: ImagePromptDataset, device, batch_size: int = 64) -> torch.Tensor:
    """Latent means (N, C, h, w) of every training image, on the CPU: the UNet stage reads these, not pixels."""
    out = []
    was_training = vae.training
    vae.eval()
    for start in range(0, len(dataset), batch_size):
        batch = _collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        out.append(_latents(vae, batch["pixel_values"].to(device)).float().cpu())
    vae.train(was_training)
    return torch.cat(out)


def _min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    return torch.minimum(snr, torch.full_like(snr, gamma)) / snr  # epsilon prediction


@torch.no_grad()
def write_validation_grid(pipe, prompts: list[str], path: Path, args: GeneratorTrainingArguments, seeds=(0, 1, 2, 3)):
    """A picture: one row per prompt (written above it), one column per seed."""
    from rahf.viz import image_rows

    rows = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(int(seed))
            image = pipe(prompt, num_inference_steps=args.validation_inference_steps,
                         guidance_scale=args.guidance_scale, generator=generator, height=args.resolution,
                         width=args.resolution).images[0]  # fmt: skip
            row.append(image.resize((128, 128)))
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_rows(rows, prompts, column_titles=[f"seed {s}" for s in seeds]).save(path)
    return path


def train_generator(args: GeneratorTrainingArguments) -> dict[str, Any]:
    """Runs one generator training job on this process (one of many under `accelerate launch`); returns a summary
    (`global_step`, `final_dir`, `train_seconds`)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from rahf.data.schema import load_rich_feedback

    if not args.data_dir:
        raise ValueError("pass `--data_dir` (a canonical data set folder, e.g. from `rahf data synth --out DIR`)")
    output_dir = Path(args.output_dir)
    logging_dir = output_dir / args.logging_dir
    state = PartialState(cpu=uses_cpu_processes())
    if not state.is_local_main_process:
        logger.setLevel(logging.WARNING)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision, cpu_bf16_ok=True),
        log_with=build_trackers(args.report_to, logging_dir, TRAIN_LOG_NAME) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir),
                                            automatic_checkpoint_naming=False),
        cpu=state.device.type == "cpu",
    )  # fmt: skip

    # 1. Data and models (the same initial weights on every process).
    data = load_rich_feedback(args.data_dir)
    if args.train_split not in data or len(data[args.train_split]) == 0:
        raise ValueError(f"`train_split` {args.train_split!r} is missing or empty in {args.data_dir!r}")
    split = data[args.train_split]
    if args.max_train_samples:
        split = split.select(range(min(args.max_train_samples, len(split))))
    validation_source = data["validation"] if "validation" in data and len(data["validation"]) else split
    validation_prompts = list(dict.fromkeys(validation_source["prompt"]))[: args.num_validation_prompts]
    set_seed(args.seed)
    parts = build_generator_components(args)
    vae, unet, text_encoder, tokenizer = parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"]
    noise_scheduler = parts["noise_scheduler"]
    dataset = ImagePromptDataset(split, tokenizer, args.resolution)
    empty_ids = tokenizer("", padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
    ema = EMAModel(unet.parameters(), decay=args.ema_decay) if args.ema_decay else None

    vae_loss = AutoencoderLoss(vae, args.vae_kl_weight)
    denoiser_loss = DenoiserLoss(unet, text_encoder, noise_scheduler, args.snr_gamma)
    vae_optimizer = build_optimizer(vae.parameters(), learning_rate=args.vae_learning_rate,
                                    weight_decay=args.adam_weight_decay, decay_1d=False)  # fmt: skip
    unet_optimizer = build_optimizer(list(unet.parameters()) + list(text_encoder.parameters()),
                                     learning_rate=args.learning_rate, weight_decay=args.adam_weight_decay,
                                     decay_1d=False)  # fmt: skip
    schedules = []
    for optimizer, steps, lr in ((vae_optimizer, args.vae_steps, args.vae_learning_rate),
                                 (unet_optimizer, args.unet_steps, args.learning_rate)):  # fmt: skip
        schedules.append(build_lr_scheduler(optimizer, args.lr_scheduler, min(args.lr_warmup_steps, steps),
                                            max(1, steps), lr_end=args.lr_end_ratio * lr,
                                            num_processes=accelerator.num_processes))  # fmt: skip
    vae_sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    vae_loader = DataLoader(dataset, batch_size=args.vae_batch_size, sampler=vae_sampler, collate_fn=_collate,
                            num_workers=args.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    vae_loss, denoiser_loss, vae_optimizer, unet_optimizer, vae_loader, vae_schedule, unet_schedule = (
        accelerator.prepare(vae_loss, denoiser_loss, vae_optimizer, unet_optimizer, vae_loader, *schedules)
    )
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))

    # 2. Resume: every model, optimizer, schedule, the EMA and the RNG states; the data position from the step.
    global_step = 0
    resume_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
        accelerator.load_state(str(resume_from))
        global_step = checkpoint_step(resume_from)
    else:
        set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process:
        truncate_log(logging_dir / TRAIN_LOG_NAME, global_step)
        accelerator.init_trackers("rahf-generator", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                            for k, v in args.to_dict().items()})  # fmt: skip
    total_steps = args.vae_steps + args.unet_steps
    guard = NonFiniteGuard(accelerator.device, start_step=global_step)
    raw = {"vae": vae, "unet": unet, "text": text_encoder}  # the modules themselves, inside the prepared losses

    def pipeline(use_ema: bool = True):
        unet_module = raw["unet"]
        if use_ema and ema is not None:
            from copy import deepcopy

            unet_module = deepcopy(raw["unet"])
            ema.copy_to(unet_module.parameters())
        return build_generator_pipeline(raw["vae"], raw["text"], tokenizer, unet_module, noise_scheduler)

    def validate(step: int) -> None:
        if accelerator.is_main_process and validation_prompts:
            devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                pipe = pipeline()
                for module in (pipe.vae, pipe.unet, pipe.text_encoder):
                    module.eval()
                path = write_validation_grid(pipe, validation_prompts, output_dir / "validation" / f"step-{step:06d}.png",
                                             args)  # fmt: skip
                for module in (raw["vae"], raw["unet"], raw["text"]):
                    module.train()  # the EMA copy was evaluated; the trained modules go on training
            logger.info("step %d: validation grid %s", step, path)
        accelerator.wait_for_everyone()

    progress = tqdm(range(total_steps), initial=global_step, desc="generator", unit="step",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    start_time = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    latents_cache: torch.Tensor | None = None
    vae_loss.train()
    denoiser_loss.train()

    def after_step(step: int, stage: str, loss: torch.Tensor, grad_norm) -> None:
        guard.end_step(grad_norm if accelerator.mixed_precision != "fp16" else None)
        guard.check_learning_rate((vae_schedule if stage == "vae" else unet_schedule).get_last_lr()[0], step)
        progress.update(1)
        if step % args.logging_steps == 0 or step == total_steps:
            guard.check(accelerator, f"at the log of step {step}")
            totals = accelerator.reduce(sums.clone(), reduction="sum").cpu()
            record = {
                f"{stage}_loss": float(totals[0] / max(totals[1], 1.0)),
                "lr": (vae_schedule if stage == "vae" else unet_schedule).get_last_lr()[0],
                "stage": stage,
            }
            accelerator.log(record, step=step)
            progress.set_postfix(stage=stage, loss=f"{record[f'{stage}_loss']:.4f}")
            sums.zero_()
        if args.validation_steps and step % args.validation_steps == 0 and stage == "unet":
            validate(step)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            guard.check(accelerator, f"before saving checkpoint-{step}")
            save_checkpoint(accelerator, output_dir, step, {"stage": stage}, total_limit=args.checkpoints_total_limit)

    # 3. The autoencoder stage.
    steps_per_epoch = len(vae_loader)
    while global_step < args.vae_steps:
        epoch, skip = divmod(global_step, steps_per_epoch)
        vae_sampler.set_epoch(epoch)
        vae_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(vae_loader, skip) if skip else vae_loader
        for batch in loader:
            loss = vae_loss(batch["pixel_values"])
            guard.observe(loss)
            accelerator.backward(loss)
            grad_norm = (
                accelerator.clip_grad_norm_(vae_loss.parameters(), args.max_grad_norm) if args.max_grad_norm else None
            )
            vae_optimizer.step()
            vae_schedule.step()
            vae_optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach().double(), loss.new_tensor(1.0, dtype=torch.float64)])
            global_step += 1
            after_step(global_step, "vae", loss, grad_norm)
            if global_step >= args.vae_steps:
                break

    # 4. The UNet + text encoder stage, on cached latents of the trained autoencoder.
    if args.unet_steps and global_step < total_steps:
        raw["vae"].requires_grad_(False)
        latents_cache = _encode_split(raw["vae"], dataset, accelerator.device)
        scale = float(1.0 / latents_cache.std())
        raw["vae"].register_to_config(scaling_factor=scale)
        logger.info("latent cache %s, scaling factor %.4f", tuple(latents_cache.shape), scale)
        ids_cache = torch.stack([dataset.tokenizer(p, padding="max_length", truncation=True,
                                                   return_tensors="pt").input_ids[0] for p in split["prompt"]])  # fmt: skip
        index_sampler = EpochShuffleSampler(len(dataset), seed=args.seed + 1)
        per_process = args.train_batch_size
        world, rank = accelerator.num_processes, accelerator.process_index
        batches_per_epoch = len(dataset) // (per_process * world)
        if batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} training images are fewer than one batch of {per_process * world}")
        while global_step < total_steps:
            stage_step = global_step - args.vae_steps
            epoch, skip = divmod(stage_step, batches_per_epoch)
            index_sampler.set_epoch(epoch)
            order = list(index_sampler)
            for b in range(skip, batches_per_epoch):
                # Each process takes its slice of the global batch: the data order does not depend on the process count
                # beyond that slicing, and a resumed run starts at the right batch.
                chunk = order[(b * world + rank) * per_process : (b * world + rank + 1) * per_process]
                idx = torch.tensor(chunk)
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, global_step, rank])
                                                        .generate_state(1)[0]))  # fmt: skip
                latents = (latents_cache[idx] * scale).to(accelerator.device)
                ids = ids_cache[idx].clone()
                drop = torch.rand(len(chunk), generator=gen) < args.prompt_dropout
                ids[drop] = empty_ids
                noise = torch.randn(latents.shape, generator=gen).to(accelerator.device)
                timesteps = torch.randint(0, args.num_train_timesteps, (len(chunk),), generator=gen).to(
                    accelerator.device
                )
                with accelerator.autocast():
                    loss = denoiser_loss(latents, ids.to(accelerator.device), noise, timesteps)
                guard.observe(loss)
                accelerator.backward(loss)
                grad_norm = (
                    accelerator.clip_grad_norm_(denoiser_loss.parameters(), args.max_grad_norm)
                    if args.max_grad_norm
                    else None
                )
                unet_optimizer.step()
                unet_schedule.step()
                unet_optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(raw["unet"].parameters())
                sums += torch.stack([loss.detach().double(), loss.new_tensor(1.0, dtype=torch.float64)])
                global_step += 1
                after_step(global_step, "unet", loss, grad_norm)
                if global_step >= total_steps:
                    break
    progress.close()

    # 5. The final pipeline (with the EMA weights), never a non-finite one.
    guard.check(accelerator, "at the end of training")
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        pipe = pipeline()
        for module in (pipe.vae, pipe.unet, pipe.text_encoder):
            check_finite_parameters(module, str(final_dir))
        if latents_cache is None:  # an autoencoder-only run still records its latent scale
            cache = _encode_split(raw["vae"], dataset, accelerator.device)
            pipe.vae.register_to_config(scaling_factor=float(1.0 / cache.std()))
        with atomic_directory(final_dir) as tmp:
            pipe.save_pretrained(tmp)
            summary = {"global_step": global_step, "train_seconds": time.perf_counter() - start_time,
                       "num_train_images": len(dataset), "args": args.to_dict()}  # fmt: skip
            (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            # What it trained on, so that held-out prompts can be drawn apart from it (`rahf efficacy`).
            prompts = sorted(set(split["prompt"]))
            (tmp / "training_prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        if validation_prompts:
            write_validation_grid(pipe, validation_prompts, output_dir / "validation" / "final.png", args)
        logger.info("saved the generator to %s (%d steps)", final_dir, global_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "final_dir": str(final_dir), "train_seconds": time.perf_counter() - start_time}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m rahf.improve.train_generator` / `accelerate launch -m rahf.improve.train_generator`."""
    from rahf.training_utils import NonFiniteTrainingError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_generator(parse_generator_args(argv))
    except NonFiniteTrainingError as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
