"""Runs `rahf.train` in this process and kills it with SIGKILL inside a checkpoint write, for the crash-safety tests.

    python tests/checkpoint_kill_harness.py --events FILE [--arm checkpoint-4] [--kill_at K | --tear NAME] \
        -- <rahf train flags>

A Python audit hook sees every file-system event the job makes from Python (a file opened for writing, a folder made,
a rename, a deletion). From the first event whose path contains `--arm` on, events are counted and appended to
`--events` (one JSON line each, flushed at once, so the parent sees them even after a kill); at the `--kill_at`-th
one the process kills itself before the event happens. Without `--kill_at` the run is not killed: its event list
says which points a test can kill at. Files written by C++ or Rust code (torch.save, safetensors) make no event of
their own: with `--tear NAME`, the first such file named NAME written after arming is cut to half its size and the
process killed, as if the kill had come in the middle of writing it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", required=True)
    parser.add_argument("--arm", default="checkpoint-4")
    parser.add_argument("--kill_at", type=int, default=None)
    parser.add_argument("--tear", default=None)
    own, train_argv = parser.parse_known_args()
    if train_argv and train_argv[0] == "--":
        train_argv = train_argv[1:]
    events_file = open(own.events, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    state = {"armed": False, "count": 0}

    def hook(event: str, args: tuple) -> None:
        if event not in _EVENTS:
            return
        if event == "open":
            path, _mode, flags = args
            if not isinstance(path, str) or not (flags & _WRITE_FLAGS) or path == own.events:
                return
            paths = [path]
        else:
            paths = [a for a in args[:2] if isinstance(a, str)]
        if not state["armed"]:
            if not any(own.arm in p for p in paths):
                return
            state["armed"] = True
        state["count"] += 1
        record = {"n": state["count"], "event": event, "paths": paths, "t": time.monotonic()}
        if own.kill_at is not None and state["count"] == own.kill_at:
            record["killed"] = True
            events_file.write(json.dumps(record) + "\n")
            os.kill(os.getpid(), signal.SIGKILL)
        events_file.write(json.dumps(record) + "\n")

    sys.addaudithook(hook)
    if own.tear:
        _install_tear(own.tear, state, events_file)
    from rahf.train import main as train_main

    return train_main(train_argv)


def _install_tear(name: str, state: dict, events_file) -> None:
    import torch
    import transformers.modeling_utils

    def tearing(real):
        def save(obj, f, *args, **kwargs):
            real(obj, f, *args, **kwargs)
            if state["armed"] and isinstance(f, (str, os.PathLike)) and os.path.basename(str(f)) == name:
                size = os.path.getsize(f)
                os.truncate(f, size // 2)
                events_file.write(json.dumps({"event": "tear", "paths": [str(f)], "size": size}) + "\n")
                os.kill(os.getpid(), signal.SIGKILL)

        return save

    torch.save = tearing(torch.save)
    transformers.modeling_utils.safe_save_file = tearing(transformers.modeling_utils.safe_save_file)


if __name__ == "__main__":
    sys.exit(main())
