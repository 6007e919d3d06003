"""`rahf train` / `accelerate launch -m rahf.train`: trains RAHF (or a baseline) from a YAML config with accelerate.

One device or many (DDP), gradient accumulation, mixed precision, AdamW or 8-bit AdamW, cosine / rsqrt / constant
schedules with warm-up, `checkpoint-{step}/` folders pruned to a limit, exact resumption (model, optimizer, scheduler,
RNG and data position), validation at intervals, a jsonl log (and tensorboard when installed), and the final model and
processor in `output_dir/final` (loadable by `RichFeedbackPredictor.from_pretrained`).

Examples:

```bash
rahf train --config configs/train/synth_tiny.yaml --data_dir /tmp/synth --output_dir runs/tiny
accelerate launch --multi_gpu --num_processes 2 -m rahf.train --config configs/train/richhf18k_base.yaml
rahf train --config configs/train/synth_tiny.yaml --resume_from_checkpoint latest
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from .calibration import calibrate_keyword_threshold
from .configuration_rahf import KEYWORDS_TASK
from .job_args import uses_cpu_processes
from .metrics import plcc
from .precision import resolve_mixed_precision
from .training_args import RAHFTrainingArguments, best_metric_direction, parse_training_args
from .training_utils import (
    TRAINING_STATE_NAME,
    EpochShuffleSampler,
    NonFiniteGuard,
    NonFiniteTrainingError,
    atomic_directory,
    build_lr_scheduler,
    build_optimizer,
    build_trackers,
    check_finite_parameters,
    checkpoint_step,
    json_value,
    parameters_checksum,
    resolve_resume_checkpoint,
    save_checkpoint,
    truncate_log,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

BEST_SUMMARY = "best_validation.json"

__all__ = [
    "MODEL_BUILDERS",
    "build_model_and_processor",
    "evaluate",
    "main",
    "register_model_type",
    "train",
]

CHECKPOINT_MODEL_DIR = "model"
TRAIN_LOG_NAME = "train_log.jsonl"


# --------------------------------------------------------------------------------------------------------------------
# Models: a registry so that baselines plug in by name (`--model_type`)

ModelBuilder = Callable[[RAHFTrainingArguments], tuple[torch.nn.Module, Any]]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model_type(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Registers `builder(args) -> (model, processor)` under `--model_type name`.

    The model must be a `PreTrainedModel` whose `forward(**batch)` takes the inputs of
    [`~rahf.data.collate.RAHFCollator`] and returns an output with `loss` (and, when it has them, `heatmaps`,
    `scores`, `sequence_logits`, `heatmap_loss`, `score_loss`, `sequence_loss` as [`RAHFOutput`] does), and whose
    config has `heatmap_size`, `score_names` and `heatmap_names`. The processor must be callable like
    [`RAHFProcessor`] and have `save_pretrained`.

    Examples:

    ```python
    >>> from rahf.train import register_model_type
    >>> @register_model_type("resnet50")
    ... def build_resnet(args):
    ...     return ResNetRichFeedbackModel(...), processor
    ```
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        MODEL_BUILDERS[name] = builder
        return builder

    return decorator


@register_model_type("rahf")
def _build_rahf(args: RAHFTrainingArguments):
    from .init_model import build_rahf_model, read_model_preset
    from .modeling_rahf import RAHFModel
    from .processing_rahf import RAHFProcessor

    if args.pretrained_model_name_or_path:
        model = RAHFModel.from_pretrained(args.pretrained_model_name_or_path)
        if args.variant is not None and args.variant != model.config.variant:
            raise ValueError(
                f"`variant`={args.variant!r} but {args.pretrained_model_name_or_path!r} is a {model.config.variant!r} "
                "model: the heads differ, so drop --variant or start from --model_config"
            )
        return model, RAHFProcessor.from_pretrained(args.pretrained_model_name_or_path)
    if not args.model_config:
        raise ValueError("pass `--model_config` (a configs/model/*.json preset) or `--pretrained_model_name_or_path`")
    overrides = {"variant": args.variant} if args.variant is not None else {}
    config = read_model_preset(args.model_config, "model_config", **overrides)
    model = build_rahf_model(config)
    return model, RAHFProcessor.from_config(model.config)


def build_model_and_processor(args: RAHFTrainingArguments) -> tuple[torch.nn.Module, Any]:
    """The model and processor that `--model_type` names: RAHF (default) or a trainable baseline of rahf.baselines."""
    if args.model_type in MODEL_BUILDERS:
        return MODEL_BUILDERS[args.model_type](args)
    # Looked up here rather than registered on import: under `python -m rahf.train` this module runs as __main__,
    # so a registry filled by importing rahf.baselines would be another module's.
    from .baselines import TRAINABLE_MODEL_TYPES, build_trainable

    if args.model_type in TRAINABLE_MODEL_TYPES:
        return build_trainable(args.model_type, args.model_config, args.seed, args.pretrained_model_name_or_path)
    raise ValueError(
        f"unknown `model_type` {args.model_type!r}; known model types: {sorted([*MODEL_BUILDERS, *TRAINABLE_MODEL_TYPES])}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Data order, optimizer, schedules


# --------------------------------------------------------------------------------------------------------------------
# Validation


def _plcc(x: np.ndarray, y: np.ndarray) -> float:
    # rahf.metrics.plcc, the one definition (0.0 for a constant input); NaN where a split is too small to correlate.
    return plcc(x, y) if len(x) >= 2 else float("nan")


def _keyword_rows(batch: dict[str, Any], config) -> torch.Tensor:
    """Which image each row of `sequence_logits` belongs to (one keyword row per image)."""
    image_index = batch["image_index"]
    if "task_ids" in batch and batch["task_ids"] is not None:
        return image_index[batch["task_ids"] == config.task_names.index(KEYWORDS_TASK)]
    return image_index


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataloader, accelerator, config) -> dict[str, float]:
    """Mean losses per head on `dataloader` (every process, gathered) and the PLCC of each score."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in dataloader:
        batch.pop("uid", None)
        out = model(**batch)
        size = batch["pixel_values"].shape[0]
        per_sample: dict[str, torch.Tensor] = {}
        if getattr(out, "heatmaps", None) is not None and "heatmap_labels" in batch:
            p, y = out.heatmaps.float(), batch["heatmap_labels"].float()
            if getattr(config, "heatmap_loss", "mse") == "bce":  # the loss the model trains on
                p = p.clamp(1e-6, 1 - 1e-6)
                err = -(y * p.log() + (1 - y) * (1 - p).log())
            else:
                err = (p - y) ** 2
            per_sample["heatmap_err"] = err.flatten(1).mean(1)  # (B,) per-pixel heatmap loss
        if getattr(out, "scores", None) is not None and "score_labels" in batch:
            per_sample["scores"] = out.scores.float()  # (B, num_scores)
            per_sample["score_labels"] = batch["score_labels"].float()
        if getattr(out, "sequence_logits", None) is not None and "labels" in batch:
            rows = _keyword_rows(batch, config)
            labels = batch["labels"][rows]  # (R_k, T)
            ce = F.cross_entropy(
                out.sequence_logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            ).sum(1)  # (R_k,)
            tokens = (labels != -100).sum(1).float()
            per_sample["seq_ce"] = ce.new_zeros(size).index_add(0, rows, ce)
            per_sample["seq_tokens"] = tokens.new_zeros(size).index_add(0, rows, tokens)
        for key, value in accelerator.gather_for_metrics(per_sample).items():
            parts.setdefault(key, []).append(value.cpu())
    if was_training:
        model.train()
    cat = {k: torch.cat(v).numpy() for k, v in parts.items()}
    metrics: dict[str, float] = {}
    total = 0.0
    if "heatmap_err" in cat:
        metrics["heatmap_loss"] = float(cat["heatmap_err"].mean())
        total += getattr(config, "heatmap_loss_weight", 1.0) * metrics["heatmap_loss"]
    if "scores" in cat:
        pred, gt = cat["scores"], cat["score_labels"]
        known = ~np.isnan(pred)
        metrics["score_loss"] = float(((pred[known] - gt[known]) ** 2).mean())
        total += getattr(config, "score_loss_weight", 1.0) * metrics["score_loss"]
        for j, name in enumerate(getattr(config, "score_names", [])):
            metrics[f"plcc_{name}"] = _plcc(pred[:, j], gt[:, j])
    if "seq_ce" in cat:
        metrics["sequence_loss"] = float(cat["seq_ce"].sum() / max(cat["seq_tokens"].sum(), 1.0))
        total += getattr(config, "sequence_loss_weight", 1.0) * metrics["sequence_loss"]
    metrics["loss"] = total
    metrics["num_samples"] = int(len(next(iter(cat.values())))) if cat else 0
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# DDP helpers


def _unused_parameters(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> list[str]:
    """Names of trainable parameters that get no gradient from one forward/backward on `batch`."""
    model.to(device)
    model.train()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "uid"}
    model(**inputs).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused


# --------------------------------------------------------------------------------------------------------------------
# Sharded training (FSDP, DeepSpeed): every process holds a shard of the weights


def is_sharded(accelerator) -> bool:
    """True under FSDP or DeepSpeed, where no process holds the whole model and gathering it is a collective."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def gather_state_dict(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The full weights of a sharded `model` (on the main process; call on every process), else None: the model's
    own parameters are whole and `save_pretrained` reads them directly."""
    return accelerator.get_state_dict(model) if is_sharded(accelerator) else None


def unsharded_copy(accelerator, model) -> torch.nn.Module | None:
    """On the main process, a plain (unwrapped, unsharded) model holding the gathered weights of a sharded `model`;
    None elsewhere. Call on every process. What runs on one process after training (the finite check, keyword
    calibration, the final save) runs on this copy."""
    state_dict = gather_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    model_class = type(unwrapped)
    try:  # FSDP2 shards a module in place by giving it a subclass of its own class: build the original one
        from torch.distributed.fsdp import FSDPModule

        model_class = next(c for c in model_class.__mro__ if not issubclass(c, FSDPModule))
    except ImportError:
        pass
    plain = model_class(unwrapped.config)
    plain.load_state_dict(state_dict)  # strict: every weight must come back
    return plain


# --------------------------------------------------------------------------------------------------------------------
# Training


def save_model_folder(
    folder: Path, model, processor, summary_name: str, summary: dict[str, Any], state_dict: dict | None = None
) -> None:
    """The model, its processor and a JSON summary in `folder`, written atomically (a crash leaves the old folder).
    `state_dict` (the gathered weights of a sharded model) replaces the model's own."""
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        (tmp / summary_name).write_text(json.dumps(summary, indent=2) + "\n")


def train(args: RAHFTrainingArguments) -> dict[str, Any]:
    """Runs one training job; returns a summary (`global_step`, `final_dir`, last `validation` metrics)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from .data.collate import RAHFCollator
    from .data.schema import load_rich_feedback
    from .data.training import RichFeedbackTorchDataset

    if not args.data_dir:
        raise ValueError("pass `--data_dir` (a canonical data set folder, e.g. from `rahf data synth --out DIR`)")
    output_dir = Path(args.output_dir)
    logging_dir = output_dir / args.logging_dir
    if args.dataloader_num_workers > 0:
        # The collator tokenizes in forked workers after the main process has used the tokenizer.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `accelerate launch --multi_gpu` on a machine without accelerators (CI, our CPU boxes) must use gloo on CPU.
    state = PartialState(cpu=uses_cpu_processes())  # the process group, before anything else
    if not state.is_local_main_process:
        logger.setLevel(logging.WARNING)  # one copy of the progress messages, not one per process

    # 1. Model, processor and data (the same initial weights on every process).
    set_seed(args.seed)
    model, processor = build_model_and_processor(args)
    config = model.config
    if args.attn_implementation is not None:
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(f"`attn_implementation` needs a transformers model; {args.model_type!r} is not one")
        model.set_attn_implementation(args.attn_implementation)  # both towers: see RAHFPreTrainedModel
    if args.gradient_checkpointing:
        # transformers v5 renamed it; v4-style models only have the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if args.calibrate_keyword_threshold and getattr(config, "model_type", None) == "rahf":
        processor.marker_token_id  # noqa: B018 - fails now, with its reason, rather than after training
    data = load_rich_feedback(args.data_dir)
    if args.train_split not in data or len(data[args.train_split]) == 0:
        raise ValueError(
            f"`train_split` {args.train_split!r} is missing or empty in {args.data_dir!r} "
            f"(splits: { {k: len(v) for k, v in data.items()} })"
        )
    train_split = data[args.train_split]
    if args.max_train_samples:
        train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
    word_swap_rate, word_swap_groups = args.word_swap_rate, None
    if word_swap_rate > 0 and getattr(config, "model_type", None) != "rahf":
        logger.warning("`word_swap_rate` trains keywords, which only RAHF writes: ignored for %s", args.model_type)
        word_swap_rate = 0.0
    if word_swap_rate > 0:  # the dataset reads and checks the file, naming it when it is missing
        word_swap_groups = args.word_swap_groups or Path(args.data_dir) / "word_swap_groups.json"
    train_dataset = RichFeedbackTorchDataset(
        train_split,
        heatmap_size=config.heatmap_size,
        augment=args.augment,
        seed=args.seed,
        word_swap_rate=word_swap_rate,
        word_swap_groups=word_swap_groups,
    )
    eval_dataset = None
    if args.validation_split and args.validation_split in data and len(data[args.validation_split]):
        eval_split = data[args.validation_split]
        if args.max_eval_samples:
            eval_split = eval_split.select(range(min(args.max_eval_samples, len(eval_split))))
        eval_dataset = RichFeedbackTorchDataset(eval_split, heatmap_size=config.heatmap_size)
    elif args.validation_split:
        logger.warning("no %r split in %s: training without validation", args.validation_split, args.data_dir)
    tasks_per_image = args.tasks_per_image
    if tasks_per_image is not None and getattr(config, "variant", None) != "augmented_prompt":
        logger.warning("`tasks_per_image` applies to the augmented-prompt variant only: ignored")
        tasks_per_image = None
    collator = RAHFCollator(processor, config.score_names, config.heatmap_names, tasks_per_image=tasks_per_image)
    eval_collator = RAHFCollator(processor, config.score_names, config.heatmap_names)  # validation sees every task

    # 2. DDP needs find_unused_parameters only when some trainable parameter gets no gradient (e.g. a CLIP tower's
    # post-layernorm): check once on a real batch rather than pay for the search every step.
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None and state.num_processes > 1 and tasks_per_image is not None:
        find_unused = True  # a rank's batch may, rarely, hold no row of some head
    if find_unused is None and state.num_processes > 1:
        unused = _unused_parameters(model, collator([train_dataset[0]]), state.device)
        find_unused = bool(unused)
        if unused and state.is_main_process:
            logger.info(
                "%d parameter(s) get no gradient (e.g. %s): DDP runs with find_unused_parameters=True",
                len(unused),
                unused[:3],
            )

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision, cpu_bf16_ok=True),
        cpu=state.device.type == "cpu",
        log_with=build_trackers(args.report_to, logging_dir, TRAIN_LOG_NAME),
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(logging_dir), automatic_checkpoint_naming=False
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused))],
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
    if args.debug_check_sync and is_sharded(accelerator):
        raise ValueError(
            "`debug_check_sync` compares each process's whole weights, and under FSDP / DeepSpeed each process holds a "
            "shard: drop the flag, or check with DDP"
        )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # 3. Checkpoints hold a save_pretrained copy of the model (and the processor), loadable on its own.
    # Under FSDP / DeepSpeed accelerate writes (and, on resuming, reads) its own sharded model files; the
    # save_pretrained copy is gathered from the shards, a collective every process joins.
    def save_model_hook(models, weights, ckpt_dir):
        for m in models:
            state_dict = gather_state_dict(accelerator, m)
            if accelerator.is_main_process:
                target = Path(ckpt_dir) / CHECKPOINT_MODEL_DIR
                accelerator.unwrap_model(m).save_pretrained(target, state_dict=state_dict)
                processor.save_pretrained(target)
        weights.clear()  # saved above: accelerate need not write the weights a second time (empty when sharded)

    def load_model_hook(models, ckpt_dir):
        while models:
            target = accelerator.unwrap_model(models.pop())
            loaded = type(target).from_pretrained(Path(ckpt_dir) / CHECKPOINT_MODEL_DIR)
            target.load_state_dict(loaded.state_dict())  # strict: a mismatch is an error, never silently skipped
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # 4. Data loaders. The sampler's order depends on (seed, epoch) only; loaders have their own generators, so that
    # building an iterator never draws from the global RNG that dropout uses (a resumed run must see the same draws).
    sampler = EpochShuffleSampler(len(train_dataset), seed=args.seed)
    pin = accelerator.device.type == "cuda"
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_dataloader = None
    if eval_dataset is not None:
        eval_dataloader = DataLoader(
            eval_dataset,
            batch_size=args.eval_batch_size,
            shuffle=False,
            collate_fn=eval_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(args.seed),
        )

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(
        model.parameters(),
        learning_rate=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        use_8bit_adam=args.use_8bit_adam,
        decay_1d=args.weight_decay_all,  # by default no weight decay on biases and normalisation weights
        # Fused is the faster kernel on GPUs and CPUs alike (README, Performance); off by default on a CPU only so
        # that the CPU runs recorded before it (demo, efficacy) stay bit-identical
        fused=args.fused_adam if args.fused_adam is not None else accelerator.device.type == "cuda",
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if eval_dataloader is not None:
        eval_dataloader = accelerator.prepare(eval_dataloader)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    else:
        max_train_steps = args.max_train_steps
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    lr_scheduler = build_lr_scheduler(
        optimizer,
        args.lr_scheduler,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        lr_end=args.lr_end * (learning_rate / args.learning_rate),
        num_processes=accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        "training %s (%s, %.1fM parameters) on %d records x %d epochs = %d steps; batch %d per device x %d "
        "process(es) x %d accumulation = %d",
        args.model_type,
        getattr(config, "variant", "-"),
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(train_dataset),
        num_train_epochs,
        max_train_steps,
        args.train_batch_size,
        accelerator.num_processes,
        args.gradient_accumulation_steps,
        total_batch_size,
    )

    # 5. Resume: model, optimizer, scheduler, RNG states and the accumulation counter from the checkpoint; the data
    # position from its step.
    global_step = 0
    resume_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
        accelerator.load_state(str(resume_from))
        global_step = checkpoint_step(resume_from)
        saved = resume_from / TRAINING_STATE_NAME
        if saved.is_file():
            recorded = json.loads(saved.read_text()).get("num_update_steps_per_epoch")
            if recorded is not None and recorded != num_update_steps_per_epoch:
                logger.warning(
                    "the checkpoint was written with %d steps per epoch, this run has %d (batch size, processes or "
                    "data changed): the data position after resuming is approximate",
                    recorded,
                    num_update_steps_per_epoch,
                )
    if accelerator.is_main_process:
        # A fresh run starts a fresh log; a resumed one drops what the interrupted run logged after its checkpoint.
        truncate_log(logging_dir / TRAIN_LOG_NAME, global_step)
        accelerator.init_trackers(
            "rahf",
            config={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in args.to_dict().items()},
        )
    first_epoch = global_step // num_update_steps_per_epoch
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
    # Dropout and other draws continue from the restored RNG states; on a fresh run, each process gets its own.
    if resume_from is None:
        set_seed(args.seed, device_specific=True)

    sync_dir = output_dir / "debug_sync"
    if args.debug_check_sync:
        sync_dir.mkdir(parents=True, exist_ok=True)
        sync_file = sync_dir / f"rank{accelerator.process_index}.jsonl"
        if resume_from is None and sync_file.exists():
            sync_file.unlink()

    guard = NonFiniteGuard(accelerator.device, start_step=global_step)

    def checkpoint(step: int, epoch: int) -> None:
        guard.check(accelerator, f"before saving checkpoint-{step}")  # a non-finite model is never checkpointed
        save_checkpoint(
            accelerator,
            output_dir,
            step,
            {
                "epoch": epoch,
                "num_update_steps_per_epoch": num_update_steps_per_epoch,
                "max_train_steps": max_train_steps,
            },
            total_limit=args.checkpoints_total_limit,
        )

    def run_validation(step: int) -> dict[str, float]:
        # Validation must not shift the training run's random stream, or a resumed run would diverge.
        devices = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            start = time.perf_counter()
            metrics = evaluate(model, eval_dataloader, accelerator, config)
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        logger.info(
            "step %d validation (%.1fs): %s",
            step,
            time.perf_counter() - start,
            ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)),
        )
        return metrics

    # The best validation so far (`--save_best_on`), kept in output_dir/best; a resumed run starts from the one on disk.
    best_dir = output_dir / "best"
    best: dict[str, Any] | None = None
    direction = best_metric_direction(args.save_best_on) if args.save_best_on else None
    if args.save_best_on:
        if eval_dataloader is None:
            raise ValueError(
                f"`save_best_on` {args.save_best_on!r} needs a validation split, and {args.data_dir} has no "
                f"{args.validation_split!r} records"
            )
        if resume_from is not None and (best_dir / BEST_SUMMARY).is_file():
            best = json.loads((best_dir / BEST_SUMMARY).read_text())
            if best.get("metric") != args.save_best_on:
                best = None  # chosen on another metric: the first validation replaces it

    def validate(step: int, epoch: int) -> dict[str, float]:
        nonlocal best, last_validated_step
        metrics = run_validation(step)
        last_validated_step = step
        if not args.save_best_on:
            return metrics
        if args.save_best_on not in metrics:
            raise ValueError(
                f"`save_best_on` {args.save_best_on!r} is not among this model's validation metrics {sorted(metrics)}"
            )
        value = float(metrics[args.save_best_on])
        if not math.isfinite(value):
            logger.warning("step %d: validation %s is %s, not a best", step, args.save_best_on, value)
            return metrics
        if best is not None and not (value < best["value"] if direction == "min" else value > best["value"]):
            return metrics
        guard.check(accelerator, f"before saving the best model at step {step}")
        best = {"metric": args.save_best_on, "value": value, "step": step, "epoch": epoch}
        accelerator.wait_for_everyone()
        state_dict = gather_state_dict(accelerator, model)
        if accelerator.is_main_process:
            summary = {**best, "validation": {k: json_value(v) for k, v in metrics.items()}}
            save_model_folder(best_dir, accelerator.unwrap_model(model), processor, BEST_SUMMARY, summary, state_dict)
            logger.info("step %d: best %s so far (%.5g): saved to %s", step, args.save_best_on, value, best_dir)
        accelerator.wait_for_everyone()
        return metrics

    last_validated_step = -1
    progress = tqdm(
        range(max_train_steps),
        initial=global_step,
        desc="training",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    head_names = ("loss", "heatmap_loss", "score_loss", "sequence_loss")
    # Accumulated on the device: a .item() per head and micro-batch would make the CPU wait for the GPU each time.
    sums = torch.zeros(len(head_names), dtype=torch.float32, device=accelerator.device)
    counts = torch.zeros(len(head_names), dtype=torch.float32, device=accelerator.device)
    step_uids: list[str] = []
    grad_norm = None
    last_validation: dict[str, float] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    start_time = time.perf_counter()

    current_epoch = first_epoch
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        current_epoch = epoch
        train_dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and resume_batches:
            loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            loader.set_epoch(epoch)
        for batch in loader:
            uids = batch.pop("uid", None) or []
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                guard.observe(loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for i, name in enumerate(head_names):
                value = getattr(outputs, name, None)
                if value is not None:
                    sums[i] += value.detach().float()
                    counts[i] += 1
            step_uids += [str(u) for u in uids]
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            # fp16's loss scaler skips steps whose gradients overflow: an inf gradient norm is normal there.
            guard.end_step(grad_norm if accelerator.mixed_precision != "fp16" else None)
            guard.check_learning_rate(lr_scheduler.get_last_lr()[0], global_step)
            progress.update(1)
            if args.debug_check_sync:
                with sync_file.open("a") as f:
                    f.write(
                        json.dumps(
                            {
                                "step": global_step,
                                "sha256": parameters_checksum(accelerator.unwrap_model(model)),
                                "uids": step_uids,
                            }
                        )
                        + "\n"
                    )
            step_uids = []
            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                guard.check(accelerator, f"at the log of step {global_step}")
                totals = accelerator.reduce(torch.stack([sums, counts]), reduction="sum").cpu()
                record = {
                    name: float(totals[0, i] / totals[1, i]) for i, name in enumerate(head_names) if totals[1, i] > 0
                }
                record.update(epoch=epoch, lr=lr_scheduler.get_last_lr()[0])
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                accelerator.log(record, step=global_step)
                progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
                sums.zero_()
                counts.zero_()
            if eval_dataloader is not None and args.validation_steps and global_step % args.validation_steps == 0:
                last_validation = validate(global_step, epoch)
            # Last: a checkpoint at step N implies that everything logged up to N is on disk.
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                checkpoint(global_step, epoch)
            if global_step >= max_train_steps:
                break
        if args.validate_every_epoch and eval_dataloader is not None and last_validated_step != global_step:
            last_validation = validate(global_step, epoch)
    progress.close()

    # 6. The last validation, and the final model and processor (never a non-finite one).
    guard.check(accelerator, "at the end of training")
    final_dir = output_dir / "final"
    sharded = is_sharded(accelerator)
    if not sharded:
        check_finite_parameters(accelerator.unwrap_model(model), f"{final_dir}")
    if eval_dataloader is not None and last_validated_step != global_step:
        last_validation = validate(global_step, current_epoch)
    accelerator.wait_for_everyone()
    # Sharded: the main process alone goes on with a whole copy (keyword decoding runs a different number of steps
    # per process, which sharded layers, each a collective, cannot).
    final_model = unsharded_copy(accelerator, model) if sharded else accelerator.unwrap_model(model)
    if sharded and final_model is not None:
        check_finite_parameters(final_model, f"{final_dir}")
    calibration = None
    if args.calibrate_keyword_threshold and eval_dataset is not None:  # every process decodes its shard
        if not sharded or accelerator.is_main_process:
            calibration = calibrate_keyword_threshold(
                final_model,
                processor,
                eval_dataset.split,
                batch_size=args.eval_batch_size,
                state=None if sharded else state,
            )
    if accelerator.is_main_process:
        if calibration is not None:
            accelerator.log(
                {
                    "val/keyword_f1_greedy": calibration["f1_greedy"],
                    "val/keyword_f1": calibration["f1"],
                    "val/keyword_threshold": calibration["threshold"] or 0.0,
                },
                step=global_step,
            )
        summary = {
            "global_step": global_step,
            "train_seconds": time.perf_counter() - start_time,
            "validation": {k: json_value(v) for k, v in last_validation.items()},
            "keyword_threshold_calibration": calibration,
            "best": best,
        }
        save_model_folder(final_dir, final_model, processor, "training_summary.json", summary)
        logger.info(
            "saved the final model to %s (%d steps, %.0fs)", final_dir, global_step, time.perf_counter() - start_time
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.free_memory()
    return {
        "global_step": global_step,
        "final_dir": str(final_dir),
        "validation": last_validation,
        "best": best,
        "best_dir": str(best_dir) if best is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rahf train` and `python -m rahf.train` / `accelerate launch -m rahf.train`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_training_args(argv)
    try:
        train(args)
    except NonFiniteTrainingError as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
