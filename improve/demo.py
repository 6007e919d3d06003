"""`rahf demo`: the whole loop on the embedded synthetic set, on CPU, with a visual report: the one place the demo lives.

synthetic data -> train tiny RAHF (both variants) and the ResNet baseline -> evaluate them, the untrained model and
the centre prior on the test split (the paper's Tables 1-4) -> repair flawed images (heatmap -> mask -> inpaint ->
rescore) -> classifier guidance from a RAHF score -> best-of-N filtering and a few LoRA steps. Everything lands
in `OUT/report.md` with pictures, `OUT/models/<name>/` and `OUT/eval/<name>/metrics.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rahf.configs import preset_path

from rahf.reward import load_reward, score_table

from .best_of_n import BestOfNArguments, derive_seed, generate_images, load_text_to_image_pipeline, run_best_of_n
from .finetune import LoRAFineTuneArguments, load_lora_into_pipeline, train_lora

logger = logging.getLogger(__name__)

__all__ = ["DemoBudget", "FULL", "QUICK", "best_of_n_report", "default_resolution", "run_demo"]


@dataclass
class DemoBudget:
    """How much of everything the demo does; `FULL` is `make demo`, `QUICK` the smoke test."""

    num_train: int = 8000
    num_validation: int = 500
    num_test: int = 500
    # optimizer steps per trained model, at train_batch_size
    steps: dict[str, int] = field(
        default_factory=lambda: {"rahf_multi_head": 5000, "rahf_augmented_prompt": 3000, "resnet50": 600}
    )
    train_batch_size: int = 16
    # augmented-prompt variant: task rows trained per image and step (None: all 7)
    tasks_per_image: int | None = 3
    validation_steps: int = 1000
    repair_images: int = 8
    repair_candidates: int = 4
    guidance_prompts: int = 4
    guidance_seeds: int = 4
    guidance_scales: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
    best_of_n_train_prompts: int = 8
    best_of_n_heldout_prompts: int = 4
    finetune_steps: int = 30
    inference_steps: int = 4


FULL = DemoBudget()
QUICK = DemoBudget(
    num_train=48,
    num_validation=16,
    num_test=16,
    steps={"rahf_multi_head": 6, "rahf_augmented_prompt": 4, "resnet50": 4},
    train_batch_size=8,
    validation_steps=1000,
    repair_images=2,
    repair_candidates=2,
    guidance_prompts=1,
    guidance_seeds=1,
    guidance_scales=(0.0, 0.5),
    best_of_n_train_prompts=2,
    best_of_n_heldout_prompts=1,
    finetune_steps=2,
    inference_steps=2,
)

RAHF_MODELS = {"rahf_multi_head": "multi_head", "rahf_augmented_prompt": "augmented_prompt"}


class _Timer:
    def __init__(self):
        self.sections: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Section:
            def __enter__(self):
                self.t0 = time.perf_counter()
                logger.info("demo: %s ...", name)

            def __exit__(self, *exc):
                timer.sections[name] = time.perf_counter() - self.t0
                logger.info("demo: %s done in %.1f s", name, timer.sections[name])

        return _Section()


def _data(out: Path, budget: DemoBudget):
    from rahf.data.schema import load_rich_feedback
    from rahf.data.synth import SynthConfig, generate_synthetic

    config = SynthConfig(num_train=budget.num_train, num_validation=budget.num_validation, num_test=budget.num_test)
    data_dir = out / "data"
    saved = data_dir / "raw" / "synth_config.json"
    # Reuse a set this same configuration made (generation is deterministic); otherwise make it anew.
    if saved.is_file() and json.loads(saved.read_text()) == json.loads(json.dumps(asdict(config))):
        try:
            return data_dir, load_rich_feedback(data_dir)
        except ValueError:
            pass
    generate_synthetic(data_dir, config, overwrite=True)
    return data_dir, load_rich_feedback(data_dir)


def _train_argv(name: str, data_dir: Path, out: Path, budget: DemoBudget) -> list[str]:
    argv = [
        "--config",
        str(preset_path("train/synth_tiny.yaml")),
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out / "runs" / name),
        "--max_train_steps",
        str(budget.steps[name]),
        "--train_batch_size",
        str(budget.train_batch_size),
        "--validation_steps",
        str(budget.validation_steps),
        "--checkpointing_steps",
        "0",
        "--seed",
        "0",
    ]
    if name in RAHF_MODELS:
        argv += ["--variant", RAHF_MODELS[name]]
        if RAHF_MODELS[name] == "augmented_prompt" and budget.tasks_per_image is not None:
            argv += ["--tasks_per_image", str(budget.tasks_per_image)]
    else:
        argv += ["--model_type", "resnet50", "--model_config", str(preset_path("model/resnet50_tiny.json"))]
    return argv


def _last_step(log_file: Path) -> int:
    step = 0
    try:
        for line in log_file.read_text(encoding="utf-8").splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    except OSError:
        pass
    return step


def _train_all(
    names: list[str], data_dir: Path, out: Path, budget: DemoBudget
) -> tuple[dict[str, Path], dict[str, float]]:
    """Trains the demo's models as separate `python -m rahf.train` processes, as many at once as there are CPU cores.

    These models are so small that one process cannot keep two cores busy (Python overhead, not arithmetic, bounds a
    step): on this project's 2-core machine two one-thread processes finished 300 steps of each RAHF variant 1.33x
    sooner than the same jobs one after another with two threads each (`python benchmarks/concurrent_training.py`). Each
    run's output goes to `OUT/runs/<name>/train.log`; one progress bar per model follows its `train_log.jsonl`.
    Returns the models' folders and each run's wall-clock seconds.
    """
    import os
    import subprocess
    import sys

    from tqdm.auto import tqdm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(len(names), cores))
    threads = max(1, cores // workers)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TQDM_MININTERVAL="30",
        TOKENIZERS_PARALLELISM="false",
    )
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    bars = {
        name: tqdm(total=budget.steps[name], desc=f"train {name}", unit="step", position=i, leave=True)
        for i, name in enumerate(names)
    }
    model_dirs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                name = pending.pop(0)
                run_dir = out / "runs" / name
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                log = (run_dir / "train.log").open("w", encoding="utf-8")
                cmd = [sys.executable, "-m", "rahf.train", *_train_argv(name, data_dir, out, budget)]
                logger.info("demo: %s (%d thread(s)), output in %s", " ".join(cmd), threads, run_dir / "train.log")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[name] = (proc, log, time.perf_counter())
            time.sleep(0.5)
            for name, (proc, log, started) in list(running.items()):
                bar = bars[name]
                bar.update(_last_step(out / "runs" / name / "logs" / "train_log.jsonl") - bar.n)
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[name]
                if code != 0:
                    tail = (out / "runs" / name / "train.log").read_text(encoding="utf-8", errors="replace")[-3000:]
                    raise RuntimeError(f"training {name} failed (exit code {code}); the end of its log:\n{tail}")
                seconds[name] = time.perf_counter() - started
                model_dir = out / "models" / name
                if model_dir.exists():
                    shutil.rmtree(model_dir)
                shutil.copytree(out / "runs" / name / "final", model_dir)
                model_dirs[name] = model_dir
    finally:
        for proc, log, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()
        for bar in bars.values():
            bar.close()
    return model_dirs, seconds


def _repair_inputs(data_dir: Path, test, count: int):
    """Test images with planted artifacts, their prompts and the artifacts' true masks (from the synthetic ground
    truth)."""
    import numpy as np

    from rahf.data.synth import decode_rle, load_ground_truth

    truth = load_ground_truth(data_dir)
    images, prompts, masks = [], [], []
    for row in test:
        record = truth.get(row["uid"])
        if record is None or not record.get("artifact_mask"):
            continue
        mask = decode_rle(record["artifact_mask"]).astype(bool)
        image = row["image"].convert("RGB")
        if mask.shape != (image.height, image.width):
            continue
        images.append(image)
        prompts.append(row["prompt"])
        masks.append(np.asarray(mask))
        if len(images) == count:
            break
    return images, prompts, masks


def _keyword_decoding(model_dirs: dict[str, Path], test) -> dict[str, dict[str, Any]]:
    """For each RAHF model whose training calibrated a keyword threshold: the validation figures of that choice and
    the test keywords with greedy decoding, so that the report shows what the threshold changed."""
    from rahf.calibration import keyword_scores_at_thresholds
    from rahf.modeling_rahf import RAHFModel
    from rahf.processing_rahf import RAHFProcessor

    out: dict[str, dict[str, Any]] = {}
    for name in RAHF_MODELS:
        summary_file = model_dirs[name] / "training_summary.json"
        if not summary_file.is_file():
            continue
        calibration = json.loads(summary_file.read_text()).get("keyword_threshold_calibration")
        if not calibration or calibration.get("threshold") is None:
            continue
        model = RAHFModel.from_pretrained(model_dirs[name])
        [greedy] = keyword_scores_at_thresholds(model, RAHFProcessor.from_pretrained(model_dirs[name]), test, [None])
        out[name] = {
            "threshold": calibration["threshold"],
            "val_f1": calibration["f1"],
            "val_f1_greedy": calibration["f1_greedy"],
            "test_greedy": (greedy["precision"], greedy["recall"], greedy["f1"]),
        }
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def run_demo(out: str | Path, quick: bool = False) -> Path:
    """Runs the demo into `out` and returns the path of `out/report.md`."""
    import torch

    from rahf.baselines import CenterPriorRater, load_rater
    from rahf.evaluation import evaluate, write_comparison_report
    from rahf.init_model import init_model
    from rahf.predictor import EXAMPLE_IMAGE, EXAMPLE_PROMPT, predict_to_folder

    budget = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    torch.manual_seed(0)

    with timer("synthetic data"):
        data_dir, data = _data(out, budget)

    model_dirs: dict[str, Path] = {}
    with timer("untrained RAHF"):
        model_dirs["rahf_untrained"] = init_model(
            str(preset_path("model/tiny.json")), str(out / "models" / "rahf_untrained")
        )
    trained = ["rahf_multi_head", "rahf_augmented_prompt", "resnet50"]
    with timer("train " + " + ".join(trained) + " (concurrently)"):
        dirs, train_seconds = _train_all(trained, data_dir, out, budget)
        model_dirs.update(dirs)

    metrics: dict[str, dict] = {}
    with timer("evaluate"):
        for name in ("rahf_multi_head", "rahf_augmented_prompt", "rahf_untrained", "resnet50"):
            rater = load_rater(model_dirs[name])
            metrics[name] = evaluate(rater, data["test"], out / "eval" / name, name=name, show_progress=False)
        prior = CenterPriorRater().fit(data["train"])
        metrics["center_prior"] = evaluate(
            prior, data["test"], out / "eval" / "center_prior", name="center_prior", show_progress=False
        )

    with timer("keywords with greedy decoding"):
        keyword_decoding = _keyword_decoding(model_dirs, data["test"])

    with timer("predict on the example image"):
        predict_to_folder(str(model_dirs["rahf_multi_head"]), [str(EXAMPLE_IMAGE)], [EXAMPLE_PROMPT], out / "predict")

    sections: list[str] = []
    best = model_dirs["rahf_multi_head"]

    with timer("repair"):
        sections.append(_repair_section(best, data_dir, data["test"], out, budget))
    with timer("guidance"):
        sections.append(_guidance_section(best, data["test"], out, budget))
    with timer("best-of-N"):
        sections.append(_best_of_n_section(best, data, out, budget))

    notes = [
        f"Synthetic set: {budget.num_train} / {budget.num_validation} / {budget.num_test} images (train / validation "
        f"/ test), 64 px, `rahf data synth` defaults. All numbers below are on the **test** split, which no model "
        f"saw in training. Models: `configs/model/tiny.json` (RAHF) and `configs/model/resnet50_tiny.json`, trained "
        "with `configs/train/synth_tiny.yaml` for "
        + ", ".join(f"{steps} optimizer steps ({name})" for name, steps in budget.steps.items())
        + f" at batch {budget.train_batch_size}"
        + (
            f" (the augmented-prompt variant trains {budget.tasks_per_image} of its 7 task rows per image and step)"
            if budget.tasks_per_image
            else ""
        )
        + ". `rahf_untrained` is the tiny RAHF at initialisation; `center_prior` a centred Gaussian fitted on the "
        "training maps (the floor).",
        "The paper's rows, where shown, are its published RichHF-18K figures, not measured here.",
    ]
    for name, info in keyword_decoding.items():
        greedy = info["test_greedy"]
        notes.append(
            f"Keywords of `{name}` are decoded at marker threshold {info['threshold']}, which `rahf train "
            f"--calibrate_keyword_threshold` chose on the validation split (validation F1 {info['val_f1_greedy']:.3f} "
            f"greedy, {info['val_f1']:.3f} at the threshold). With greedy decoding (the paper's) its test keywords are "
            f"P {100 * greedy[0]:.1f} / R {100 * greedy[1]:.1f} / F1 {100 * greedy[2]:.1f} %."
        )
    figures = [
        (
            "Multi-head RAHF on test images (image | ground truth | prediction), implausibility",
            "eval/rahf_multi_head/examples_implausibility.png",
        ),
        ("Multi-head RAHF, misalignment", "eval/rahf_multi_head/examples_misalignment.png"),
        ("Multi-head RAHF, ground-truth vs predicted scores", "eval/rahf_multi_head/scores_scatter.png"),
        ("Augmented-prompt RAHF, implausibility", "eval/rahf_augmented_prompt/examples_implausibility.png"),
        ("ResNet-50 baseline, implausibility", "eval/resnet50/examples_implausibility.png"),
        ("The bundled example image, rated by the trained multi-head model", "predict/example/overlay.png"),
    ]
    report = out / "report.md"
    write_comparison_report(
        {
            name: metrics[name]
            for name in ("rahf_multi_head", "rahf_augmented_prompt", "resnet50", "rahf_untrained", "center_prior")
        },
        report,
        title="rahf demo",
        include_paper=True,
        notes=notes,
        figures=[(c, p) for c, p in figures if (out / p).is_file()],
    )
    timing = ["## Time", "", "| step | seconds |", "|---|---|"]
    timing += [f"| {name} | {seconds:.1f} |" for name, seconds in timer.sections.items()]
    timing += [f"| **total** | **{sum(timer.sections.values()):.1f}** |", ""]
    timing += [
        "Training runs, each in its own process, concurrently (wall-clock seconds of each): "
        + ", ".join(f"{name} {sec:.1f}" for name, sec in train_seconds.items())
        + ".",
        "",
    ]
    with report.open("a", encoding="utf-8") as f:
        f.write("\n" + "\n\n".join(s for s in sections if s) + "\n\n" + "\n".join(timing))
    (out / "demo_summary.json").write_text(
        json.dumps(
            {
                "budget": asdict(budget),
                "seconds": timer.sections,
                "train_seconds": train_seconds,
                "keyword_decoding": keyword_decoding,
                "metrics": metrics,
            },
            indent=2,
            default=str,
        )
    )
    logger.info("demo written to %s (%.0f s)", report, sum(timer.sections.values()))
    return report


def _repair_section(model_dir: Path, data_dir: Path, test, out: Path, budget: DemoBudget) -> str:
    from rahf.testing import tiny_sd_inpaint_pipeline

    from .repair_report import repair_report

    images, prompts, masks = _repair_inputs(data_dir, test, budget.repair_images)
    if not images:
        return "## Repair\n\nNo test image with a planted artifact in this set.\n"
    report = repair_report(
        str(model_dir),
        tiny_sd_inpaint_pipeline(seed=0),
        images,
        prompts,
        masks,
        out / "repair",
        num_candidates=budget.repair_candidates,
        num_inference_steps=budget.inference_steps,
        dilation=0.05,
        seed=0,
    )
    return "\n".join(
        [
            "## Repair: heatmap -> mask -> inpaint -> rescore",
            "",
            f"{len(images)} test images with planted artifacts; the trained multi-head RAHF predicts the implausibility "
            f"heatmap, it is thresholded and dilated into a mask, a tiny (random) Stable Diffusion inpainting pipeline "
            f"makes {budget.repair_candidates} candidates, RAHF rescores them and keeps the best if it beats the input.",
            "",
            "| | value |",
            "|---|---|",
            f"| images repaired (a candidate beat the input) | {_fmt(report.get('share_repaired'))} |",
            f"| plausibility raised | {_fmt(report.get('share_plausibility_raised'))} |",
            f"| mean plausibility before / after | {_fmt(report.get('mean_plausibility_before'))} / "
            f"{_fmt(report.get('mean_plausibility_after'))} |",
            f"| IoU of the thresholded heatmap with the planted artifacts | {_fmt(report.get('mean_iou_raw_threshold'))} |",
            f"| IoU of the dilated mask with the planted artifacts | {_fmt(report.get('mean_iou_mask'))} |",
            f"| mean mask area (share of the image) | {_fmt(report.get('mean_mask_area_fraction'))} |",
            "",
            "The generator is an untrained tiny pipeline, so its candidates are noise inside the mask: what this shows is "
            "the chain (mask placement, one batched generation, pixels outside the mask unchanged, rescoring), not "
            "repair quality.",
            "",
            "![repair](repair/repair_grid.png)",
            "",
        ]
    )


def _guidance_section(model_dir: Path, test, out: Path, budget: DemoBudget) -> str:
    from rahf.testing import tiny_sd_pipeline

    from .guided_sample import guidance_report

    prompts = list(dict.fromkeys(test["prompt"]))[: budget.guidance_prompts]
    report = guidance_report(
        str(model_dir),
        tiny_sd_pipeline(seed=0),
        prompts,
        list(range(budget.guidance_seeds)),
        list(budget.guidance_scales),
        out / "guidance",
        reward="aesthetics",
        num_inference_steps=budget.inference_steps,
    )
    lines = [
        "## Classifier guidance from the aesthetics score",
        "",
        "A tiny (random) Stable Diffusion pipeline, guided by the trained multi-head RAHF's aesthetics score "
        f"(forward universal guidance), {len(prompts)} prompts x {budget.guidance_seeds} seeds per scale, the same "
        "seeds at every scale. The other three scores are shown so that reward hacking is visible.",
        "",
        "| scale | aesthetics (target) | plausibility | alignment | overall | non-finite |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.get("per_scale", []):
        others = row.get("mean_others", {})
        lines.append(
            f"| {row.get('scale')} | {_fmt(row.get('mean_target'))} | {_fmt(others.get('plausibility'))} | "
            f"{_fmt(others.get('alignment'))} | {_fmt(others.get('overall'))} | {row.get('nan_count', 0)} |"
        )
    if report.get("grid"):
        lines += ["", f"![guidance]({Path(report['grid']).relative_to(out).as_posix()})"]
    return "\n".join(lines + [""])


def _best_of_n_section(model_dir: Path, data, out: Path, budget: DemoBudget) -> str:

    from rahf.testing import tiny_sd_pipeline

    sd_dir = out / "generators" / "tiny_sd"
    tiny_sd_pipeline(seed=0).save_pretrained(sd_dir)
    train_prompts = list(dict.fromkeys(data["train"]["prompt"]))[: budget.best_of_n_train_prompts]
    heldout = list(dict.fromkeys(data["test"]["prompt"]))[: budget.best_of_n_heldout_prompts]
    report = best_of_n_report(
        sd_dir,
        model_dir,
        train_prompts,
        heldout,
        out / "best_of_n",
        n=4,
        threshold=None,
        finetune_steps=budget.finetune_steps,
        reward="overall",
        num_inference_steps=budget.inference_steps,
    )
    held = report.get("heldout", {})
    before, after = held.get("before", {}), held.get("after", {})
    bon = report.get("best_of_n", {})
    lines = [
        "## Best-of-N filtering and LoRA fine-tuning",
        "",
        f"A tiny (random) Stable Diffusion pipeline makes N = 4 images for each of {len(train_prompts)} training "
        "prompts; the trained RAHF's overall score keeps the best of each; a LoRA on the UNet is fine-tuned for "
        f"{budget.finetune_steps} steps on the kept images; {len(heldout)} held-out prompts are sampled before and "
        "after with the same seeds.",
        "",
        f"Kept {bon.get('num_kept', 'n/a')} of {bon.get('num_prompts', len(train_prompts))} prompts.",
        "",
        "| held-out mean | before | after |",
        "|---|---|---|",
        f"| reward (overall) | {_fmt(before.get('reward'))} | {_fmt(after.get('reward'))} |",
    ]
    for name in ("plausibility", "alignment", "aesthetics"):
        lines.append(f"| {name} | {_fmt(before.get(name))} | {_fmt(after.get(name))} |")
    lines += ["", "![before/after](best_of_n/before_after.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Best-of-N and LoRA fine-tuning, before and after

# Held-out images are seeded apart from the best-of-N run's (prompt indices could coincide).
HELDOUT_SEED_OFFSET = 1_000_003


def default_resolution(pipe) -> int:
    """The pipeline's default output size (the denoiser's sample size times the autoencoder's scale factor)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0]
    if not sample_size:
        raise ValueError(f"cannot tell the default resolution of a {type(pipe).__name__}; pass `resolution`")
    return int(sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def _evaluate(pipe, reward_fn, prompts: Sequence[str], seeds: list[list[int]], gen_args: BestOfNArguments):
    """Images for every held-out prompt (one per seed) and their rewards / RAHF scores."""
    images, rewards, tables = [], [], []
    for prompt, prompt_seeds in zip(prompts, seeds):
        batch = generate_images(pipe, prompt, prompt_seeds, gen_args, pipe.device)
        values, info = reward_fn(batch, [prompt] * len(batch), None)
        images.append(batch)
        rewards.append([float(v) for v in torch.as_tensor(values).float().reshape(-1)])
        tables.append(score_table(info, len(batch)))
    flat = [r for row in rewards for r in row]
    summary: dict[str, Any] = {"reward": float(np.mean(flat)), "rewards": rewards}
    for name in tables[0]:
        summary[name] = float(np.mean([v for table in tables for v in table[name]]))
    return images, summary


def best_of_n_report(
    sd_pipe_dir: str | Path,
    reward_model_dir: str | Path,
    train_prompts: Sequence[str],
    heldout_prompts: Sequence[str],
    out_dir: str | Path,
    n: int = 4,
    threshold: float | None = None,
    finetune_steps: int = 20,
    reward: str = "overall",
    num_inference_steps: int = 2,
    heldout_images_per_prompt: int = 2,
    learning_rate: float = 1e-3,
    rank: int = 4,
    train_batch_size: int = 2,
    reward_weighted: bool = False,
    resolution: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Best-of-N on `train_prompts`, a few LoRA steps on the kept images, then the mean reward on `heldout_prompts`
    before and after (the same seeds), and a before/after grid.

    Writes under `out_dir`: `best_of_n/` (kept set, all_scores.jsonl, ...), `lora/` (the fine-tuning run and its
    `pytorch_lora_weights.safetensors`), `before_after.png` (top row before, bottom row after, one column per held-out
    prompt, first seed) and `best_of_n_report.json` (what this returns).

    Returns:
        `dict` with `best_of_n` (the run's summary), `finetune` (the training summary), `heldout` (`before` / `after`:
        mean `reward` and mean RAHF scores over the held-out images; `gain` = after - before), `grid` (the PNG path).
    """
    from rahf.viz import image_grid

    if not train_prompts or not heldout_prompts:
        raise ValueError("`train_prompts` and `heldout_prompts` must both be non-empty lists of prompts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = out_dir / "train_prompts.txt"
    prompts_file.write_text("".join(p.replace("\n", " ") + "\n" for p in train_prompts))
    if resolution is None:
        resolution = default_resolution(load_text_to_image_pipeline(str(sd_pipe_dir)))

    # 1. Best-of-N on the training prompts.
    bon_args = BestOfNArguments(
        pretrained_model_name_or_path=str(sd_pipe_dir),
        reward_model=str(reward_model_dir),
        prompts_file=str(prompts_file),
        output_dir=str(out_dir / "best_of_n"),
        num_images_per_prompt=n,
        reward=reward,
        threshold=threshold,
        num_inference_steps=num_inference_steps,
        resolution=resolution,
        seed=seed,
        batch_size=n,
    )
    bon_summary = run_best_of_n(bon_args)
    if not bon_summary.get("num_kept"):
        raise ValueError(f"best-of-{n} kept no image (threshold {threshold}); lower `threshold` for the demo")

    # 2. A few LoRA steps on what was kept.
    ft_summary = train_lora(
        LoRAFineTuneArguments(
            pretrained_model_name_or_path=str(sd_pipe_dir),
            train_data_dir=str(out_dir / "best_of_n" / "kept"),
            resolution=resolution,
            train_batch_size=train_batch_size,
            max_train_steps=finetune_steps,
            learning_rate=learning_rate,
            rank=rank,
            output_dir=str(out_dir / "lora"),
            checkpointing_steps=0,
            reward_weighted=reward_weighted,
            seed=seed,
            mixed_precision="no",
        )
    )

    # 3. Held-out prompts, the same seeds before and after.
    reward_fn = load_reward(reward, str(reward_model_dir))
    seeds = [
        [derive_seed(seed + HELDOUT_SEED_OFFSET, p, i) for i in range(heldout_images_per_prompt)]
        for p in range(len(heldout_prompts))
    ]
    gen_args = BestOfNArguments(
        num_inference_steps=num_inference_steps, resolution=resolution, batch_size=heldout_images_per_prompt
    )
    pipe = load_text_to_image_pipeline(str(sd_pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    before_images, before = _evaluate(pipe, reward_fn, heldout_prompts, seeds, gen_args)
    load_lora_into_pipeline(pipe, out_dir / "lora")
    after_images, after = _evaluate(pipe, reward_fn, heldout_prompts, seeds, gen_args)

    # 4. The grid: first seed of each held-out prompt, before (top) and after (bottom).
    cells = [imgs[0] for imgs in before_images] + [imgs[0] for imgs in after_images]
    scale = max(1, -(-128 // max(cells[0].size)))  # tiny generators: upscale (nearest) so the captions fit
    cells = [c.resize((c.width * scale, c.height * scale), Image.Resampling.NEAREST) for c in cells]
    captions = [f"before {r[0]:.3f}" for r in before["rewards"]] + [f"after {r[0]:.3f}" for r in after["rewards"]]
    grid_path = out_dir / "before_after.png"
    image_grid(cells, cols=len(heldout_prompts), captions=captions).save(grid_path)

    gain = {k: after[k] - before[k] for k in before if isinstance(before[k], float)}
    report = {
        "best_of_n": {k: v for k, v in bon_summary.items() if k != "generated_by_this_process"},
        "finetune": ft_summary,
        "heldout": {"prompts": list(heldout_prompts), "seeds": seeds, "before": before, "after": after, "gain": gain},
        "grid": str(grid_path),
    }
    (out_dir / "best_of_n_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "best-of-%d: kept %d of %d prompts; held-out mean %s %.4f -> %.4f after %d LoRA steps",
        n,
        bon_summary["num_kept"],
        bon_summary["num_prompts"],
        reward,
        before["reward"],
        after["reward"],
        ft_summary["global_step"],
    )
    return report
