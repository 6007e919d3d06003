"""What every training job of rahf shares: crash-safe checkpoints (written aside, marked complete, renamed into
place, pruned only afterwards), resume resolution, a data order that depends only on (seed, epoch), logs, and the
guard that stops a run at its first non-finite loss.

A checkpoint `OUTPUT/checkpoint-{step}/` is written as `OUTPUT/.tmp-checkpoint-{step}/` by every process, then the
main process flushes every file to disk, writes `checkpoint_complete.json` (the step and the size of every file) last,
and renames the folder into place. `list_checkpoints` and `--resume_from_checkpoint latest` only take folders whose
marker is there and whose files have the sizes it lists, so a job killed at any point of a write resumes from the
newest complete checkpoint; older checkpoints are deleted only once the new one is complete.

Examples:

```python
>>> from rahf.training_utils import list_checkpoints, resolve_resume_checkpoint, save_checkpoint
>>> save_checkpoint(accelerator, "runs/x", step=200, training_state={"epoch": 0}, total_limit=2)
>>> resolve_resume_checkpoint("latest", "runs/x")
PosixPath('runs/x/checkpoint-200')
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.tracking import GeneralTracker
from torch.utils.data import Sampler

if TYPE_CHECKING:
    from accelerate import Accelerator

from .fileio import fsync_dir

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER",
    "EpochShuffleSampler",
    "JsonlTracker",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "TRAINING_STATE_NAME",
    "DIFFUSERS_LR_SCHEDULES",
    "LR_SCHEDULES",
    "atomic_directory",
    "build_lr_scheduler",
    "build_optimizer",
    "build_trackers",
    "check_finite_parameters",
    "fsync_dir",
    "checkpoint_step",
    "is_complete_checkpoint",
    "json_value",
    "list_checkpoints",
    "parameters_checksum",
    "prune_checkpoints",
    "resolve_resume_checkpoint",
    "save_checkpoint",
    "truncate_log",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


# --------------------------------------------------------------------------------------------------------------------
# Durable, atomic folders


def _fsync_tree(root: Path) -> None:
    """Flushes every file under `root`, then every folder (so that their entries are durable too)."""
    folders = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for folder in reversed(folders):
        fsync_dir(folder)


def _write_json_durably(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_tree(path: Path) -> None:
    """Deletes a folder so that a kill part-way never leaves a half-deleted folder under its own name."""
    if not path.exists():
        return
    trash = path.with_name(_TRASH_PREFIX + path.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Renames the complete folder `tmp` to `final`, replacing a folder already there."""
    _fsync_tree(tmp)
    if final.exists():
        _remove_tree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a scratch folder beside `final`; when the block ends without an error, its files are flushed to disk and
    it is renamed to `final` (replacing what was there). An error or a kill leaves `final` as it was.

    Examples:

    ```python
    >>> with atomic_directory("runs/x/final") as tmp:
    ...     model.save_pretrained(tmp)
    ```
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(_TMP_PREFIX + final.name)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, final)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` holds a `checkpoint_complete.json` whose listed files are all there with their sizes."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(listed, dict):
        return False
    for name, size in listed.items():
        try:
            if (Path(path) / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _numbered_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete `checkpoint-{step}` folders of `output_dir`, oldest (smallest step) first. Incomplete ones (a
    write that was interrupted, a folder copied in part) are left out with a warning."""
    complete = []
    for _, path in _numbered_checkpoints(Path(output_dir)):
        if is_complete_checkpoint(path):
            complete.append(path)
        else:
            logger.warning("%s is incomplete (no valid %s): not used for resuming", path, COMPLETE_MARKER)
    return complete


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Deletes the oldest complete checkpoints so that at most `keep` remain; returns the deleted folders."""
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - keep)]
    for path in doomed:
        _remove_tree(path)
    if doomed:
        logger.info("deleted %d old checkpoint(s): %s", len(doomed), ", ".join(p.name for p in doomed))
    return doomed


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    training_state: dict[str, Any] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Saves `accelerator.save_state` as `output_dir/checkpoint-{step}`, crash-safely; call it on every process.

    Every process writes into `.tmp-checkpoint-{step}/` (each its own RNG state); the main process adds
    `training_state.json` (`{"global_step": step, **training_state}`), flushes everything, writes the completion
    marker last and renames the folder into place; only then are checkpoints beyond `total_limit` deleted, oldest
    first. Returns the checkpoint's path.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for leftover in output_dir.glob(f"{_TMP_PREFIX}{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(leftover)  # a write that a killed run left half done
        for leftover in output_dir.glob(f"{_TRASH_PREFIX}{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        state = {"global_step": int(step), **(training_state or {})}
        (tmp / TRAINING_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()  # every process has written its part
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        _write_json_durably(tmp / COMPLETE_MARKER, {"global_step": int(step), "files": _checkpoint_files(tmp)})
        _move_into_place(tmp, final)
        if total_limit is not None:
            prune_checkpoints(output_dir, keep=total_limit)
    accelerator.wait_for_everyone()
    logger.info("saved %s", final)
    return final


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a `checkpoint-{step}` folder was saved at (its training state, else its name)."""
    path = Path(path)
    state_file = path / TRAINING_STATE_NAME
    if state_file.is_file():
        return int(json.loads(state_file.read_text())["global_step"])
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    if not match:
        raise ValueError(
            f"`resume_from_checkpoint` {str(path)!r} has no {TRAINING_STATE_NAME} and is not named "
            f"{CHECKPOINT_PREFIX}<step>"
        )
    return int(match.group(1))


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`--resume_from_checkpoint`: None, "latest" (the newest complete checkpoint in `output_dir`, or None when there
    is none) or a folder (as given, or relative to `output_dir`), which must be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s, starting a new run", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(
            f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder; pass 'latest' or a "
            f"{CHECKPOINT_PREFIX}<step> folder"
        )
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"`resume_from_checkpoint` {str(path)!r} is incomplete (no valid {COMPLETE_MARKER}: its write was "
            "interrupted, or it was copied in part); pass 'latest' to take the newest complete checkpoint"
        )
    return path


def parameters_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal checksums mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Non-finite losses


class NonFiniteTrainingError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or learning rate; nothing after it was saved."""


class NonFiniteGuard:
    """Remembers, on the device, the first optimizer step whose loss (or gradient norm) is not finite, so that the
    training loop needs no host synchronisation per step; `check` (at the loop's sync points: logging, checkpoints,
    the end) raises `NonFiniteTrainingError` naming that step, on every process alike.

    Examples:

    ```python
    >>> guard = NonFiniteGuard(accelerator.device, start_step=global_step)
    >>> guard.observe(loss)                          # every micro-batch
    >>> guard.end_step(grad_norm)                    # every optimizer step
    >>> guard.check_learning_rate(lr_scheduler.get_last_lr()[0], step)
    >>> guard.check(accelerator, "before saving checkpoint-200")
    ```
    """

    def __init__(
        self, device: torch.device | str, start_step: int = 0, hint: str = "lower --learning_rate, or check the data"
    ):
        self.start_step = int(start_step)  # a resumed run counts on from its checkpoint's step
        self.hint = hint
        self._steps = torch.zeros((), dtype=torch.long, device=device)
        self._pending = torch.zeros((), dtype=torch.bool, device=device)
        self._pending_value = torch.zeros((), dtype=torch.float32, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._first_value = torch.zeros((), dtype=torch.float32, device=device)

    def _mark(self, value: torch.Tensor) -> None:
        value = value.detach().float().reshape(-1).sum().to(self._pending.device)
        new = ~torch.isfinite(value) & ~self._pending
        self._pending_value = torch.where(new, value, self._pending_value)
        self._pending = self._pending | new

    def observe(self, loss: torch.Tensor) -> None:
        """Records one micro-batch's loss."""
        self._mark(loss)

    def end_step(self, grad_norm: torch.Tensor | float | None = None) -> None:
        """Closes one optimizer step (with its gradient norm, when clipping computed one)."""
        if isinstance(grad_norm, torch.Tensor):
            self._mark(grad_norm)
        self._steps += 1
        new = self._pending & (self._first_bad < 0)
        self._first_bad = torch.where(new, self._steps, self._first_bad)
        self._first_value = torch.where(new, self._pending_value, self._first_value)
        self._pending = torch.zeros_like(self._pending)

    def check(self, accelerator: Accelerator | None = None, when: str = "") -> None:
        """Raises `NonFiniteTrainingError` if any process observed a non-finite step (one host sync)."""
        first, value = self._first_bad.reshape(1), self._first_value.reshape(1)
        if accelerator is not None and accelerator.num_processes > 1:
            # Every process must stop at the same point, or the others would wait at the next collective forever.
            first, value = accelerator.gather(first), accelerator.gather(value)
        bad = [(int(f), float(v)) for f, v in zip(first.cpu(), value.cpu()) if int(f) >= 0]
        if bad:
            step, value = min(bad)
            where = f" (noticed {when})" if when else ""
            raise NonFiniteTrainingError(
                f"training stopped: the loss or gradient norm is {value} at step {self.start_step + step}{where}; "
                f"nothing after it was saved; {self.hint}"
            )

    def check_learning_rate(self, lr: float, step: int) -> None:
        """Raises `NonFiniteTrainingError` at once for a non-finite learning rate (a host value: no sync)."""
        if not math.isfinite(lr):
            raise NonFiniteTrainingError(
                f"training stopped: the learning rate is {lr} at step {step}; nothing after it was saved; check "
                "--learning_rate, --lr_end and the schedule"
            )


def check_finite_parameters(model: torch.nn.Module, what: str) -> None:
    """Raises `NonFiniteTrainingError` when any parameter of `model` is NaN or infinite (one host sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    if flags and not bool(torch.stack(flags).all()):
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
        raise NonFiniteTrainingError(
            f"refusing to save {what}: {len(bad)} parameter tensor(s) are not finite (e.g. {bad[:3]})"
        )


# --------------------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule

# rahf's schedule names -> transformers' (`transformers.get_scheduler`), which all warm up linearly from 0.
LR_SCHEDULES = {
    "cosine": "cosine_with_min_lr",  # half a cosine from the peak to `lr_end`
    "rsqrt": "inverse_sqrt",  # T5X-style reciprocal square root after warm-up
    "constant": "constant_with_warmup",
    "linear": "linear",  # to 0 at the last step
}
# diffusers' training scripts name transformers' schedules as they are (`--lr_scheduler constant` has no warm-up).
DIFFUSERS_LR_SCHEDULES = {
    name: name
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
}


def build_optimizer(
    parameters,
    *,
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    use_8bit_adam: bool = False,
    decay_1d: bool = True,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit with `use_8bit_adam`) over the trainable ones of `parameters`.

    With `decay_1d=False`, 1-D parameters (biases, normalisation weights) get no weight decay, as transformers' own
    trainer does; LoRA fine-tuning decays every parameter, as diffusers' scripts do. `fused=True` takes torch's fused
    AdamW kernel (one launch for all parameters instead of a few per tensor; the same update up to float rounding),
    for parameters on CUDA, CPU, MPS or XPU; it is ignored with `use_8bit_adam`.
    """
    params = [p for p in parameters if p.requires_grad]
    if decay_1d:
        groups: list[dict[str, Any]] = [{"params": params, "weight_decay": weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    kwargs = {"lr": learning_rate, "betas": tuple(betas), "eps": eps}
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError(
                "`use_8bit_adam` needs bitsandbytes: `pip install bitsandbytes` (or `pip install rahf[bnb]`)"
            ) from err
        return bnb.optim.AdamW8bit(groups, **kwargs)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float = 0.0,
    num_processes: int = 1,
    schedule_names: dict[str, str] = LR_SCHEDULES,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`transformers.get_scheduler` under rahf's schedule names (`LR_SCHEDULES`; `DIFFUSERS_LR_SCHEDULES` for the
    names of diffusers' scripts), counted in optimizer steps.

    - `cosine`: half a cosine from the optimizer's lr (the peak) down to `lr_end` at `num_training_steps`;
    - `rsqrt`: T5X-style reciprocal square root, `peak * sqrt(warmup / step)` after warm-up (with no warm-up,
      `peak * sqrt(10_000 / (step + 10_000))`);
    - `constant`: the peak after warm-up; `linear`: linear decay to 0 at `num_training_steps`.

    Pass `num_processes` when accelerate prepares the scheduler: it then steps it once per process per optimizer
    step, so every length is counted in those units.
    """
    from transformers import get_scheduler

    if name not in schedule_names:
        raise ValueError(f"unknown `lr_scheduler` {name!r}; choose one of {list(schedule_names)}")
    kind = schedule_names[name]
    specific: dict[str, Any] = {}
    if kind == "cosine_with_min_lr":
        specific["min_lr"] = lr_end
    elif kind == "inverse_sqrt":
        specific["timescale"] = (num_warmup_steps or 10_000) * num_processes
    return get_scheduler(
        kind,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps * num_processes,
        num_training_steps=num_training_steps * num_processes,
        scheduler_specific_kwargs=specific or None,
    )


# --------------------------------------------------------------------------------------------------------------------
# Data order


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of `range(num_samples)` that depends only on (seed, epoch): the same on every process
    and after a resume, whatever else consumed random numbers. Call `set_epoch` before each epoch."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


# --------------------------------------------------------------------------------------------------------------------
# Logs


def json_value(value: Any) -> Any:
    """A log value as JSON: tensors and numpy scalars as Python numbers, non-finite floats as null."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class JsonlTracker(GeneralTracker):
    """An accelerate tracker that appends one JSON object per `accelerator.log` call to a file.

    Examples:

    ```python
    >>> accelerator = Accelerator(log_with=[JsonlTracker("out/logs/train_log.jsonl")])
    >>> accelerator.init_trackers("rahf")
    >>> accelerator.log({"loss": 0.5}, step=10)  # appends {"step": 10, "loss": 0.5}
    ```
    """

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, **{k: json_value(v) for k, v in values.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def build_trackers(report_to: str, logging_dir: Path, log_name: str = "train_log.jsonl") -> list:
    """The accelerate trackers of `--report_to` (jsonl, tensorboard or all); tensorboard only when installed."""
    from accelerate.utils import is_tensorboard_available

    trackers: list = []
    if report_to in ("jsonl", "all"):
        trackers.append(JsonlTracker(logging_dir / log_name))
    if report_to in ("tensorboard", "all"):
        if is_tensorboard_available():
            trackers.append("tensorboard")
        else:
            logger.warning(
                "report_to=%s: tensorboard is not installed, skipping it (pip install tensorboard)", report_to
            )
    return trackers


def truncate_log(path: Path, step: int) -> None:
    """Keeps the records of a jsonl log up to `step`; a fresh run (`step` 0) starts an empty log. A line that a
    killed run left torn is dropped."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (record.get("step") or 0) <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")
