"""Precision, in one place: the `--mixed_precision` names of every job, what `auto` means on this machine, and the
torch dtype each name stands for.

Examples:

```python
>>> from rahf.precision import resolve_mixed_precision, torch_dtype
>>> resolve_mixed_precision("auto", device="cpu")
'no'
>>> torch_dtype("bf16")
torch.bfloat16
```
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DTYPE_NAMES", "MIXED_PRECISIONS", "has_accelerator", "resolve_mixed_precision", "torch_dtype"]

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# Every spelling of a dtype that a flag of ours takes: accelerate's (no / fp16 / bf16), short (fp32) and torch's.
DTYPE_NAMES = {
    "no": "float32",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def torch_dtype(name: str) -> Any:
    """The torch dtype a precision name stands for (`"no"`/`"fp32"`/`"float32"`, `"fp16"`, `"bf16"`, ...)."""
    import torch

    key = str(name).lower()
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[key])


def has_accelerator() -> bool:
    """True when torch sees a GPU or another accelerator accelerate supports."""
    import torch

    if torch.cuda.is_available():
        return True
    from accelerate.utils import is_mlu_available, is_npu_available, is_xpu_available

    return is_xpu_available() or is_npu_available() or is_mlu_available()


def resolve_mixed_precision(value: str | None, *, device: Any = None, cpu_bf16_ok: bool = False) -> str:
    """The precision a job runs in: the flag, else what `accelerate launch` / `accelerate config` set
    (ACCELERATE_MIXED_PRECISION), else "no".

    `auto` is half precision where there is an accelerator (bf16 where the GPU supports it, else fp16) and float32
    ("no") on a CPU. An explicit fp16 (or bf16, unless `cpu_bf16_ok`: autocast with float32 weights, as `rahf train`
    uses it) on a machine without an accelerator, or with `device` a CPU, is refused: half precision is emulated on
    a CPU, 10-100x slower.
    """
    value = value if value is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    value = str(value).lower()
    if value not in MIXED_PRECISIONS:
        raise ValueError(f"`mixed_precision` must be one of {list(MIXED_PRECISIONS)}, got {value!r}")
    on_cpu = str(device).split(":")[0] == "cpu" if device is not None else not has_accelerator()
    if value == "auto":
        if on_cpu:
            return "no"
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"
    if value == "fp16" or (value == "bf16" and not cpu_bf16_ok):
        if on_cpu:
            raise ValueError(
                f"`mixed_precision` {value!r} on a CPU would run in emulated half precision, "
                "10-100x slower than float32; pass --mixed_precision auto (half precision only on an accelerator) or no"
            )
    return value
