"""`RAHFAmusedInpaintPipeline`: RAHF heatmap -> mask -> K aMUSEd inpaintings -> rescore -> best, the mask on VQ tokens.

The aMUSEd counterpart of `rahf.pipelines.rahf_inpaint.RAHFInpaintPipeline`, with the same `__call__` interface and output.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AmusedInpaintPipeline, AmusedScheduler, DiffusionPipeline, UVit2DModel, VQModel
from diffusers.utils import logging, replace_example_docstring
from rahf.pipelines.masks import MaskConfig
from rahf.pipelines.rahf_inpaint import RAHFInpaintMixin, RAHFInpaintPipelineOutput
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from rahf import RAHFModel, RAHFProcessor

logger = logging.get_logger(__name__)

__all__ = ["RAHFAmusedInpaintPipeline", "pixel_mask_to_token_mask"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import AmusedInpaintPipeline
        >>> from rahf import RAHFModel, RAHFProcessor
        >>> from rahf.pipelines.rahf_amused_inpaint import RAHFAmusedInpaintPipeline

        >>> inpainter = AmusedInpaintPipeline.from_pretrained("amused/amused-512", torch_dtype=torch.float16)
        >>> pipe = RAHFAmusedInpaintPipeline.from_pipe(
        ...     inpainter,
        ...     reward_model=RAHFModel.from_pretrained("path/to/rahf"),
        ...     reward_processor=RAHFProcessor.from_pretrained("path/to/rahf"),
        ...     dtype=torch.float16,  # from_pipe casts to float32 otherwise
        ... ).to("cuda")
        >>> out = pipe("a cat on a wooden table", image="cat.png", num_candidates=4, threshold=0.3)
        >>> out.images[0].save("repaired.png")
        ```
"""


def pixel_mask_to_token_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A pixel mask (H, W) -> the VQ-token mask (H / factor, W / factor): a token is masked when any pixel of its
    factor x factor cell is, so that every masked pixel is regenerated (aMUSEd's own resize + binarize would leave
    tokens less than half covered unmasked)."""
    h, w = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"the mask's size {w}x{h} must be a multiple of the VQ factor {factor}")
    return mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # aMUSEd pipelines live in diffusers' `deprecated` package and warn on every construction; ours builds one per call.
    pipeline_logger = std_logging.getLogger("diffusers.pipelines.pipeline_utils")
    previous = pipeline_logger.level
    pipeline_logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        pipeline_logger.setLevel(previous)


class RAHFAmusedInpaintPipeline(RAHFInpaintMixin, DiffusionPipeline):
    r"""
    Repairs what RAHF flags in an image with aMUSEd (masked-token) inpainting: heatmap -> mask -> the mask mapped to VQ
    tokens -> K candidates in one batched [`AmusedInpaintPipeline`] call -> the input pasted back outside the mask ->
    RAHF rescoring of candidates and input in one batch -> the best, or the input.

    Args:
        vqvae ([`VQModel`]), tokenizer ([`~transformers.CLIPTokenizer`]), text_encoder
        ([`~transformers.CLIPTextModelWithProjection`]), transformer ([`UVit2DModel`]), scheduler ([`AmusedScheduler`]):
            As in [`AmusedInpaintPipeline`].
        reward_model ([`rahf.RAHFModel`]), reward_processor ([`rahf.RAHFProcessor`]):
            The trained RAHF model and its processor.

    Examples:

    ```python
    >>> from PIL import Image
    >>> from rahf.pipelines.rahf_amused_inpaint import RAHFAmusedInpaintPipeline
    >>> from rahf.testing import tiny_amused_inpaint_pipeline, tiny_rahf_model, tiny_rahf_processor
    >>> pipe = RAHFAmusedInpaintPipeline.from_pipe(
    ...     tiny_amused_inpaint_pipeline(), reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    ... )
    >>> out = pipe("a red cat", image=Image.new("RGB", (32, 32)), threshold=0.01, num_inference_steps=2)
    ```
    """

    # The reward model stays on the accelerator under `enable_model_cpu_offload` (see `RAHFInpaintPipeline`).
    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    _optional_components: list[str] = []
    _exclude_from_cpu_offload = ["vqvae", "reward_model"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vqvae: VQModel,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        transformer: UVit2DModel,
        scheduler: AmusedScheduler,
        reward_model: RAHFModel,
        reward_processor: RAHFProcessor,
    ):
        super().__init__()
        self.register_modules(
            vqvae=vqvae,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            scheduler=scheduler,
            reward_model=reward_model,
            reward_processor=reward_processor,
        )
        self.vae_scale_factor = (
            2 ** (len(self.vqvae.config.block_out_channels) - 1) if getattr(self, "vqvae", None) else 8
        )

    def inpaint_pipeline(self) -> AmusedInpaintPipeline:
        """The [`AmusedInpaintPipeline`] on this pipeline's own components (shared, not copied)."""
        with _quiet_deprecation():
            pipe = AmusedInpaintPipeline(
                vqvae=self.vqvae,
                tokenizer=self.tokenizer,
                text_encoder=self.text_encoder,
                transformer=self.transformer,
                scheduler=self.scheduler,
            )
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    @property
    def generation_multiple(self) -> int:
        """Generation sizes are multiples of this. aMUSEd resizes the mask to the token grid rounded down to multiples
        of the VQ factor f, so the grid (size / f) must itself be a multiple of f, and even when the transformer
        downsamples: size a multiple of lcm(f * f, 2 * f) (4 for the tiny test model, 256 for amused-512)."""
        f = self.vae_scale_factor
        step = 2 * f if getattr(self.transformer.config, "downsample", False) else f
        return math.lcm(f * f, step)

    def _check_generator_inputs(self, generator: Any, callback_on_step_end_tensor_inputs: Any) -> None:
        if not all(k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs} for aMUSEd, got "
                f"{callback_on_step_end_tensor_inputs}"
            )
        if isinstance(generator, list):
            raise ValueError(
                "`generator` must be one torch.Generator for aMUSEd (its scheduler samples all K "
                "candidates from one), got a list"
            )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str,
        image: PIL.Image.Image | np.ndarray | str,
        heatmap: str | np.ndarray = "implausibility",
        threshold: float | None = None,
        dilation: float | None = None,
        feather: float | None = None,
        mask_config: MaskConfig | dict[str, Any] | None = None,
        num_candidates: int = 4,
        rescore_with: str | dict[str, float] = "plausibility",
        strength: float = 1.0,
        num_inference_steps: int = 12,
        guidance_scale: float = 10.0,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], Any] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> RAHFInpaintPipelineOutput | tuple:
        r"""
        Repairs `image`: RAHF heatmap -> mask -> VQ-token mask -> `num_candidates` aMUSEd inpaintings -> RAHF
        rescoring -> the best. Arguments as in [`RAHFInpaintPipeline.__call__`], except:

        Args:
            num_inference_steps (`int`, *optional*, defaults to 12), guidance_scale (`float`, *optional*, defaults to
                10.0): aMUSEd's defaults.
            height (`int`, *optional*), width (`int`, *optional*): the generation size, multiples of
                `generation_multiple`; defaults to the input's size rounded to them.
            generator (`torch.Generator`, *optional*): one generator (aMUSEd samples every candidate from it).
            callback_on_step_end (`Callable`, *optional*): called after each step as
                `callback_on_step_end(pipe, step, timestep, {"latents": latents})` with the internal
                [`AmusedInpaintPipeline`]; aMUSEd offers only an observing callback, so what it returns is ignored.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): only `["latents"]` is available.

        Examples:

        Returns:
            [`RAHFInpaintPipelineOutput`] or `tuple`.
        """
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]

        # 0. Check inputs
        image, config, weights, gen_size = self.check_inputs(
            prompt,
            image,
            heatmap,
            num_candidates,
            rescore_with,
            mask_config,
            threshold,
            dilation,
            feather,
            strength,
            num_inference_steps,
            height,
            width,
            generator,
            output_type,
            callback_on_step_end_tensor_inputs,
        )

        # 4. Map the mask to VQ tokens and inpaint all K candidates in one batched aMUSEd call (steps 1-3 and 5-7:
        # `_repair`)
        def generate(gen_image: PIL.Image.Image, gen_mask: np.ndarray) -> list[PIL.Image.Image]:
            token_mask = pixel_mask_to_token_mask(gen_mask, self.vae_scale_factor)
            inpainter = self.inpaint_pipeline()
            callback = None
            if callback_on_step_end is not None:

                def callback(step: int, timestep: int, latents: torch.Tensor) -> None:
                    callback_on_step_end(inpainter, step, timestep, {"latents": latents})

            return inpainter(
                prompt=prompt,
                image=gen_image,
                # At the token grid's size, so aMUSEd's resize to it is the identity and its binarisation keeps our
                # tokens.
                mask_image=PIL.Image.fromarray(token_mask.astype(np.uint8) * 255),
                strength=strength,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_candidates,
                generator=generator,
                output_type="pil",
                cross_attention_kwargs=cross_attention_kwargs,
                callback=callback,
            ).images

        return self._repair(prompt, image, heatmap, config, weights, gen_size, output_type, return_dict, generate)
