"""The trainer: arguments, schedules, optimizers, checkpoints and their pruning, logs, exact resumption, final model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from train_utils import load_state_dict, make_tiny_dataset, write_tiny_model_config

from rahf import RichFeedbackPredictor
from rahf.testing import tiny_rahf_model
from rahf.train import build_model_and_processor, main, train
from rahf.training_args import parse_training_args
from rahf.training_utils import (
    COMPLETE_MARKER,
    build_lr_scheduler,
    build_optimizer,
    list_checkpoints,
    prune_checkpoints,
)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_tiny_dataset(root / "data")
    config = write_tiny_model_config(root / "tiny.json")
    return data, config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads stall each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Each run builds its own Accelerator; accelerate keeps process-wide singletons that tests must clear.
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _argv(data, config, out, *extra) -> list[str]:
    return [
        "--data_dir",
        str(data),
        "--model_config",
        str(config),
        "--output_dir",
        str(out),
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        *map(str, extra),
    ]


def _run(*argv):
    return train(parse_training_args(list(argv)))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "job.yaml"
    # `1e-3` without a dot is a string to YAML: it must still arrive as a float.
    cfg.write_text(
        "data_dir: d\nlearning_rate: 1e-3\nmax_train_steps: 5\naugment: true\nlr_scheduler: rsqrt\n"
        "train_batch_size: 4\n"
    )
    args = parse_training_args(["--config", str(cfg)])
    assert (args.learning_rate, args.max_train_steps, args.augment, args.lr_scheduler) == (1e-3, 5, True, "rsqrt")
    args = parse_training_args(
        [
            "--config",
            str(cfg),
            "--max_train_steps",
            "9",
            "--augment",
            "false",
            "--output_dir",
            "elsewhere",
            "--seed",
            "3",
            "--model_config",
            "m.json",
        ]
    )
    assert (args.max_train_steps, args.augment, args.output_dir, args.seed) == (9, False, "elsewhere", 3)
    assert (args.model_config, args.learning_rate, args.train_batch_size) == ("m.json", 1e-3, 4)


def test_yaml_mistakes_are_named(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat.*did you mean 'learning_rate'"):
        parse_training_args(["--config", str(cfg)])
    cfg.write_text("lr_scheduler: cosine_restarts\n")
    with pytest.raises(ValueError, match="lr_scheduler.*one of"):
        parse_training_args(["--config", str(cfg)])
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        parse_training_args(["--gradient_accumulation_steps", "0"])
    with pytest.raises(ValueError, match="word_swap_rate"):
        parse_training_args(["--word_swap_rate", "2", "--word_swap_groups", "g.json"])


def test_word_swap_needs_groups_and_is_ignored_by_models_without_keywords(tiny_setup, tmp_path, caplog):
    data, config = tiny_setup
    with pytest.raises(ValueError, match=r"word_swap_groups.*word_swap_groups\.json"):  # none given, none in data_dir
        _run(*_argv(data, config, tmp_path / "rahf", "--word_swap_rate", "0.5", "--max_train_steps", "1"))
    out = tmp_path / "resnet"
    summary = _run(
        "--data_dir",
        str(data),
        "--model_type",
        "resnet50",
        "--model_config",
        "configs/model/resnet50_tiny.json",
        "--output_dir",
        str(out),
        "--word_swap_rate",
        "0.5",
        "--max_train_steps",
        "1",
        "--validation_split",
        "none",
    )
    assert summary["global_step"] == 1 and "ignored for resnet50" in caplog.text


def test_unknown_model_type_lists_known_ones():
    args = parse_training_args(["--model_type", "vgg", "--model_config", "configs/model/tiny.json"])
    with pytest.raises(ValueError, match=r"unknown `model_type` 'vgg'.*'rahf'"):
        build_model_and_processor(args)


def test_start_from_a_saved_model(tmp_path):
    from rahf.init_model import init_model

    init_model("configs/model/tiny.json", str(tmp_path / "init"), seed=1)
    args = parse_training_args(["--pretrained_model_name_or_path", str(tmp_path / "init")])
    model, processor = build_model_and_processor(args)
    _assert_same_weights(model.state_dict(), load_state_dict(tmp_path / "init"))
    with pytest.raises(ValueError, match="variant"):
        build_model_and_processor(
            parse_training_args(
                [*["--pretrained_model_name_or_path", str(tmp_path / "init")], "--variant", "augmented_prompt"]
            )
        )


def test_variant_override_and_preset_lookup():
    # A repo-relative preset path resolves from any working directory.
    args = parse_training_args(["--model_config", "configs/model/tiny.json", "--variant", "augmented_prompt"])
    model, processor = build_model_and_processor(args)
    assert model.config.variant == processor.variant == "augmented_prompt"


# --------------------------------------------------------------------------------------------------------------------
# Schedules and optimizers


def _lrs(name: str, steps: int, warmup: int, lr_end: float = 0.0, processes: int = 1) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, name, warmup, steps, lr_end=lr_end, num_processes=processes)
    lrs = []
    opt.step()  # (silences torch's warning about stepping the scheduler first)
    for _ in range(steps + 1):
        lrs.append(sched.get_last_lr()[0])
        for _ in range(processes):  # what accelerate does for a prepared scheduler
            sched.step()
    return lrs


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    lrs = _lrs("cosine", steps=100, warmup=10, lr_end=0.5)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[55] == pytest.approx(0.75)  # half-way down the cosine
    assert lrs[100] == pytest.approx(0.5)
    # With 2 processes accelerate steps the scheduler twice per optimizer step; the trainer scales the step counts.
    assert _lrs("cosine", steps=100, warmup=10, lr_end=0.5, processes=2) == pytest.approx(lrs)


def test_rsqrt_schedule_is_reciprocal_square_root_after_warmup():
    lrs = _lrs("rsqrt", steps=400, warmup=100)
    assert lrs[50] == pytest.approx(0.5) and lrs[100] == pytest.approx(1.0)
    for step in (100, 200, 400):
        assert lrs[step] == pytest.approx(math.sqrt(100 / step))
    assert _lrs("rsqrt", steps=400, warmup=100, processes=2) == pytest.approx(lrs)
    no_warmup = _lrs("rsqrt", steps=30_000, warmup=0)
    assert no_warmup[0] == 1.0 and no_warmup[30_000] == pytest.approx(0.5)
    assert _lrs("rsqrt", steps=30_000, warmup=0, processes=2)[::1000] == pytest.approx(no_warmup[::1000])
    assert _lrs("constant", steps=50, warmup=10)[10:] == pytest.approx([1.0] * 41)


def test_8bit_adam_takes_a_step():
    pytest.importorskip("bitsandbytes")
    model = tiny_rahf_model()
    args = parse_training_args(["--use_8bit_adam"])
    opt = build_optimizer(model.parameters(), learning_rate=1e-3, use_8bit_adam=args.use_8bit_adam, decay_1d=False)
    assert type(opt).__name__ == "AdamW8bit"
    before = model.text_model.shared.weight.detach().clone()
    model.text_model.shared.weight.sum().backward()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert not torch.equal(before, model.text_model.shared.weight)
    states = [s for s in opt.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # large tensors keep 8-bit moments


# --------------------------------------------------------------------------------------------------------------------
# Runs


def _complete_checkpoint(path):
    path.mkdir()
    (path / "optimizer.bin").write_bytes(b"0123")
    (path / COMPLETE_MARKER).write_text(json.dumps({"global_step": 0, "files": {"optimizer.bin": 4}}))


def test_list_and_prune_checkpoints_sort_by_step(tmp_path):
    for step in (9, 10, 2, 100):
        _complete_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-100",
    ]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-100"]


def test_run_writes_pruned_checkpoints_logs_and_a_loadable_final_model(tiny_setup, tmp_path):
    data, config = tiny_setup
    out = tmp_path / "run"
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data),
                "model_config": str(config),
                "output_dir": "ignored",
                "train_batch_size": 4,
                "max_train_steps": 3,
                "learning_rate": 1e-3,
            }
        )
    )
    # 16 records / batch 4 = 4 steps per epoch: 7 steps cross an epoch boundary. Checkpoints at 2, 4, 6; limit 2.
    assert (
        main(
            [
                "--config",
                str(job),
                "--output_dir",
                str(out),
                "--max_train_steps",
                "7",
                "--checkpointing_steps",
                "2",
                "--checkpoints_total_limit",
                "2",
                "--logging_steps",
                "2",
                "--validation_steps",
                "4",
                "--calibrate_keyword_threshold",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for name in (
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "training_state.json",
        "model/model.safetensors",
        "model/processor_config.json",
    ):
        assert (out / "checkpoint-6" / name).is_file(), name
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6

    lines = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 7]
    for r in train_lines:
        assert {"loss", "heatmap_loss", "score_loss", "sequence_loss", "lr", "epoch"} <= r.keys()
        assert r["loss"] == pytest.approx(r["heatmap_loss"] + r["score_loss"] + r["sequence_loss"], rel=1e-5)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    val_lines = [r for r in lines if "val/loss" in r]
    assert [r["step"] for r in val_lines] == [4, 7]
    assert {"val/heatmap_loss", "val/score_loss", "val/sequence_loss", "val/plcc_plausibility"} <= val_lines[0].keys()
    assert val_lines[0]["val/num_samples"] == 8

    # the keyword decoding was chosen on the validation split and saved with the model
    calibration = json.loads((out / "final" / "training_summary.json").read_text())["keyword_threshold_calibration"]
    assert [row["threshold"] for row in calibration["table"]] == [None, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1]
    assert calibration["f1"] == max(row["f1"] for row in calibration["table"])
    assert json.loads((out / "final" / "config.json").read_text()).get("keyword_threshold") == calibration["threshold"]
    assert "val/keyword_f1_greedy" in lines[-1]

    predictor = RichFeedbackPredictor.from_pretrained(out / "final")
    [feedback] = predictor([Image.new("RGB", (48, 40), (200, 30, 30))], ["a red circle on a table"])
    assert set(feedback.scores) == {"plausibility", "alignment", "aesthetics", "overall"}
    assert feedback.heatmaps["implausibility"].shape == (40, 48)
    # The checkpoint's model copy loads on its own too, and the run really trained.
    RichFeedbackPredictor.from_pretrained(out / "checkpoint-6" / "model")
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            load_state_dict(out / "final").values(), load_state_dict(out / "checkpoint-4" / "model").values()
        )
    )


def test_resume_after_a_crash_reaches_the_same_weights(tiny_setup, tmp_path):
    """A run killed right after saving checkpoint-6 and resumed ends bit-identical to one that never stopped.

    Cosine schedule with warm-up, gradient accumulation, augmentation and dropout: the model, optimizer, scheduler,
    RNG states, accumulation counter and data position must all come back. Compared with torch.equal: on CPU the
    resumed run replays the same float32 operations in the same order on exactly restored state, so any difference,
    however small, is a bug.
    """
    data, config = tiny_setup
    common = [
        "--train_batch_size",
        2,
        "--gradient_accumulation_steps",
        2,
        "--max_train_steps",
        10,
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        3,
        "--lr_end",
        "1e-4",
        "--augment",
        "true",
        "--checkpointing_steps",
        3,
        "--validation_steps",
        3,
    ]
    full = tmp_path / "full"
    _run(*_argv(data, config, full, *common))
    # 16 records / batch 2 / accumulation 2 = 4 steps per epoch: step 6 is half-way through the second epoch.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-6", crashed / "checkpoint-6")
    summary = _run(*_argv(data, config, crashed, *common, "--resume_from_checkpoint", "latest"))
    assert summary["global_step"] == 10
    _assert_same_weights(load_state_dict(full / "final"), load_state_dict(crashed / "final"))
    logged = [json.loads(line)["step"] for line in (crashed / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert logged[0] == 7  # it went on from step 6; it did not start over


def test_stop_at_max_train_steps_then_continue(tiny_setup, tmp_path):
    """`--max_train_steps 4`, then the same job with `--max_train_steps 8 --resume_from_checkpoint latest`, equals an
    8-step run (a constant schedule: cosine and linear schedules depend on the total number of steps). The
    augmented-prompt variant with `--tasks_per_image` and word swaps: the resumed run draws the same task rows and
    swaps the same words, and the labels the swaps leave unknown (NaN) never reach the weights."""
    data, config = tiny_setup
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"colour": ["red", "blue", "green"], "shape": ["circle", "square", "star"]}))
    common = [
        "--word_swap_rate",
        1.0,
        "--word_swap_groups",
        groups,
        "--train_batch_size",
        4,
        "--lr_scheduler",
        "constant",
        "--checkpointing_steps",
        2,
        "--variant",
        "augmented_prompt",
        "--tasks_per_image",
        3,
    ]
    once = tmp_path / "once"
    _run(*_argv(data, config, once, *common, "--max_train_steps", 8))
    twice = tmp_path / "twice"
    _run(*_argv(data, config, twice, *common, "--max_train_steps", 4))
    _run(*_argv(data, config, twice, *common, "--max_train_steps", 8, "--resume_from_checkpoint", "latest"))
    _assert_same_weights(load_state_dict(once / "final"), load_state_dict(twice / "final"))
    # One log line per step: the second run went on from step 4 and kept the first run's lines up to there.
    assert [
        json.loads(line)["step"]
        for line in (twice / "logs" / "train_log.jsonl").read_text().splitlines()
        if "loss" in line and "val/" not in line
    ] == list(range(1, 9))
    assert json.loads((twice / "final" / "config.json").read_text())["variant"] == "augmented_prompt"
    assert all(torch.isfinite(w).all() for w in load_state_dict(once / "final").values())


def test_8bit_adam_bf16_run_without_tensorboard(tiny_setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    data, config = tiny_setup
    out = tmp_path / "bnb"
    summary = _run(
        *_argv(
            data,
            config,
            out,
            "--use_8bit_adam",
            "--train_batch_size",
            8,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            1,
            "--validation_split",
            "none",
            "--mixed_precision",
            "bf16",
            "--report_to",
            "all",  # tensorboard is skipped with a warning where it is not installed
        )
    )
    assert summary["global_step"] == 2 and (out / "checkpoint-2" / "optimizer.bin").is_file()
    assert not (out / "logs" / "train_log.jsonl").read_text().count("val/")


def test_calibrate_keyword_threshold_picks_the_best_validation_f1_greedy_on_ties(monkeypatch):
    from datasets import Dataset

    from rahf.calibration import calibrate_keyword_threshold
    from rahf.data.schema import FEATURES
    from rahf.predictor import RichFeedback

    rows = [
        {
            "uid": f"u{i}",
            "image": Image.new("RGB", (8, 8)),
            "prompt": "a red circle",
            "plausibility": 0.5,
            "alignment": 0.5,
            "aesthetics": 0.5,
            "overall": 0.5,
            "implausibility_map": Image.new("L", (8, 8)),
            "misalignment_map": Image.new("L", (8, 8)),
            "prompt_words": ["a", "red", "circle"],
            "word_labels": [1, 0, 1],
        }
        for i in range(4)
    ]
    split = Dataset.from_list(rows, features=FEATURES)
    # What each decoding "predicts" for every record: greedy misses the word, 0.3 finds it, 0.1 adds a wrong one.
    marks = {None: [], 0.45: [], 0.4: [], 0.35: [], 0.3: [1], 0.25: [1], 0.2: [1], 0.15: [1, 2], 0.1: [0, 1, 2]}

    def fake_call(self, images, prompts, outputs=None, show_progress=False):
        assert outputs == ["keywords"] and self.model.config.keyword_threshold is None
        return [RichFeedback(prompt=p, misaligned_word_indices=marks[self.keyword_threshold]) for p in prompts]

    monkeypatch.setattr(RichFeedbackPredictor, "__call__", fake_call)
    model = tiny_rahf_model("multi_head")
    model.train()
    result = calibrate_keyword_threshold(model, None, split)
    assert result["threshold"] == 0.3  # the first (highest) of the thresholds with F1 1
    assert (result["f1"], result["f1_greedy"]) == (1.0, 0.0)
    assert model.config.keyword_threshold == 0.3 and model.training
    # all equal: greedy stays
    marks.update({k: [1] for k in marks})
    assert calibrate_keyword_threshold(model, None, split)["threshold"] is None
    assert model.config.keyword_threshold is None
    # a baseline without keywords is left alone
    assert calibrate_keyword_threshold(torch.nn.Linear(2, 2), None, split) is None


# --------------------------------------------------------------------------------------------------------------------
# Best checkpoint on validation


def test_save_best_on_keeps_the_best_validation_model_and_validates_each_epoch(tiny_setup, tmp_path):
    data, config = tiny_setup
    out = tmp_path / "run"
    # 16 records / batch 4 = 4 steps per epoch; 10 steps: validations at the ends of epochs 0 and 1 (steps 4, 8), at
    # step 6 (validation_steps) and at the end (10). A high learning rate makes the validation loss move both ways.
    summary = _run(
        *_argv(data, config, out, "--train_batch_size", 4, "--max_train_steps", 10, "--checkpointing_steps", 0),
        "--validation_steps",
        "6",
        "--validate_every_epoch",
        "--save_best_on",
        "score_loss",
        "--weight_decay_all",
        "--adam_weight_decay",
        "0.002",
        "--max_grad_norm",
        "0",
    )
    lines = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/score_loss"] for r in lines if "val/score_loss" in r}
    assert sorted(val) == [4, 6, 8, 10]
    best_step = min(val, key=lambda s: (val[s], s))
    saved = json.loads((out / "best" / "best_validation.json").read_text())
    assert (saved["metric"], saved["step"]) == ("score_loss", best_step)
    assert saved["value"] == pytest.approx(val[best_step])
    assert summary["best"]["step"] == best_step and summary["best_dir"] == str(out / "best")
    assert json.loads((out / "final" / "training_summary.json").read_text())["best"]["step"] == best_step
    RichFeedbackPredictor.from_pretrained(out / "best")  # a complete, loadable model
    if best_step == 10:
        _assert_same_weights(load_state_dict(out / "best"), load_state_dict(out / "final"))


def test_save_best_on_names_are_checked():
    with pytest.raises(ValueError, match="`save_best_on` must be a validation metric.*plcc_overall"):
        parse_training_args(["--data_dir", "d", "--save_best_on", "f1"])
    with pytest.raises(ValueError, match="needs a validation split"):
        parse_training_args(["--data_dir", "d", "--save_best_on", "loss", "--validation_split", "none"])
    assert parse_training_args(["--data_dir", "d", "--save_best_on", "plcc_overall"]).save_best_on == "plcc_overall"


def test_reimpl_presets_say_what_they_set():
    from rahf import RAHFConfig, RAHFModel

    args = parse_training_args(["--config", "configs/train/richhf18k_reimpl.yaml"])
    assert (args.learning_rate, args.lr_end, args.lr_scheduler, args.train_batch_size) == (2e-5, 1e-5, "cosine", 8)
    assert (args.num_train_epochs, args.adam_weight_decay, args.weight_decay_all) == (30, 2e-3, True)
    assert (args.mixed_precision, args.allow_tf32, args.max_grad_norm, args.augment) == ("no", False, 0.0, False)
    assert args.validate_every_epoch and args.save_best_on == "loss"
    assert args.model_config.endswith("configs/model/base_reimpl.json")

    def head_parameters(preset: str) -> int:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = RAHFModel(RAHFConfig.from_json_file(preset))
        return sum(p.numel() for head in (model.heatmap_head, model.score_head) for p in head.parameters())

    # The numbers the presets' comments state.
    assert round(head_parameters("configs/model/base_reimpl.json") / 1e6) == 108
    assert round(head_parameters("configs/model/base.json") / 1e6, 1) == 7.3
    config = RAHFConfig.from_json_file("configs/model/base_reimpl.json")
    assert (config.head_structure, config.score_head_pooling, config.decoder_attends_to) == (
        "separate",
        "flatten",
        "text",
    )
