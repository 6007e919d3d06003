"""Picking the RAHF pipeline class that fits a diffusers pipeline a user already has, from its components: the front
doors `AutoRAHFInpaintPipeline.from_pipe` / `from_pretrained`, as diffusers' `AutoPipelineForInpainting` is one.

Examples:

```python
>>> from rahf.pipelines import AutoRAHFInpaintPipeline
>>> pipe = AutoRAHFInpaintPipeline.from_pipe(flux_pipe, reward_model=model, reward_processor=processor)
>>> type(pipe).__name__
'RAHFFluxInpaintPipeline'
```
"""

from __future__ import annotations

import importlib
from typing import Any

from rahf.pipelines.families import generator_family
from rahf.pipelines.loading import dtype_kwarg

__all__ = [
    "AutoRAHFInpaintPipeline",
    "RAHF_INPAINT_PIPELINES",
    "from_inpaint_pipe",
    "rahf_inpaint_class_for",
    "rahf_inpaint_class_named",
]

# Generator family -> (module, class) of its RAHF repair pipeline.
RAHF_INPAINT_PIPELINES = {
    "sd": ("rahf.pipelines.rahf_inpaint", "RAHFInpaintPipeline"),
    "sdxl": ("rahf.pipelines.rahf_sdxl_inpaint", "RAHFStableDiffusionXLInpaintPipeline"),
    "sd3": ("rahf.pipelines.rahf_sd3_inpaint", "RAHFStableDiffusion3InpaintPipeline"),
    "flux": ("rahf.pipelines.rahf_flux_inpaint", "RAHFFluxInpaintPipeline"),
    "amused": ("rahf.pipelines.rahf_amused_inpaint", "RAHFAmusedInpaintPipeline"),
}


def _load_class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def rahf_inpaint_class_for(pipe: Any, argument: str = "pipe") -> type:
    """The RAHF repair pipeline class of `pipe`'s generator family (any text-to-image, image-to-image or inpainting
    pipeline of Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX or aMUSEd); a ValueError naming the supported families
    otherwise."""
    return _load_class(*RAHF_INPAINT_PIPELINES[generator_family(pipe, argument)])


def rahf_inpaint_class_named(class_name: str | None) -> type | None:
    """The RAHF repair pipeline class called `class_name` (a saved pipeline's `_class_name`), or None."""
    for module, name in RAHF_INPAINT_PIPELINES.values():
        if name == class_name:
            return _load_class(module, name)
    return None


class AutoRAHFInpaintPipeline:
    r"""
    Builds the RAHF repair pipeline of a generator's family: [`RAHFInpaintPipeline`] (Stable Diffusion 1.x/2.x),
    [`RAHFStableDiffusionXLInpaintPipeline`], [`RAHFStableDiffusion3InpaintPipeline`], [`RAHFFluxInpaintPipeline`]
    (FLUX.1, Fill or text-to-image) or [`RAHFAmusedInpaintPipeline`]. A text-to-image pipeline works as well as an
    inpainting one. Not instantiable: use `from_pipe` or `from_pretrained`.

    Examples:

    ```python
    >>> from rahf._testing_diffusers import tiny_sd3_pipeline
    >>> from rahf.pipelines import AutoRAHFInpaintPipeline
    >>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor
    >>> pipe = AutoRAHFInpaintPipeline.from_pipe(
    ...     tiny_sd3_pipeline(), reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    ... )
    >>> type(pipe).__name__
    'RAHFStableDiffusion3InpaintPipeline'
    ```
    """

    def __init__(self, *args: Any, **kwargs: Any):
        raise OSError(
            f"{type(self).__name__} is built with `{type(self).__name__}.from_pipe(pipe, reward_model=..., "
            f"reward_processor=...)` or `{type(self).__name__}.from_pretrained(path, ...)`"
        )

    @classmethod
    def from_pipe(cls, pipe: Any, **kwargs: Any) -> Any:
        """The family's RAHF repair pipeline on `pipe`'s components (shared, not copied).

        Args:
            pipe: a diffusers pipeline of a supported family (text-to-image, image-to-image or inpainting), or a RAHF
                pipeline (its reward model is kept unless another is passed).
            **kwargs: `reward_model`, `reward_processor` (required unless `pipe` has them) and any other keyword of
                `DiffusionPipeline.from_pipe`. The pipeline's dtype is kept unless `dtype` / `torch_dtype` is given
                (`from_pipe` casts every component, the reward model included, to float32 otherwise).

        Raises:
            `ValueError`: `pipe` is of no supported family (the message names the supported ones), or has no reward
            model and none is passed.
        """
        rahf_class = rahf_inpaint_class_for(pipe)
        components = getattr(pipe, "components", {})
        missing = [k for k in ("reward_model", "reward_processor") if kwargs.get(k, components.get(k)) is None]
        if missing:
            raise ValueError(
                f"`{missing[0]}` is required: {type(pipe).__name__} has none; pass the trained RAHF model and its "
                "processor (`RAHFModel.from_pretrained(dir)`, `RAHFProcessor.from_pretrained(dir)`)"
            )
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs.update(dtype_kwarg(pipe.dtype))
        return rahf_class.from_pipe(pipe, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path: str, **kwargs: Any) -> Any:
        """A saved RAHF repair pipeline (its own class, reward model included), or any diffusers pipeline of a
        supported family (loaded with `DiffusionPipeline.from_pretrained`, then `from_pipe` with `reward_model` and
        `reward_processor`, which are then required).

        Args:
            pretrained_model_or_path (`str`): a folder or a hub id.
            **kwargs: `reward_model`, `reward_processor`, and the keywords of `DiffusionPipeline.from_pretrained`
                (`dtype` / `torch_dtype`, `variant`, ...).
        """
        from diffusers import DiffusionPipeline

        config = DiffusionPipeline.load_config(pretrained_model_or_path)
        rahf_class = rahf_inpaint_class_named(config.get("_class_name"))
        if rahf_class is not None:
            return rahf_class.from_pretrained(pretrained_model_or_path, **kwargs)
        reward = {k: kwargs.pop(k) for k in ("reward_model", "reward_processor") if k in kwargs}
        if len(reward) < 2:
            raise ValueError(
                f"`reward_model` and `reward_processor` are required: {pretrained_model_or_path!r} is a "
                f"{config.get('_class_name')}, which has no reward model"
            )
        return cls.from_pipe(DiffusionPipeline.from_pretrained(pretrained_model_or_path, **kwargs), **reward)


def from_inpaint_pipe(pipe: Any, reward_model: Any, reward_processor: Any) -> Any:
    """`AutoRAHFInpaintPipeline.from_pipe(pipe, reward_model=..., reward_processor=...)`, keeping `pipe`'s dtype."""
    return AutoRAHFInpaintPipeline.from_pipe(pipe, reward_model=reward_model, reward_processor=reward_processor)


# --- Guidance --------------------------------------------------------------------------------------------------------

# Generator family -> (module, class) of its RAHF-guided sampling pipeline.
RAHF_GUIDED_PIPELINES = {
    "sd": ("rahf.pipelines.rahf_guided", "RAHFGuidedStableDiffusionPipeline"),
    "sdxl": ("rahf.pipelines.rahf_guided_sdxl", "RAHFGuidedStableDiffusionXLPipeline"),
    "sd3": ("rahf.pipelines.rahf_guided_sd3", "RAHFGuidedStableDiffusion3Pipeline"),
    "flux": ("rahf.pipelines.rahf_guided_flux", "RAHFGuidedFluxPipeline"),
}
__all__ += ["AutoRAHFGuidedPipeline", "RAHF_GUIDED_PIPELINES", "rahf_guided_class_for"]


def rahf_guided_class_for(pipe: Any, argument: str = "pipe") -> type:
    """The RAHF-guided pipeline class of `pipe`'s generator family (any text-to-image, image-to-image or inpainting
    pipeline of Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX); a ValueError naming the supported families otherwise
    (aMUSEd samples discrete tokens: there is no gradient to guide with)."""
    import importlib

    from rahf.pipelines.families import generator_family

    family = generator_family(pipe, argument)
    if family not in RAHF_GUIDED_PIPELINES:
        raise ValueError(
            f"`{argument}` is a {family} pipeline ({type(pipe).__name__}), which RAHF guidance does not support: it "
            f"needs a differentiable denoising path; supported: {', '.join(RAHF_GUIDED_PIPELINES)} (Stable Diffusion "
            "1.x/2.x, SDXL, SD3/SD3.5, FLUX.1)"
        )
    module, name = RAHF_GUIDED_PIPELINES[family]
    return getattr(importlib.import_module(module), name)


class AutoRAHFGuidedPipeline:
    r"""
    Builds the RAHF-guided sampling pipeline of a generator's family: [`RAHFGuidedStableDiffusionPipeline`],
    [`RAHFGuidedStableDiffusionXLPipeline`], [`RAHFGuidedStableDiffusion3Pipeline`] or [`RAHFGuidedFluxPipeline`],
    all on the one guidance mechanism of `rahf.pipelines.guidance`. Any text-to-image, image-to-image or inpainting
    pipeline of these families gives its components (an inpainting checkpoint whose denoiser reads extra channels
    cannot sample from noise and is refused). Not instantiable: use `from_pipe`.

    Examples:

    ```python
    >>> from rahf._testing_diffusers import tiny_flux_pipeline
    >>> from rahf.pipelines import AutoRAHFGuidedPipeline
    >>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor
    >>> pipe = AutoRAHFGuidedPipeline.from_pipe(
    ...     tiny_flux_pipeline(), reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    ... )
    >>> type(pipe).__name__
    'RAHFGuidedFluxPipeline'
    ```
    """

    def __init__(self, *args: Any, **kwargs: Any):
        raise OSError(
            f"{type(self).__name__} is built with `{type(self).__name__}.from_pipe(pipe, reward_model=..., "
            "reward_processor=...)`"
        )

    @classmethod
    def from_pipe(cls, pipe: Any, **kwargs: Any) -> Any:
        """The family's RAHF-guided pipeline on `pipe`'s components (shared, not copied).

        Args:
            pipe: a diffusers pipeline of a supported family, or a RAHF pipeline (its reward model is kept unless
                another is passed).
            **kwargs: `reward_model`, `reward_processor` (optional: without them only a callable `reward` can guide)
                and any other keyword of `DiffusionPipeline.from_pipe`. The pipeline's dtype is kept unless `dtype` /
                `torch_dtype` is given.

        Raises:
            `ValueError`: `pipe` is of no supported family (the message names the supported ones), or its denoiser
            is an inpainting one (extra input channels).
        """
        rahf_class = rahf_guided_class_for(pipe)
        components = getattr(pipe, "components", {})
        denoiser = components.get("unet") or components.get("transformer")
        config = denoiser.config
        out_channels = getattr(config, "out_channels", None) or config.in_channels
        if config.in_channels != out_channels:
            raise ValueError(
                f"`pipe`'s {type(denoiser).__name__} reads {config.in_channels} input channels for {out_channels} "
                "output ones (an inpainting / Fill checkpoint): it cannot sample text-to-image; pass a text-to-image "
                "checkpoint of the family"
            )
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs.update(dtype_kwarg(pipe.dtype))
        return rahf_class.from_pipe(pipe, **kwargs)
