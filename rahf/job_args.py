"""Job arguments: a dataclass read from a YAML file (`--config`) with command-line flags on top, for `rahf train` and
the `improve` jobs alike.

YAML keys are flag names, an unknown key is named with the closest flag, values are coerced to the flag's type (YAML
reads `1e-4` as a string), and flags on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:  # transformers is imported where a parser is built: the CLI imports this module to start fast
    from transformers import HfArgumentParser

T = TypeVar("T")

__all__ = [
    "check_finite_numbers",
    "check_int_fields",
    "load_yaml_defaults",
    "parse_job_args",
    "positive_int",
    "read_prompt_records",
    "uses_cpu_processes",
]


def _coerce(parser: HfArgumentParser, key: str, value: Any, source: str) -> Any:
    action = parser._option_string_actions[f"--{key}"]
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            raise ValueError(f"{source}: `{key}` takes one value, got the list {value!r}")
        if action.type is not None:
            value = [action.type(v) if isinstance(v, str) else v for v in value]
        return value
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: `{key}: {value!r}` is not a valid value ({err})") from err
    elif isinstance(value, int) and not isinstance(value, bool) and action.type is float:
        value = float(value)
    if action.nargs in ("+", "*") and value is not None and not isinstance(value, list):
        value = [value]
    if action.choices is not None and value is not None and value not in action.choices:
        raise ValueError(f"{source}: `{key}` must be one of {list(action.choices)}, got {value!r}")
    return value


def load_yaml_defaults(path: str | os.PathLike, dataclass_type: type, parser: HfArgumentParser, prog: str) -> dict:
    """Reads a job YAML and checks its keys and values against the flags of `dataclass_type`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`--config` {str(path)!r} is not a file; pass a YAML such as configs/improve/*.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(dataclass_type)} - {"config"}
    out = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}; the keys are the flags of `{prog} --help`")
        out[key] = _coerce(parser, key, value, str(path))
    return out


def parse_job_args(dataclass_type: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """`--config file.yaml` gives the defaults, the other flags override them; `dataclass_type` needs a `config`
    field."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_type, prog=prog, description=description)
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "config", None):
        parser.set_defaults(**load_yaml_defaults(known.config, dataclass_type, parser, prog))
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args


def check_int_fields(
    args: Any,
    positive: tuple[str, ...] = (),
    positive_or_unset: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
) -> None:
    """Raises `ValueError` naming the first named field of `args` that is not an int in its range: `positive` ones
    >= 1, `positive_or_unset` ones >= 1 or None, `non_negative` ones >= 0."""
    for names, low, may_be_none, what in (
        (positive, 1, False, "a positive int"),
        (positive_or_unset, 1, True, "a positive int or unset"),
        (non_negative, 0, False, "a non-negative int"),
    ):
        for name in names:
            value = getattr(args, name)
            if value is None and may_be_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be {what}, got {value!r}")


def check_finite_numbers(args: Any) -> None:
    """Raises `ValueError` naming the first float field of the dataclass `args` (or float in a list field) that is NaN
    or infinite: a flag such as `--learning_rate inf` is a mistake to name where it enters, not after training."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"`{f.name}` must be a finite number, got {value!r}")


def uses_cpu_processes() -> bool:
    """True when launched as several processes on a machine without an accelerator.

    `accelerate launch --multi_gpu` on a CPU-only machine starts the processes but does not tell them to use CPU
    (ACCELERATE_USE_CPU is only set by the single-process launcher), so `PartialState()` would see no GPU and fall back
    to one non-distributed process per rank. Passing `cpu=True` then makes accelerate pick the gloo backend.
    """
    import torch
    from accelerate.utils import is_mlu_available, is_npu_available, is_xpu_available

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mlu_available())


def read_prompt_records(path: str | os.PathLike, flag: str = "--prompts_file") -> list[dict[str, Any]]:
    """Prompt records from a .txt file (one prompt a line; blank lines and `#` comments skipped) or a .jsonl file
    (`prompt`, or `text` / `caption`, per row).

    Returns:
        one dict per prompt with `prompt` and, for jsonl, the row's other fields.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`{flag}` {str(path)!r} is not a file; pass a .txt (one prompt a line) or .jsonl file")
    records: list[dict[str, Any]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
            key = next((k for k in ("prompt", "text", "caption") if isinstance(row, dict) and k in row), None)
            if key is None or not isinstance(row[key], str):
                raise ValueError(f"{path}:{n}: each row needs a string `prompt` field, got {line[:80]!r}")
            records.append({**{k: v for k, v in row.items() if k != key}, "prompt": row[key]})
    else:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                records.append({"prompt": line})
    if not records:
        raise ValueError(f"`{flag}` {str(path)!r} holds no prompts")
    return records


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the flag in its message and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}; pass a positive one")
    return value
