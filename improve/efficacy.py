"""`rahf efficacy`: the paper's §5 experiments in the measuring world, each judged by the judge (never a reward) on
held-out prompts, each beside a control that runs the same procedure without RAHF's information.

- **Best-of-N + fine-tuning** (the paper's Table 5): the generator makes N images for each selection prompt, RAHF's
  plausibility keeps the best of each (above a threshold: prompts whose best falls below the `threshold_quantile` of
  the bests are dropped), a LoRA is fine-tuned on the kept set with `rahf.improve.finetune`; the control keeps a random
  image of the N of the same prompts and is fine-tuned the same way. On held-out prompts, the judge compares each
  fine-tuned generator with the original, side by side on the same seeds, in Table 5's five buckets.
- **Repair** (Fig. 9): generated images that the judge finds flawed go through RAHF inpainting (heatmap -> mask -> K
  candidates -> RAHF rescoring); the control inpaints a random mask of the same area (the RAHF mask moved to a random
  place), with the same rescoring.
- **Guidance** (Fig. 8): RAHF-guided sampling at several scales for a target score; scale 0 is the control.
- **Reward fine-tuning** (`--experiments reward_backprop policy_gradient policy_gradient_dense`, not run by default:
  they do not fit the default run's time on a CPU): LoRA trained online on the same selection prompts by
  backpropagating RAHF's reward through the last sampler step (`rahf.improve.reward_finetune`), by policy gradient with
  group advantages (`rahf.improve.policy_gradient`), and by the same policy gradient with the advantage placed by RAHF's
  implausibility heatmap. Each gets the budget of generator forward passes that best-of-N spent (sampling its N images
  per prompt plus its LoRA's training passes), unless `--method_budget` sets another, and is judged against the
  original generator side by side like best-of-N.

Held-out prompts are drawn from the synthetic grammar by `--seed` (as are every sampling seed and the random
controls), apart from the selection prompts and from every prompt the generator trained on.

```bash
rahf efficacy --out efficacy --seed 0                  # all three, the defaults (27 min on one CPU core)
rahf efficacy --out efficacy-s1 --seed 1 --num_prompts 50
rahf efficacy --out efficacy-all --summarize efficacy efficacy-s1   # the seeds side by side: mean and spread
rahf efficacy --out efficacy-ft --experiments best_of_n reward_backprop policy_gradient policy_gradient_dense
```

Writes `OUT/efficacy.json`, `OUT/report.md` and its pictures.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rahf.job_args import check_finite_numbers, check_int_fields, parse_job_args

from .judge import JUDGED_SCORES, SynthJudge

logger = logging.getLogger(__name__)

__all__ = [
    "BUCKETS",
    "TARGETS",
    "EfficacyArguments",
    "bucket_of",
    "check_targets",
    "draw_prompts",
    "main",
    "run_efficacy",
    "summarize_runs",
    "weights_path",
]

# Table 5's side-by-side buckets, on the per-prompt difference d of the judged overall score (fine-tuned - original,
# mean over the prompt's seeds): a whole requirement of one image (1/5 of alignment) or one artifact moves d by about
# 0.1 at 2 seeds, so "much" is two of them or more.
BUCKETS = ("much_better", "better", "same", "worse", "much_worse")
BUCKET_EDGES = {"much": 0.15, "some": 0.025}
# The prompts of the synthetic grammar that efficacy draws come from renders under this seed offset (held-out and
# selection prompts alike), far from the seed 0 of the data everything trained on.
PROMPT_SEED_OFFSET = 424_242
EXPERIMENTS = ("best_of_n", "repair", "guidance", "reward_backprop", "policy_gradient", "policy_gradient_dense")
# The reward fine-tuning methods, each judged like best-of-N at best-of-N's budget of generator forward passes.
ONLINE_METHODS = ("reward_backprop", "policy_gradient", "policy_gradient_dense")
# What each experiment must show to count as an improvement (shares of held-out prompts / flawed images; relative
# changes of judged means): the bar, a little above the paper's Table 5 (51.8 % better, 16.8 % worse).
TARGETS = {
    "best_of_n": {"better_at_least": 0.55, "worse_at_most": 0.15, "judged_mean_drop_at_most": 0.05},
    "repair": {"raised_at_least": 0.60, "lowered_at_most": 0.10},
    "guidance": {"target_rise_at_least": 0.10, "other_drop_at_most": 0.05},
}


def weights_path(name: str) -> Path:
    """A model shipped with rahf for the measuring world: `generator_synth`, `judge_synth` or `rahf_synth_tiny`."""
    from importlib import resources

    path = Path(str(resources.files("rahf.improve").joinpath("weights", name)))
    if not path.is_dir():
        raise ValueError(
            f"no shipped model {name!r} under {path.parent}; pass its folder explicitly (see the README's commands that "
            "train the measuring world's generator, judge and RAHF)"
        )
    return path


def bucket_of(difference: float) -> str:
    """The Table 5 bucket of a judged-overall difference."""
    if difference >= BUCKET_EDGES["much"]:
        return "much_better"
    if difference >= BUCKET_EDGES["some"]:
        return "better"
    if difference > -BUCKET_EDGES["some"]:
        return "same"
    if difference > -BUCKET_EDGES["much"]:
        return "worse"
    return "much_worse"


@dataclass
class EfficacyArguments:
    """Arguments of `rahf efficacy`. Each field is a `--flag`; `--config` YAML sets defaults."""

    config: str | None = field(default=None, metadata={"help": "YAML file of arguments (keys = flag names)"})
    out: str = field(default="efficacy-output", metadata={"help": "output folder (efficacy.json, report.md, ...)"})
    seed: int = field(default=0, metadata={"help": "draws the held-out prompts, every sampling seed and the controls"})
    num_prompts: int = field(default=100, metadata={"help": "held-out prompts the judge rates"})
    seeds_per_prompt: int = field(default=2, metadata={"help": "images per held-out prompt and generator"})
    generator: str | None = field(default=None, metadata={"help": "generator folder (default: the shipped one)"})
    judge: str | None = field(default=None, metadata={"help": "judge folder (default: the shipped one)"})
    reward_model: str | None = field(default=None, metadata={"help": "RAHF folder (default: the shipped one)"})
    num_inference_steps: int = field(default=20, metadata={"help": "DDIM steps of every generation"})
    guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance of every generation"})
    experiments: list[str] = field(
        default_factory=lambda: ["best_of_n", "repair", "guidance"], metadata={"help": "which experiments to run"}
    )
    # ---- best-of-N + fine-tuning
    num_selection_prompts: int = field(default=200, metadata={"help": "prompts best-of-N selects among"})
    num_images_per_prompt: int = field(default=8, metadata={"help": "N"})
    selection_reward: str = field(default="plausibility", metadata={"help": "the RAHF reward that picks the best"})
    threshold_quantile: float = field(
        default=0.25, metadata={"help": "drop the prompts whose best reward is below this quantile of the bests"}
    )
    finetune_steps: int = field(default=300, metadata={"help": "LoRA steps on each kept set"})
    finetune_batch_size: int = field(default=16, metadata={"help": "LoRA batch"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_learning_rate: float = field(default=3e-4, metadata={"help": "LoRA learning rate"})
    # ---- repair
    repair_images: int = field(default=40, metadata={"help": "at most this many judged-flawed images are repaired"})
    repair_candidates: int = field(default=4, metadata={"help": "K candidates per repair"})
    repair_dilation: float = field(default=0.06, metadata={"help": "mask dilation, a share of the image side"})
    # ---- guidance
    guidance_prompts: int = field(default=40, metadata={"help": "held-out prompts generated with guidance"})
    guidance_targets: list[str] = field(
        default_factory=lambda: ["plausibility", "aesthetics"], metadata={"help": "RAHF scores guided towards"}
    )
    reward_guidance_scales: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 2.0], metadata={"help": "guidance scales (0 is always added)"}
    )
    # ---- reward fine-tuning (reward_backprop, policy_gradient, policy_gradient_dense)
    method_budget: int | None = field(
        default=None,
        metadata={"help": "generator forward passes (one denoising step of one image) each fine-tuning method may "
                          "spend; default: what best-of-N spends with the settings above"},
    )  # fmt: skip
    method_reward: str = field(default="plausibility", metadata={"help": "the RAHF reward the methods train on"})
    backprop_steps: int = field(default=1, metadata={"help": "reward_backprop: K last steps with gradients"})
    backprop_batch_size: int = field(default=8, metadata={"help": "reward_backprop: images per step"})
    backprop_learning_rate: float = field(default=3e-4, metadata={"help": "reward_backprop: LoRA learning rate"})
    backprop_reference_weight: float = field(default=0.0, metadata={"help": "reward_backprop: reference penalty"})
    pg_group_size: int = field(default=4, metadata={"help": "policy gradient: images per prompt (G)"})
    pg_batch_size: int = field(default=4, metadata={"help": "policy gradient: prompts per step"})
    pg_learning_rate: float = field(default=3e-4, metadata={"help": "policy gradient: LoRA learning rate"})
    pg_train_timestep_fraction: float = field(default=0.5, metadata={"help": "policy gradient: steps trained on"})
    pg_clip_range: float = field(default=1e-4, metadata={"help": "policy gradient: importance-ratio clip"})
    pg_heatmap: str = field(default="implausibility", metadata={"help": "policy_gradient_dense: the heatmap"})
    device: str = field(default="cpu", metadata={"help": "where everything runs"})
    summarize: list[str] = field(
        default_factory=list,
        metadata={"help": "instead of running: folders of earlier runs (one per seed) -> OUT/summary.json, their "
                          "figures side by side with mean and spread"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        check_int_fields(
            self,
            positive=("num_prompts", "seeds_per_prompt", "num_inference_steps", "num_selection_prompts",
                      "num_images_per_prompt", "finetune_steps", "finetune_batch_size", "lora_rank",
                      "repair_candidates", "guidance_prompts", "backprop_steps", "backprop_batch_size",
                      "pg_group_size", "pg_batch_size"),
            positive_or_unset=("method_budget",),
            non_negative=("repair_images",),
        )  # fmt: skip
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown or not self.experiments:
            raise ValueError(f"`experiments` must name some of {', '.join(EXPERIMENTS)}, got {self.experiments!r}")
        if not 0.0 <= self.threshold_quantile < 1.0:
            raise ValueError(f"`threshold_quantile` must lie in [0, 1), got {self.threshold_quantile!r}")


# --------------------------------------------------------------------------------------------------------------------
# Prompts and sampling


def _training_prompts(generator_dir: Path) -> set[str]:
    path = generator_dir / "training_prompts.txt"
    return set(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else set()


def draw_prompts(seed: int, count: int, exclude: set[str], start: int = 0) -> tuple[list[str], int]:
    """`count` distinct prompts of the synthetic grammar drawn by `seed` (renders of the test split under
    `PROMPT_SEED_OFFSET + seed`, from index `start`), none in `exclude`; returns them and the next index."""
    from rahf.data.synth import SynthConfig, render_example

    config = SynthConfig(num_train=1, num_validation=1, num_test=1, seed=PROMPT_SEED_OFFSET + int(seed))
    prompts: list[str] = []
    seen = set(exclude)
    index = start
    while len(prompts) < count:
        _, truth = render_example("test", index, config)
        index += 1
        if truth["prompt"] not in seen:
            seen.add(truth["prompt"])
            prompts.append(truth["prompt"])
        if index - start > 50 * count + 1000:
            raise RuntimeError(f"could only draw {len(prompts)} new prompts of {count}: the grammar is exhausted")
    return prompts, index


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], args: EfficacyArguments, batch: int = 16, **kwargs):
    """One image per (prompt, seed) pair, in batches; `kwargs` go to the pipeline (guidance settings)."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        part_prompts, part_seeds = prompts[start : start + batch], seeds[start : start + batch]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in part_seeds]
        out = pipe(part_prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                   generator=generators, **kwargs)  # fmt: skip
        images += list(out.images)
    return images


def _load_generator(path: Path, device: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _judge_means(verdicts) -> dict[str, float]:
    return {name: float(np.mean([v.scores[name] for v in verdicts])) for name in JUDGED_SCORES}


def _side_by_side(original, tuned, prompts_per_image: list[str]) -> dict[str, Any]:
    """Per-prompt mean judged overall of `tuned` minus `original` (same prompts and seeds) -> bucket shares."""
    per_prompt: dict[str, list[float]] = {}
    for prompt, a, b in zip(prompts_per_image, original, tuned):
        per_prompt.setdefault(prompt, []).append(b.scores["overall"] - a.scores["overall"])
    differences = [float(np.mean(v)) for v in per_prompt.values()]
    counts = {b: 0 for b in BUCKETS}
    for d in differences:
        counts[bucket_of(d)] += 1
    n = max(len(differences), 1)
    return {"buckets": {b: counts[b] / n for b in BUCKETS}, "num_prompts": len(differences),
            "mean_difference": float(np.mean(differences)) if differences else 0.0}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Best-of-N + fine-tuning


def _kept_folder(folder: Path, rows: list[dict[str, Any]], source: Path) -> int:
    """An image folder with metadata.jsonl (`file_name`, `prompt`), as `rahf.improve.finetune` reads it."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            name = Path(row["file_name"]).name
            shutil.copyfile(source / row["file_name"], folder / name)
            f.write(json.dumps({"file_name": name, "prompt": row["prompt"]}) + "\n")
    return len(rows)


def _finetune(generator_dir: Path, kept: Path, out: Path, args: EfficacyArguments) -> Path:
    from accelerate.state import AcceleratorState, GradientState

    from .finetune import LoRAFineTuneArguments, train_lora

    lora = LoRAFineTuneArguments(
        pretrained_model_name_or_path=str(generator_dir), train_data_dir=str(kept), output_dir=str(out),
        resolution=64, center_crop=True, random_flip=False, train_batch_size=args.finetune_batch_size,
        max_train_steps=args.finetune_steps, learning_rate=args.lora_learning_rate, lr_scheduler="constant",
        rank=args.lora_rank, seed=args.seed, checkpointing_steps=0, mixed_precision="no", logging_steps=50,
    )  # fmt: skip
    try:
        train_lora(lora)
    finally:  # the next job in this process builds its own Accelerator
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return out


def best_of_n_budget(args: EfficacyArguments) -> dict[str, int]:
    """Generator forward passes best-of-N spends (one denoising step of one image, guidance included): N images per
    selection prompt, then the LoRA's training passes (one UNet evaluation per image per step)."""
    sampling = args.num_selection_prompts * args.num_images_per_prompt * args.num_inference_steps
    training = args.finetune_steps * args.finetune_batch_size
    return {"generator_forward_passes": sampling + training, "sampling_forward_passes": sampling,
            "training_forward_passes": training}  # fmt: skip


def _heldout_arm(
    name: str, generator_dir: Path, judge: SynthJudge, heldout: list[str], args: EfficacyArguments, cache: dict,
    lora: Path | None = None,
) -> tuple[list[Image.Image], list]:  # fmt: skip
    """Images and verdicts of one generator on the held-out prompts x seeds (the original's computed once per run)."""
    from .finetune import load_lora_into_pipeline

    if name in cache:
        return cache[name]
    prompts = [p for p in heldout for _ in range(args.seeds_per_prompt)]
    seeds = [_seed(args.seed, 3, i, j) for i in range(len(heldout)) for j in range(args.seeds_per_prompt)]
    pipe = _load_generator(generator_dir, args.device)
    if lora is not None:
        load_lora_into_pipeline(pipe, lora)
    images = sample(pipe, prompts, seeds, args)
    cache[name] = (images, judge(images, prompts))
    return cache[name]


def best_of_n_experiment(
    out: Path, generator_dir: Path, reward_dir: Path, judge: SynthJudge, heldout: list[str], selection: list[str],
    args: EfficacyArguments, cache: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    from accelerate.state import AcceleratorState, GradientState

    from .best_of_n import BestOfNArguments, run_best_of_n

    cache = {} if cache is None else cache
    work = out / "best_of_n"
    work.mkdir(parents=True, exist_ok=True)
    (work / "selection_prompts.txt").write_text("\n".join(selection) + "\n", encoding="utf-8")
    bon = BestOfNArguments(
        pretrained_model_name_or_path=str(generator_dir), reward_model=str(reward_dir),
        prompts_file=str(work / "selection_prompts.txt"), output_dir=str(work / "run"),
        num_images_per_prompt=args.num_images_per_prompt, reward=args.selection_reward, threshold=None,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, resolution=64,
        seed=_seed(args.seed, 1), batch_size=8, reward_batch_size=32, mixed_precision="no", device=args.device,
        save_all_images=True,
    )  # fmt: skip
    try:
        run_best_of_n(bon)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    rows = [json.loads(line) for line in (work / "run" / "all_scores.jsonl").read_text().splitlines() if line]
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_prompt.setdefault(int(row["prompt_index"]), []).append(row)
    bests = {p: max(r, key=lambda x: (x["reward"], -x["image_index"])) for p, r in by_prompt.items()}
    threshold = float(np.quantile([b["reward"] for b in bests.values()], args.threshold_quantile))
    kept_prompts = sorted(p for p, b in bests.items() if b["reward"] >= threshold)
    rng = np.random.default_rng(_seed(args.seed, 2))
    rahf_rows = [bests[p] for p in kept_prompts]
    random_rows = [by_prompt[p][int(rng.integers(len(by_prompt[p])))] for p in kept_prompts]
    source = work / "run"
    num_kept = _kept_folder(work / "kept_rahf", rahf_rows, source)
    _kept_folder(work / "kept_random", random_rows, source)
    mean_reward = {"all": float(np.mean([r["reward"] for r in rows])),
                   "kept_rahf": float(np.mean([r["reward"] for r in rahf_rows])),
                   "kept_random": float(np.mean([r["reward"] for r in random_rows]))}  # fmt: skip

    _finetune(generator_dir, work / "kept_rahf", work / "lora_rahf", args)
    _finetune(generator_dir, work / "kept_random", work / "lora_random", args)

    prompts = [p for p in heldout for _ in range(args.seeds_per_prompt)]
    images: dict[str, list[Image.Image]] = {}
    verdicts: dict[str, list] = {}
    for arm in ("original", "rahf", "random"):
        lora = None if arm == "original" else work / f"lora_{arm}"
        images[arm], verdicts[arm] = _heldout_arm(arm if arm == "original" else f"best_of_n_{arm}", generator_dir,
                                                  judge, heldout, args, cache, lora)  # fmt: skip
    result = _side_by_side(verdicts["original"], verdicts["rahf"], prompts)
    control = _side_by_side(verdicts["original"], verdicts["random"], prompts)
    means = {arm: _judge_means(v) for arm, v in verdicts.items()}
    _before_after_picture(images, heldout, args.seeds_per_prompt, work / "before_after.png")
    return {
        **result,
        "control": control,
        "judged_means": {"original": means["original"], "finetuned": means["rahf"], "control": means["random"]},
        "num_selection_prompts": len(selection),
        "num_kept": num_kept,
        "threshold": threshold,
        "selection_reward_means": mean_reward,
        "num_heldout_images": len(prompts),
        "budget": {
            **best_of_n_budget(args),
            "finetune_steps": args.finetune_steps,
        },  # fmt: skip
        "pictures": {"before_after": "best_of_n/before_after.png"},
    }


def _before_after_picture(images: dict[str, list[Image.Image]], prompts: list[str], per: int, path: Path, rows=8,
                          titles: list[str] | None = None):  # fmt: skip
    from rahf.viz import image_rows

    arms = ("original", "rahf", "random") if titles is None or titles[1] != titles[2] else ("original", "rahf")
    titles = (titles or ["original", "RAHF best-of-N", "random keep"])[: len(arms)]
    picked = list(range(min(rows, len(prompts))))
    grid = [[images[arm][i * per].resize((96, 96)) for arm in arms] for i in picked]
    image_rows(grid, [prompts[i] for i in picked], column_titles=titles).save(path)


# --------------------------------------------------------------------------------------------------------------------
# Reward fine-tuning: backpropagation, policy gradient (scalar and heatmap-weighted advantages)


def _method_arguments(method: str, generator_dir: Path, reward_dir: Path, prompts_file: Path, work: Path,
                      args: EfficacyArguments) -> tuple[Any, int]:  # fmt: skip
    """The job's arguments for `method` and its steps, as many as the budget pays for."""
    from .policy_gradient import PolicyGradientArguments
    from .policy_gradient import forward_passes_per_image as pg_cost
    from .reward_finetune import RewardFinetuneArguments
    from .reward_finetune import forward_passes_per_image as rb_cost

    budget = args.method_budget or best_of_n_budget(args)["generator_forward_passes"]
    common = dict(pretrained_model_name_or_path=str(generator_dir), reward_model=str(reward_dir),
                  prompts_file=str(prompts_file), output_dir=str(work / "run"), reward=args.method_reward,
                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                  rank=args.lora_rank, seed=_seed(args.seed, 8), checkpointing_steps=0, mixed_precision="no",
                  logging_steps=5, max_train_steps=1)  # fmt: skip
    if method == "reward_backprop":
        job = RewardFinetuneArguments(**common, train_batch_size=args.backprop_batch_size,
                                      learning_rate=args.backprop_learning_rate, backprop_steps=args.backprop_steps,
                                      reference_weight=args.backprop_reference_weight)  # fmt: skip
        per_step = args.backprop_batch_size * rb_cost(job)
    else:
        job = PolicyGradientArguments(**common, train_batch_size=args.pg_batch_size, group_size=args.pg_group_size,
                                      learning_rate=args.pg_learning_rate, clip_range=args.pg_clip_range,
                                      train_timestep_fraction=args.pg_train_timestep_fraction,
                                      advantage="dense" if method == "policy_gradient_dense" else "scalar",
                                      heatmap=args.pg_heatmap)  # fmt: skip
        per_step = args.pg_batch_size * args.pg_group_size * pg_cost(job)
    job.max_train_steps = max(1, budget // per_step)
    return job, budget


def online_method_experiment(
    method: str, out: Path, generator_dir: Path, reward_dir: Path, judge: SynthJudge, heldout: list[str],
    selection: list[str], args: EfficacyArguments, cache: dict,
) -> dict[str, Any]:  # fmt: skip
    """One reward fine-tuning method on the selection prompts, at best-of-N's budget; judged on the held-out prompts
    side by side against the original generator, as best-of-N is."""
    from accelerate.state import AcceleratorState, GradientState

    from .policy_gradient import train_policy_gradient
    from .reward_finetune import train_reward_backprop

    work = out / method
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = work / "selection_prompts.txt"
    prompts_file.write_text("\n".join(selection) + "\n", encoding="utf-8")
    job, budget = _method_arguments(method, generator_dir, reward_dir, prompts_file, work, args)
    try:
        summary = (train_reward_backprop if method == "reward_backprop" else train_policy_gradient)(job)
    finally:  # the next job in this process builds its own Accelerator
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    prompts = [p for p in heldout for _ in range(args.seeds_per_prompt)]
    original_images, original = _heldout_arm("original", generator_dir, judge, heldout, args, cache)
    images, tuned = _heldout_arm(method, generator_dir, judge, heldout, args, cache, lora=work / "run")
    history = summary["history"]
    # The reward-hacking monitor: the training reward on the held-out images beside what the judge says of them.
    from rahf.reward import load_reward

    reward = load_reward(args.method_reward, str(reward_dir), device=args.device)
    heldout_reward = {arm: float(reward(ims, prompts, None)[0].float().mean())
                      for arm, ims in (("original", original_images), ("finetuned", images))}  # fmt: skip
    _before_after_picture({"original": original_images, "rahf": images, "random": images}, heldout,
                          args.seeds_per_prompt, work / "before_after.png", titles=["original", method, method])  # fmt: skip
    return {
        **_side_by_side(original, tuned, prompts),
        "judged_means": {"original": _judge_means(original), "finetuned": _judge_means(tuned)},
        "num_heldout_images": len(prompts),
        "budget": {
            "generator_forward_passes": summary["forward_passes"],
            "allowed": budget,
            "train_steps": summary["global_step"],
            "images_per_step": job.train_batch_size * getattr(job, "group_size", 1),
        },  # fmt: skip
        "train_reward": {
            "first": history[0].get("train/reward") if history else None,
            "last": history[-1].get("train/reward") if history else None,
        },  # fmt: skip
        "heldout_reward": heldout_reward,
        "nonfinite_reward_grads": summary["nonfinite_reward_grads"],
        "settings": {
            k: v
            for k, v in job.to_dict().items()
            if k
            in (
                "reward",
                "learning_rate",
                "train_batch_size",
                "backprop_steps",
                "reference_weight",
                "group_size",
                "clip_range",
                "train_timestep_fraction",
                "advantage",
                "heatmap",
                "rank",
                "max_train_steps",
            )
        },
        "pictures": {"before_after": f"{method}/before_after.png"},
    }


# --------------------------------------------------------------------------------------------------------------------
# Repair


def _moved(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same mask (its shape and area) moved to a random place of the image, wrapping around the edges."""
    h, w = mask.shape
    return np.roll(mask, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))


def repair_experiment(
    out: Path, generator_dir: Path, reward_dir: Path, judge: SynthJudge, heldout: list[str], args: EfficacyArguments
) -> dict[str, Any]:
    from rahf.pipelines import RAHFInpaintPipeline

    from rahf import RAHFModel, RAHFProcessor

    work = out / "repair"
    work.mkdir(parents=True, exist_ok=True)
    base = _load_generator(generator_dir, args.device)
    prompts = list(heldout)
    seeds = [_seed(args.seed, 4, i) for i in range(len(prompts))]
    images = sample(base, prompts, seeds, args)
    verdicts = judge(images, prompts)
    flawed = [i for i, v in enumerate(verdicts) if v.artifact_areas][: args.repair_images]
    pipe = RAHFInpaintPipeline.from_pipe(base, reward_model=RAHFModel.from_pretrained(reward_dir),
                                         reward_processor=RAHFProcessor.from_pretrained(reward_dir))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(_seed(args.seed, 5))
    rows, picture = [], []
    changed_outside = 0
    for k, i in enumerate(flawed):
        image, prompt = images[i], prompts[i]
        common = {"num_candidates": args.repair_candidates, "num_inference_steps": args.num_inference_steps,
                  "guidance_scale": args.guidance_scale}  # fmt: skip
        repaired = pipe(prompt, image, heatmap="implausibility", dilation=args.repair_dilation,
                        generator=torch.Generator("cpu").manual_seed(_seed(args.seed, 6, k)), **common)  # fmt: skip
        control_mask = _moved(repaired.mask, rng)
        control = pipe(prompt, image, heatmap=control_mask.astype(np.float32), threshold=0.5, dilation=0.0,
                       generator=torch.Generator("cpu").manual_seed(_seed(args.seed, 6, k)), **common)  # fmt: skip
        original = np.asarray(image)
        for result in (repaired, control):
            changed_outside += int((np.asarray(result.images[0])[~result.mask] != original[~result.mask]).sum())
        after, after_control = judge([repaired.images[0], control.images[0]], [prompt, prompt])
        truth = verdicts[i].artifact_mask
        union = (repaired.mask | truth).sum()
        rows.append({
            "prompt": prompt,
            "before": verdicts[i].scores["plausibility"],
            "after": after.scores["plausibility"],
            "after_control": after_control.scores["plausibility"],
            "repaired": bool(repaired.repaired),
            "repaired_control": bool(control.repaired),
            "mask_area": float(repaired.mask.mean()),
            "mask_iou": float((repaired.mask & truth).sum() / union) if union else 1.0,
        })  # fmt: skip
        if len(picture) < 8:
            picture.append((image, repaired, control, prompt))
    result = _repair_summary(rows)
    result["pixels_changed_outside_mask"] = changed_outside
    result["num_generated"] = len(images)
    result["num_judged_flawed"] = sum(1 for v in verdicts if v.artifact_areas)
    if picture:
        _repair_picture(picture, work / "repair.png")
        result["pictures"] = {"repair": "repair/repair.png"}
    (work / "repairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return result


def _shares(pairs: list[tuple[float, float]]) -> dict[str, float]:
    n = max(len(pairs), 1)
    return {
        "better": sum(b > a + 1e-9 for a, b in pairs) / n,
        "same": sum(abs(b - a) <= 1e-9 for a, b in pairs) / n,
        "worse": sum(b < a - 1e-9 for a, b in pairs) / n,
    }


def _repair_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"better": 0.0, "same": 0.0, "worse": 0.0, "control": {"better": 0.0, "same": 0.0, "worse": 0.0},
                "mask_iou": None, "num_images": 0}  # fmt: skip
    return {
        **_shares([(r["before"], r["after"]) for r in rows]),
        "control": _shares([(r["before"], r["after_control"]) for r in rows]),
        "mask_iou": float(np.mean([r["mask_iou"] for r in rows])),
        "mean_plausibility": {
            "before": float(np.mean([r["before"] for r in rows])),
            "after": float(np.mean([r["after"] for r in rows])),
            "after_control": float(np.mean([r["after_control"] for r in rows])),
        },  # fmt: skip
        "share_replaced": float(np.mean([r["repaired"] for r in rows])),
        "mean_mask_area": float(np.mean([r["mask_area"] for r in rows])),
        "num_images": len(rows),
    }


def _repair_picture(items, path: Path) -> None:
    from rahf.pipelines.masks import mask_to_pil

    from rahf.viz import image_rows

    rows, labels = [], []
    for image, repaired, control, prompt in items:
        rows.append([im.resize((96, 96)) for im in (image, mask_to_pil(repaired.mask), repaired.images[0],
                                                     mask_to_pil(control.mask), control.images[0])])  # fmt: skip
        labels.append(prompt)
    titles = ["generated", "RAHF mask", "repaired", "random mask", "control"]
    image_rows(rows, labels, column_titles=titles).save(path)


# --------------------------------------------------------------------------------------------------------------------
# Guidance


def guidance_experiment(
    out: Path, generator_dir: Path, reward_dir: Path, judge: SynthJudge, heldout: list[str], args: EfficacyArguments
) -> dict[str, Any]:
    from rahf.pipelines import RAHFGuidedStableDiffusionPipeline

    from rahf import RAHFModel, RAHFProcessor
    from rahf.reward import get_reward

    work = out / "guidance"
    work.mkdir(parents=True, exist_ok=True)
    base = _load_generator(generator_dir, args.device)
    model, processor = RAHFModel.from_pretrained(reward_dir), RAHFProcessor.from_pretrained(reward_dir)
    pipe = RAHFGuidedStableDiffusionPipeline.from_pipe(base, reward_model=model, reward_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(heldout[: args.guidance_prompts])
    seeds = [_seed(args.seed, 7, i) for i in range(len(prompts))]
    scales = sorted({0.0, *args.reward_guidance_scales})
    result: dict[str, Any] = {}
    pictures: dict[str, list[Image.Image]] = {}
    for target in args.guidance_targets:
        reward = get_reward(target, reward_model=model, reward_processor=processor)
        rows = []
        for scale in scales:
            images = sample(pipe, prompts, seeds, args, reward=reward, reward_guidance_scale=scale)
            with torch.no_grad():
                values, _ = reward(images, prompts, None)
            judged = _judge_means(judge(images, prompts))
            rows.append({"scale": scale, "judged": judged, "reward": float(values.float().mean())})
            pictures.setdefault(target, []).extend(images[:4])
        base_row = rows[0]
        for row in rows:
            row["reward_change"] = _relative(row["reward"], base_row["reward"])
            row["judged_change"] = {k: _relative(v, base_row["judged"][k]) for k, v in row["judged"].items()}
        result[target] = rows
    _guidance_picture(pictures, scales, prompts[:4], work / "guidance.png")
    result["pictures"] = {"guidance": "guidance/guidance.png"}
    result["num_prompts"] = len(prompts)
    return result


def _relative(value: float, base: float) -> float | None:
    return None if abs(base) < 1e-9 else (value - base) / abs(base)


def _guidance_picture(pictures: dict[str, list[Image.Image]], scales, prompts: list[str], path: Path) -> None:
    from rahf.viz import image_rows

    rows, labels = [], []
    for target, images in pictures.items():
        per_scale = [images[k * 4 : (k + 1) * 4] for k in range(len(scales))]
        for j, prompt in enumerate(prompts):
            rows.append([per_scale[k][j].resize((96, 96)) for k in range(len(scales)) if j < len(per_scale[k])])
            labels.append(f"{target}: {prompt}")
    image_rows(rows, labels, column_titles=[f"scale {s:g}" for s in scales]).save(path)


# --------------------------------------------------------------------------------------------------------------------
# The run


def run_efficacy(args: EfficacyArguments, judge: SynthJudge | None = None) -> dict[str, Any]:
    """Runs the experiments `args.experiments` and writes `OUT/efficacy.json` and `OUT/report.md`.

    Args:
        judge: a loaded judge, instead of `args.judge` (whose `judge_report.json` is still read when it exists).
    """
    from rahf.pretrained_paths import resolve_pretrained_path

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator_dir = Path(resolve_pretrained_path(args.generator or weights_path("generator_synth"), "--generator",
                                                 what="a generator folder", allow_hub=False))  # fmt: skip
    judge_dir = Path(resolve_pretrained_path(args.judge or weights_path("judge_synth"), "--judge",
                                             what="a judge folder", allow_hub=False))  # fmt: skip
    reward_dir = Path(resolve_pretrained_path(args.reward_model or weights_path("rahf_synth_tiny"), "--reward_model",
                                              what="a RAHF model folder", allow_hub=False))  # fmt: skip
    judge = judge if judge is not None else SynthJudge.from_pretrained(judge_dir, device=args.device)
    report_file = judge_dir / "judge_report.json"
    exclude = _training_prompts(generator_dir)
    heldout, next_index = draw_prompts(args.seed, args.num_prompts, exclude)
    selection, _ = draw_prompts(args.seed, args.num_selection_prompts, exclude | set(heldout), start=next_index)
    (out / "heldout_prompts.txt").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    result: dict[str, Any] = {
        "seed": args.seed,
        "judge": json.loads(report_file.read_text()) if report_file.is_file() else {},
        "models": {"generator": str(generator_dir), "judge": str(judge_dir), "reward_model": str(reward_dir)},
        "num_heldout_prompts": len(heldout),
        "heldout_prompts_excluded": {"generator_training_prompts": len(exclude), "selection_prompts": len(selection)},
        "args": asdict(args),
    }
    seconds: dict[str, float] = {}
    cache: dict[str, Any] = {}  # the original generator's held-out images and verdicts, shared by the methods
    online = [(m, (lambda m=m: online_method_experiment(m, out, generator_dir, reward_dir, judge, heldout, selection,
                                                        args, cache))) for m in ONLINE_METHODS]  # fmt: skip
    for name, run in (("best_of_n", lambda: best_of_n_experiment(out, generator_dir, reward_dir, judge, heldout,
                                                                 selection, args, cache)),
                      ("repair", lambda: repair_experiment(out, generator_dir, reward_dir, judge, heldout, args)),
                      ("guidance", lambda: guidance_experiment(out, generator_dir, reward_dir, judge, heldout,
                                                               args)), *online):  # fmt: skip
        if name not in args.experiments:
            continue
        t0 = time.perf_counter()
        logger.info("efficacy: %s ...", name)
        result[name] = run()
        seconds[name] = time.perf_counter() - t0
        logger.info("efficacy: %s done in %.0f s", name, seconds[name])
    result["seconds"] = {**seconds, "total": time.perf_counter() - start}
    result["targets"] = check_targets(result)
    (out / "efficacy.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out)
    return result


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each experiment's figures against `TARGETS`: the measured values and whether each bar is met (and whether
    RAHF beats its control), so that a missed target reads as plainly as a met one."""
    checks: dict[str, Any] = {}
    bon = result.get("best_of_n")
    if bon:
        t = TARGETS["best_of_n"]
        better = bon["buckets"]["much_better"] + bon["buckets"]["better"]
        worse = bon["buckets"]["much_worse"] + bon["buckets"]["worse"]
        control_better = bon["control"]["buckets"]["much_better"] + bon["control"]["buckets"]["better"]
        means = bon["judged_means"]
        drops = {k: _relative(means["finetuned"][k], means["original"][k]) for k in means["original"]}
        worst = min((d for d in drops.values() if d is not None), default=0.0)
        checks["best_of_n"] = {
            "better": better, "worse": worse, "control_better": control_better, "worst_judged_mean_change": worst,
            "met": {"better": better >= t["better_at_least"], "worse": worse <= t["worse_at_most"],
                    "no_judged_mean_drop": worst >= -t["judged_mean_drop_at_most"],
                    "above_control": better > control_better},
        }  # fmt: skip
    for method in ONLINE_METHODS:
        m = result.get(method)
        if not m:
            continue
        t = TARGETS["best_of_n"]
        better = m["buckets"]["much_better"] + m["buckets"]["better"]
        worse = m["buckets"]["much_worse"] + m["buckets"]["worse"]
        means = m["judged_means"]
        drops = {k: _relative(means["finetuned"][k], means["original"][k]) for k in means["original"]}
        worst = min((d for d in drops.values() if d is not None), default=0.0)
        check = {"better": better, "worse": worse, "better_minus_worse": better - worse,
                 "worst_judged_mean_change": worst,
                 "met": {"better": better >= t["better_at_least"], "worse": worse <= t["worse_at_most"],
                         "no_judged_mean_drop": worst >= -t["judged_mean_drop_at_most"]}}  # fmt: skip
        if bon:
            bon_net = checks["best_of_n"]["better"] - checks["best_of_n"]["worse"]
            check["met"]["beats_best_of_n"] = better - worse > bon_net
        checks[method] = check
    rep = result.get("repair")
    if rep and rep.get("num_images"):
        t = TARGETS["repair"]
        checks["repair"] = {
            "raised": rep["better"], "lowered": rep["worse"], "control_raised": rep["control"]["better"],
            "met": {"raised": rep["better"] >= t["raised_at_least"], "lowered": rep["worse"] <= t["lowered_at_most"],
                    "above_control": rep["better"] > rep["control"]["better"]},
        }  # fmt: skip
    gui = result.get("guidance")
    if gui:
        t = TARGETS["guidance"]
        per_target = {}
        for target in result["args"]["guidance_targets"]:
            judged_name = target if target in JUDGED_SCORES else None
            best = None
            for row in gui[target][1:]:
                changes = row["judged_change"]
                rise = changes.get(judged_name) if judged_name else None
                others = [v for k, v in changes.items() if k != judged_name and k != "overall" and v is not None]
                worst_other = min(others, default=0.0)
                row_check = {"scale": row["scale"], "judged_target_change": rise, "worst_other_change": worst_other,
                             "reward_change": row["reward_change"]}  # fmt: skip
                if best is None or (rise or 0.0) > (best["judged_target_change"] or 0.0):
                    best = row_check
            met = (best is not None and best["judged_target_change"] is not None
                   and best["judged_target_change"] >= t["target_rise_at_least"]
                   and best["worst_other_change"] >= -t["other_drop_at_most"])  # fmt: skip
            # a target the judge has no score for (aesthetics) cannot be checked, only watched for side effects
            per_target[target] = {"best_scale": best, "checkable": judged_name is not None,
                                  "met": met if judged_name else None}  # fmt: skip
        checks["guidance"] = per_target
    return checks


def summarize_runs(folders: list[str | Path]) -> dict[str, Any]:
    """The figures of several `rahf efficacy` runs (one per seed) side by side: per figure, each seed's value, the mean
    and the spread (max - min), and whether every seed met each target."""
    runs = [json.loads((Path(f) / "efficacy.json").read_text()) for f in folders]
    figures: dict[str, list[float]] = {}
    met: dict[str, list[bool]] = {}
    for run in runs:
        checks = json.loads(json.dumps(run.get("targets") or check_targets(run)))  # a copy: popped below
        for target, g in checks.pop("guidance", {}).items():
            if g["best_scale"] is not None and g["best_scale"]["judged_target_change"] is not None:
                figures.setdefault(f"guidance.{target}.judged_target_change", []).append(
                    g["best_scale"]["judged_target_change"]
                )
            if g["met"] is not None:
                met.setdefault(f"guidance.{target}", []).append(bool(g["met"]))
        for experiment, check in checks.items():
            for name, ok in check.pop("met").items():
                met.setdefault(f"{experiment}.{name}", []).append(bool(ok))
            for key, value in check.items():
                figures.setdefault(f"{experiment}.{key}", []).append(float(value))
    return {
        "seeds": [run["seed"] for run in runs],
        "figures": {k: {"values": v, "mean": float(np.mean(v)), "spread": float(np.max(v) - np.min(v))}
                    for k, v in figures.items()},
        "met_by_every_seed": {k: all(v) for k, v in met.items()},
    }  # fmt: skip


def _net(buckets: dict[str, float]) -> float:
    """Judged better minus judged worse, as a share."""
    return buckets["much_better"] + buckets["better"] - buckets["worse"] - buckets["much_worse"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def write_report(result: dict[str, Any], out: Path) -> Path:
    """`OUT/report.md`, with the Table 5 chart (`OUT/table5.png`) beside the tables."""
    lines = [f"# rahf efficacy (seed {result['seed']})", ""]
    judge = result.get("judge") or {}
    if judge:
        lines += ["## The judge", "",
                  f"Trained on {judge.get('num_train', '?')} scenes of its own (seed {judge.get('seed')}); on "
                  f"{judge.get('num_scenes', '?')} held-out scenes of its own: artifact pixel IoU "
                  f"{judge.get('artifact_pixel_iou', 0):.3f}, artifact / no artifact per image "
                  f"{_pct(judge.get('artifact_image_accuracy'))}, object sets exactly right "
                  f"{_pct(judge.get('object_set_accuracy'))}, requirement verdicts agreeing with the exact labels "
                  f"{_pct(judge.get('requirement_agreement'))}, plausibility PLCC with the true latent score "
                  f"{judge.get('plausibility_plcc_vs_truth', 0):.3f}.", ""]  # fmt: skip
    bon = result.get("best_of_n")
    if bon:
        lines += ["## Best-of-N + LoRA fine-tuning (Table 5)", "",
                  f"{bon['num_kept']} of {bon['num_selection_prompts']} selection prompts kept (best RAHF "
                  f"plausibility of N = {result['args']['num_images_per_prompt']} above {bon['threshold']:.3f}); "
                  f"judged on {bon['num_prompts']} held-out prompts x {result['args']['seeds_per_prompt']} seeds.",
                  "", "| | much better | better | same | worse | much worse |", "|---|---|---|---|---|---|"]  # fmt: skip
        for label, buckets in (
            ("RAHF best-of-N", bon["buckets"]),
            ("random keep (control)", bon["control"]["buckets"]),
        ):
            lines.append(f"| {label} | " + " | ".join(_pct(buckets[b]) for b in BUCKETS) + " |")
        lines += ["", "| judged mean | original | RAHF best-of-N | random keep |", "|---|---|---|---|"]
        for name in JUDGED_SCORES:
            m = bon["judged_means"]
            lines.append(f"| {name} | {m['original'][name]:.3f} | {m['finetuned'][name]:.3f} | "
                         f"{m['control'][name]:.3f} |")  # fmt: skip
        _table5_chart(bon, out / "table5.png")
        lines += ["", "![Table 5](table5.png)", "", f"![before/after]({bon['pictures']['before_after']})", ""]
    methods = [m for m in ("best_of_n", *ONLINE_METHODS) if result.get(m)]
    if any(m in result for m in ONLINE_METHODS):
        lines += ["## Reward fine-tuning against best-of-N, at an equal budget", "",
                  "Each judged side by side against the original generator on the same held-out prompts and seeds; "
                  "budget = generator forward passes (one denoising step of one image).", "",
                  "| method | budget | much better | better | same | worse | much worse | better - worse | judged overall "
                  "| RAHF reward |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m in methods:
            r = result[m]
            lines.append(f"| {m} | {r['budget']['generator_forward_passes']} | "
                         + " | ".join(_pct(r["buckets"][b]) for b in BUCKETS)
                         + f" | {_pct(_net(r['buckets']))}"
                         + f" | {r['judged_means']['original']['overall']:.3f} -> "
                           f"{r['judged_means']['finetuned']['overall']:.3f} | "
                         + (f"{r['heldout_reward']['original']:.3f} -> {r['heldout_reward']['finetuned']:.3f} |"
                            if "heldout_reward" in r else "n/a |"))  # fmt: skip
        _bucket_chart([(m, result[m]["buckets"]) for m in methods], out / "methods.png")
        lines += ["", "![the methods' buckets](methods.png)", ""]
    rep = result.get("repair")
    if rep:
        lines += ["## Repair (Fig. 9)", "",
                  f"{rep['num_images']} generated images the judge finds flawed (of {rep['num_generated']}).", "",
                  "| | judged plausibility raised | same | lowered |", "|---|---|---|---|",
                  f"| RAHF mask | {_pct(rep['better'])} | {_pct(rep['same'])} | {_pct(rep['worse'])} |",
                  f"| random mask, same area (control) | {_pct(rep['control']['better'])} | "
                  f"{_pct(rep['control']['same'])} | {_pct(rep['control']['worse'])} |", "",
                  f"Mask IoU with the judge's artifact map {rep['mask_iou'] if rep['mask_iou'] is None else round(rep['mask_iou'], 3)}; "
                  f"pixels changed outside the masks: {rep['pixels_changed_outside_mask']}.", ""]  # fmt: skip
        if rep.get("pictures"):
            lines += [f"![repair]({rep['pictures']['repair']})", ""]
    gui = result.get("guidance")
    if gui:
        lines += ["## Guidance (Fig. 8)", ""]
        for target in result["args"]["guidance_targets"]:
            lines += [f"Target **{target}** ({gui['num_prompts']} held-out prompts):", "",
                      "| scale | RAHF reward | judged plausibility | judged alignment | judged overall |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for row in gui[target]:
                j = row["judged"]
                lines.append(f"| {row['scale']:g} | {row['reward']:.3f} | {j['plausibility']:.3f} | "
                             f"{j['alignment']:.3f} | {j['overall']:.3f} |")  # fmt: skip
            lines.append("")
        lines += [f"![guidance]({gui['pictures']['guidance']})", ""]
    targets = result.get("targets") or {}
    if targets:
        lines += ["## Against the targets", "", "| check | met |", "|---|---|"]
        for experiment, check in targets.items():
            if experiment == "guidance":
                for target, g in check.items():
                    lines.append(f"| guidance {target}: judged target up >= 10 %, others down <= 5 % | "
                                 f"{'n/a (the judge has no such score)' if g['met'] is None else g['met']} |")  # fmt: skip
            else:
                lines += [f"| {experiment} {name} | {ok} |" for name, ok in check["met"].items()]
        lines.append("")
    seconds = result.get("seconds", {})
    lines += ["## Time", "", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _table5_chart(bon: dict[str, Any], path: Path) -> None:
    _bucket_chart([("RAHF best-of-N", bon["buckets"]), ("random keep", bon["control"]["buckets"])], path)


def _bucket_chart(rows: list[tuple[str, dict[str, float]]], path: Path) -> None:
    """Table 5's bars: one stacked bar of the five buckets per (label, buckets) row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.6 * len(rows)), dpi=120)
    colours = ["#1a9850", "#91cf60", "#d9d9d9", "#fc8d59", "#d73027"]
    for row, (_, buckets) in enumerate(rows):
        left = 0.0
        for bucket, colour in zip(BUCKETS, colours):
            width = 100 * buckets[bucket]
            ax.barh(row, width, left=left, color=colour, label=bucket.replace("_", " ") if row == 0 else None)
            if width >= 6:
                ax.text(left + width / 2, row, f"{width:.0f}", ha="center", va="center", fontsize=8)
            left += width
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of held-out prompts, judged against the original generator")
    ax.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.5 if len(rows) < 3 else -0.25),
              frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_efficacy_args(argv: list[str] | None = None) -> EfficacyArguments:
    return parse_job_args(EfficacyArguments, argv, prog="rahf efficacy",
                          description="The paper's §5 experiments in the measuring world, judged, with controls.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_efficacy_args(argv)
    if args.summarize:
        summary = summarize_runs(args.summarize)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for name, f in summary["figures"].items():
            values = ", ".join(f"{v:.3f}" for v in f["values"])
            print(f"{name}: {values} (mean {f['mean']:.3f}, spread {f['spread']:.3f})")
        for name, ok in summary["met_by_every_seed"].items():
            print(f"met by every seed: {name}: {ok}")
        return 0
    run_efficacy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
