"""Training the demo's tiny models one after another vs all at once, side by side in one run.

    python benchmarks/concurrent_training.py [--steps 300] [--data DIR] [--repeats 1]

`rahf demo` trains its models (and runs `rahf efficacy`) as separate processes, all at once, one thread each. This
script times two of those jobs (the tiny multi-head and augmented-prompt RAHF, `--steps` steps each at batch 16, no
validation or checkpoints) both ways, alternating the order per repeat:

- sequential: one job after the other, each with all the cores' threads;
- concurrent: all jobs at once, the threads split between them.

It prints the wall-clock seconds of each way and their ratio. The data set is made with `rahf data synth` into a
temporary folder unless `--data` names one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = {
    "rahf_multi_head": ["--variant", "multi_head"],
    "rahf_augmented_prompt": ["--variant", "augmented_prompt", "--tasks_per_image", "3"],
}


def _command(name: str, data: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rahf.train",
        "--config",
        str(ROOT / "configs/train/synth_tiny.yaml"),
        "--data_dir",
        str(data),
        "--output_dir",
        str(out / name),
        "--max_train_steps",
        str(steps),
        "--validation_split",
        "none",
        "--checkpointing_steps",
        "0",
        "--calibrate_keyword_threshold",
        "false",
        "--seed",
        "0",
        *JOBS[name],
    ]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _run(commands: list[list[str]], threads: int, concurrent: bool, log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as sink:
        if concurrent:
            procs = [subprocess.Popen(c, env=_env(threads), stdout=sink, stderr=subprocess.STDOUT) for c in commands]
            codes = [p.wait() for p in procs]
        else:
            codes = [
                subprocess.run(c, env=_env(threads), stdout=sink, stderr=subprocess.STDOUT).returncode
                for c in commands
            ]
    if any(codes):
        raise SystemExit(f"a training job failed (exit codes {codes}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per job")
    parser.add_argument("--data", default=None, help="a canonical data set (default: a small synthetic one)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else tmp / "data"
        if not args.data:
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
                    "800",
                    "--num_validation",
                    "0",
                    "--num_test",
                    "0",
                ],
                check=True,
                env=_env(cores),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        log = tmp / "train.log"
        times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        for r in range(args.repeats):
            order = ["sequential", "concurrent"] if r % 2 == 0 else ["concurrent", "sequential"]
            for way in order:
                commands = [_command(name, data, tmp / f"{way}{r}", args.steps) for name in JOBS]
                concurrent = way == "concurrent"
                threads = max(1, cores // len(JOBS)) if concurrent else cores
                times[way].append(_run(commands, threads, concurrent, log))
                print(f"repeat {r}: {way} ({threads} thread(s) per job): {times[way][-1]:.1f} s", flush=True)
        seq, conc = min(times["sequential"]), min(times["concurrent"])
        print(f"\n{cores} cores, {len(JOBS)} jobs x {args.steps} steps (batch 16):")
        print(f"sequential {seq:.1f} s, concurrent {conc:.1f} s -> concurrent is {seq / conc:.2f}x faster")


if __name__ == "__main__":
    main()
