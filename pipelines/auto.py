"""Picking the RAHF pipeline class that fits a diffusers pipeline a user already has, from its components.

Examples:

```python
>>> from rahf.pipelines.auto import from_inpaint_pipe
>>> pipe = from_inpaint_pipe(sd_inpaint_pipe, reward_model, reward_processor)  # a RAHFInpaintPipeline
```
"""

from __future__ import annotations

from typing import Any

from rahf.pipelines.loading import dtype_kwarg

__all__ = ["from_inpaint_pipe", "rahf_inpaint_class_for"]


def rahf_inpaint_class_for(pipe: Any) -> type:
    """The RAHF inpainting pipeline class that fits `pipe`'s components: aMUSEd (vqvae + transformer) or Stable
    Diffusion (unet + vae)."""
    components = getattr(pipe, "components", {})
    if "vqvae" in components and "transformer" in components:
        from rahf.pipelines.rahf_amused_inpaint import RAHFAmusedInpaintPipeline

        return RAHFAmusedInpaintPipeline
    if "unet" in components and "vae" in components:
        from rahf.pipelines.rahf_inpaint import RAHFInpaintPipeline

        return RAHFInpaintPipeline
    raise ValueError(
        f"`inpainter` must be a Stable Diffusion inpainting or an aMUSEd pipeline, got {type(pipe).__name__} with "
        f"components {sorted(components)}"
    )


def from_inpaint_pipe(pipe: Any, reward_model: Any, reward_processor: Any) -> Any:
    """`RAHF*InpaintPipeline.from_pipe(pipe, ...)` for whichever kind of inpainting pipeline `pipe` is, keeping its
    dtype (`from_pipe` casts every component, shared ones included, to float32 unless told otherwise)."""
    return rahf_inpaint_class_for(pipe).from_pipe(
        pipe, reward_model=reward_model, reward_processor=reward_processor, **dtype_kwarg(pipe.dtype)
    )
