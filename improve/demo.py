"""`rahf demo`: the whole loop on the embedded synthetic set, on CPU, with a visual report: the one place the demo lives.

synthetic data -> train tiny RAHF (both variants) and the ResNet baseline -> evaluate them, the untrained model and
the centre prior on the test split (the paper's Tables 1-4); concurrently, `rahf efficacy` at a reduced size with the
shipped RAHF, generator and judge of the synthetic world: best-of-N + LoRA fine-tuning, repair and guidance, judged
beside their controls, and reward backprop and policy gradient (scalar and heatmap-weighted) at best-of-N's budget.
Everything lands in `OUT/report.md` with pictures, `OUT/models/<name>/`, `OUT/eval/<name>/metrics.json` and
`OUT/efficacy/efficacy.json"""

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
    num_validation: int = 250
    num_test: int = 500
    # optimizer steps per trained model, at train_batch_size
    steps: dict[str, int] = field(
        default_factory=lambda: {"rahf_multi_head": 2000, "rahf_augmented_prompt": 1000, "resnet50": 600}
    )
    train_batch_size: int = 16
    # augmented-prompt variant: task rows trained per image and step (None: all 7)
    tasks_per_image: int | None = 3
    validation_steps: int = 1000
    # `rahf efficacy` at a reduced size with the shipped generator, judge and RAHF: the paper's three experiments and
    # the reward fine-tuning methods against best-of-N at its budget of generator forward passes
    efficacy: dict[str, Any] = field(
        default_factory=lambda: {
            "num_prompts": 24, "seeds_per_prompt": 1, "num_inference_steps": 10, "num_selection_prompts": 16,
            "num_images_per_prompt": 8, "finetune_steps": 40, "lora_learning_rate": 1e-3, "repair_images": 8,
            "guidance_prompts": 8, "reward_guidance_scales": [2.0], "backprop_learning_rate": 1e-3,
            "pg_learning_rate": 1e-3, "pg_batch_size": 2,
            "experiments": ["best_of_n", "repair", "guidance", "reward_backprop", "policy_gradient",
                            "policy_gradient_dense"],
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
        "backprop_batch_size": 2,
        "pg_group_size": 2,
        "pg_batch_size": 1,
        "experiments": [
            "best_of_n",
            "repair",
            "guidance",
            "reward_backprop",
            "policy_gradient",
            "policy_gradient_dense",
        ],
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


def _count_lines(log_file: Path, marker: str) -> int:
    try:
        return log_file.read_text(encoding="utf-8", errors="replace").count(marker)
    except OSError:
        return 0


@dataclass
class _Job:
    """One demo step run as its own process: its command, where it writes, how far it is (for its progress bar)."""

    name: str
    argv: list[str]  # after `python -m`
    run_dir: Path
    total: int
    progress: Any  # () -> int, the bar's position
    log_name: str = "job.log"  # the process's output, in run_dir
    done: Any = None  # () -> None, called when the process exits 0


def _run_jobs(jobs: list[_Job], prepare: Any = None, then: list[_Job] | None = None) -> dict[str, float]:
    """Runs `jobs` as separate processes, all at once with one thread each, and returns each one's wall-clock seconds.

    The demo's models are so small that one process does not keep two cores busy (each operation has too little work
    to split between threads): on this project's 2-core machine two one-thread processes finished 300 steps of each
    RAHF variant 1.33x sooner than the same jobs one after another with two threads each
    (`python benchmarks/concurrent_training.py`).
    `jobs` start at once; `then` once `prepare()` has returned (the training jobs wait for the data, which the
    efficacy job does not need). Each job's output goes to `<run_dir>/<log_name>`; one progress bar per job.
    """
    import os
    import subprocess
    import sys

    from tqdm.auto import tqdm

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_MININTERVAL="30", TOKENIZERS_PARALLELISM="false")
    running: dict[str, tuple[_Job, subprocess.Popen, Any, float]] = {}
    bars = {job.name: tqdm(total=job.total, desc=job.name, position=i, leave=True)
            for i, job in enumerate([*jobs, *(then or [])])}  # fmt: skip
    seconds: dict[str, float] = {}

    def launch(job: _Job) -> None:
        if job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        job.run_dir.mkdir(parents=True)
        log_path = job.run_dir / job.log_name
        cmd = [sys.executable, "-m", *job.argv]
        logger.info("demo: %s (1 thread), output in %s", " ".join(cmd), log_path)
        log = log_path.open("w", encoding="utf-8")
        running[job.name] = (job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                             time.perf_counter())  # fmt: skip

    try:
        for job in jobs:
            launch(job)
        if prepare is not None:
            prepare()
        for job in then or []:
            launch(job)
        while running:
            time.sleep(0.5)
            for name, (job, proc, log, started) in list(running.items()):
                bars[name].update(min(job.total, job.progress()) - bars[name].n)
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[name]
                if code != 0:
                    tail = (job.run_dir / job.log_name).read_text(encoding="utf-8", errors="replace")[-3000:]
                    raise RuntimeError(f"demo step {name} failed (exit code {code}); the end of its log:\n{tail}")
                seconds[name] = time.perf_counter() - started
                bars[name].update(job.total - bars[name].n)
                if job.done is not None:
                    job.done()
    finally:
        for _, proc, log, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()
        for bar in bars.values():
            bar.close()
    return seconds


def _training_job(name: str, data_dir: Path, out: Path, budget: DemoBudget, model_dirs: dict[str, Path]) -> _Job:
    run_dir = out / "runs" / name

    def done() -> None:
        model_dir = out / "models" / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(run_dir / "final", model_dir)
        model_dirs[name] = model_dir

    return _Job(name=f"train {name}", argv=["rahf.train", *_train_argv(name, data_dir, out, budget)],
                run_dir=run_dir, total=budget.steps[name], log_name="train.log",
                progress=lambda: _last_step(run_dir / "logs" / "train_log.jsonl"), done=done)  # fmt: skip


def _efficacy_argv(out: Path, budget: DemoBudget) -> list[str]:
    argv = ["rahf.improve.efficacy", "--out", str(out / "efficacy")]
    for key, value in budget.efficacy.items():
        argv += [f"--{key}", *(str(v) for v in value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return argv


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
    started = time.perf_counter()
    torch.manual_seed(0)

    model_dirs: dict[str, Path] = {}
    with timer("untrained RAHF"):
        model_dirs["rahf_untrained"] = init_model(
            str(preset_path("model/tiny.json")), str(out / "models" / "rahf_untrained")
        )
    trained = ["rahf_multi_head", "rahf_augmented_prompt", "resnet50"]
    efficacy_dir = out / "efficacy"
    efficacy = _Job(name="efficacy", argv=_efficacy_argv(out, budget), run_dir=efficacy_dir,
                    total=len(budget.efficacy["experiments"]), log_name="efficacy.log",
                    progress=lambda: _count_lines(efficacy_dir / "efficacy.log", " done in "))  # fmt: skip
    data_ready: dict[str, Any] = {}

    def make_data() -> None:
        with timer("(within it) synthetic data, while the efficacy run starts"):
            data_ready["data"] = _data(out, budget)[1]

    # `_data` writes into OUT/data, which the training commands name before it exists; they start once it does.
    training = [_training_job(name, out / "data", out, budget, model_dirs) for name in trained]
    with timer("train " + " + ".join(trained) + ", and rahf efficacy (concurrently)"):
        job_seconds = _run_jobs([efficacy], prepare=make_data, then=training)
    data = data_ready["data"]
    train_seconds = {name.removeprefix("train "): sec for name, sec in job_seconds.items()}

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

    sections = [_efficacy_section(out)]

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
    total = time.perf_counter() - started
    timing += [f"| **total** (wall clock) | **{total:.1f}** |", ""]
    timing += [
        "Training runs and the efficacy run, each in its own process with one thread, concurrently (wall-clock "
        "seconds of each): " + ", ".join(f"{name} {sec:.1f}" for name, sec in train_seconds.items()) + ".",
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
    logger.info("demo written to %s (%.0f s)", report, total)
    return report


def _efficacy_section(out: Path) -> str:
    """The report of the demo's `rahf efficacy` run (`OUT/efficacy`), re-rooted under the demo's report."""
    text = (out / "efficacy" / "report.md").read_text(encoding="utf-8")
    text = text.replace("](", "](efficacy/").replace(
        "# rahf efficacy", "## Does RAHF make a generator better? (rahf efficacy"
    )
    lines = text.splitlines()
    lines[0] = lines[0] + ")"
    intro = [
        "",
        "The loops use the shipped RAHF of the synthetic world (`rahf/improve/weights/rahf_synth_tiny`: the tiny "
        "multi-head model above trained by `rahf train --config configs/train/synth_tiny.yaml` for its full 5000 steps; "
        "the demo's own is trained for fewer, to fit its time, and concurrently with this run) to improve the shipped "
        "tiny generator; whether they did is rated by the judge (trained on its own scenes, never a reward) on "
        "held-out prompts, beside a control without RAHF's information. Best-of-N + LoRA and the reward fine-tuning "
        "methods (reward backprop, scalar and heatmap-weighted policy gradient) spend the same number of generator "
        "forward passes. A reduced run, so its shares move by a prompt or two from seed to seed; `rahf efficacy` runs "
        "the full size (README, 'Does it work?').",
    ]
    return "\n".join([lines[0], *intro, *[line.replace("## ", "### ", 1) if line.startswith("## ") else line
                                           for line in lines[1:]]])  # fmt: skip
