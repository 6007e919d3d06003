"""Durable file writes with no heavy imports: atomic replacement, folder fsync, appended JSON lines."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["append_jsonl", "fsync_dir", "write_text_atomically"]


def fsync_dir(folder: Path) -> None:
    """Flushes a folder's entries (a rename or a new file in it) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; renames there are as durable as they get
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomically(path: str | Path, text: str) -> None:
    """`text` to a temporary file beside `path`, flushed to disk, renamed over `path`, the folder entry flushed: a
    crash leaves the old file or the new one, never a part of either."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Appends `record` as one JSON line to `path`, creating its folder; a log that grows one line per event."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
