"""Loading helpers shared by the RAHF pipelines.

Nothing here registers RAHF's components with diffusers: `RAHFModel` is a transformers `PreTrainedModel` and
`RAHFProcessor` a transformers `ProcessorMixin`, both bases that diffusers' own `LOADABLE_CLASSES` list, so a pipeline
saves them into `reward_model/` and `reward_processor/` with their `save_pretrained`, records them in
`model_index.json` as `["rahf.modeling_rahf", "RAHFModel"]` and `["rahf.processing_rahf", "RAHFProcessor"]`, and
rebuilds them with their `from_pretrained` after importing those modules.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dtype_kwarg"]


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """`{"dtype": dtype}` for diffusers that renamed `torch_dtype` (0.36+, which warns on the old name), else
    `{"torch_dtype": dtype}`: the keyword of `from_pretrained` and `from_pipe` (which casts every component, shared
    ones included, to float32 unless told otherwise)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (exists since the rename)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
