"""`rahf train` under FSDP: the accelerate configs parse as what they say, RAHF names only FSDP units it holds, and (on
a machine with GPUs; accelerate refuses FSDP for CPU processes) two-process FSDP training saves checkpoints that
resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from accelerate.utils.dataclasses import get_module_class_from_name
from train_utils import make_tiny_dataset, write_tiny_model_config

from rahf.testing import tiny_rahf_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "cpu_2proc.yaml": DistributedType.MULTI_GPU,
    "single_gpu.yaml": DistributedType.NO,
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "multi_node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_configs_parse(name):
    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert config.distributed_type == CONFIGS[name]
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-6])
    if name == "multi_node.yaml":
        assert config.num_machines > 1 and config.num_processes % config.num_machines == 0


@pytest.mark.parametrize("tower", ["vit", "siglip_vision_model", "clip_vision_model"])
def test_fsdp_wrap_units_are_classes_of_the_model(tower):
    # accelerate's transformer wrap policy takes `_no_split_modules` and fails on a name the model does not hold.
    model = tiny_rahf_model(vision_model_type=tower)
    assert "T5Block" in model._no_split_modules
    for name in model._no_split_modules:
        assert get_module_class_from_name(model, name) is not None, name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP on GPU processes only")
def test_fsdp_training_checkpoints_and_resumes(tmp_path):
    processes = min(2, torch.cuda.device_count())
    data = make_tiny_dataset(tmp_path / "data")
    config = write_tiny_model_config(tmp_path / "tiny.json")
    out = tmp_path / "fsdp"

    def launch(max_steps: int, *extra: str) -> None:
        cmd = [
            *(sys.executable, "-m", "accelerate.commands.launch"),
            *("--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")),
            *("--num_processes", str(processes), "--mixed_precision", "bf16"),
            *("--main_process_port", str(_free_port()), "-m", "rahf.train"),
            *("--data_dir", str(data), "--model_config", str(config), "--output_dir", str(out)),
            *("--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler", "constant"),
            *("--checkpointing_steps", "2", "--logging_steps", "1", "--validation_steps", "2"),
            *("--calibrate_keyword_threshold", "true", "--max_train_steps", str(max_steps), *extra),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    launch(2)
    ckpt = out / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert "model" in names and any(n.startswith("pytorch_model_fsdp") for n in names), names
    from rahf import RichFeedbackPredictor

    first = RichFeedbackPredictor.from_pretrained(ckpt / "model").model.state_dict()
    final = RichFeedbackPredictor.from_pretrained(out / "final").model.state_dict()
    assert first.keys() == final.keys()
    for key in first:  # final/ after step 2 is checkpoint-2's model: the gathered weights, whole
        torch.testing.assert_close(first[key], final[key])

    launch(4, "--resume_from_checkpoint", "latest")
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "model").is_dir()
    resumed = RichFeedbackPredictor.from_pretrained(out / "final").model.state_dict()
    assert any(not torch.equal(resumed[k], final[k]) for k in final)  # steps 3-4 trained on from the shards
