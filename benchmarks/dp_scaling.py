"""Data-parallel scaling of `rahf train`: per-process throughput with two processes over one, on the tiny model.

    python benchmarks/dp_scaling.py [--steps 200] [--batch 16] [--data DIR] [--json FILE]

Trains the tiny multi-head RAHF (configs/train/synth_tiny.yaml, no validation, checkpoints or calibration) for
`--steps` steps at `--batch` images per process, once as one process and once as two data-parallel processes
(`accelerate launch --multi_gpu --num_processes 2`, gloo on a CPU; NCCL on GPUs), each process with one thread
(`OMP_NUM_THREADS=1`) so that two processes use two cores. The training time is what `rahf train` itself records
(`train_seconds` in final/training_summary.json: from the first step to the final save, start-up excluded).

Scaling efficiency = (images/s of the two processes together / 2) / images/s of one process; 1.0 is perfect.
On a CPU the two processes share the memory bandwidth and the machine's other jobs, and every step all-reduces the
gradients over loopback, so the figure is a floor of what separate GPUs reach.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(processes: int, data: Path, out: Path, steps: int, batch: int) -> float:
    """Images per second of the whole job (all processes), as `rahf train` timed it."""
    train = [
        *("-m", "rahf.train", "--config", str(ROOT / "configs/train/synth_tiny.yaml")),
        *("--data_dir", str(data), "--output_dir", str(out), "--max_train_steps", str(steps)),
        *("--train_batch_size", str(batch), "--validation_split", "none", "--checkpointing_steps", "0"),
        *("--calibrate_keyword_threshold", "false", "--logging_steps", str(steps)),
    ]
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [
            *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"),
            *("--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"),
            *("--dynamo_backend", "no", "--main_process_port", str(_free_port()), *train),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = json.loads((out / "final" / "training_summary.json").read_text())["train_seconds"]
    return steps * batch * processes / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="images per process per step")
    parser.add_argument(
        "--data", default=None, help="a canonical data set (default: `rahf data synth` into a temp dir)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else tmp / "synth"
        if not args.data:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "rahf",
                    "data",
                    "synth",
                    "--out",
                    str(data),
                    "--num_train",
                    "2000",
                    "--num_validation",
                    "16",
                    "--num_test",
                    "16",
                ],
                check=True,
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        one = run(1, data, tmp / "one", args.steps, args.batch)
        two = run(2, data, tmp / "two", args.steps, args.batch)
    result = {
        "workload": "dp_scaling_tiny",
        "batch_per_process": args.batch,
        "steps": args.steps,
        "images_per_s_1_process": one,
        "images_per_s_2_processes": two,
        "per_process_efficiency": two / 2 / one,
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
