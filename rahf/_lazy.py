"""Lazy package fronts: a package lists its public names and the module each lives in, and imports a module only when
one of its names is first used, so that `import rahf` (and `rahf.pipelines`, `rahf.improve`) stay light."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for `package`, whose `exports` map each public name to the module (relative to the
    package, e.g. `".masks"`) that defines it. A name is imported on first use and cached in `namespace`."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
