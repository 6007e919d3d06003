"""Imports flow one way: the `rahf` core <- `rahf.pipelines` <- `rahf.improve` <- the CLI (`rahf.cli`, `rahf.__main__`).

Every import statement of every module, at the top or inside a function, is read from the source (AST) and resolved
to the module it names; an import of a higher layer than the importing module's fails the test with the file, line and
the two layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
FOLDERS = {"rahf": "rahf", "pipelines": "rahf.pipelines", "improve": "rahf.improve", "configs": "rahf.configs"}
LAYERS = {"core": 0, "pipelines": 1, "improve": 2, "cli": 3}


def layer_of(module: str) -> str | None:
    """The layer of a rahf module, or None for a module outside rahf."""
    if module != "rahf" and not module.startswith("rahf."):
        return None
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("cli", "__main__"):
        return "cli"
    if len(parts) > 1 and parts[1] in ("pipelines", "improve"):
        return parts[1]
    return "core"


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found.append((".".join([package, *parts]), path))
    return found


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`; for `from X import name`, both X and X.name (a
    submodule) are candidates, so that `from rahf import improve` counts as importing rahf.improve."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return out


def _lazy_targets(path: Path, package: str) -> list[tuple[int, str]]:
    """Modules named in a lazy package front's `_EXPORTS` table (imported on first use, by name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            for value in node.value.values:  # type: ignore[union-attr]
                name = value.value
                out.append((value.lineno, package + name if name.startswith(".") else name))
    return out


def test_the_walk_finds_every_package():
    names = {m for m, _ in modules()}
    assert {
        "rahf",
        "rahf.train",
        "rahf.reward",
        "rahf.pipelines.rahf_inpaint",
        "rahf.improve.best_of_n",
        "rahf.improve.demo",
        "rahf.cli",
    } <= names
    assert layer_of("rahf.improve.demo") == "improve" and layer_of("rahf.pipelines") == "pipelines"
    assert layer_of("rahf.cli") == "cli" and layer_of("rahf.data.synth") == "core" and layer_of("torch") is None


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_no_import_runs_against_the_direction(module, path):
    own = LAYERS[layer_of(module)]
    imports = imported_modules(module, path)
    if path.name == "__init__.py":
        imports += _lazy_targets(path, module)
    wrong = []
    for line, target in imports:
        layer = layer_of(target)
        if layer is not None and LAYERS[layer] > own:
            wrong.append(
                f"{path.relative_to(ROOT)}:{line} imports {target} ({layer} layer) from the {layer_of(module)} layer"
            )
    assert not wrong, "imports against the direction core <- pipelines <- improve <- cli:\n" + "\n".join(wrong)


def test_the_checker_catches_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from rahf.improve.best_of_n import run_best_of_n\n    from ..pipelines import masks\n"
    )
    found = [layer_of(t) for _, t in imported_modules("rahf.data.bad", bad)]
    assert "improve" in found and "pipelines" in found
