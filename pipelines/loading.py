"""Teaches diffusers to save and load `RAHFProcessor` as a pipeline component, next to `RAHFModel`.

`DiffusionPipeline.save_pretrained` / `from_pretrained` only carry components whose class derives from a base listed in
diffusers' `LOADABLE_CLASSES` (per library: the base class and its save / load method names). `RAHFModel` is a
transformers `PreTrainedModel`, recorded in `model_index.json` as `["rahf.modeling_rahf", "RAHFModel"]` and loaded
like any transformers model. `RAHFProcessor` has no such base, so without this registration a pipeline silently drops
it on save ("cannot be saved") and cannot rebuild itself on load. Registering the module `rahf.processing_rahf` with
the class makes the processor round-trip through a `reward_processor/` subfolder, written by its own `save_pretrained`
and read by its own `from_pretrained`, recorded as `["rahf.processing_rahf", "RAHFProcessor"]`, which diffusers then
resolves by importing that module. The model's entry is the same with or without the registration, so pipelines saved
by any process load in any other.

Every pipeline module that registers a `RAHFProcessor` calls `register_rahf_components()` at import time, before any
pipeline is built (`register_modules` records the library name).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Module -> {class name: [save method, load method]}, the shape of diffusers' LOADABLE_CLASSES entries. Keyed by the
# defining module (not the package `rahf`), so that `RAHFModel`'s entry, which diffusers derives from the top-level
# package name when that is registered, stays `rahf.modeling_rahf` either way.
RAHF_LOADABLE_CLASSES = {
    "rahf.processing_rahf": {"RAHFProcessor": ["save_pretrained", "from_pretrained"]},
}

__all__ = ["RAHF_LOADABLE_CLASSES", "dtype_kwarg", "register_rahf_components"]


def register_rahf_components() -> bool:
    """Adds `rahf`'s loadable classes to diffusers' registry (idempotent).

    The registry is a pair of module-level dicts that `DiffusionPipeline.save_pretrained`, `from_pretrained` and
    `pipeline_loading_utils` read at call time, so updating them in place is seen by every caller.

    Returns:
        `bool`: True when the registry holds the RAHF classes; False (with a warning) when this diffusers version has
        no such registry, in which case pipelines still run but `save_pretrained` drops the reward processor.
    """
    try:
        from diffusers.pipelines import pipeline_loading_utils
    except ImportError as err:  # pragma: no cover - depends on the diffusers version
        logger.warning("diffusers has no pipeline_loading_utils (%s): RAHF components will not be saved", err)
        return False
    loadable = getattr(pipeline_loading_utils, "LOADABLE_CLASSES", None)
    importable = getattr(pipeline_loading_utils, "ALL_IMPORTABLE_CLASSES", None)
    if not isinstance(loadable, dict) or not isinstance(importable, dict):  # pragma: no cover
        logger.warning("this diffusers version has no LOADABLE_CLASSES registry: RAHF components will not be saved")
        return False
    for module, classes in RAHF_LOADABLE_CLASSES.items():
        loadable.setdefault(module, {}).update(classes)
        importable.update(classes)
    return True


def dtype_kwarg(dtype) -> dict:
    """`{"dtype": dtype}` for diffusers that renamed `torch_dtype` (0.36+, which warns on the old name), else
    `{"torch_dtype": dtype}`: the keyword of `from_pretrained` and `from_pipe` (which casts every component, shared
    ones included, to float32 unless told otherwise)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (exists since the rename)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
