"""Which generator family a diffusers pipeline belongs to, read from its components (not its class name), so that
text-to-image, image-to-image, inpainting and fill pipelines of one family, and user subclasses, map to one name.

| family   | denoiser                               | text encoders                          | parameterisation       |
|----------|----------------------------------------|----------------------------------------|------------------------|
| `sd`     | `UNet2DConditionModel`                 | one CLIP                               | epsilon / v (scheduler) |
| `sdxl`   | `UNet2DConditionModel` ("text_time")   | two CLIP (the second with projection)  | epsilon / v (scheduler) |
| `sd3`    | `SD3Transformer2DModel`                | two CLIP with projection (+ T5)        | flow matching          |
| `flux`   | `FluxTransformer2DModel`               | CLIP + T5                              | flow matching          |
| `amused` | `UVit2DModel` on VQ tokens             | one CLIP with projection               | masked tokens          |

Examples:

```python
>>> from rahf._testing_diffusers import tiny_sdxl_pipeline
>>> from rahf.pipelines.families import generator_family
>>> generator_family(tiny_sdxl_pipeline())
'sdxl'
```
"""

from __future__ import annotations

from typing import Any

__all__ = ["SUPPORTED_FAMILIES", "FLOW_MATCHING_FAMILIES", "denoiser_of", "generator_family"]

SUPPORTED_FAMILIES = ("sd", "sdxl", "sd3", "flux", "amused")
FLOW_MATCHING_FAMILIES = ("sd3", "flux")


def generator_family(pipe: Any, argument: str = "pipe") -> str:
    """The family name of `pipe` (one of `SUPPORTED_FAMILIES`).

    Args:
        pipe: a diffusers pipeline (anything with a `components` mapping).
        argument (`str`, *optional*, defaults to `"pipe"`): the argument's name for the error message.

    Raises:
        `ValueError`: when the components match no supported family; the message names the supported ones.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UVit2DModel

    components = getattr(pipe, "components", None) or {}
    unet, transformer = components.get("unet"), components.get("transformer")
    if isinstance(unet, UNet2DConditionModel) and components.get("vae") is not None:
        if unet.config.addition_embed_type == "text_time" or components.get("text_encoder_2") is not None:
            return "sdxl"
        return "sd"
    if isinstance(transformer, SD3Transformer2DModel) and components.get("vae") is not None:
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel) and components.get("vae") is not None:
        return "flux"
    if isinstance(transformer, UVit2DModel) and components.get("vqvae") is not None:
        return "amused"
    denoiser = type(unet or transformer).__name__ if (unet or transformer) is not None else "no unet/transformer"
    raise ValueError(
        f"`{argument}` is a {type(pipe).__name__} ({denoiser}, components {sorted(components)}), which is no supported "
        "generator family; supported: Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1 and aMUSEd pipelines "
        "(text-to-image, image-to-image or inpainting)"
    )


def denoiser_of(pipe: Any) -> Any:
    """The pipeline's denoising network: its `unet` (SD, SDXL) or its `transformer` (SD3, FLUX, aMUSEd)."""
    return pipe.unet if generator_family(pipe) in ("sd", "sdxl") else pipe.transformer
