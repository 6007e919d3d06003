"""kill -9 at many points inside checkpoint writes (and the final model's): every resumed run ends with exactly the
weights of a run that was never interrupted, and `--checkpoints_total_limit 1` never leaves nothing to resume from.

Each kill runs `rahf.train` in a subprocess (`checkpoint_kill_harness.py`) that is killed
- before a chosen file-system event of the write (folder made, file opened for writing, rename, deletion),
- in the middle of writing a file that C++/Rust code writes (the file cut to half its size, then the kill), or
- at a delay after the checkpoint's scratch folder appears;
then the same job resumes with `--resume_from_checkpoint latest` in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from train_utils import load_state_dict, make_tiny_dataset, write_tiny_model_config

from rahf.train import train
from rahf.training_args import parse_training_args
from rahf.training_utils import COMPLETE_MARKER, is_complete_checkpoint, list_checkpoints

pytestmark = pytest.mark.slow

HARNESS = Path(__file__).with_name("checkpoint_kill_harness.py")


def _job(data: Path, config: Path, out: Path) -> list[str]:
    # 16 records / batch 4: 4 steps per epoch; checkpoints at 2, 4 and 6, at most one kept; dropout on (RNG matters).
    return [
        "--data_dir", str(data), "--model_config", str(config), "--output_dir", str(out),
        "--learning_rate", "1e-3", "--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1", "--lr_scheduler", "constant", "--logging_steps", "1",
        "--validation_split", "none",
    ]  # fmt: skip


def _harness(args: list[str], events: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, str(HARNESS), "--events", str(events), *extra, "--", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = make_tiny_dataset(root / "data")
    config = write_tiny_model_config(root / "tiny.json")
    reference = root / "reference"
    proc = _harness(_job(data, config, reference), root / "reference-events.jsonl")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return {
        "data": data,
        "config": config,
        "events": _events(root / "reference-events.jsonl"),
        "weights": load_state_dict(reference / "final"),
    }


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float operations in the same order
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _rel(path: str) -> str:
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.startswith((".tmp-", ".trash-", "checkpoint-", "final", "logs")):
            return "/".join(parts[i:])
    return parts[-1]


# Points before which the run is killed, found in the reference run's event list by (event, path) so that the test
# does not depend on how many events each library makes.
EVENT_POINTS = {
    "scratch folder made": ("os.mkdir", ".tmp-checkpoint-4"),
    "model config opened": ("open", ".tmp-checkpoint-4/model/config.json"),
    "processor config opened": ("open", ".tmp-checkpoint-4/model/processor_config.json"),
    "training state opened": ("open", ".tmp-checkpoint-4/training_state.json"),
    "marker opened": ("open", f".tmp-checkpoint-4/{COMPLETE_MARKER}.tmp"),
    "marker renamed": ("os.rename", f".tmp-checkpoint-4/{COMPLETE_MARKER}.tmp"),
    "checkpoint renamed into place": ("os.rename", ".tmp-checkpoint-4"),
    "old checkpoint moved aside": ("os.rename", "checkpoint-2"),
    "old checkpoint half deleted": ("os.remove", "optimizer.bin"),
    "next log line": ("open", "logs/train_log.jsonl"),
    "final scratch folder made": ("os.mkdir", ".tmp-final"),
    "final config opened": ("open", ".tmp-final/config.json"),
    "final renamed into place": ("os.rename", ".tmp-final"),
}
TEARS = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
DELAYS_MS = [1, 5, 10, 15, 20, 30]


def _kill_index(events: list[dict], event: str, path: str) -> int:
    for e in events:
        if e["event"] == event and e["paths"] and _rel(e["paths"][0]) == path:
            return e["n"]
    raise AssertionError(f"the reference run made no {event} of {path}: {[(e['event'], e['paths']) for e in events]}")


def _resume_and_compare(world, out: Path) -> None:
    checkpoints = list_checkpoints(out)
    assert checkpoints, f"nothing left to resume from in {sorted(p.name for p in out.iterdir())}"
    assert all(is_complete_checkpoint(p) for p in checkpoints)
    summary = train(
        parse_training_args([*_job(world["data"], world["config"], out), "--resume_from_checkpoint", "latest"])
    )
    assert summary["global_step"] == 6
    resumed = load_state_dict(out / "final")
    different = [k for k in world["weights"] if not torch.equal(world["weights"][k], resumed[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    logged = [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 7)), logged  # one line per step, none repeated, none torn


@pytest.mark.parametrize("point", list(EVENT_POINTS))
def test_kill_before_a_file_system_event_then_resume(world, tmp_path, point):
    out = tmp_path / "run"
    kill_at = _kill_index(world["events"], *EVENT_POINTS[point])
    proc = _harness(_job(world["data"], world["config"], out), tmp_path / "events.jsonl", "--kill_at", str(kill_at))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert _events(tmp_path / "events.jsonl")[-1].get("killed")
    _resume_and_compare(world, out)


@pytest.mark.parametrize("name", TEARS)
def test_kill_in_the_middle_of_writing_a_file_then_resume(world, tmp_path, name):
    out = tmp_path / "run"
    proc = _harness(_job(world["data"], world["config"], out), tmp_path / "events.jsonl", "--tear", name)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    tear = _events(tmp_path / "events.jsonl")[-1]
    assert tear["event"] == "tear" and ".tmp-checkpoint-4" in tear["paths"][0]
    assert 0 < Path(tear["paths"][0]).stat().st_size < tear["size"]  # the torn file is really there, half written
    _resume_and_compare(world, out)


@pytest.mark.parametrize("delay_ms", DELAYS_MS)
def test_kill_at_a_delay_inside_the_write_then_resume(world, tmp_path, delay_ms):
    out = tmp_path / "run"
    proc = _harness(_job(world["data"], world["config"], out), tmp_path / "events.jsonl")
    scratch = out / ".tmp-checkpoint-4"
    deadline = time.monotonic() + 300
    while not scratch.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0002)
    time.sleep(delay_ms / 1000)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _resume_and_compare(world, out)
