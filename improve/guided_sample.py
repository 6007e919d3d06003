"""Sampling with RAHF classifier guidance: the same seeds with and without guidance, scored, in a grid and a summary.
Any Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 checkpoint (the family is read from its components).

    python -m rahf.improve.guided_sample --config configs/improve/guidance.yaml
    python -m rahf.improve.guided_sample --config configs/improve/guidance.yaml --reward_guidance_scale 0.25 0.5 1 --seeds 0 1
    python -m rahf.improve.guided_sample --config configs/improve/guidance.yaml \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-schnell --num_inference_steps 4 --guidance_scale 0 \
        --guidance_decode_scale 0.375 --guide_every 2 --mixed_precision bf16

Writes to `--output_dir`: `images/` (one PNG per prompt, seed and scale), `grid.png` (rows: prompt x seed; columns:
the scales, 0 = no guidance; captions: the four RAHF scores) and `summary.json` (per scale: the mean target score, the
means of the other scores, the NaN count; per image: its four scores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from rahf.pipelines.auto import AutoRAHFGuidedPipeline
from rahf.pipelines.families import FLOW_MATCHING_FAMILIES, generator_family
from tqdm.auto import tqdm

from rahf.job_args import check_finite_numbers, parse_job_args, read_prompt_records
from rahf.modeling_rahf import RAHFModel
from rahf.precision import MIXED_PRECISIONS, resolve_mixed_precision, torch_dtype
from rahf.predictor import RichFeedbackPredictor
from rahf.pretrained_paths import resolve_pretrained_path
from rahf.processing_rahf import RAHFProcessor
from rahf.reward import get_reward, list_rewards
from rahf.viz import image_grid

logger = logging.getLogger(__name__)

__all__ = [
    "GuidedSampleArguments",
    "SCHEDULERS",
    "guided_sample",
    "main",
    "parse_args",
    "read_prompts",
]

# --scheduler name -> diffusers class name (all supported by the guided pipelines: the first four for SD and SDXL,
# flow_match_euler for SD3 and FLUX); "auto" keeps the checkpoint's own scheduler when guidance supports it.
SCHEDULERS = {
    "auto": None,
    "flow_match_euler": "FlowMatchEulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
}
# Grid cells are at least this wide so that the captions (four scores) fit under 32 px test images too.
_MIN_CELL = 256


@dataclass
class GuidedSampleArguments:
    """Arguments of `python -m rahf.improve.guided_sample` / `rahf guide`. Each field is a `--flag`; `--config` sets defaults."""

    config: str | None = field(
        default=None, metadata={"help": "YAML file of arguments (keys = flag names); flags on the command line win"}
    )
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "generator pipeline (SD 1.x/2.x, SDXL, SD3, FLUX): hub id or folder (e.g. "
            "stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0)"
        },
    )
    revision: str | None = field(default=None, metadata={"help": "revision of the generator pipeline"})
    reward_model: str | None = field(
        default=None, metadata={"help": "RAHF model folder (model and processor, written by save_pretrained)"}
    )
    prompts_file: str | None = field(
        default=None, metadata={"help": "prompts: a .txt file (one per line) or a .jsonl file (a 'prompt' per record)"}
    )
    reward: str = field(
        default="aesthetics",
        metadata={
            "help": "the reward to increase: a name of rahf.reward.list_rewards(), or a mix such as "
            "'aesthetics=0.7,-implausibility=0.3' (write --reward=-implausibility for a leading '-')"
        },
    )
    reward_guidance_scale: list[float] = field(
        default_factory=lambda: [0.5],
        metadata={"help": "guidance scale(s); several make a sweep; 0 (no guidance) is always added as the baseline"},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3], metadata={"help": "one image per prompt and seed"})
    num_inference_steps: int = field(default=50, metadata={"help": "denoising steps"})
    guidance_scale: float | None = field(
        default=None,
        metadata={"help": "classifier-free guidance scale (FLUX: the distilled guidance); default: the pipeline's"},
    )
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "T5 prompt length of SD3 / FLUX (default: the pipeline's, 256 / 512)"}
    )
    height: int | None = field(default=None, metadata={"help": "image height (default: the UNet's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: the UNet's)"})
    scheduler: str = field(
        default="auto",
        metadata={
            "help": "sampler; auto keeps the checkpoint's if guidance supports it, else DDIM (SD, SDXL) or "
            "flow_match_euler (SD3, FLUX)",
            "choices": sorted(SCHEDULERS),
        },
    )
    guidance_start: float = field(default=0.0, metadata={"help": "first guided step, a fraction of the schedule"})
    guidance_end: float = field(default=1.0, metadata={"help": "guidance stops at this fraction of the schedule"})
    guide_every: int = field(default=1, metadata={"help": "guide every n-th step of the window"})
    num_recurrence_steps: int = field(default=1, metadata={"help": "takes of each guided step (1 = no recurrence)"})
    guidance_decode_scale: float = field(
        default=1.0, metadata={"help": "decode the predicted image at this fraction of its size for the reward"}
    )
    normalize_grad: bool = field(default=True, metadata={"help": "rescale each image's gradient to unit RMS"})
    grad_clip: float | None = field(
        default=1.0, metadata={"help": "clip each image's shift of the noise prediction to this RMS (noise units)"}
    )
    backprop_through_unet: bool = field(
        default=False,
        metadata={"help": "differentiate through the denoiser (UNet / transformer) too: exact gradient, slower"},
    )
    cpu_offload: bool = field(
        default=False,
        metadata={
            "help": "keep the text encoders and the denoiser on the CPU, each moved to --device while it runs "
            "(enable_model_cpu_offload); the VAE and the reward model stay on --device"
        },
    )
    output_dir: str = field(default="guided-output", metadata={"help": "where images/, grid.png, summary.json go"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda when available)"})
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "dtype of the generator pipeline: auto (bf16/fp16 on a GPU, float32 on a CPU), no, fp16, bf16",
            "choices": list(MIXED_PRECISIONS),
        },
    )

    def __post_init__(self):
        if isinstance(self.reward_guidance_scale, (int, float)):
            self.reward_guidance_scale = [float(self.reward_guidance_scale)]
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        check_finite_numbers(self)
        if not self.seeds:
            raise ValueError("`--seeds` is empty; pass at least one seed, e.g. --seeds 0 1 2 3")
        if self.num_inference_steps < 1:
            raise ValueError(f"`--num_inference_steps` must be >= 1, got {self.num_inference_steps}")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"`--max_sequence_length` must be >= 1, got {self.max_sequence_length}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_args(argv: Sequence[str] | None = None) -> GuidedSampleArguments:
    """`--config file.yaml` gives the defaults, the other flags override them."""
    return parse_job_args(
        GuidedSampleArguments,
        None if argv is None else list(argv),
        prog="rahf guide",
        description="Sampling with RAHF classifier guidance.",
    )


def read_prompts(path: str | Path) -> list[str]:
    """A .txt file (one prompt per non-empty line, `#` comments skipped) or a .jsonl file (one record with a
    "prompt", or "text" / "caption", per line)."""
    return [record["prompt"] for record in read_prompt_records(path)]


def _caption(scale: float, scores: dict[str, float], label: str = "") -> str:
    # Cells are >= 256 px wide, room for about 42 characters: "p0 s1 g=0.5 pla.38 ali.27 aes.70 ove.38".
    short = {"plausibility": "pla", "alignment": "ali", "aesthetics": "aes", "overall": "ove"}
    parts = [f"{short.get(k, k[:3])}{v:.2f}".replace("0.", ".", 1) for k, v in scores.items()]
    return f"{label}g={scale:g} " + " ".join(parts)


def _cell(image: Image.Image) -> Image.Image:
    if image.width >= _MIN_CELL:
        return image
    factor = math.ceil(_MIN_CELL / image.width)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def guided_sample(
    generator_pipe,
    reward_model: RAHFModel,
    reward_processor: RAHFProcessor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    scales: Sequence[float],
    out_dir: str | Path,
    reward: str = "aesthetics",
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    **guidance_kwargs,
) -> dict[str, Any]:
    """Generates every prompt with every seed at every scale (0 included), scores the final images (every RAHF score,
    from the reward's own pass, or with `RichFeedbackPredictor` for a reward that does not report them all), and
    writes `images/`, `grid.png` and `summary.json` to `out_dir`.

    Args:
        generator_pipe: any pipeline of SD 1.x/2.x, SDXL, SD3 or FLUX (text-to-image, img2img or inpainting: its
            components are taken); its scheduler must be one the guided pipeline supports.
        guidance_scale: classifier-free guidance scale; `None` keeps the pipeline's default.
        max_sequence_length: T5 prompt length (SD3, FLUX); `None` keeps the pipeline's default.
        guidance_kwargs: `guidance_start`, `guidance_end`, `guide_every`, `num_recurrence_steps`,
            `guidance_decode_scale`, `normalize_grad`, `grad_clip`, `backprop_through_denoiser`.

    Returns:
        The summary (also in `summary.json`): `per_scale` (scale, mean target, means of the other scores, NaN count),
        `images` (prompt, seed, scale, path, scores) and the paths of the grid and the summary.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    scales = sorted({0.0, *(float(s) for s in scales)})
    reward_model = reward_model.to(generator_pipe._execution_device)
    reward_fn = get_reward(reward, reward_model=reward_model, reward_processor=reward_processor)
    # The family's guided class; the pipeline's dtype is kept (from_pipe would cast to float32), the reward model's too.
    reward_dtype = reward_model.dtype
    pipe = AutoRAHFGuidedPipeline.from_pipe(
        generator_pipe, reward_model=reward_model, reward_processor=reward_processor
    )
    pipe.reward_model.to(reward_dtype)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = {"guidance_scale": guidance_scale, "max_sequence_length": max_sequence_length}
    call_kwargs = {k: v for k, v in call_kwargs.items() if v is not None}  # None: the pipeline's default
    predictor = RichFeedbackPredictor(reward_model, reward_processor)
    score_names = list(reward_model.config.score_names)
    target_is_score = reward in score_names

    records: list[dict[str, Any]] = []
    nonfinite_pixels = {s: 0 for s in scales}
    nonfinite_grads = {s: 0 for s in scales}
    jobs = [(p, s) for p in range(len(prompts)) for s in scales]
    for p, scale in tqdm(jobs, desc="guided sampling", disable=len(jobs) < 2):
        prompt = prompts[p]
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        out = pipe(
            [prompt] * len(seeds),
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            generator=generators,
            output_type="np",
            reward=reward_fn,
            reward_guidance_scale=scale,
            **call_kwargs,
            **guidance_kwargs,
        )
        arrays = out.images  # (B, H, W, 3) float in [0, 1]
        nonfinite_pixels[scale] += int((~np.isfinite(arrays)).sum())
        nonfinite_grads[scale] += out.num_nonfinite_grads
        images = pipe.numpy_to_pil(np.nan_to_num(arrays))
        with torch.no_grad():
            targets, info = reward_fn(images, [prompt] * len(images), None)
        reported = info.get("scores", {}) if isinstance(info, dict) else {}
        if all(n in reported for n in score_names):  # a RAHF reward reports every score: no second pass
            per_image = [{n: float(reported[n][i]) for n in score_names} for i in range(len(images))]
        else:
            per_image = [fb.scores for fb in predictor(images, [prompt] * len(images), outputs="scores")]
        for seed, image, image_scores, target in zip(seeds, images, per_image, targets.tolist()):
            path = out_dir / "images" / f"p{p:03d}_seed{seed}_g{scale:g}.png"
            image.save(path)
            records.append(
                {
                    "prompt_index": p,
                    "prompt": prompt,
                    "seed": int(seed),
                    "scale": scale,
                    "path": str(path.relative_to(out_dir)),
                    "target": target,
                    "scores": image_scores,
                }
            )
        logger.info("prompt %d scale %g: mean %s %.4f", p, scale, reward, float(np.mean(targets.tolist())))

    per_scale = []
    for scale in scales:
        rows = [r for r in records if r["scale"] == scale]
        others = {n: float(np.mean([r["scores"][n] for r in rows])) for n in score_names if n != reward}
        values = [r["target"] for r in rows] + [v for r in rows for v in r["scores"].values()]
        per_scale.append(
            {
                "scale": scale,
                "num_images": len(rows),
                "mean_target": float(np.mean([r["target"] for r in rows])),
                "mean_others": others,
                "mean_of_others": float(np.mean(list(others.values()))) if others else None,
                "nan_count": int(sum(not math.isfinite(v) for v in values)) + nonfinite_pixels[scale],
                "nonfinite_grads_zeroed": nonfinite_grads[scale],
            }
        )

    # Grid: one row per (prompt, seed), one column per scale.
    cells, captions = [], []
    for p in range(len(prompts)):
        for seed in seeds:
            for scale in scales:
                rec = next(r for r in records if r["prompt_index"] == p and r["seed"] == seed and r["scale"] == scale)
                cells.append(_cell(Image.open(out_dir / rec["path"]).convert("RGB")))
                captions.append(_caption(scale, rec["scores"], f"p{p} s{seed} " if scale == scales[0] else ""))
    grid_path = out_dir / "grid.png"
    image_grid(cells, cols=len(scales), captions=captions).save(grid_path)

    summary = {
        "reward": reward,
        "target": reward if target_is_score else f"{reward} (reward value)",
        "scales": scales,
        "seeds": [int(s) for s in seeds],
        "prompts": list(prompts),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "family": pipe._rahf_family,
        "scheduler": type(pipe.scheduler).__name__,
        "guidance": {k: v for k, v in guidance_kwargs.items()},
        "per_scale": per_scale,
        "images": records,
        "grid": str(grid_path),
        "summary": str(out_dir / "summary.json"),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in per_scale:
        logger.info(
            "scale %-6g mean %s %.4f | others %s | NaN %d",
            row["scale"],
            reward,
            row["mean_target"],
            {k: round(v, 4) for k, v in row["mean_others"].items()},
            row["nan_count"],
        )
    return summary


def _load_generator_pipeline(args: GuidedSampleArguments, device: str):
    import diffusers
    from diffusers import DiffusionPipeline
    from rahf.pipelines.guidance import FLOW_MATCHING_SCHEDULERS, SUPPORTED_SCHEDULERS
    from rahf.pipelines.loading import dtype_kwarg

    if args.cpu_offload and torch.device(device).type == "cpu":
        raise ValueError(
            "`--cpu_offload` moves the generator's models to an accelerator one at a time; it needs `--device` cuda "
            "(or another accelerator), got cpu"
        )
    dtype = torch_dtype(resolve_mixed_precision(args.mixed_precision, device=device))
    path = resolve_pretrained_path(
        args.pretrained_model_name_or_path,
        "--pretrained_model_name_or_path",
        what="a diffusers pipeline folder",
    )
    try:
        pipe = DiffusionPipeline.from_pretrained(path, revision=args.revision, **dtype_kwarg(dtype))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"`--pretrained_model_name_or_path` {path!r} could not be loaded as a diffusers pipeline ({err})"
        ) from err
    family = generator_family(pipe, "--pretrained_model_name_or_path")
    flow = family in FLOW_MATCHING_FAMILIES
    supported = FLOW_MATCHING_SCHEDULERS if flow else SUPPORTED_SCHEDULERS
    name = args.scheduler
    if name == "auto":
        name = None if isinstance(pipe.scheduler, supported) else ("flow_match_euler" if flow else "ddim")
    elif (name == "flow_match_euler") != flow:
        allowed = ["auto", "flow_match_euler"] if flow else sorted(set(SCHEDULERS) - {"flow_match_euler"})
        raise ValueError(f"`--scheduler {name}` does not fit a {family} pipeline; use one of {allowed}")
    if name is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    missing = [
        f"--{name}"
        for name in ("pretrained_model_name_or_path", "reward_model", "prompts_file")
        if not getattr(args, name)
    ]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: give them as flags or in the --config YAML")
    if "=" not in args.reward and args.reward not in list_rewards():
        raise ValueError(
            f"unknown reward {args.reward!r}; the known rewards are {list_rewards()} (or a mix 'a=0.5,b=0.5')"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = read_prompts(args.prompts_file)
    reward_model = resolve_pretrained_path(args.reward_model, "--reward_model", what="a RAHF model folder")
    generator_pipe = _load_generator_pipeline(args, device)
    model = RAHFModel.from_pretrained(reward_model).to(device)
    processor = RAHFProcessor.from_pretrained(reward_model)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "guided_sample_args.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
    guided_sample(
        generator_pipe,
        model,
        processor,
        prompts,
        args.seeds,
        args.reward_guidance_scale,
        out_dir,
        reward=args.reward,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        max_sequence_length=args.max_sequence_length,
        guidance_start=args.guidance_start,
        guidance_end=args.guidance_end,
        guide_every=args.guide_every,
        num_recurrence_steps=args.num_recurrence_steps,
        guidance_decode_scale=args.guidance_decode_scale,
        normalize_grad=args.normalize_grad,
        grad_clip=args.grad_clip,
        backprop_through_denoiser=args.backprop_through_unet,
    )
    logger.info("wrote %s and %s", out_dir / "grid.png", out_dir / "summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
