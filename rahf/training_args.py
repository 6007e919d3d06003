"""Arguments of `rahf train`: one dataclass, read from a YAML file (`--config`) with command-line flags on top.

Flag names follow diffusers' training scripts (`--output_dir`, `--train_batch_size`, `--learning_rate`,
`--lr_scheduler`, `--lr_warmup_steps`, `--adam_beta1`, `--use_8bit_adam`, `--mixed_precision`, `--checkpointing_steps`,
`--checkpoints_total_limit`, `--resume_from_checkpoint latest`, ...).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from .job_args import check_finite_numbers, check_int_fields, parse_job_args
from .precision import MIXED_PRECISIONS
from .training_utils import LR_SCHEDULES

logger = logging.getLogger(__name__)

__all__ = ["LR_SCHEDULERS", "MIXED_PRECISIONS", "REPORT_TO", "RAHFTrainingArguments", "parse_training_args"]

LR_SCHEDULERS = tuple(LR_SCHEDULES)
REPORT_TO = ("jsonl", "tensorboard", "all")


@dataclass
class RAHFTrainingArguments:
    """Everything `rahf train` needs. Each field is a `--flag`; a YAML file given with `--config` sets defaults."""

    # ---- where things are
    config: str | None = field(
        default=None, metadata={"help": "YAML file of arguments (keys = flag names); flags on the command line win"}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "canonical data set folder (`rahf data synth|convert-richhf|consolidate`)"}
    )
    output_dir: str = field(
        default="rahf-output",
        metadata={"help": "checkpoints (checkpoint-{step}/), logs/ and the final model (final/)"},
    )
    logging_dir: str = field(default="logs", metadata={"help": "log folder, relative to output_dir"})

    # ---- the model
    model_type: str = field(
        default="rahf", metadata={"help": "which model to train (rahf, or a baseline registered in rahf.train)"}
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "a configs/model/*.json preset (pretrained towers are loaded when it names them)"},
    )
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "start from a saved model folder (save_pretrained) instead of --model_config"}
    )
    variant: str | None = field(
        default=None, metadata={"help": "override the preset's variant: multi_head or augmented_prompt"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass: less memory for about a third more compute"},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "attention of both towers: sdpa (F.scaled_dot_product_attention, fused kernels on GPUs) or "
            "eager; default: the model's own (sdpa)",
            "choices": ["sdpa", "eager"],
        },
    )

    # ---- data
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    validation_split: str | None = field(
        default="validation", metadata={"help": "split to validate on ('none': no validation)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N validation records"})
    augment: bool = field(
        default=False,
        metadata={"help": "random crop, colour jitter, JPEG and greyscale (docs/reference.md, section 6)"},
    )
    tasks_per_image: int | None = field(
        default=None,
        metadata={
            "help": "augmented-prompt variant: train a random N of each image's task rows per step (default: all); "
            "each row is a pass of the fusion encoder, so steps get about that much cheaper"
        },
    )
    word_swap_rate: float = field(
        default=0.0,
        metadata={
            "help": "RAHF only, not in the paper: probability that a training record with no misaligned word gets "
            "one word swapped for another of its group (--word_swap_groups), which the keyword target then marks; "
            "the alignment/overall scores and misalignment heatmap of such a record are left out of the loss"
        },
    )
    word_swap_groups: str | None = field(
        default=None,
        metadata={
            "help": "JSON file {group: [interchangeable words]} (default: DATA_DIR/word_swap_groups.json, which "
            "`rahf data synth` writes)"
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading worker processes (0: main)"})

    # ---- schedule
    num_train_epochs: int = field(default=1, metadata={"help": "epochs (ignored when max_train_steps is set)"})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps in total; overrides num_train_epochs"}
    )
    train_batch_size: int = field(default=8, metadata={"help": "images per device per micro-batch"})
    eval_batch_size: int = field(default=16, metadata={"help": "images per device in validation"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})

    # ---- optimizer
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (after warm-up)"})
    scale_lr: bool = field(
        default=False, metadata={"help": "multiply learning_rate by batch size x accumulation x processes"}
    )
    lr_scheduler: str = field(
        default="cosine",
        metadata={
            "help": "cosine (to lr_end), rsqrt (T5X-style lr*sqrt(warmup/step) after warm-up), constant or linear",
            "choices": list(LR_SCHEDULERS),
        },
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (optimizer steps)"})
    lr_end: float = field(default=0.0, metadata={"help": "cosine: the learning rate at the last step"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(
        default=1e-2,
        metadata={"help": "AdamW weight decay (not applied to biases and norm weights unless weight_decay_all)"},
    )
    weight_decay_all: bool = field(
        default=False,
        metadata={"help": "apply the weight decay to every parameter, biases and normalisation weights included"},
    )
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (pip install bitsandbytes)"})
    fused_adam: bool | None = field(
        default=None,
        metadata={
            "help": "torch's fused AdamW kernel (the same update up to rounding, faster); default: on when training "
            "on a GPU, off on a CPU"
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: none)"})

    # ---- precision, reproducibility
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "auto (bf16/fp16 on a GPU, float32 on a CPU), no, fp16 or bf16; default: what `accelerate "
            "launch` / `accelerate config` says, else no",
            "choices": list(MIXED_PRECISIONS),
        },
    )
    allow_tf32: bool = field(default=False, metadata={"help": "TF32 matmuls on Ampere+ GPUs"})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order, augmentation and dropout"})

    # ---- checkpoints, validation, logs
    checkpointing_steps: int = field(
        default=500, metadata={"help": "save a checkpoint-{step}/ every N steps (0: never)"}
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "keep at most N checkpoint-*/ folders (the oldest are deleted)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'latest' (the newest checkpoint-* in output_dir, if any) or a checkpoint path"},
    )
    calibrate_keyword_threshold: bool = field(
        default=False,
        metadata={
            "help": "after training, pick the keyword decoding (greedy or a marker threshold) of best F1 on the "
            "validation split and save it in the model's config (keyword_threshold)"
        },
    )
    validation_steps: int | None = field(
        default=None, metadata={"help": "validate every N steps (always at the end, when there is a validation split)"}
    )
    validate_every_epoch: bool = field(default=False, metadata={"help": "also validate at the end of every epoch"})
    save_best_on: str | None = field(
        default=None,
        metadata={
            "help": "keep, in output_dir/best, the model of the best validation so far on this metric: loss, "
            "heatmap_loss, score_loss, sequence_loss (lower is better) or plcc_<score> (higher is better)"
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "write a log line every N steps"})
    report_to: str = field(
        default="jsonl",
        metadata={
            "help": "jsonl (logs/train_log.jsonl), tensorboard (when installed) or all",
            "choices": list(REPORT_TO),
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=None,
        metadata={"help": "DDP: look for parameters without gradients each step (default: only when needed)"},
    )
    debug_check_sync: bool = field(
        default=False,
        metadata={"help": "each process writes a checksum of its weights after each step (output_dir/debug_sync)"},
    )

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        if self.validation_split in ("", "none", "None"):
            self.validation_split = None
        check_int_fields(
            self,
            positive=(
                "train_batch_size",
                "eval_batch_size",
                "gradient_accumulation_steps",
                "num_train_epochs",
                "logging_steps",
            ),
            positive_or_unset=(
                "max_train_steps",
                "validation_steps",
                "checkpoints_total_limit",
                "max_train_samples",
                "max_eval_samples",
                "tasks_per_image",
            ),
            non_negative=("checkpointing_steps", "lr_warmup_steps", "dataloader_num_workers"),
        )
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate!r}")
        if not 0 <= self.lr_end <= self.learning_rate:
            raise ValueError(f"`lr_end` must lie in [0, learning_rate={self.learning_rate}], got {self.lr_end!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"`lr_scheduler` must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"`mixed_precision` must be one of {list(MIXED_PRECISIONS)}, got {self.mixed_precision!r}"
            )
        if self.attn_implementation not in (None, "sdpa", "eager"):
            raise ValueError(f"`attn_implementation` must be sdpa or eager, got {self.attn_implementation!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"`report_to` must be one of {list(REPORT_TO)}, got {self.report_to!r}")
        if self.variant is not None and self.variant not in ("multi_head", "augmented_prompt"):
            raise ValueError(f"`variant` must be multi_head or augmented_prompt, got {self.variant!r}")
        if not 0.0 <= self.word_swap_rate <= 1.0:
            raise ValueError(f"`word_swap_rate` must be a probability in [0, 1], got {self.word_swap_rate!r}")
        if self.save_best_on in ("", "none", "None"):
            self.save_best_on = None
        if self.save_best_on is not None:
            best_metric_direction(self.save_best_on)  # an unknown name fails before training
            if self.validation_split is None:
                raise ValueError(
                    f"`save_best_on` {self.save_best_on!r} needs a validation split; set `validation_split`"
                )
        if self.max_grad_norm < 0:
            raise ValueError(f"`max_grad_norm` must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BEST_METRIC_LOSSES = ("loss", "heatmap_loss", "score_loss", "sequence_loss")


def best_metric_direction(name: str) -> str:
    """`"min"` for a validation loss, `"max"` for a `plcc_<score>`; a ValueError listing the names otherwise."""
    from .constants import SCORE_NAMES

    if name in BEST_METRIC_LOSSES:
        return "min"
    if name.startswith("plcc_") and name[len("plcc_") :] in SCORE_NAMES:
        return "max"
    known = [*BEST_METRIC_LOSSES, *(f"plcc_{s}" for s in SCORE_NAMES)]
    raise ValueError(f"`save_best_on` must be a validation metric, one of {known}; got {name!r}")


def parse_training_args(argv: list[str] | None = None) -> RAHFTrainingArguments:
    """`--config file.yaml` gives the defaults, the other flags override them.

    Examples:

    ```python
    >>> args = parse_training_args(["--config", "configs/train/synth_tiny.yaml", "--max_train_steps", "10"])
    ```
    """
    return parse_job_args(RAHFTrainingArguments, argv, prog="rahf train", description="Train RAHF (or a baseline).")
