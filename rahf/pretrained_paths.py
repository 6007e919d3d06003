"""Telling a local folder from a model-hub id before anything is loaded, so that a mistyped path is an error that
names the flag, never a hub lookup that ends in a connection traceback.

A value that exists on disk is local. A value that *looks* local (absolute, `./`, `../`, `~`, a backslash, more than
one `/`, no `/` at all, or whose first part is a folder that exists) and does not exist is an error. Anything else
(`org/name`) is a hub id, unless the hub is switched off (`HF_HUB_OFFLINE=1`), in which case it must exist locally.

Examples:

```python
>>> from rahf.pretrained_paths import resolve_pretrained_path
>>> resolve_pretrained_path("runs/tiny/final", "--model")                      # an existing folder
'runs/tiny/final'
>>> resolve_pretrained_path("stable-diffusion-v1-5/stable-diffusion-v1-5", "--inpainter")  # a hub id
'stable-diffusion-v1-5/stable-diffusion-v1-5'
>>> resolve_pretrained_path("./missing", "--model")
Traceback (most recent call last):
ValueError: `--model` './missing' is not a folder ...
```
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["hub_is_offline", "looks_local", "resolve_pretrained_path"]


def hub_is_offline() -> bool:
    """True when the environment switches the model hub off (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE`)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_local(name_or_path: str) -> bool:
    """Whether `name_or_path` can only mean a path on disk (see the module docstring)."""
    value = str(name_or_path)
    if value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or "\\" in value:
        return True
    if os.path.isabs(value) or (len(value) > 1 and value[1] == ":"):
        return True
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        return True  # hub ids are `org/name`; a bare name or a deeper path is a folder
    return Path(parts[0]).is_dir()


def resolve_pretrained_path(
    name_or_path: str | os.PathLike | None, flag: str, *, what: str = "a saved model folder", allow_hub: bool = True
) -> str:
    """Returns `name_or_path` when it is an existing folder or a plausible hub id; raises `ValueError` naming `flag`.

    Args:
        name_or_path: the value given.
        flag (`str`): the argument's name for the message, e.g. `"--model"`.
        what (`str`, *optional*): what the argument should be, for the message.
        allow_hub (`bool`, *optional*, defaults to `True`): False for arguments that only take local folders.
    """
    if name_or_path is None or not str(name_or_path).strip():
        raise ValueError(f"`{flag}` is required: pass {what}")
    value = str(name_or_path)
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path) if value.startswith("~") else value
    if path.exists():
        raise ValueError(f"`{flag}` {value!r} is a file, not a folder; pass {what}")
    if not allow_hub:
        raise ValueError(f"`{flag}` {value!r} is not a folder; pass {what}")
    if looks_local(value):
        raise ValueError(f"`{flag}` {value!r} is not a folder; pass {what} or a model-hub id such as org/name")
    if hub_is_offline():
        raise ValueError(
            f"`{flag}` {value!r} is not a folder, and the model hub is off (HF_HUB_OFFLINE is set), so it cannot be a "
            f"hub id either; pass {what}"
        )
    return value
