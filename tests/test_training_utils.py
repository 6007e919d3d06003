"""The shared training utilities: complete-only checkpoints, atomic folders, torn logs, the non-finite guard, and the
checks of numbers and precision where job arguments enter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from train_utils import make_tiny_dataset, write_tiny_model_config

from rahf.job_args import check_finite_numbers
from rahf.precision import resolve_mixed_precision
from rahf.train import main as train_main
from rahf.train import train
from rahf.training_args import RAHFTrainingArguments, parse_training_args
from rahf.training_utils import (
    COMPLETE_MARKER,
    NonFiniteGuard,
    NonFiniteTrainingError,
    atomic_directory,
    check_finite_parameters,
    is_complete_checkpoint,
    list_checkpoints,
    resolve_resume_checkpoint,
    truncate_log,
)


def _checkpoint(path, files=None, marker=True):
    path.mkdir(parents=True)
    files = files or {"optimizer.bin": b"0123", "model/model.safetensors": b"abcdef"}
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if marker:
        listed = {name: len(data) for name, data in files.items()}
        (path / COMPLETE_MARKER).write_text(json.dumps({"global_step": 1, "files": listed}))
    return path


def test_only_complete_checkpoints_are_listed_and_resumed(tmp_path, caplog):
    _checkpoint(tmp_path / "checkpoint-2")
    _checkpoint(tmp_path / "checkpoint-4", marker=False)  # killed before its marker: never renamed in by rahf
    torn = _checkpoint(tmp_path / "checkpoint-6")
    (torn / "optimizer.bin").write_bytes(b"01")  # a file shorter than the marker says
    gone = _checkpoint(tmp_path / "checkpoint-8")
    (gone / "model" / "model.safetensors").unlink()
    (tmp_path / ".tmp-checkpoint-10").mkdir()  # a write in progress
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert resolve_resume_checkpoint("latest", tmp_path).name == "checkpoint-2"
    assert "checkpoint-6 is incomplete" in caplog.text
    assert not is_complete_checkpoint(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="incomplete .*pass 'latest'"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)
    assert resolve_resume_checkpoint("checkpoint-2", tmp_path) == tmp_path / "checkpoint-2"


def test_atomic_directory_replaces_on_success_and_keeps_the_old_on_error(tmp_path):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("killed half-way")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_truncate_log_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    truncate_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_guard_names_the_first_non_finite_step():
    guard = NonFiniteGuard("cpu", start_step=10)
    for loss in (1.0, 0.5):
        guard.observe(torch.tensor(loss))
        guard.end_step(torch.tensor(0.3))
    guard.check()
    guard.observe(torch.tensor(0.4))
    guard.end_step(torch.tensor(float("inf")))  # step 13: a gradient norm overflows
    guard.observe(torch.tensor(float("nan")))
    guard.end_step()
    with pytest.raises(NonFiniteTrainingError, match="is inf at step 13 .*noticed at the log"):
        guard.check(when="at the log of step 14")
    with pytest.raises(NonFiniteTrainingError, match="learning rate is nan at step 3"):
        guard.check_learning_rate(float("nan"), 3)
    model = torch.nn.Linear(2, 2)
    check_finite_parameters(model, "x")
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="1 parameter tensor"):
        check_finite_parameters(model, "x")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused_where_they_enter(value):
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number, got"):
        parse_training_args([f"--learning_rate={value}"])
    with pytest.raises(ValueError, match=r"`adam_epsilon` must be a finite number"):
        RAHFTrainingArguments(adam_epsilon=float(value))

    from rahf.improve.best_of_n import BestOfNArguments

    with pytest.raises(ValueError, match=r"`threshold` must be a finite number"):
        BestOfNArguments(threshold=float(value))
    arguments = RAHFTrainingArguments()
    arguments.learning_rate = float(value)
    with pytest.raises(ValueError, match="learning_rate"):
        check_finite_numbers(arguments)


def test_mixed_precision_auto_is_float32_on_a_cpu_and_half_precision_there_is_refused():
    assert resolve_mixed_precision("auto", device="cpu") == "no"
    assert resolve_mixed_precision("no", device="cpu") == "no"
    assert resolve_mixed_precision("bf16", device="cpu", cpu_bf16_ok=True) == "bf16"
    for value in ("fp16", "bf16"):
        with pytest.raises(ValueError, match="emulated half precision.*--mixed_precision auto"):
            resolve_mixed_precision(value, device="cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_mixed_precision("half", device="cpu")
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "no"


def test_the_job_configs_do_not_force_half_precision():
    import yaml

    root = Path(__file__).resolve().parents[1] / "configs" / "improve"
    for name in ("best_of_n.yaml", "finetune_lora.yaml"):
        assert yaml.safe_load((root / name).read_text())["mixed_precision"] == "auto"


@pytest.fixture
def tiny(tmp_path):
    yield make_tiny_dataset(tmp_path / "data"), write_tiny_model_config(tmp_path / "tiny.json")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_a_diverging_run_stops_at_its_first_non_finite_step_and_saves_nothing_after(tiny, tmp_path, caplog):
    data, config = tiny
    out = tmp_path / "run"
    argv = ["--data_dir", str(data), "--model_config", str(config), "--output_dir", str(out),
            "--learning_rate", "1e30", "--lr_scheduler", "constant", "--train_batch_size", "4",
            "--max_train_steps", "8", "--checkpointing_steps", "1", "--logging_steps", "4",
            "--validation_split", "none"]  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped: .* at step \d+") as info:
        train(parse_training_args(argv))
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert 1 <= step <= 8
    assert not (out / "final").exists()
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    assert saved and max(saved) < step  # checkpointed every step until the loss went bad, never after
    for checkpoint in list_checkpoints(out):
        weights = load_file(str(checkpoint / "model" / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values())
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert train_main([*argv, "--output_dir", str(tmp_path / "again")]) == 1  # `rahf train` exits 1 with the message
    assert "training stopped" in caplog.text
