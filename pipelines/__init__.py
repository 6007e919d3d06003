"""`rahf.pipelines`: diffusers pipelines that use RAHF (inpainting that repairs what RAHF flags, sampling guided by a
RAHF score), the heatmap-to-mask step, and picking the RAHF pipeline that fits a pipeline you have. Names are imported
on first use.

Examples:

```python
>>> from rahf.pipelines import AutoRAHFInpaintPipeline, RAHFGuidedStableDiffusionPipeline, heatmap_to_mask
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rahf._lazy import lazy_exports

_EXPORTS = {
    "RAHFInpaintPipeline": ".rahf_inpaint",
    "RAHFInpaintPipelineOutput": ".rahf_inpaint",
    "RAHFInpaintMixin": ".rahf_inpaint",
    "DEFAULT_MASK_CONFIG": ".rahf_inpaint",
    "RAHFLatentInpaintMixin": ".rahf_inpaint",
    "RAHFStableDiffusionXLInpaintPipeline": ".rahf_sdxl_inpaint",
    "RAHFStableDiffusion3InpaintPipeline": ".rahf_sd3_inpaint",
    "RAHFFluxInpaintPipeline": ".rahf_flux_inpaint",
    "RAHFAmusedInpaintPipeline": ".rahf_amused_inpaint",
    "RAHFGuidedStableDiffusionPipeline": ".rahf_guided",
    "RAHFGuidedStableDiffusionPipelineOutput": ".rahf_guided",
    "RAHFGuidedStableDiffusionXLPipeline": ".rahf_guided_sdxl",
    "RAHFGuidedStableDiffusion3Pipeline": ".rahf_guided_sd3",
    "RAHFGuidedFluxPipeline": ".rahf_guided_flux",
    "RAHFGuidedPipelineOutput": ".guidance",
    "AutoRAHFGuidedPipeline": ".auto",
    "SUPPORTED_SCHEDULERS": ".rahf_guided",
    "MaskConfig": ".masks",
    "heatmap_to_mask": ".masks",
    "mask_to_pil": ".masks",
    "override_mask_config": ".masks",
    "SUPPORTED_FAMILIES": ".families",
    "generator_family": ".families",
    "AutoRAHFInpaintPipeline": ".auto",
    "from_inpaint_pipe": ".auto",
    "rahf_inpaint_class_for": ".auto",
}

__all__ = [
    "AutoRAHFGuidedPipeline",
    "DEFAULT_MASK_CONFIG",
    "AutoRAHFInpaintPipeline",
    "MaskConfig",
    "RAHFAmusedInpaintPipeline",
    "RAHFFluxInpaintPipeline",
    "RAHFGuidedStableDiffusionPipeline",
    "RAHFGuidedStableDiffusionPipelineOutput",
    "RAHFGuidedStableDiffusionXLPipeline",
    "RAHFGuidedStableDiffusion3Pipeline",
    "RAHFGuidedFluxPipeline",
    "RAHFGuidedPipelineOutput",
    "RAHFInpaintMixin",
    "RAHFInpaintPipeline",
    "RAHFInpaintPipelineOutput",
    "RAHFLatentInpaintMixin",
    "RAHFStableDiffusion3InpaintPipeline",
    "RAHFStableDiffusionXLInpaintPipeline",
    "SUPPORTED_FAMILIES",
    "SUPPORTED_SCHEDULERS",
    "from_inpaint_pipe",
    "generator_family",
    "heatmap_to_mask",
    "mask_to_pil",
    "override_mask_config",
    "rahf_inpaint_class_for",
]

if TYPE_CHECKING:
    from .auto import AutoRAHFGuidedPipeline, AutoRAHFInpaintPipeline, from_inpaint_pipe, rahf_inpaint_class_for
    from .families import SUPPORTED_FAMILIES, generator_family
    from .guidance import RAHFGuidedPipelineOutput
    from .masks import MaskConfig, heatmap_to_mask, mask_to_pil, override_mask_config
    from .rahf_amused_inpaint import RAHFAmusedInpaintPipeline
    from .rahf_flux_inpaint import RAHFFluxInpaintPipeline
    from .rahf_guided import (
        SUPPORTED_SCHEDULERS,
        RAHFGuidedStableDiffusionPipeline,
        RAHFGuidedStableDiffusionPipelineOutput,
    )
    from .rahf_guided_flux import RAHFGuidedFluxPipeline
    from .rahf_guided_sd3 import RAHFGuidedStableDiffusion3Pipeline
    from .rahf_guided_sdxl import RAHFGuidedStableDiffusionXLPipeline
    from .rahf_inpaint import (
        DEFAULT_MASK_CONFIG,
        RAHFInpaintMixin,
        RAHFInpaintPipeline,
        RAHFInpaintPipelineOutput,
        RAHFLatentInpaintMixin,
    )
    from .rahf_sd3_inpaint import RAHFStableDiffusion3InpaintPipeline
    from .rahf_sdxl_inpaint import RAHFStableDiffusionXLInpaintPipeline

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
