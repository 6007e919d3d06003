"""The presets that ship with rahf (`rahf.configs`): model configs (`model/*.json`), training jobs (`train/*.yaml`),
improvement jobs (`improve/*.yaml`) and accelerate configs (`accelerate/*.yaml`), read through `importlib.resources`
so that they are found from an installed wheel as well as from the repository.

Examples:

```python
>>> from rahf.configs import preset_path
>>> preset_path("configs/model/tiny.json")   # also "model/tiny.json"
PosixPath('.../rahf/configs/model/tiny.json')
```
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["list_presets", "preset_path", "resolve_config_path"]

_PREFIX = "configs/"


def preset_path(name: str) -> Path:
    """The installed file of a preset named `model/tiny.json` or `configs/model/tiny.json`; raises `ValueError` naming
    the presets when there is none."""
    relative = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
    root = resources.files(__name__)
    candidate = root.joinpath(*relative.split("/"))
    if relative and candidate.is_file():
        return Path(str(candidate))
    raise ValueError(f"{name!r} is not a rahf preset; the presets are {list_presets()}")


def list_presets() -> list[str]:
    """Every preset, as `configs/<kind>/<file>`."""
    root = Path(str(resources.files(__name__)))
    return sorted(
        f"{_PREFIX}{p.relative_to(root).as_posix()}"
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".json", ".yaml", ".txt")
    )


def resolve_config_path(path: str | os.PathLike, flag: str) -> Path:
    """A config file given by the user: the path as given (relative to the working directory) when it exists, else a
    shipped preset of that name (`configs/model/tiny.json` works from any directory)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    try:
        return preset_path(str(path))
    except ValueError:
        raise ValueError(
            f"`{flag}` {str(path)!r} is not a file, nor a rahf preset; pass a file, or one of {list_presets()}"
        ) from None
