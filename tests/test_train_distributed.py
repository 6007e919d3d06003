"""Two-process DDP training on CPU (gloo) through `accelerate launch`, as users run it on GPUs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import load_state_dict, make_tiny_dataset, write_tiny_model_config

from rahf import RichFeedbackPredictor
from rahf.training_utils import parameters_checksum

pytestmark = pytest.mark.distributed

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(argv: list[str], cwd: Path, timeout: int = 240) -> None:
    # `--cpu --num_processes 2` starts a single process: two CPU processes need --multi_gpu (gloo).
    cmd = [
        *ACCELERATE,
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "rahf.train",
        *argv,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def _sync_log(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / "debug_sync" / f"rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_stay_in_sync_and_resume(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    config = write_tiny_model_config(tmp_path / "tiny.json")
    out = tmp_path / "ddp"
    common = [
        "--data_dir",
        str(data),
        "--model_config",
        str(config),
        "--output_dir",
        str(out),
        "--train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "1",
        "--augment",
        "true",
        "--checkpointing_steps",
        "2",
        "--logging_steps",
        "1",
        "--validation_steps",
        "2",
        "--debug_check_sync",
        "--calibrate_keyword_threshold",
        "true",
    ]
    # 16 records / (2 per process x 2 processes x 2 accumulated) = 2 steps per epoch.
    _launch([*common, "--max_train_steps", "3"], cwd=tmp_path)

    rank0, rank1 = _sync_log(out, 0), _sync_log(out, 1)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2, 3]
    for a, b in zip(rank0, rank1):
        assert a["sha256"] == b["sha256"], f"ranks disagree after step {a['step']}"
        # Each rank trained on its own shard: equal weights come from averaged gradients, not from equal data.
        assert len(a["uids"]) == len(b["uids"]) == 4 and not set(a["uids"]) & set(b["uids"])
    assert len({r["sha256"] for r in rank0}) == 3  # every step changed the weights

    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoint-2").iterdir()}
    final = RichFeedbackPredictor.from_pretrained(out / "final")
    assert parameters_checksum(final.model) == rank0[-1]["sha256"]
    assert (
        parameters_checksum(RichFeedbackPredictor.from_pretrained(out / "checkpoint-2" / "model").model)
        == rank0[1]["sha256"]
    )
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert [r["val/num_samples"] for r in log if "val/loss" in r] == [8, 8]  # gathered, padding dropped
    # Keyword calibration: each rank decoded half of the validation split; the gathered table is the one a single
    # process computes on the whole split, and the chosen decoding is saved with the model.
    calibration = json.loads((out / "final" / "training_summary.json").read_text())["keyword_threshold_calibration"]
    assert calibration["num_records"] == 8
    from rahf.calibration import keyword_scores_at_thresholds
    from rahf.data.schema import load_rich_feedback

    thresholds = [r["threshold"] for r in calibration["table"]]
    table = keyword_scores_at_thresholds(
        final.model, final.processor, load_rich_feedback(data)["validation"], thresholds
    )
    assert [round(r["f1"], 6) for r in table] == [round(r["f1"], 6) for r in calibration["table"]]
    assert final.model.config.keyword_threshold == calibration["threshold"]

    # The two-process checkpoint resumes in two processes and the ranks stay in sync.
    _launch([*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], cwd=tmp_path)
    resumed0, resumed1 = _sync_log(out, 0), _sync_log(out, 1)
    assert [r["step"] for r in resumed0] == [1, 2, 3, 3, 4]  # appended: steps 3 and 4 after checkpoint-2
    assert [r["sha256"] for r in resumed0] == [r["sha256"] for r in resumed1]
    # Step 3 replayed from checkpoint-2 gives the weights step 3 gave the first time.
    assert resumed0[3]["sha256"] == rank0[2]["sha256"] and resumed0[3]["uids"] == rank0[2]["uids"]
    state = load_state_dict(out / "final")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_ddp_turns_on_unused_parameter_search_when_needed(tmp_path):
    # A CLIP tower's post-layernorm feeds only its pooled output, which RAHF does not use: plain DDP would fail at the
    # second step ("Expected to have finished reduction in the prior iteration").
    data = make_tiny_dataset(tmp_path / "data", sizes={"train": 8, "validation": 4})
    config = write_tiny_model_config(tmp_path / "clip.json", vision_model_type="clip_vision_model")
    out = tmp_path / "clip"
    _launch(
        [
            "--data_dir",
            str(data),
            "--model_config",
            str(config),
            "--output_dir",
            str(out),
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "0",
            "--debug_check_sync",
        ],
        cwd=tmp_path,
    )
    assert [r["sha256"] for r in _sync_log(out, 0)] == [r["sha256"] for r in _sync_log(out, 1)]
    assert len(_sync_log(out, 0)) == 2
