"""Helpers shared by the best-of-N and LoRA fine-tuning tests: tiny generators and a tiny RAHF model on disk, and
`accelerate launch` with two CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rahf.testing import tiny_amused_pipeline, tiny_rahf_model, tiny_rahf_processor, tiny_sd_pipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
PROMPTS = [
    "a red cat on a table",
    "a blue square above a star",
    "two green circles",
    "a wooden chair",
    "a yellow star below a red square",
]  # an odd count: 2 processes get 3 and 2


def save_tiny_sd(path: Path) -> Path:
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


def save_tiny_amused(path: Path) -> Path:
    tiny_amused_pipeline(seed=0).save_pretrained(path)
    return path


def save_tiny_rahf(path: Path) -> Path:
    tiny_rahf_model("multi_head", seed=0).save_pretrained(path)
    tiny_rahf_processor("multi_head").save_pretrained(path)
    return path


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("# tiny prompts\n" + "".join(p + "\n" for p in prompts))
    return path


def make_image_folder(path: Path, count: int = 6, size: int = 40, seed: int = 0) -> Path:
    """An image folder with metadata.jsonl as best-of-N writes it (random images, prompts, rewards in (0, 1))."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"{i:06d}-00.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(path / name)
        rows.append(
            {
                "file_name": name,
                "prompt": PROMPTS[i % len(PROMPTS)],
                "reward": float(rng.uniform(0.2, 0.9)),
                "overall": float(rng.uniform(0, 1)),
                "seed": i,
                "rank": 1,
            }
        )
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(module: str, argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
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
        str(free_port()),
        "-m",
        module,
        *map(str, argv),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
