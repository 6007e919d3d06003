"""`rahf demo`: the whole loop on the embedded synthetic set, on CPU, with a visual report: the one place the demo lives.

synthetic data -> train tiny RAHF (both variants) and the ResNet baseline -> evaluate them, the untrained model and
the centre prior on the test split (the paper's Tables 1-4) -> `rahf efficacy` at a reduced size with the trained
multi-head RAHF: best-of-N + LoRA fine-tuning, repair and guidance of the shipped synthetic-world generator, judged
beside their controls. Everything lands in `OUT/report.md` with pictures, `OUT/models/<name>/`,
`OUT/eval/<name>/metrics.json` and `OUT/efficacy/efficacy.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rahf.configs import preset_path

logger = logging.getLogger(__name__)

__all__ = ["DemoBudget", "FULL", "QUICK", "run_demo"]


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
    # `rahf efficacy` at a reduced size, with the shipped generator and judge and the RAHF trained above
    efficacy: dict[str, Any] = field(
        default_factory=lambda: {
            "num_prompts": 24, "seeds_per_prompt": 1, "num_selection_prompts": 32, "num_images_per_prompt": 8,
            "finetune_steps": 100, "repair_images": 8, "guidance_prompts": 8, "reward_guidance_scales": [2.0],
        }
    )  # fmt: skip


FULL = DemoBudget()
QUICK = DemoBudget(
    num_train=48,
    num_validation=16,
    num_test=16,
    steps={"rahf_multi_head": 6, "rahf_augmented_prompt": 4, "resnet50": 4},
    train_batch_size=8,
    validation_steps=1000,
    efficacy={
        "num_prompts": 3,
        "seeds_per_prompt": 1,
        "num_selection_prompts": 3,
        "num_images_per_prompt": 2,
        "finetune_steps": 2,
        "repair_images": 2,
        "repair_candidates": 2,
        "guidance_prompts": 2,
        "reward_guidance_scales": [1.0],
        "num_inference_steps": 3,
        "finetune_batch_size": 2,
    },  # fmt: skip
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

    with timer("efficacy: best-of-N + fine-tuning, repair, guidance (judged)"):
        sections.append(_efficacy_section(best, out, budget))

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


def _efficacy_section(model_dir: Path, out: Path, budget: DemoBudget) -> str:
    """`rahf efficacy` at the demo's size, with the RAHF trained above as the reward; its report, re-rooted."""
    from .efficacy import EfficacyArguments, run_efficacy

    run_efficacy(EfficacyArguments(out=str(out / "efficacy"), reward_model=str(model_dir), **budget.efficacy))
    text = (out / "efficacy" / "report.md").read_text(encoding="utf-8")
    text = text.replace("](", "](efficacy/").replace(
        "# rahf efficacy", "## Does RAHF make a generator better? (rahf efficacy"
    )
    lines = text.splitlines()
    lines[0] = lines[0] + ")"
    intro = [
        "",
        "The loops use the trained multi-head RAHF above to improve the shipped tiny generator of the synthetic world; "
        "whether they did is rated by the judge (trained on its own scenes, never a reward) on held-out prompts, beside "
        "a control without RAHF's information. A reduced run; `rahf efficacy` runs the full size (README, 'Does it work?').",
    ]
    return "\n".join([lines[0], *intro, *[line.replace("## ", "### ", 1) if line.startswith("## ") else line
                                           for line in lines[1:]]])  # fmt: skip
