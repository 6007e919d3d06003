"""`accelerate launch -m rahf.improve.finetune`: LoRA fine-tuning of a text-to-image generator on an image folder (e.g. the
best-of-N kept set), the paper's §5 "fine-tune on what RAHF kept", with accelerate.

Stable Diffusion 1.x / 2.x and SDXL (LoRA on the UNet's attention projections, the noise-prediction loss of diffusers'
`train_text_to_image_lora.py` / `train_text_to_image_lora_sdxl.py`, SDXL with both text encoders and its size and
crop conditioning), SD3 / SD3.5 and FLUX.1 (LoRA on the transformer, the flow-matching loss and timestep sampling of
`train_dreambooth_lora_sd3.py` / `train_dreambooth_lora_flux.py`) and aMUSEd (LoRA on the `UVit2DModel`, the
masked-token loss of `train_amused.py`); the losses are in `rahf.improve.denoising_losses`. Flags are named as in
those scripts. Optional reward-weighted loss from the `reward`
column that `rahf.improve.best_of_n` records; validation images scored by RAHF at intervals; `checkpoint-{step}/` folders
whose save/load hooks write and *restore* the LoRA (`pytorch_lora_weights.safetensors`); the final LoRA in
`output_dir/pytorch_lora_weights.safetensors`, written by the family's `save_lora_weights`, which the family's
`pipe.load_lora_weights(output_dir)` reads.

Examples:

```bash
accelerate launch -m rahf.improve.finetune --config configs/improve/finetune_lora.yaml
accelerate launch --multi_gpu --num_processes 4 -m rahf.improve.finetune --config configs/improve/finetune_lora.yaml \\
    --train_data_dir runs/bon/kept --reward_weighted --resume_from_checkpoint latest
```

```python
>>> from diffusers import FluxPipeline
>>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
>>> pipe.load_lora_weights("runs/lora")  # output_dir of the job
```
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rahf.constants import SCORE_NAMES
from rahf.fileio import append_jsonl
from rahf.job_args import check_finite_numbers, check_int_fields, parse_job_args, uses_cpu_processes
from rahf.precision import MIXED_PRECISIONS, resolve_mixed_precision, torch_dtype
from rahf.reward import load_reward, score_table
from rahf.training_utils import (
    DIFFUSERS_LR_SCHEDULES,
    EpochShuffleSampler,
    NonFiniteGuard,
    build_lr_scheduler,
    build_optimizer,
    build_trackers,
    check_finite_parameters,
    checkpoint_step,
    resolve_resume_checkpoint,
    save_checkpoint,
)

from .denoising_losses import (
    FLOW_WEIGHTING_SCHEMES,
    LORA_TARGET_MODULES,
    denoising_loss,
    encode_batch,
    training_noise_scheduler,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_WEIGHT_NAME",
    "LoRAFineTuneArguments",
    "get_lora_state_dict",
    "load_lora_into_pipeline",
    "lora_checksum",
    "main",
    "parse_finetune_args",
    "restore_lora",
    "save_lora",
    "train_lora",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LR_SCHEDULERS = tuple(DIFFUSERS_LR_SCHEDULES)
DEFAULT_TARGET_MODULES = LORA_TARGET_MODULES["sd"]


@dataclass
class LoRAFineTuneArguments:
    """Everything `rahf.improve.finetune` needs; flag names follow diffusers' `train_text_to_image_lora.py`.

    Examples:

    ```python
    >>> args = LoRAFineTuneArguments(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
    ...                              train_data_dir="runs/bon/kept", max_train_steps=1000, output_dir="runs/lora")
    >>> summary = train_lora(args)  # runs/lora/pytorch_lora_weights.safetensors
    ```
    """

    config: str | None = field(
        default=None, metadata={"help": "YAML file of arguments (keys = flag names); flags on the command line win"}
    )
    # ---- model and data
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "a text-to-image pipeline (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, aMUSEd): hub id or folder"},
    )
    revision: str | None = field(default=None, metadata={"help": "hub revision of the pipeline"})
    variant: str | None = field(default=None, metadata={"help": "weights variant of the pipeline, e.g. fp16"})
    train_data_dir: str | None = field(
        default=None, metadata={"help": "an image folder with metadata.jsonl (e.g. best-of-N's OUT/kept)"}
    )
    image_column: str = field(default="image", metadata={"help": "the image column of the data set"})
    caption_column: str = field(default="prompt", metadata={"help": "the caption column (falls back to `text`)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N images"})
    resolution: int = field(default=512, metadata={"help": "training images are resized and cropped to this square"})
    center_crop: bool = field(default=False, metadata={"help": "center crop (default: random crop)"})
    random_flip: bool = field(default=False, metadata={"help": "random horizontal flips"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading worker processes (0: main)"})
    # ---- LoRA
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank, scale 1)"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "module names that get LoRA (default: the family's script's: to_k to_q to_v to_out.0 for the "
            "UNets; the attention projections for SD3, and the feed-forwards too for FLUX)"
        },
    )
    # ---- schedule and optimizer
    train_batch_size: int = field(default=4, metadata={"help": "images per device per micro-batch"})
    num_train_epochs: int = field(default=1, metadata={"help": "epochs (ignored when max_train_steps is set)"})
    max_train_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    scale_lr: bool = field(default=False, metadata={"help": "multiply the lr by batch x accumulation x processes"})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "diffusers' get_scheduler names", "choices": list(LR_SCHEDULERS)}
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (optimizer steps)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (pip install bitsandbytes)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: none)"})
    noise_offset: float = field(default=0.0, metadata={"help": "SD: offset noise scale (0: off)"})
    prediction_type: str | None = field(
        default=None, metadata={"help": "SD: epsilon or v_prediction (default: the scheduler's)"}
    )
    min_masking_rate: float = field(default=0.0, metadata={"help": "aMUSEd: lowest fraction of tokens masked"})
    weighting_scheme: str | None = field(
        default=None,
        metadata={
            "help": "SD3 / FLUX: timestep density and loss weighting (default: logit_normal for SD3, none for FLUX, "
            "as their scripts)",
            "choices": list(FLOW_WEIGHTING_SCHEMES),
        },
    )
    logit_mean: float = field(default=0.0, metadata={"help": "SD3 / FLUX: mean of the logit_normal scheme"})
    logit_std: float = field(default=1.0, metadata={"help": "SD3 / FLUX: std of the logit_normal scheme"})
    mode_scale: float = field(default=1.29, metadata={"help": "SD3 / FLUX: scale of the mode scheme"})
    precondition_outputs: bool = field(
        default=False,
        metadata={
            "help": "SD3 / FLUX: EDM preconditioning (the prediction turned into x0, target x0) instead of the "
            "velocity target noise - x0 (train_dreambooth_lora_sd3.py's default is on)"
        },
    )
    guidance_scale: float = field(
        default=3.5, metadata={"help": "FLUX with guidance_embeds (FLUX.1 dev): the guidance it is trained at"}
    )
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "SD3 / FLUX: T5 tokens of a caption (default: 77 for SD3, 512 for FLUX)"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute the denoiser's activations in the backward pass (less memory)"}
    )
    offload: bool = field(
        default=False,
        metadata={
            "help": "keep the text encoders and the VAE on the CPU, moved to the device only to encode a batch or "
            "validate (saves their memory, e.g. FLUX's T5, at a transfer per step)"
        },
    )
    # ---- reward
    reward_model: str | None = field(
        default=None, metadata={"help": "a RAHF model folder: validation images are scored with it"}
    )
    reward: str = field(default="overall", metadata={"help": "the validation reward: a name or 'a=0.5,b=0.5'"})
    reward_weighted: bool = field(
        default=False,
        metadata={"help": "weight each image's loss by its recorded reward (column --reward_column) / the mean"},
    )
    reward_column: str = field(default="reward", metadata={"help": "the metadata column --reward_weighted reads"})
    # ---- precision, reproducibility, outputs
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "auto (bf16/fp16 on a GPU, float32 on a CPU), no, fp16 or bf16; default: what `accelerate "
            "launch` says, else no",
            "choices": list(MIXED_PRECISIONS),
        },
    )
    allow_tf32: bool = field(default=False, metadata={"help": "TF32 matmuls on Ampere+ GPUs"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA init, data order, noise and validation"})
    output_dir: str = field(default="lora-output", metadata={"help": "checkpoints, logs, validation, final LoRA"})
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
    # ---- validation
    validation_prompts: list[str] | None = field(default=None, metadata={"help": "prompts generated at validation"})
    num_validation_images: int = field(default=1, metadata={"help": "images per validation prompt"})
    validation_steps: int | None = field(
        default=None, metadata={"help": "validate every N steps (always before training and at the end)"}
    )
    validation_num_inference_steps: int = field(default=30, metadata={"help": "denoising steps at validation"})
    validation_guidance_scale: float | None = field(default=None, metadata={"help": "guidance at validation"})
    validation_resolution: int | None = field(default=None, metadata={"help": "validation size (default: resolution)"})
    debug_check_sync: bool = field(
        default=False,
        metadata={"help": "each process writes a checksum of its LoRA after each step (output_dir/debug_sync)"},
    )

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        check_int_fields(
            self,
            positive=(
                "train_batch_size",
                "num_train_epochs",
                "gradient_accumulation_steps",
                "rank",
                "logging_steps",
                "num_validation_images",
                "validation_num_inference_steps",
                "resolution",
            ),
            positive_or_unset=(
                "max_train_steps",
                "validation_steps",
                "checkpoints_total_limit",
                "max_train_samples",
                "lora_alpha",
                "validation_resolution",
                "max_sequence_length",
            ),
            non_negative=("checkpointing_steps", "lr_warmup_steps", "dataloader_num_workers"),
        )
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
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"`prediction_type` must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.weighting_scheme is not None and self.weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            raise ValueError(
                f"`weighting_scheme` must be one of {list(FLOW_WEIGHTING_SCHEMES)}, got {self.weighting_scheme!r}"
            )
        if not 0.0 <= self.min_masking_rate <= 1.0:
            raise ValueError(f"`min_masking_rate` must lie in [0, 1], got {self.min_masking_rate!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_finetune_args(argv: list[str] | None = None) -> LoRAFineTuneArguments:
    """`--config file.yaml` gives the defaults, the other flags override them.

    Examples:

    ```python
    >>> args = parse_finetune_args(["--config", "configs/improve/finetune_lora.yaml", "--max_train_steps", "10"])
    ```
    """
    return parse_job_args(
        LoRAFineTuneArguments,
        argv,
        prog="accelerate launch -m rahf.improve.finetune",
        description="LoRA fine-tuning of a text-to-image generator on an image folder.",
    )


# --------------------------------------------------------------------------------------------------------------------
# LoRA: add, save, restore, load into a pipeline


def _generator_kind(pipe, argument: str = "pretrained_model_name_or_path") -> str:
    """The generator family of a text-to-image pipeline: "sd", "sdxl", "sd3", "flux" or "amused" (an inpainting or
    image-conditioned denoiser, or an unsupported pipeline, is refused with a `ValueError` naming `argument`)."""
    from .best_of_n import text_to_image_family

    return text_to_image_family(pipe, argument)


def _denoiser(pipe, kind: str) -> torch.nn.Module:
    return pipe.unet if kind in ("sd", "sdxl") else pipe.transformer


def _prefix(kind: str) -> str:
    return "unet" if kind in ("sd", "sdxl") else "transformer"


def get_lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of `denoiser`'s "default" adapter, in peft naming (`...to_q.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name="default")


def lora_checksum(denoiser_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 over the LoRA tensors (names and float32 bytes, in name order): equal means bit-identical LoRA."""
    state = denoiser_or_state if isinstance(denoiser_or_state, dict) else get_lora_state_dict(denoiser_or_state)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_lora(denoiser: torch.nn.Module, kind: str, directory: str | Path, is_main_process: bool = True) -> Path:
    """Writes `directory/pytorch_lora_weights.safetensors` as diffusers' LoRA scripts do (the format that the family's
    `pipe.load_lora_weights` reads), with the adapter's `LoraConfig` as metadata: `StableDiffusionPipeline` /
    `StableDiffusionXLPipeline.save_lora_weights` (UNet LoRA in diffusers naming, as their scripts convert it),
    `StableDiffusion3Pipeline` / `FluxPipeline.save_lora_weights` (transformer LoRA in peft naming) and
    `AmusedLoraLoaderMixin.save_lora_weights`. The file is written beside its place and renamed into it, so a kill
    never leaves a torn LoRA file."""
    import diffusers
    from diffusers.loaders import AmusedLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers

    target = Path(directory) / LORA_WEIGHT_NAME
    if not is_main_process:
        return target
    if kind not in _LORA_SAVERS:
        raise ValueError(f"`kind` must be one of {sorted(_LORA_SAVERS)}, got {kind!r}")
    layers = get_lora_state_dict(denoiser)
    scratch = Path(directory) / ".tmp-lora"
    if scratch.exists():
        shutil.rmtree(scratch)  # left by a killed run
    scratch.mkdir(parents=True)
    if kind == "amused":
        AmusedLoraLoaderMixin.save_lora_weights(str(scratch), transformer_lora_layers=layers, safe_serialization=True)
    else:
        saver = getattr(diffusers, _LORA_SAVERS[kind]).save_lora_weights
        component = _prefix(kind)
        kwargs: dict[str, Any] = {
            f"{component}_lora_layers": convert_state_dict_to_diffusers(layers) if component == "unet" else layers
        }
        if f"{component}_lora_adapter_metadata" in inspect.signature(saver).parameters:
            kwargs[f"{component}_lora_adapter_metadata"] = denoiser.peft_config["default"].to_dict()
        saver(save_directory=str(scratch), safe_serialization=True, **kwargs)
    with open(scratch / LORA_WEIGHT_NAME, "rb") as f:
        os.fsync(f.fileno())
    os.replace(scratch / LORA_WEIGHT_NAME, target)
    shutil.rmtree(scratch)
    return target


# The pipeline class whose `save_lora_weights` writes each family's file (aMUSEd: AmusedLoraLoaderMixin's).
_LORA_SAVERS = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "amused": "AmusedLoraLoaderMixin",
}


def restore_lora(denoiser: torch.nn.Module, kind: str, directory: str | Path) -> None:
    """Loads `directory/pytorch_lora_weights.safetensors` into the "default" adapter already on `denoiser`.

    Every LoRA tensor of the adapter must come from the file and every tensor of the file must land: anything else
    is an error, never a silent partial restore (a resumed run would otherwise train on from a fresh LoRA).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise ValueError(
            f"{str(directory)!r} has no {LORA_WEIGHT_NAME}; pass a checkpoint written by rahf.improve.finetune"
        )
    prefix = _prefix(kind) + "."
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no `{prefix}*` LoRA tensors for this {kind} pipeline")
    state = convert_unet_state_dict_to_peft(state)
    expected = set(get_lora_state_dict(denoiser))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RuntimeError(
            f"{path} does not match the adapter: {len(missing)} LoRA tensor(s) missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]}); were --rank / --lora_target_modules changed?"
        )
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise RuntimeError(f"restoring {path}: unexpected keys {unexpected[:3]}")


def load_lora_into_pipeline(pipe, lora_dir: str | Path, adapter_name: str | None = None):
    """`pipe.load_lora_weights(lora_dir)`, or, for pipelines without the LoRA mixin (aMUSEd in recent diffusers), the
    same file loaded into the transformer with `load_lora_adapter`. Returns `pipe`."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(lora_dir), adapter_name=adapter_name)
        return pipe
    kind = _generator_kind(pipe)
    denoiser = _denoiser(pipe, kind)
    denoiser.load_lora_adapter(
        str(lora_dir), prefix=_prefix(kind), adapter_name=adapter_name, weight_name=LORA_WEIGHT_NAME
    )
    return pipe


# --------------------------------------------------------------------------------------------------------------------
# Data


class ImageCaptionDataset(Dataset):
    """Image folder rows -> `pixel_values` (3, R, R), `input_ids`, the `caption`, a loss `weight`, and SDXL's
    `original_size` (height, width) and `crop_top_left` (top, left) of the crop in the resized image.

    Crops and flips are drawn from a generator seeded by (seed, epoch, index), so they do not depend on the process,
    the worker or what else drew random numbers (a resumed run sees the same crops).

    Examples:

    ```python
    >>> rows = datasets.load_dataset("imagefolder", data_dir="runs/bon/kept", split="train")
    >>> data = ImageCaptionDataset(rows, pipe.tokenizer, 512, center_crop=True, random_flip=False, normalize=True,
    ...                            image_column="image", caption_column="prompt", weights=None, seed=0)
    >>> data[0]["pixel_values"].shape  # torch.Size([3, 512, 512]), in [-1, 1]
    ```
    """

    def __init__(
        self,
        rows,
        tokenizer,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        normalize: bool,
        image_column: str,
        caption_column: str,
        weights: list[float] | None,
        seed: int,
    ):
        self.rows, self.tokenizer = rows, tokenizer
        self.resolution, self.center_crop, self.random_flip, self.normalize = (
            resolution,
            center_crop,
            random_flip,
            normalize,
        )
        self.image_column, self.caption_column = image_column, caption_column
        self.weights, self.seed, self.epoch = weights, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def _pixels(self, image: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        r = self.resolution
        image = image.convert("RGB")
        scale = r / min(image.size)
        image = image.resize(
            (max(r, round(image.width * scale)), max(r, round(image.height * scale))), Image.Resampling.BILINEAR
        )
        if self.center_crop:
            left, top = (image.width - r) // 2, (image.height - r) // 2
        else:
            left, top = int(rng.integers(0, image.width - r + 1)), int(rng.integers(0, image.height - r + 1))
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, R, R) in [0, 1]
        return (x * 2.0 - 1.0 if self.normalize else x), (top, left)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        caption = row[self.caption_column]
        if isinstance(caption, (list, tuple)):
            caption = caption[int(rng.integers(0, len(caption)))]
        input_ids = self.tokenizer(
            caption,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        weight = 1.0 if self.weights is None else self.weights[index]
        image = row[self.image_column]
        pixel_values, crop_top_left = self._pixels(image, rng)
        return {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "caption": caption,
            "original_size": torch.tensor([image.height, image.width]),
            "crop_top_left": torch.tensor(crop_top_left),
            "weight": torch.tensor(weight, dtype=torch.float32),
            "index": torch.tensor(index),
        }


_TENSOR_KEYS = ("pixel_values", "input_ids", "original_size", "crop_top_left", "weight", "index")


def _collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {k: torch.stack([e[k] for e in examples]) for k in _TENSOR_KEYS}
    batch["caption"] = [e["caption"] for e in examples]
    return batch


def _load_rows(args: LoRAFineTuneArguments):
    from datasets import load_dataset

    if not args.train_data_dir or not Path(args.train_data_dir).is_dir():
        raise ValueError(
            f"`train_data_dir` {args.train_data_dir!r} is not a folder; pass an image folder with "
            "metadata.jsonl, e.g. the kept/ folder of `rahf best-of-n`"
        )
    image_suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    if not any(p.suffix.lower() in image_suffixes for p in Path(args.train_data_dir).rglob("*")):
        raise ValueError(
            f"`train_data_dir` {args.train_data_dir!r} holds no images (did best-of-N keep none? lower "
            "its --threshold)"
        )
    rows = load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
    if len(rows) == 0:
        raise ValueError(f"`train_data_dir` {args.train_data_dir!r} holds no images")
    columns = rows.column_names
    if args.image_column not in columns:
        raise ValueError(f"`image_column` {args.image_column!r} is not a column of {args.train_data_dir!r}: {columns}")
    if args.caption_column not in columns:
        if "text" in columns:
            args.caption_column = "text"
        else:
            raise ValueError(
                f"`caption_column` {args.caption_column!r} is not a column of {args.train_data_dir!r} "
                f"({columns}); write a metadata.jsonl with it"
            )
    if args.max_train_samples:
        rows = rows.select(range(min(args.max_train_samples, len(rows))))
    weights = None
    if args.reward_weighted:
        if args.reward_column not in columns:
            raise ValueError(
                f"`reward_weighted` needs a `{args.reward_column}` column in {args.train_data_dir!r} "
                f"(columns: {columns}); set --reward_column or write it with `rahf best-of-n`"
            )
        rewards = np.asarray(rows[args.reward_column], dtype=np.float64)
        if (rewards < 0).any() or rewards.mean() <= 0:
            raise ValueError(
                f"`reward_weighted` needs non-negative rewards with a positive mean in column "
                f"{args.reward_column!r}, got min {rewards.min():.4g}; use a reward in [0, 1] "
                "(e.g. overall) for the best-of-N run"
            )
        weights = (rewards / rewards.mean()).tolist()  # mean weight 1: the learning rate keeps its meaning
    return rows, weights


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints, logs


# --------------------------------------------------------------------------------------------------------------------
# Encoding on the device (--offload)


def _frozen_modules(pipe, kind: str) -> list[torch.nn.Module]:
    """The pipeline's modules besides the denoiser (text encoders, VAE / VQ-VAE): frozen, used only to encode."""
    denoiser = _denoiser(pipe, kind)
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module) and m is not denoiser]


@contextlib.contextmanager
def _frozen_on_device(pipe, kind: str, args, device: torch.device) -> Iterator[None]:
    """With `--offload`, the frozen modules on `device` inside the block and back on the CPU after it."""
    if not args.offload:
        yield
        return
    from diffusers.training_utils import offload_models

    with offload_models(*_frozen_modules(pipe, kind), device=device, offload=True):
        yield


# --------------------------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def _validate(pipe, kind, denoiser, args, reward_fn, step: int, output_dir: Path, accelerator) -> dict[str, float]:
    """Generates the validation prompts (fixed seeds), scores them, writes images and jsonl rows; main process only."""
    from .best_of_n import text_to_image_call_kwargs

    was_training = denoiser.training
    denoiser.eval()
    folder = output_dir / "validation" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    size = args.validation_resolution or args.resolution
    kwargs = text_to_image_call_kwargs(
        pipe,
        args.validation_num_inference_steps,
        height=size,
        width=size,
        guidance_scale=args.validation_guidance_scale,
        max_sequence_length=args.max_sequence_length,
    )

    rows = []
    devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
    gen_device = "cpu" if accelerator.device.type == "mps" else accelerator.device
    for p, prompt in enumerate(args.validation_prompts or []):
        seeds = [args.seed + 1000 * p + j for j in range(args.num_validation_images)]
        images = []
        # Training's RNG stream stays untouched; autocast only around the generator (the reward model runs in its
        # own precision, so that scores compare across runs).
        with (
            torch.random.fork_rng(devices=devices),
            accelerator.autocast(),
            _frozen_on_device(pipe, kind, args, accelerator.device),
        ):
            for seed in seeds:
                images += pipe(prompt, generator=torch.Generator(gen_device).manual_seed(seed), **kwargs).images
        scores, table = None, {}
        if reward_fn is not None:
            rewards, info = reward_fn(images, [prompt] * len(images), None)
            scores = [float(v) for v in torch.as_tensor(rewards).float().reshape(-1)]
            table = score_table(info, len(images))
        for j, (image, seed) in enumerate(zip(images, seeds)):
            name = f"{p:02d}-{j:02d}.png"
            image.save(folder / name)
            row = {
                "step": step,
                "prompt_index": p,
                "prompt": prompt,
                "image_index": j,
                "seed": seed,
                "file_name": f"validation/{folder.name}/{name}",
            }
            if scores is not None:
                row["reward"] = scores[j]
                row.update({k: v[j] for k, v in table.items()})
            rows.append(row)
    for row in rows:
        append_jsonl(output_dir / args.logging_dir / "validation_log.jsonl", row)
    metrics: dict[str, float] = {}
    if rows and "reward" in rows[0]:
        metrics["val/reward"] = float(np.mean([r["reward"] for r in rows]))
        for name in rows[0]:
            if name in SCORE_NAMES:
                metrics[f"val/{name}"] = float(np.mean([r[name] for r in rows]))
    if was_training:
        denoiser.train()
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# Training


def train_lora(args: LoRAFineTuneArguments, pipe=None) -> dict[str, Any]:
    """Runs one LoRA fine-tuning job on this process (one of many under `accelerate launch`); returns a summary
    (`global_step`, `lora_path`, last `validation` metrics, `resumed_from`).

    Args:
        pipe: a loaded pipeline to fine-tune in place, instead of loading `args.pretrained_model_name_or_path`.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from tqdm.auto import tqdm

    from .best_of_n import as_text_to_image_pipeline, load_text_to_image_pipeline

    output_dir = Path(args.output_dir)
    logging_dir = output_dir / args.logging_dir
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    PartialState(cpu=uses_cpu_processes())  # the process group first (gloo when there is no GPU)
    log_with = build_trackers(args.report_to, logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(logging_dir), automatic_checkpoint_naming=False
        ),
        cpu=uses_cpu_processes(),
    )
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = torch_dtype(accelerator.mixed_precision)

    # 1. The pipeline, frozen; a LoRA adapter on its denoiser (the same initial LoRA on every process).
    if pipe is None:
        pipe = load_text_to_image_pipeline(
            args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant
        )
    else:
        pipe = as_text_to_image_pipeline(pipe, "pipe")
    kind = _generator_kind(pipe)
    _check_family_args(pipe, kind, args)
    pipe.set_progress_bar_config(disable=True)
    denoiser = _denoiser(pipe, kind)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            device = "cpu" if args.offload and component is not denoiser else accelerator.device
            # SDXL's VAE overflows in fp16 (its config says force_upcast): it encodes in float32, as in the script.
            keep_fp32 = kind == "sdxl" and component is pipe.vae and getattr(pipe.vae.config, "force_upcast", False)
            # (a dtype argument, even float32, makes diffusers warn about modules it would keep in float32)
            component.to(device) if weight_dtype == torch.float32 or keep_fp32 else component.to(
                device, dtype=weight_dtype
            )
    set_seed(args.seed)
    denoiser.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha or args.rank,
            init_lora_weights="gaussian",
            target_modules=list(args.lora_target_modules or LORA_TARGET_MODULES[kind]),
        )
    )
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if accelerator.mixed_precision == "fp16":
        cast_training_params(denoiser, dtype=torch.float32)  # trainable LoRA in fp32, the frozen rest in fp16
    lora_params = [p for p in denoiser.parameters() if p.requires_grad]
    if not lora_params:
        raise ValueError(
            f"`lora_target_modules` {args.lora_target_modules!r} matched no module of the {kind} denoiser"
        )
    noise_scheduler = training_noise_scheduler(pipe, kind, args.prediction_type)

    # 2. Checkpoints hold the LoRA as pytorch_lora_weights.safetensors; loading puts exactly it back.
    def save_model_hook(models, weights, ckpt_dir):
        if accelerator.is_main_process:
            for model in models:
                save_lora(accelerator.unwrap_model(model), kind, ckpt_dir)
        weights.clear()  # accelerate need not write the whole frozen denoiser

    def load_model_hook(models, ckpt_dir):
        while models:
            restore_lora(accelerator.unwrap_model(models.pop()), kind, ckpt_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # 3. Data: same order on every process and after a resume.
    with accelerator.main_process_first():
        rows, weights = _load_rows(args)
    dataset = ImageCaptionDataset(
        rows,
        pipe.tokenizer,
        args.resolution,
        args.center_crop,
        args.random_flip,
        normalize=kind != "amused",
        image_column=args.image_column,
        caption_column=args.caption_column,
        weights=weights,
        seed=args.seed,
    )
    sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=_collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(
        lora_params,
        learning_rate=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        use_8bit_adam=args.use_8bit_adam,
    )
    denoiser_ddp, optimizer, dataloader = accelerator.prepare(denoiser, optimizer, dataloader)
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # accelerate steps a prepared scheduler once per process per optimizer step: count in those units.
    lr_scheduler = accelerator.prepare(
        build_lr_scheduler(
            optimizer,
            args.lr_scheduler,
            args.lr_warmup_steps,
            max_train_steps,
            num_processes=accelerator.num_processes,
            schedule_names=DIFFUSERS_LR_SCHEDULES,
        )
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
        accelerator.init_trackers(
            "rahf-lora",
            config={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in args.to_dict().items()},
        )
    reward_fn = None
    if args.reward_model and args.validation_prompts and accelerator.is_main_process:
        reward_fn = load_reward(args.reward, args.reward_model, device=accelerator.device)
    logger.info(
        "LoRA rank %d on the %s %s (%.3fM trainable parameters); %d images, %d steps of %d x %d process(es) "
        "x %d accumulation",
        args.rank,
        kind,
        type(denoiser).__name__,
        sum(p.numel() for p in lora_params) / 1e6,
        len(dataset),
        max_train_steps,
        args.train_batch_size,
        accelerator.num_processes,
        args.gradient_accumulation_steps,
    )

    # 4. Resume: LoRA (through the hook), optimizer, scheduler, RNG states; the data position from the step.
    global_step = 0
    resume_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
        accelerator.load_state(str(resume_from))
        global_step = checkpoint_step(resume_from)
    else:
        set_seed(args.seed, device_specific=True)  # each process its own noise; resumed runs restore theirs
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    sync_file = output_dir / "debug_sync" / f"rank{accelerator.process_index}.jsonl"
    if args.debug_check_sync:
        if resume_from is None and sync_file.exists():
            sync_file.unlink()
        if resume_from is not None:
            append_jsonl(
                sync_file,
                {
                    "step": global_step,
                    "event": "resumed",
                    "sha256": lora_checksum(accelerator.unwrap_model(denoiser_ddp)),
                },
            )
            if accelerator.is_main_process:  # the LoRA as restored, in the checkpoint's own format, for comparison
                save_lora(
                    accelerator.unwrap_model(denoiser_ddp),
                    kind,
                    output_dir / "debug_sync" / f"resumed-step-{global_step}",
                )

    guard = NonFiniteGuard(accelerator.device, start_step=global_step)

    def checkpoint(step: int) -> None:
        guard.check(accelerator, f"before saving checkpoint-{step}")
        save_checkpoint(accelerator, output_dir, step, total_limit=args.checkpoints_total_limit)

    def validate(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if args.validation_prompts and accelerator.is_main_process:
            start = time.perf_counter()
            metrics = _validate(
                pipe, kind, accelerator.unwrap_model(denoiser_ddp), args, reward_fn, step, output_dir, accelerator
            )
            if metrics:
                accelerator.log(metrics, step=step)
            logger.info("step %d validation (%.1fs): %s", step, time.perf_counter() - start, metrics or "images only")
        accelerator.wait_for_everyone()
        return metrics

    last_validation: dict[str, float] = {}
    if resume_from is None:
        last_validation = validate(0)  # the starting point, for comparison

    progress = tqdm(
        range(max_train_steps),
        initial=global_step,
        desc="LoRA",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    denoiser_ddp.train()
    # Summed on the device: a .item() per micro-batch would make the CPU wait for the GPU each time.
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    loss_count = 0
    step_indices: list[int] = []
    grad_norm = None
    start_time = time.perf_counter()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        loader = dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(denoiser_ddp):
                with _frozen_on_device(pipe, kind, args, accelerator.device):
                    encoded = encode_batch(batch, pipe, kind, args, weight_dtype, accelerator.device)
                per_image = denoising_loss(encoded, denoiser_ddp, kind, noise_scheduler, args)
                loss = (per_image * batch["weight"].to(per_image.device)).mean()
                guard.observe(loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double()
            loss_count += 1
            step_indices += batch["index"].tolist()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            guard.end_step(grad_norm if accelerator.mixed_precision != "fp16" else None)
            guard.check_learning_rate(lr_scheduler.get_last_lr()[0], global_step)
            progress.update(1)
            if args.debug_check_sync:
                append_jsonl(
                    sync_file,
                    {
                        "step": global_step,
                        "num_processes": accelerator.num_processes,
                        "sha256": lora_checksum(accelerator.unwrap_model(denoiser_ddp)),
                        "indices": step_indices,
                    },
                )
            step_indices = []
            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                guard.check(accelerator, f"at the log of step {global_step}")
                mean_loss = accelerator.reduce(
                    torch.stack([loss_sum, loss_sum.new_tensor(float(loss_count))]), reduction="sum"
                ).cpu()
                record = {
                    "loss": float(mean_loss[0] / max(mean_loss[1], 1.0)),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "epoch": epoch,
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                accelerator.log(record, step=global_step)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                loss_sum.zero_()
                loss_count = 0
            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                last_validation = validate(global_step)
            # Last: a checkpoint at step N implies that everything logged up to N is on disk.
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                checkpoint(global_step)
            if global_step >= max_train_steps:
                break
    progress.close()

    # 5. The final LoRA (never a non-finite one) and the last validation.
    guard.check(accelerator, "at the end of training")
    check_finite_parameters(accelerator.unwrap_model(denoiser_ddp), f"the LoRA in {output_dir}")
    accelerator.wait_for_everyone()
    lora_path = output_dir / LORA_WEIGHT_NAME
    if accelerator.is_main_process:
        save_lora(accelerator.unwrap_model(denoiser_ddp), kind, output_dir)
    last_validation = validate(global_step) or last_validation
    summary = {
        "global_step": global_step,
        "lora_path": str(lora_path),
        "kind": kind,
        "resumed_from": str(resume_from) if resume_from else None,
        "validation": last_validation,
        "train_seconds": time.perf_counter() - start_time,
        "num_train_images": len(dataset),
        "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
    }
    if accelerator.is_main_process:
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("saved the LoRA to %s (%d steps)", lora_path, global_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _check_family_args(pipe, kind: str, args: LoRAFineTuneArguments) -> None:
    """Settings the family cannot train with, refused before any work."""
    if kind in ("sd3", "flux"):
        # The latent grid must split into the transformer's patches (FLUX: 2x2 packing).
        patch = 2 if kind == "flux" else _denoiser(pipe, kind).config.patch_size
        multiple = pipe.vae_scale_factor * patch
        if args.resolution % multiple:
            raise ValueError(
                f"`resolution` must be a multiple of {multiple} for this {kind} pipeline (VAE factor "
                f"{pipe.vae_scale_factor} x patch {patch}), got {args.resolution}"
            )
    if args.prediction_type is not None and kind not in ("sd", "sdxl"):
        raise ValueError(
            f"`prediction_type` {args.prediction_type!r} applies to the SD / SDXL UNets, not to this {kind} pipeline"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m rahf.improve.finetune` / `accelerate launch -m rahf.improve.finetune`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_lora(parse_finetune_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
