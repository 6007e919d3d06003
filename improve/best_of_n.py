"""`rahf best-of-n` / `accelerate launch -m rahf.improve.best_of_n`: generate N images per prompt, score each with RAHF, keep
the best when its reward passes a threshold (the paper's §5 data filtering), written as a `datasets` image folder.
Any text-to-image pipeline of Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1 or aMUSEd generates (a checkpoint saved
from another pipeline of the family is used through the family's text-to-image class).

Outputs under `--output_dir`:

- `kept/`: the kept images and `metadata.jsonl` (`file_name`, `prompt`, the RAHF scores, `reward`, `seed`, `rank`
  among the N, ...): `datasets.load_dataset("imagefolder", data_dir="OUT/kept")` reads it, and so do diffusers'
  fine-tuning scripts (`--train_data_dir OUT/kept --caption_column prompt`) and `rahf.improve.finetune`;
- `all_scores.jsonl`: one row per generated image (N per prompt), kept or not;
- `summary.json`: counts and mean scores; `shards/`: one finished-prompt record each (what makes a rerun resume).

Prompts are split across processes; image `i` of prompt `p` is generated from its own seed, derived from
(`--seed`, p, i), in batches that never mix prompts, so the result does not depend on the number of processes. Each
finished prompt is committed with atomic renames (image, then shard, then a done-marker holding the shard's hash); a
rerun skips the prompts whose marker checks out and redoes any other, so a crash never leaves a half-written prompt
that counts as done.

Examples:

```bash
rahf best-of-n --config configs/improve/best_of_n.yaml --output_dir runs/bon
accelerate launch --multi_gpu --num_processes 8 -m rahf.improve.best_of_n --config configs/improve/best_of_n.yaml \\
    --reward "plausibility=0.5,aesthetics=0.5" --threshold 0.6
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rahf.pipelines.loading import dtype_kwarg

from rahf.constants import SCORE_NAMES
from rahf.job_args import (
    check_finite_numbers,
    check_int_fields,
    parse_job_args,
    read_prompt_records,
    uses_cpu_processes,
)
from rahf.precision import MIXED_PRECISIONS, resolve_mixed_precision, torch_dtype
from rahf.pretrained_paths import resolve_pretrained_path
from rahf.reward import RewardFn, load_reward, parse_reward, score_table
from rahf.training_utils import fsync_dir

logger = logging.getLogger(__name__)

__all__ = [
    "BestOfNArguments",
    "as_text_to_image_pipeline",
    "derive_seed",
    "generate_images",
    "load_text_to_image_pipeline",
    "main",
    "parse_best_of_n_args",
    "read_prompts",
    "run_best_of_n",
    "text_to_image_call_kwargs",
    "text_to_image_family",
]

KEPT_DIR = "kept"
ALL_DIR = "all"
SHARDS_DIR = "shards"
WORK_LOG_DIR = "work_log"
METADATA_NAME = "metadata.jsonl"
ALL_SCORES_NAME = "all_scores.jsonl"
SUMMARY_NAME = "summary.json"
RUN_CONFIG_NAME = "run_config.json"
TMP_MARK = ".tmp-"
# Arguments that change which images are generated or kept: a rerun into the same output_dir must not change them.
_IDENTITY_FIELDS = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "reward_model",
    "num_images_per_prompt",
    "reward",
    "threshold",
    "num_inference_steps",
    "guidance_scale",
    "resolution",
    "negative_prompt",
    "max_sequence_length",
    "seed",
    "mixed_precision",
)


@dataclass
class BestOfNArguments:
    """Everything `rahf best-of-n` needs. Each field is a `--flag`; a YAML file given with `--config` sets defaults.

    Examples:

    ```python
    >>> args = BestOfNArguments(pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
    ...                         reward_model="runs/rahf/final", prompts_file="prompts.txt", reward="plausibility",
    ...                         threshold=0.8, output_dir="runs/bon")
    >>> summary = run_best_of_n(args)  # summary["num_kept"], summary["mean_reward_kept"], ...
    ```
    """

    config: str | None = field(
        default=None, metadata={"help": "YAML file of arguments (keys = flag names); flags on the command line win"}
    )
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "a diffusers text-to-image pipeline: hub id or folder (SD 1.x/2.x, SDXL, SD3, FLUX, aMUSEd)"
        },
    )
    revision: str | None = field(default=None, metadata={"help": "hub revision of the pipeline"})
    variant: str | None = field(default=None, metadata={"help": "weights variant of the pipeline, e.g. fp16"})
    reward_model: str | None = field(
        default=None, metadata={"help": "a RAHF model folder (save_pretrained: model + processor)"}
    )
    prompts_file: str | None = field(
        default=None,
        metadata={
            "help": "prompts: .txt (one per line; blank lines and lines starting with # skipped) or .jsonl "
            "(a `prompt` field per row)"
        },
    )
    output_dir: str = field(default="best-of-n-output", metadata={"help": "where kept/, all_scores.jsonl, ... go"})
    num_images_per_prompt: int = field(default=8, metadata={"help": "N: images generated per prompt"})
    reward: str = field(
        default="overall",
        metadata={
            "help": "the reward to rank by: a name (plausibility, alignment, aesthetics, overall, "
            "-implausibility, -misalignment) or a weighted mix 'plausibility=0.5,aesthetics=0.5' "
            "('-implausibility=0.2' weighs minus the mean implausibility heat; write --reward=-implausibility "
            "with `=` on the command line)"
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "keep a prompt's best image only when its reward is above this (paper: 0.8 on "
            "plausibility); default: always keep the best"
        },
    )
    num_inference_steps: int = field(default=50, metadata={"help": "denoising steps per image"})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "classifier-free guidance (pipeline default)"}
    )
    resolution: int | None = field(default=None, metadata={"help": "image height and width (pipeline default)"})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt for every image"})
    max_sequence_length: int | None = field(
        default=None,
        metadata={"help": "SD3 / FLUX: T5 tokens of the prompt (pipeline default: 256 / 512); ignored by the others"},
    )
    seed: int = field(default=0, metadata={"help": "base seed: image i of prompt p uses derive_seed(seed, p, i)"})
    batch_size: int = field(default=8, metadata={"help": "images per pipeline call (never mixing prompts)"})
    reward_batch_size: int = field(default=16, metadata={"help": "images per RAHF forward pass"})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "the generator's dtype: auto (bf16/fp16 on a GPU, float32 on a CPU), no, fp16 or bf16; "
            "default: what `accelerate launch` says, else no",
            "choices": list(MIXED_PRECISIONS),
        },
    )
    device: str | None = field(default=None, metadata={"help": "e.g. cuda, cpu; default: the process's accelerator"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts of the file"})
    save_all_images: bool = field(default=False, metadata={"help": "also write every generated image under all/"})
    image_format: str = field(default="png", metadata={"help": "png or jpg", "choices": ["png", "jpg"]})

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        check_int_fields(
            self,
            positive=("num_images_per_prompt", "num_inference_steps", "batch_size", "reward_batch_size"),
            positive_or_unset=("max_prompts", "max_sequence_length"),
        )
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"`resolution` must be at least 8 pixels or unset, got {self.resolution!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"`mixed_precision` must be one of {list(MIXED_PRECISIONS)}, got {self.mixed_precision!r}"
            )
        parse_reward(self.reward)  # fails early on a malformed mix

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in _IDENTITY_FIELDS}


def parse_best_of_n_args(argv: list[str] | None = None) -> BestOfNArguments:
    """`--config file.yaml` gives the defaults, the other flags override them.

    Examples:

    ```python
    >>> args = parse_best_of_n_args(["--config", "configs/improve/best_of_n.yaml", "--num_images_per_prompt", "4"])
    ```
    """
    return parse_job_args(
        BestOfNArguments,
        argv,
        prog="rahf best-of-n",
        description="Generate N images per prompt, keep the best by a RAHF reward.",
    )


# --------------------------------------------------------------------------------------------------------------------
# Prompts, seeds, rewards


def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Prompt records from a .txt file (one prompt a line) or a .jsonl file (`prompt`, or `text` / `caption`, per row).

    Returns:
        one dict per prompt with `prompt` and, for jsonl, the row's other fields (handed to the reward as metadata).
    """
    return read_prompt_records(path, flag="prompts_file")


def derive_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image `image_index` of prompt `prompt_index`: a 31-bit int that depends on nothing else."""
    return int(np.random.SeedSequence([int(seed), int(prompt_index), int(image_index)]).generate_state(1)[0] >> 1)


# --------------------------------------------------------------------------------------------------------------------
# Crash-safe files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to a hidden temporary name beside `path`, fsyncs it, then renames it over `path`.

    A reader sees the old file or the whole new one, never a prefix; the temporary name starts with a dot and holds
    `.tmp-`, so neither `load_dataset("imagefolder")` nor a rerun ever takes it for a result.
    """
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _encode_image(image: Image.Image, image_format: str) -> bytes:
    import io

    buffer = io.BytesIO()
    if image_format == "jpg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shard_path(output_dir: Path, prompt_index: int) -> Path:
    return output_dir / SHARDS_DIR / f"{prompt_index:06d}.json"


def _done_path(output_dir: Path, prompt_index: int) -> Path:
    return output_dir / SHARDS_DIR / f"{prompt_index:06d}.done"


def _load_done_shard(output_dir: Path, prompt_index: int, prompt: str) -> dict[str, Any] | None:
    """The shard of a finished prompt, or None when the prompt must be (re)done.

    Done means: the marker exists and names the sha256 of the shard file as it is now, the shard is for this prompt,
    and the kept image (if any) has the bytes the shard recorded.
    """
    done, shard = _done_path(output_dir, prompt_index), _shard_path(output_dir, prompt_index)
    try:
        marker = json.loads(done.read_text())
        data = shard.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("shard_sha256") != _sha256(data):
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if record.get("prompt") != prompt:
        logger.warning(
            "prompt %d changed since it was generated (%r -> %r): generating it again",
            prompt_index,
            record.get("prompt"),
            prompt,
        )
        return None
    kept = record.get("kept")
    if kept is not None:
        try:
            image_bytes = (output_dir / KEPT_DIR / kept["file_name"]).read_bytes()
        except OSError:
            return None
        if _sha256(image_bytes) != kept.get("image_sha256"):
            return None
    return record


def _clean_stale_files(output_dir: Path) -> int:
    """Deletes temporary files left by a crashed run (never a finished result); returns how many."""
    removed = 0
    for folder in (output_dir, output_dir / KEPT_DIR, output_dir / ALL_DIR, output_dir / SHARDS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and TMP_MARK in path.name and path.is_file():
                path.unlink()
                removed += 1
    return removed


# --------------------------------------------------------------------------------------------------------------------
# Generation


# The text-to-image class of each family: a checkpoint saved from another task's pipeline of the family (an SDXL
# inpainting pipeline holding a text-to-image UNet, say) is re-wrapped in it with `from_pipe`, sharing its components.
_TEXT_TO_IMAGE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "amused": "AmusedPipeline",
}
# Families whose pipelines read a T5 encoder and take `max_sequence_length`.
_T5_FAMILIES = ("sd3", "flux")


def text_to_image_family(pipe, argument: str = "pretrained_model_name_or_path") -> str:
    """The generator family of `pipe` (`sd`, `sdxl`, `sd3`, `flux` or `amused`), refusing a denoiser that reads more
    than the noisy latents (an inpainting UNet, a FLUX.1 Fill transformer): it cannot generate from a prompt alone.

    Raises:
        `ValueError`: naming `argument`, for an unsupported pipeline or an inpainting / image-conditioned denoiser.
    """
    from rahf.pipelines.families import denoiser_of, generator_family

    family = generator_family(pipe, argument)
    if family == "amused":
        return family
    denoiser, latent_channels = denoiser_of(pipe), pipe.vae.config.latent_channels
    # FLUX packs 2x2 latent patches into one token; the others read the latents as they are.
    expected = 4 * latent_channels if family == "flux" else latent_channels
    if denoiser.config.in_channels != expected:
        raise ValueError(
            f"`{argument}` is a {type(pipe).__name__} whose {type(denoiser).__name__} takes "
            f"{denoiser.config.in_channels} input channels, not the {expected} of the noisy latents alone (an "
            "inpainting or image-conditioned checkpoint); pass a text-to-image checkpoint of the family"
        )
    return family


def as_text_to_image_pipeline(pipe, argument: str = "pretrained_model_name_or_path"):
    """`pipe` as its family's text-to-image pipeline (the same object when it already is one; otherwise the class's
    `from_pipe`, sharing the components), after `text_to_image_family`'s checks."""
    import diffusers

    family = text_to_image_family(pipe, argument)
    cls = getattr(diffusers, _TEXT_TO_IMAGE_CLASSES[family])
    if isinstance(pipe, cls):
        return pipe
    logger.info("using the %s components of a %s as a %s", family, type(pipe).__name__, cls.__name__)
    return cls.from_pipe(pipe)


def load_text_to_image_pipeline(
    name_or_path: str, dtype: torch.dtype = torch.float32, revision: str | None = None, variant: str | None = None
):
    """`DiffusionPipeline.from_pretrained`, as its family's text-to-image pipeline (`as_text_to_image_pipeline`), with
    a clear error when the folder or hub id is not a pipeline of a supported family (SD, SDXL, SD3, FLUX, aMUSEd)."""
    from diffusers import DiffusionPipeline

    name_or_path = resolve_pretrained_path(
        name_or_path, "--pretrained_model_name_or_path", what="a diffusers pipeline folder (pipe.save_pretrained)"
    )
    kwargs: dict[str, Any] = dtype_kwarg(dtype)
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    try:
        pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"`pretrained_model_name_or_path` {name_or_path!r} could not be loaded as a diffusers pipeline ({err}); "
            "pass a folder written by `pipe.save_pretrained` or a hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        ) from err
    return as_text_to_image_pipeline(pipe)


def text_to_image_call_kwargs(
    pipe,
    num_inference_steps: int,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of one text-to-image call, for whichever family `pipe` is: what is unset is left to the
    pipeline's defaults, and `max_sequence_length` goes only to the T5 families (SD3, FLUX) that take it."""
    from rahf.pipelines.families import generator_family

    kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps, "output_type": "pil"}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if max_sequence_length is not None and generator_family(pipe) in _T5_FAMILIES:
        kwargs["max_sequence_length"] = max_sequence_length
    return kwargs


def _takes_generator_list(pipe) -> bool:
    # Pipelines that draw their initial noise with `prepare_latents` (Stable Diffusion family, PixArt, ...) accept one
    # generator per image; aMUSEd's scheduler takes a single generator, so there each image gets its own call.
    return hasattr(pipe, "prepare_latents")


def generate_images(
    pipe, prompt: str, seeds: list[int], args: BestOfNArguments, device: torch.device
) -> list[Image.Image]:
    """One image per seed for `prompt`, with the generation settings of `args` (as many per call as `batch_size`)."""
    kwargs = text_to_image_call_kwargs(
        pipe,
        args.num_inference_steps,
        height=args.resolution,
        width=args.resolution,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        max_sequence_length=args.max_sequence_length,
    )
    gen_device = "cpu" if device.type == "mps" else device
    images: list[Image.Image] = []
    if _takes_generator_list(pipe):
        for start in range(0, len(seeds), args.batch_size):
            chunk = seeds[start : start + args.batch_size]
            generators = [torch.Generator(gen_device).manual_seed(s) for s in chunk]
            images += pipe(prompt, num_images_per_prompt=len(chunk), generator=generators, **kwargs).images
    else:
        for s in seeds:
            images += pipe(
                prompt, num_images_per_prompt=1, generator=torch.Generator(gen_device).manual_seed(s), **kwargs
            ).images
    return [im.convert("RGB") for im in images]


def _process_prompt(
    pipe,
    reward_fn: RewardFn,
    output_dir: Path,
    prompt_index: int,
    record: dict[str, Any],
    args: BestOfNArguments,
    device: torch.device,
    process_index: int,
) -> dict[str, Any]:
    """Generates, scores and commits one prompt; returns its shard record."""
    prompt = record["prompt"]
    n = args.num_images_per_prompt
    seeds = [derive_seed(args.seed, prompt_index, i) for i in range(n)]
    images = generate_images(pipe, prompt, seeds, args, device)
    metadata = {**record, "prompt_index": prompt_index, "image_index": list(range(n)), "seed": seeds}
    rewards_list: list[float] = []
    table: dict[str, list[float]] = {}
    for start in range(0, n, args.reward_batch_size):
        sl = slice(start, start + args.reward_batch_size)
        part = {**metadata, "image_index": metadata["image_index"][sl], "seed": seeds[sl]}
        rewards, info = reward_fn(images[sl], [prompt] * len(images[sl]), part)
        rewards_list += [float(v) for v in torch.as_tensor(rewards).detach().float().reshape(-1).cpu()]
        for name, values in score_table(info, len(images[sl])).items():
            table.setdefault(name, []).extend(values)
    table = {k: v for k, v in table.items() if len(v) == n}
    order = sorted(range(n), key=lambda i: (-rewards_list[i], i))  # best first; ties: the lower image index
    rank = {i: r + 1 for r, i in enumerate(order)}
    best = order[0]
    passes = args.threshold is None or rewards_list[best] > args.threshold  # "above a fixed threshold" (§5)
    ext = "jpg" if args.image_format == "jpg" else "png"

    rows = []
    for i in range(n):
        row = {
            "image_index": i,
            "seed": seeds[i],
            "reward": rewards_list[i],
            "rank": rank[i],
            "kept": bool(passes and i == best),
            "scores": {k: v[i] for k, v in table.items()},
        }
        if args.save_all_images:
            name = f"{prompt_index:06d}-{i:02d}.{ext}"
            _atomic_write_bytes(output_dir / ALL_DIR / name, _encode_image(images[i], args.image_format))
            row["file_name"] = f"{ALL_DIR}/{name}"
        rows.append(row)
    kept = None
    if passes:
        name = f"{prompt_index:06d}-{best:02d}.{ext}"
        data = _encode_image(images[best], args.image_format)
        _atomic_write_bytes(output_dir / KEPT_DIR / name, data)  # 1. the image
        kept = {"file_name": name, "image_index": best, "image_sha256": _sha256(data)}
    shard = {
        "prompt_index": prompt_index,
        "prompt": prompt,
        "process_index": process_index,
        "num_images_per_prompt": n,
        "rows": rows,
        "kept": kept,
    }
    shard_bytes = (json.dumps(shard, sort_keys=True) + "\n").encode("utf-8")
    _atomic_write_bytes(_shard_path(output_dir, prompt_index), shard_bytes)  # 2. the record
    _mark_done(output_dir, prompt_index, shard_bytes)  # 3. the marker, last
    return shard


def _mark_done(output_dir: Path, prompt_index: int, shard_bytes: bytes) -> None:
    _atomic_write_text(_done_path(output_dir, prompt_index), json.dumps({"shard_sha256": _sha256(shard_bytes)}) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Merge


_OWN_IMAGE = re.compile(r"\d{6}-\d{2,}\.(png|jpg)")


def _merge(
    output_dir: Path,
    records: list[dict[str, Any]],
    args: BestOfNArguments,
    shards: list[dict[str, Any]],
    generated: int,
    seconds: float,
) -> dict[str, Any]:
    """Writes kept/metadata.jsonl, all_scores.jsonl and summary.json from the shards, in prompt order."""
    n = args.num_images_per_prompt
    kept_rows, all_rows = [], []
    for shard in shards:
        p, prompt = shard["prompt_index"], shard["prompt"]
        for row in shard["rows"]:
            flat = {
                "prompt_index": p,
                "prompt": prompt,
                "image_index": row["image_index"],
                "seed": row["seed"],
                **row["scores"],
                "reward": row["reward"],
                "rank": row["rank"],
                "kept": row["kept"],
            }
            if "file_name" in row:
                flat["file_name"] = row["file_name"]
            all_rows.append(flat)
        if shard["kept"] is not None:
            row = shard["rows"][shard["kept"]["image_index"]]
            kept_rows.append(
                {
                    "file_name": shard["kept"]["file_name"],
                    "prompt": prompt,
                    "prompt_index": p,
                    "image_index": row["image_index"],
                    "seed": row["seed"],
                    **row["scores"],
                    "reward": row["reward"],
                    "rank": row["rank"],
                    "num_images_per_prompt": n,
                }
            )
    kept_dir = output_dir / KEPT_DIR
    kept_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(kept_dir / METADATA_NAME, "".join(json.dumps(r) + "\n" for r in kept_rows))
    _atomic_write_text(output_dir / ALL_SCORES_NAME, "".join(json.dumps(r) + "\n" for r in all_rows))
    # Images of an earlier run over a longer prompts file would otherwise be read as training data without metadata.
    referenced = {r["file_name"] for r in kept_rows}
    for path in kept_dir.iterdir():
        if _OWN_IMAGE.fullmatch(path.name) and path.name not in referenced:
            path.unlink()

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    score_names = sorted({k for r in all_rows for k in r if k in SCORE_NAMES or k.endswith("_mean")})
    summary = {
        "num_prompts": len(records),
        "num_images": len(all_rows),
        "num_kept": len(kept_rows),
        "kept_fraction": len(kept_rows) / max(1, len(records)),
        "reward": args.reward,
        "threshold": args.threshold,
        "num_images_per_prompt": n,
        "mean_reward_all": mean([r["reward"] for r in all_rows]),
        "mean_reward_kept": mean([r["reward"] for r in kept_rows]),
        "mean_scores_all": {k: mean([r[k] for r in all_rows if k in r]) for k in score_names},
        "mean_scores_kept": {k: mean([r[k] for r in kept_rows if k in r]) for k in score_names},
        "generated_this_run": generated,
        "seconds_this_run": seconds,
    }
    _atomic_write_text(output_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------------------------
# The job


def _check_run_config(output_dir: Path, args: BestOfNArguments) -> None:
    path = output_dir / RUN_CONFIG_NAME
    identity = args.identity()
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} holds a run with other settings ({details}); resuming would mix "
                "them. Pass a new --output_dir, or delete the old one"
            )
        return
    _atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def run_best_of_n(args: BestOfNArguments, pipe=None, reward_fn: RewardFn | None = None) -> dict[str, Any]:
    """Runs the job on this process (one of many under `accelerate launch`); returns the summary.

    Args:
        pipe: a loaded text-to-image pipeline, instead of loading `args.pretrained_model_name_or_path`.
        reward_fn: a reward `fn(images, prompts, metadata) -> (scores, info)`, instead of `args.reward` on
            `args.reward_model`.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    if not args.prompts_file:
        raise ValueError("pass `--prompts_file` (a .txt file with one prompt a line, or a .jsonl file)")
    start_time = time.perf_counter()
    state = PartialState(cpu=uses_cpu_processes() or args.device == "cpu")
    device = torch.device(args.device) if args.device else state.device
    args.mixed_precision = resolve_mixed_precision(args.mixed_precision, device=device)
    output_dir = Path(args.output_dir)
    records = read_prompts(args.prompts_file)
    if args.max_prompts:
        records = records[: args.max_prompts]

    # 1. The main process checks the settings, cleans up after a crash and lists the prompts still to do; every
    # process gets the same list (no process lists while another is already writing).
    pending: list[int] | None = None
    error: str | None = None
    if state.is_main_process:
        try:
            for sub in (KEPT_DIR, SHARDS_DIR, WORK_LOG_DIR) + ((ALL_DIR,) if args.save_all_images else ()):
                (output_dir / sub).mkdir(parents=True, exist_ok=True)
            _check_run_config(output_dir, args)
            removed = _clean_stale_files(output_dir)
            if removed:
                logger.info("removed %d temporary file(s) left by an interrupted run", removed)
            pending = [p for p, r in enumerate(records) if _load_done_shard(output_dir, p, r["prompt"]) is None]
            for p in pending:  # a stale marker must not outlive the shard it vouched for
                _done_path(output_dir, p).unlink(missing_ok=True)
        except ValueError as err:
            error = str(err)
    shared = [pending, error]
    if state.num_processes > 1:
        broadcast_object_list(shared)
    pending, error = shared
    if error is not None:
        raise ValueError(error)
    if state.is_main_process:
        logger.info(
            "%d prompt(s), %d already done, %d to generate with N=%d on %d process(es)",
            len(records),
            len(records) - len(pending),
            len(pending),
            args.num_images_per_prompt,
            state.num_processes,
        )

    # 2. Models, only when there is work (a finished run just merges again).
    generated = 0
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    if mine:
        if pipe is None:
            pipe = load_text_to_image_pipeline(
                args.pretrained_model_name_or_path,
                torch_dtype(args.mixed_precision),
                revision=args.revision,
                variant=args.variant,
            )
        else:
            pipe = as_text_to_image_pipeline(pipe, "pipe")
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if reward_fn is None:
            reward_fn = load_reward(args.reward, args.reward_model, device=device, batch_size=args.reward_batch_size)
        work_log = output_dir / WORK_LOG_DIR / f"rank{state.process_index}.jsonl"
        bar = tqdm(
            mine,
            desc=f"best-of-{args.num_images_per_prompt} [rank {state.process_index}]",
            unit="prompt",
            position=state.process_index,
        )
        for p in bar:
            shard = _process_prompt(pipe, reward_fn, output_dir, p, records[p], args, device, state.process_index)
            generated += 1
            with work_log.open("a") as f:
                f.write(json.dumps({"prompt_index": p, "num_processes": state.num_processes}) + "\n")
            best = max(r["reward"] for r in shard["rows"])
            bar.set_postfix(best=f"{best:.3f}", kept=shard["kept"] is not None)

    # 3. The main process merges every prompt's shard, in prompt order.
    state.wait_for_everyone()
    summary: dict[str, Any] = {}
    if state.is_main_process:
        shards = []
        missing = []
        for p, r in enumerate(records):
            shard = _load_done_shard(output_dir, p, r["prompt"])
            (missing.append(p) if shard is None else shards.append(shard))
        if missing:
            raise RuntimeError(f"prompts {missing[:10]} have no finished shard after all processes returned")
        summary = _merge(output_dir, records, args, shards, len(pending), time.perf_counter() - start_time)
        logger.info(
            "kept %d of %d prompts (mean reward kept %s, all %s); wrote %s",
            summary["num_kept"],
            summary["num_prompts"],
            summary["mean_reward_kept"],
            summary["mean_reward_all"],
            output_dir / KEPT_DIR,
        )
    summary["generated_by_this_process"] = generated
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rahf best-of-n` and `python -m rahf.improve.best_of_n` / `accelerate launch -m rahf.improve.best_of_n`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_best_of_n_args(argv)
    run_best_of_n(args)
    _destroy_process_group()
    return 0


def _destroy_process_group() -> None:
    # Without it a gloo/nccl process group dies with "terminate called without an active exception" at exit.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
