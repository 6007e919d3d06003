"""`RAHFInpaintPipeline`: repair the region RAHF flags (heatmap -> mask -> K inpainted candidates -> rescore -> best).

The paper's §5 / Fig. 9 use of the heatmaps. The flow every family shares is `RAHFInpaintMixin`; `RAHFLatentInpaintMixin`
adds generation by a diffusers inpainting pipeline, used here for Stable Diffusion 1.x/2.x and by the SDXL, SD3 and
FLUX classes (`rahf_sdxl_inpaint`, `rahf_sd3_inpaint`, `rahf_flux_inpaint`); aMUSEd's is `rahf_amused_inpaint`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AsymmetricAutoencoderKL,
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from rahf.pipelines.masks import MaskConfig, feather_mask, heatmap_to_mask, override_mask_config
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from rahf import RAHFModel, RAHFProcessor, RichFeedbackPredictor, load_image

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_MASK_CONFIG",
    "RAHFInpaintMixin",
    "RAHFInpaintPipeline",
    "RAHFInpaintPipelineOutput",
    "RAHFLatentInpaintMixin",
    "check_unet_channels",
]

# Pipeline defaults: the 40/255 threshold; specks under 0.1% of the image dropped; the mask grown by 3% of the shorter
# side (about 15 px at 512) so that the repaint covers the artifact's surroundings; a 1% seam blended inside the mask.
DEFAULT_MASK_CONFIG = MaskConfig(threshold=None, min_area=0.001, dilation=0.03, feather=0.01)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import StableDiffusionXLPipeline
        >>> from rahf import RAHFModel, RAHFProcessor
        >>> from rahf.pipelines import AutoRAHFInpaintPipeline

        >>> sdxl = StableDiffusionXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16
        ... )  # any text-to-image or inpainting checkpoint of SD 1.x/2.x, SDXL, SD3 or FLUX
        >>> pipe = AutoRAHFInpaintPipeline.from_pipe(
        ...     sdxl,
        ...     reward_model=RAHFModel.from_pretrained("path/to/rahf"),
        ...     reward_processor=RAHFProcessor.from_pretrained("path/to/rahf"),
        ... )  # keeps the pipeline's dtype
        >>> pipe.enable_model_cpu_offload()  # the reward model stays on the GPU
        >>> out = pipe("a cat on a wooden table", image="cat.png", num_candidates=4, threshold=0.3, dilation=0.03)
        >>> out.repaired, out.original_score, out.candidate_scores
        >>> out.images[0].save("repaired.png")
        ```
"""


@dataclass
class RAHFInpaintPipelineOutput(BaseOutput):
    """
    Output of the RAHF inpainting pipelines.

    Args:
        images (`list[PIL.Image.Image]` or `np.ndarray`):
            One image: the best candidate when it beat the input, else the input itself; at the input's size. A list
            of one PIL image, or a float array (1, H, W, 3) in [0, 1] with `output_type="np"`.
        candidates (`list[PIL.Image.Image]` or `np.ndarray`):
            The K candidates after pasting the input back outside the mask, in generation order ((K, H, W, 3) floats
            with `output_type="np"`); empty when the mask was empty.
        candidate_scores (`list[float]`):
            The rescoring score of each candidate (the `rescore_with` score, or the weighted mean of several).
        original_score (`float`):
            The same score for the input image.
        heatmap (`np.ndarray`):
            float32 (H, W) heat in [0, 1] at the input's size: the predicted (or the given) heatmap.
        mask (`np.ndarray`):
            bool (H, W): the region that was repainted; all False when there was nothing to repair.
        repaired (`bool`):
            Whether `images[0]` is a candidate (True) or the input returned untouched (False).
        scores (`dict[str, list[float]]`):
            Each RAHF score used for rescoring, for the input followed by the K candidates (index 0 is the input).
    """

    images: list[PIL.Image.Image] | np.ndarray
    candidates: list[PIL.Image.Image] | np.ndarray
    candidate_scores: list[float]
    original_score: float
    heatmap: np.ndarray
    mask: np.ndarray
    repaired: bool
    scores: dict[str, list[float]] | None = None


class RAHFInpaintMixin:
    r"""
    The steps every RAHF inpainting pipeline shares: check the inputs, predict the heatmap, threshold and dilate it
    into a mask, paste the input back outside the mask, rescore candidates and input together, keep the best. A
    pipeline that mixes it in registers `reward_model` and `reward_processor`, defines `generation_multiple` and
    `_check_generator_inputs`, and its `__call__` runs `check_inputs` then `_repair` with its own generation step.
    """

    reward_model: RAHFModel
    reward_processor: RAHFProcessor
    generation_multiple: int  # generation sizes are rounded to multiples of this

    # ----------------------------------------------------------------------------------------------------------------
    # Input checks

    def _check_generator_inputs(self, generator: Any, callback_on_step_end_tensor_inputs: Any) -> None:
        """The generator-specific checks, run first by `check_inputs`; raises a ValueError naming the argument."""

    def check_inputs(
        self,
        prompt: Any,
        image: Any,
        heatmap: Any,
        num_candidates: Any,
        rescore_with: Any,
        mask_config: Any,
        threshold: Any,
        dilation: Any,
        feather: Any,
        strength: Any,
        num_inference_steps: Any,
        height: Any,
        width: Any,
        generator: Any,
        output_type: Any,
        callback_on_step_end_tensor_inputs: Any,
    ) -> tuple[PIL.Image.Image, MaskConfig, dict[str, float], tuple[int, int]]:
        """Validates the arguments (a ValueError naming the first bad one); returns the RGB input, the resolved mask
        config, the normalised rescoring weights and the (width, height) to generate at."""
        self._check_generator_inputs(generator, callback_on_step_end_tensor_inputs)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"`prompt` must be a non-empty str (one image is repaired per call), got {prompt!r}; loop over "
                "prompts to repair several images"
            )
        if isinstance(image, (list, tuple)):
            raise ValueError(
                f"`image` must be one image (PIL image, HxWx3 array or path), got a {type(image).__name__} of "
                f"{len(image)}; call the pipeline once per image"
            )
        if isinstance(image, torch.Tensor):
            raise ValueError(
                "`image` must be a PIL image, an HxWx3 uint8 array or a path, got a torch.Tensor; "
                "convert it with `diffusers.utils.pt_to_pil` first"
            )
        try:
            rgb = load_image(image)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`image` could not be read as an image: {err}") from err

        if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
            raise ValueError(
                f"`num_candidates` must be an int >= 1 (how many repairs to generate), got {num_candidates!r}"
            )

        if isinstance(heatmap, str):
            names = list(self.reward_model.config.heatmap_names)
            if heatmap not in names:
                raise ValueError(
                    f"`heatmap` must be one of the reward model's heatmaps {names} or an HxW array, got {heatmap!r}"
                )
        elif isinstance(heatmap, (np.ndarray, torch.Tensor)):
            heat = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else heatmap
            if heat.ndim != 2 or heat.shape != (rgb.height, rgb.width):
                raise ValueError(
                    f"`heatmap` has shape {tuple(heat.shape)} but `image` is {rgb.width}x{rgb.height} (W x H): pass "
                    f"a 2-D heatmap of shape ({rgb.height}, {rgb.width}), e.g. cv2.resize(heatmap, image.size)"
                )
            if heat.dtype.kind not in "biuf" or np.isnan(heat).any() or heat.min() < 0 or heat.max() > 1:
                raise ValueError(
                    "`heatmap` must hold finite values in [0, 1] (a 0/1 mask works too), got "
                    f"dtype {heat.dtype}, range [{np.nanmin(heat)}, {np.nanmax(heat)}]"
                )
        else:
            raise ValueError(
                f"`heatmap` must be a heatmap name such as 'implausibility' or an HxW array in [0, 1], "
                f"got {type(heatmap).__name__}"
            )

        config = self._resolve_mask_config(mask_config, threshold, dilation, feather)
        weights = self._resolve_rescore_weights(rescore_with)

        if isinstance(generator, list) and len(generator) != num_candidates:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but `num_candidates` is "
                f"{num_candidates}: pass one generator, or one per candidate"
            )
        if output_type not in ("pil", "np"):
            raise ValueError(
                f"`output_type` must be 'pil' or 'np' (the result is composited in pixel space), got {output_type!r}"
            )
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}")
        gen_size = self._generation_size(rgb.size, self.generation_multiple, height, width)
        return rgb, config, weights, gen_size

    @staticmethod
    def _resolve_mask_config(
        mask_config: MaskConfig | Mapping[str, Any] | None,
        threshold: float | None,
        dilation: float | None,
        feather: float | None,
    ) -> MaskConfig:
        """`DEFAULT_MASK_CONFIG`, or `mask_config`, with the explicit `threshold` / `dilation` / `feather` on top.
        `MaskConfig` raises a ValueError naming any field out of range."""
        if mask_config is None:
            config = DEFAULT_MASK_CONFIG
        elif isinstance(mask_config, MaskConfig):
            config = mask_config
        elif isinstance(mask_config, Mapping):
            config = override_mask_config(DEFAULT_MASK_CONFIG, "`mask_config`", **mask_config)
        else:
            raise ValueError(
                f"`mask_config` must be a MaskConfig, a dict of its fields or None, got {type(mask_config).__name__}"
            )
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0
        ):
            raise ValueError(f"`threshold` must be a number in [0, 1] (heat above it is repaired), got {threshold!r}")
        given = {"threshold": threshold, "dilation": dilation, "feather": feather}
        overrides = {k: float(v) if k == "threshold" else v for k, v in given.items() if v is not None}
        return override_mask_config(config, **overrides) if overrides else config

    def _resolve_rescore_weights(self, rescore_with: str | Mapping[str, float]) -> dict[str, float]:
        names = list(self.reward_model.config.score_names)
        if isinstance(rescore_with, str):
            rescore_with = {rescore_with: 1.0}
        if not isinstance(rescore_with, Mapping) or not rescore_with:
            raise ValueError(
                f"`rescore_with` must be a score name or a non-empty dict name -> weight over {names}, "
                f"got {rescore_with!r}"
            )
        unknown = [k for k in rescore_with if k not in names]
        if unknown:
            raise ValueError(f"`rescore_with` names unknown score(s) {unknown}; the reward model's scores are {names}")
        weights = {}
        for name, w in rescore_with.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
                raise ValueError(f"`rescore_with[{name!r}]` must be a finite weight >= 0, got {w!r}")
            weights[name] = float(w)
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"`rescore_with` weights must not all be 0, got {dict(rescore_with)}")
        return {k: w / total for k, w in weights.items()}  # a weighted mean stays in [0, 1]

    @staticmethod
    def _generation_size(
        size: tuple[int, int], multiple: int, height: int | None, width: int | None
    ) -> tuple[int, int]:
        """(width, height) to generate at: the explicit `height` / `width`, else the input's size rounded to the
        nearest multiple the generator needs (so odd sizes work: the candidates are resized back before pasting)."""
        w, h = size
        gen_w = width if width is not None else max(multiple, int(round(w / multiple)) * multiple)
        gen_h = height if height is not None else max(multiple, int(round(h / multiple)) * multiple)
        for name, value in (("height", gen_h), ("width", gen_w)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(
                    f"`{name}` (the generation size) must be a positive multiple of {multiple} for this "
                    f"generator, got {value!r}; leave it None to use the input's size rounded"
                )
        return gen_w, gen_h

    # ----------------------------------------------------------------------------------------------------------------
    # Steps

    def _predictor(self, batch_size: int) -> RichFeedbackPredictor:
        return RichFeedbackPredictor(self.reward_model, self.reward_processor, batch_size=max(1, batch_size))

    def _predict_heatmap(
        self, image: PIL.Image.Image, prompt: str, heatmap: str | np.ndarray, weights: Mapping[str, float]
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Step 1: the heatmap at the image's size (predicted, or the given array), and the input's rescoring scores
        from the same pass (needed only when there turns out to be nothing to repair)."""
        if isinstance(heatmap, str):
            [feedback] = self._predictor(1)([image], [prompt], outputs=[heatmap, *weights])
            return feedback.heatmaps[heatmap], feedback.scores
        heat = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
        [feedback] = self._predictor(1)([image], [prompt], outputs=list(weights))
        return heat.astype(np.float32), feedback.scores

    @staticmethod
    def _build_mask(heat: np.ndarray, config: MaskConfig, size: tuple[int, int]) -> np.ndarray:
        """Step 2: threshold, drop specks, dilate (`rahf.pipelines.masks`), at the image's size."""
        return heatmap_to_mask(heat, config, size=size)

    @staticmethod
    def _generation_inputs(
        image: PIL.Image.Image, mask: np.ndarray, gen_size: tuple[int, int]
    ) -> tuple[PIL.Image.Image, np.ndarray]:
        """The input and the mask at the generation size. The mask is resized so that it covers every pixel of the
        original mask (any overlap counts), so the whole region that will be pasted back is regenerated."""
        if gen_size == image.size:
            return image, mask
        gen_image = image.resize(gen_size, PIL.Image.Resampling.LANCZOS)
        mask_img = PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize(gen_size, PIL.Image.Resampling.BILINEAR)
        return gen_image, np.asarray(mask_img) > 0

    @staticmethod
    def _composite(
        image: PIL.Image.Image, candidates: Sequence[PIL.Image.Image], mask: np.ndarray, feather: float
    ) -> list[PIL.Image.Image]:
        """Step 5: each candidate at the input's size, blended in over the mask only. Done in uint8 at the input's
        size, and the pixels outside the mask are copied from the input, so they are bit-identical to it."""
        original = np.asarray(image, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))  # only the mask's bounding box is blended
        alpha = feather_mask(mask, feather)[box][..., None]  # (h, w, 1), 0 outside the mask
        outside = ~mask[box]
        base = original[box]
        out = []
        for candidate in candidates:
            candidate = candidate.convert("RGB")
            if candidate.size != image.size:
                candidate = candidate.resize(image.size, PIL.Image.Resampling.LANCZOS)
            blended = alpha * np.asarray(candidate, dtype=np.float32)[box] + (1.0 - alpha) * base.astype(np.float32)
            region = np.clip(np.round(blended), 0, 255).astype(np.uint8)
            region[outside] = base[outside]
            composite = original.copy()
            composite[box] = region
            out.append(PIL.Image.fromarray(composite))
        return out

    def _rescore(
        self, image: PIL.Image.Image, candidates: Sequence[PIL.Image.Image], prompt: str, weights: Mapping[str, float]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Step 6: the input and all candidates through RAHF in one batch. Returns the combined score of each (index 0
        is the input) and the per-name scores."""
        images = [image, *candidates]
        feedback = self._predictor(len(images))(images, [prompt] * len(images), outputs=list(weights))
        per_name = {name: [float(f.scores[name]) for f in feedback] for name in weights}
        combined = [float(sum(w * f.scores[name] for name, w in weights.items())) for f in feedback]
        return combined, per_name

    @staticmethod
    def _combine(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
        return float(sum(w * scores[name] for name, w in weights.items()))

    def _output(
        self,
        image: PIL.Image.Image,
        candidates: list[PIL.Image.Image],
        scores: list[float],
        per_name: dict[str, list[float]],
        heat: np.ndarray,
        mask: np.ndarray,
        output_type: str,
        return_dict: bool,
    ) -> RAHFInpaintPipelineOutput | tuple:
        """Step 7: the best candidate if it beats the input (strictly), else the input with `repaired=False`."""
        original_score, candidate_scores = scores[0], scores[1:]
        best = int(np.argmax(candidate_scores)) if candidate_scores else -1
        repaired = best >= 0 and candidate_scores[best] > original_score
        chosen = candidates[best] if repaired else image
        if output_type == "np":
            images: Any = np.stack([np.asarray(chosen, dtype=np.float32) / 255.0])
            cands: Any = (
                np.stack([np.asarray(c, dtype=np.float32) / 255.0 for c in candidates])
                if candidates
                else np.zeros((0, image.height, image.width, 3), dtype=np.float32)
            )
        else:
            images, cands = [chosen], list(candidates)
        result = (images, cands, list(candidate_scores), float(original_score), heat, mask, bool(repaired), per_name)
        if not return_dict:
            return result
        return RAHFInpaintPipelineOutput(*result)

    # ----------------------------------------------------------------------------------------------------------------
    # The flow

    def _repair(
        self,
        prompt: str,
        image: PIL.Image.Image,
        heatmap: str | np.ndarray,
        config: MaskConfig,
        weights: Mapping[str, float],
        gen_size: tuple[int, int],
        output_type: str,
        return_dict: bool,
        generate: Callable[[PIL.Image.Image, np.ndarray], Sequence[PIL.Image.Image]],
    ) -> RAHFInpaintPipelineOutput | tuple:
        """Steps 1-7 on checked inputs (`check_inputs`' results). `generate(gen_image, gen_mask)` is the pipeline's
        own step 4: all K candidates (PIL images) for the input and the bool mask, both at the generation size."""
        # 1. Predict the heatmap with RAHF (and the input's scores, from the same pass)
        heat, input_scores = self._predict_heatmap(image, prompt, heatmap, weights)

        # 2. Build the mask: threshold, drop specks, dilate
        mask = self._build_mask(heat, config, image.size)

        # 3. Nothing flagged: return the input untouched, without running the generator
        if not mask.any():
            logger.info("the mask is empty (no heat above the threshold): returning the input unrepaired")
            per_name = {name: [float(input_scores[name])] for name in weights}
            score = self._combine(input_scores, weights)
            self.maybe_free_model_hooks()
            return self._output(image, [], [score], per_name, heat, mask, output_type, return_dict)

        # 4. Generate all K candidates in one batched call of the pipeline's generator
        gen_image, gen_mask = self._generation_inputs(image, mask, gen_size)
        generated = generate(gen_image, gen_mask)

        # 5. Paste the input back outside the mask (feathered seam inside the mask only)
        candidates = self._composite(image, generated, mask, config.feather)

        # 6. Rescore the K candidates and the input in one batched RAHF call
        scores, per_name = self._rescore(image, candidates, prompt, weights)

        # 7. Keep the best candidate if it beats the input
        self.maybe_free_model_hooks()
        return self._output(image, candidates, scores, per_name, heat, mask, output_type, return_dict)


# Arguments the repair flow sets itself, with what to pass instead; the rest of the wrapped pipeline's `__call__`
# arguments pass through `**inpaint_kwargs`.
_RESERVED_INPAINT_KWARGS = {
    "image": "pass it as `image`",
    "mask_image": "the mask comes from `heatmap` (pass a 0/1 array there to use your own)",
    "masked_image_latents": "the mask comes from `heatmap` (pass a 0/1 array there to use your own)",
    "num_images_per_prompt": "use `num_candidates`",
    "latents": "the candidates' noise comes from `generator`",
    "prompt_embeds": "pass `prompt`: RAHF rates the image against the same text",
    "negative_prompt_embeds": "pass `negative_prompt`",
    "pooled_prompt_embeds": "pass `prompt`: RAHF rates the image against the same text",
    "negative_pooled_prompt_embeds": "pass `negative_prompt`",
}


def _call_default(pipeline_class: type, name: str) -> Any:
    """The default of `name` in `pipeline_class.__call__` (None when it has none)."""
    param = inspect.signature(pipeline_class.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


class RAHFLatentInpaintMixin(RAHFInpaintMixin):
    r"""
    Step 4 of the repair flow for latent-diffusion families (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX): the K
    candidates come from one call of the family's diffusers inpainting pipeline, built on this pipeline's own
    components (shared, not copied), so its denoising loop is diffusers' own. Inpainting checkpoints and any
    text-to-image checkpoint both work: with a denoiser that takes only latents, diffusers blends the noised input's
    latents in outside the mask at every step.

    A family's class registers the components of its inpainting pipeline plus `reward_model` and `reward_processor`,
    and fills in the hooks: `inpaint_pipeline_class` (the wrapped class, or `_inpaint_pipeline_cls`),
    `generation_multiple`, `_check_denoiser` (the channel counts it accepts) and, if its wrapped class takes
    configuration arguments, `_inpaint_pipeline_kwargs`. `__call__` passes every argument it does not own to the
    wrapped pipeline's `__call__` (`eta`, `clip_skip`, `prompt_2`, `max_sequence_length`, `true_cfg_scale`, ...).
    """

    _inpaint_pipeline_cls: type[DiffusionPipeline]

    # ----------------------------------------------------------------------------------------------------------------
    # Per-family hooks

    def inpaint_pipeline_class(self) -> type[DiffusionPipeline]:
        """The diffusers inpainting pipeline class that generates the candidates."""
        return type(self)._inpaint_pipeline_cls

    def _inpaint_pipeline_kwargs(self) -> dict[str, Any]:
        """Configuration arguments of the wrapped class's `__init__` that are not read from this pipeline's config."""
        return {}

    def _check_denoiser(self) -> None:
        """Raises a ValueError naming the denoiser when its input channels fit neither inpainting path."""

    # ----------------------------------------------------------------------------------------------------------------

    def inpaint_pipeline(self) -> DiffusionPipeline:
        """The wrapped inpainting pipeline on this pipeline's own components (shared, not copied), which generates the
        candidates. Built per call, so that swapped components (`pipe.unet = ...`) are always used."""
        cls = self.inpaint_pipeline_class()
        modules, config_names = cls._get_signature_keys(cls)
        components = self.components
        kwargs = {name: components.get(name) for name in modules}
        overrides = self._inpaint_pipeline_kwargs()
        for name in config_names:
            if name in overrides:
                kwargs[name] = overrides[name]
            elif name in self.config:
                kwargs[name] = self.config[name]
        pipe = cls(**kwargs)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def _check_generator_inputs(self, generator: Any, callback_on_step_end_tensor_inputs: Any) -> None:
        self._check_denoiser()
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )

    def _check_inpaint_kwargs(self, pipeline_class: type, inpaint_kwargs: Mapping[str, Any]) -> None:
        """The arguments passed through to the wrapped `__call__` exist there and are not ones the flow sets."""
        params = inspect.signature(pipeline_class.__call__).parameters
        accepted = {k for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
        for name in inpaint_kwargs:
            if name in _RESERVED_INPAINT_KWARGS:
                raise ValueError(f"`{name}` is set by the repair flow: {_RESERVED_INPAINT_KWARGS[name]}")
            if name not in accepted:
                others = sorted(
                    accepted - set(_RESERVED_INPAINT_KWARGS) - set(inspect.signature(self.__call__).parameters)
                )
                raise ValueError(
                    f"`{name}` is not an argument of {pipeline_class.__name__}.__call__, which generates the "
                    f"candidates of {type(self).__name__}; besides the repair arguments it takes {others}"
                )

    # ----------------------------------------------------------------------------------------------------------------
    # Memory: the VAE decodes the K candidates at once; slicing decodes them one by one, tiling in overlapping tiles.

    def enable_vae_slicing(self) -> None:
        """Decode the K candidates one at a time (`vae.enable_slicing()`), for less memory at large K."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Encode and decode in overlapping tiles (`vae.enable_tiling()`), for less memory at large sizes."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

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
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **inpaint_kwargs: Any,
    ) -> RAHFInpaintPipelineOutput | tuple:
        r"""
        Repairs `image`: RAHF heatmap -> mask -> `num_candidates` inpaintings in one call of the wrapped inpainting
        pipeline -> the input pasted back outside the mask -> RAHF rescoring -> the best.

        Args:
            prompt (`str`): the image's prompt; RAHF rates against it and the inpainter is conditioned on it.
            image (`PIL.Image.Image`, `np.ndarray` or path): the image to repair, any size and mode.
            heatmap (`str` or `np.ndarray`, *optional*, defaults to `"implausibility"`): which RAHF heatmap drives the
                mask (`"implausibility"` or `"misalignment"`), or your own (H, W) heat in [0, 1] at the image's size
                (a 0/1 mask works: any threshold below 1 keeps it).
            threshold (`float`, *optional*): heat level in [0, 1] above which pixels are repaired; overrides
                `mask_config` (default 40/255). 1.0 repairs nothing.
            dilation (`float`, *optional*): radius the mask grows by, as a fraction of the shorter side (default
                0.03); overrides `mask_config`.
            feather (`float`, *optional*): width of the blending seam inside the mask, a fraction of the shorter side
                (default 0.01); overrides `mask_config`.
            mask_config (`MaskConfig` or `dict`, *optional*): every mask option (quantile threshold, minimum area,
                dilation iterations, ...); defaults to `DEFAULT_MASK_CONFIG`.
            num_candidates (`int`, *optional*, defaults to 4): K, the candidates inpainted in one batched call.
            rescore_with (`str` or `dict[str, float]`, *optional*, defaults to `"plausibility"`): the RAHF score that
                ranks candidates, or weights over several (their weighted mean is used).
            strength (`float`, *optional*, defaults to 1.0): how much of the masked region is renoised (1.0: all).
            num_inference_steps (`int`, *optional*), guidance_scale (`float`, *optional*), negative_prompt (`str`,
                *optional*): passed to the wrapped pipeline; `None` keeps its own default.
            height (`int`, *optional*), width (`int`, *optional*): the generation size (multiples of
                `generation_multiple`); defaults to the input's size rounded to them. Candidates are resized back to
                the input's size.
            generator (`torch.Generator` or a list of K, *optional*): makes generation deterministic.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"` or `"np"` (floats in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`): return a [`RAHFInpaintPipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called at
                the end of each denoising step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`, where
                `pipe` is the wrapped inpainting pipeline (so callbacks written for it work as is).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed to the callback; any of
                `_callback_tensor_inputs`; defaults to `["latents"]`.
            **inpaint_kwargs: any other argument of the wrapped pipeline's `__call__` (`eta`, `clip_skip`,
                `cross_attention_kwargs`, `prompt_2`, `max_sequence_length`, `true_cfg_scale`, ...); an unknown name
                raises a ValueError listing the accepted ones.

        Examples:

        Returns:
            [`RAHFInpaintPipelineOutput`] or `tuple`: `(images, candidates, candidate_scores, original_score, heatmap,
            mask, repaired, scores)`.
        """
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Check inputs (the wrapped class depends on the denoiser, so it is checked first)
        self._check_denoiser()
        inpainter_class = self.inpaint_pipeline_class()
        if num_inference_steps is None:
            num_inference_steps = _call_default(inpainter_class, "num_inference_steps")
        passed = {"guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
        call_kwargs = {**{k: v for k, v in passed.items() if v is not None}, **inpaint_kwargs}
        self._check_inpaint_kwargs(inpainter_class, call_kwargs)
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

        # 4. Inpaint all K candidates in one batched call of the wrapped pipeline (steps 1-3 and 5-7: `_repair`)
        def generate(gen_image: PIL.Image.Image, gen_mask: np.ndarray) -> list[PIL.Image.Image]:
            return self.inpaint_pipeline()(
                prompt=prompt,
                image=gen_image,
                mask_image=PIL.Image.fromarray(gen_mask.astype(np.uint8) * 255),
                height=gen_size[1],
                width=gen_size[0],
                strength=strength,
                num_inference_steps=num_inference_steps,
                num_images_per_prompt=num_candidates,
                generator=generator,
                output_type="pil",
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                **call_kwargs,
            ).images

        return self._repair(prompt, image, heatmap, config, weights, gen_size, output_type, return_dict, generate)


class RAHFInpaintPipeline(RAHFLatentInpaintMixin, DiffusionPipeline):
    r"""
    Repairs what RAHF flags in an image with Stable Diffusion 1.x/2.x: predicts the implausibility (or misalignment)
    heatmap, thresholds and dilates it into a mask, inpaints K candidates in one batched Stable Diffusion inpainting
    call, pastes the input back outside the mask, rescores candidates and input with RAHF in one batch and returns the
    best (or the input when nothing beats it, or when the mask is empty).

    This model inherits from [`DiffusionPipeline`]; generation is [`StableDiffusionInpaintPipeline.__call__`] run on the
    same components (no copy of its denoising loop). The SDXL, SD3 and FLUX counterparts are
    `RAHFStableDiffusionXLInpaintPipeline`, `RAHFStableDiffusion3InpaintPipeline` and `RAHFFluxInpaintPipeline`;
    `AutoRAHFInpaintPipeline.from_pipe` picks the right one.

    Args:
        vae ([`AutoencoderKL`] or [`AsymmetricAutoencoderKL`]), text_encoder ([`~transformers.CLIPTextModel`]),
        tokenizer ([`~transformers.CLIPTokenizer`]), scheduler ([`SchedulerMixin`]):
            As in [`StableDiffusionInpaintPipeline`].
        unet ([`UNet2DConditionModel`]):
            An inpainting UNet (9 input channels: latents, mask, masked-image latents) or the UNet of any text-to-image
            checkpoint (4 channels), which inpaints by blending the input's latents in outside the mask.
        reward_model ([`rahf.RAHFModel`]):
            The trained RAHF model that predicts heatmaps and rescores candidates.
        reward_processor ([`rahf.RAHFProcessor`]):
            Its processor.
        safety_checker, feature_extractor, image_encoder (*optional*):
            As in [`StableDiffusionInpaintPipeline`].

    Examples:

    ```python
    >>> from PIL import Image
    >>> from rahf.pipelines.rahf_inpaint import RAHFInpaintPipeline
    >>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor, tiny_sd_inpaint_pipeline
    >>> pipe = RAHFInpaintPipeline.from_pipe(
    ...     tiny_sd_inpaint_pipeline(), reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor()
    ... )
    >>> out = pipe("a red cat", image=Image.new("RGB", (32, 32)), threshold=0.5, num_inference_steps=2)
    >>> out.repaired, out.mask.shape
    ```
    """

    # The reward model is left out of the offload chain: it stays on the accelerator (it runs before the text encoder
    # and after the VAE, so offloading it would move it twice per call).
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker", "reward_model"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents"]
    _inpaint_pipeline_cls = StableDiffusionInpaintPipeline

    def __init__(
        self,
        vae: AutoencoderKL | AsymmetricAutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        reward_model: RAHFModel,
        reward_processor: RAHFProcessor,
        safety_checker: torch.nn.Module | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            reward_model=reward_model,
            reward_processor=reward_processor,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8

    def _inpaint_pipeline_kwargs(self) -> dict[str, Any]:
        return {"requires_safety_checker": False}  # the check ran (or not) when this pipeline was built

    @property
    def generation_multiple(self) -> int:
        """Generation sizes are rounded to multiples of this (8, or the VAE's factor when larger)."""
        return max(8, self.vae_scale_factor)

    def _check_denoiser(self) -> None:
        check_unet_channels(self.unet, self.vae)


def check_unet_channels(unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
    """A UNet inpaints with 2 * latent + 1 input channels (latents, mask, masked-image latents) or, as a text-to-image
    UNet with as many channels as the latents, by the noised input's latents blended in outside the mask at every
    step (Stable Diffusion and SDXL alike); anything else raises a ValueError naming `unet`."""
    in_channels, latent_channels = unet.config.in_channels, vae.config.latent_channels
    if in_channels not in (2 * latent_channels + 1, latent_channels):
        raise ValueError(
            f"`unet` must be a text-to-image UNet ({latent_channels} input channels) or an inpainting UNet "
            f"({2 * latent_channels + 1}: latents, mask, masked-image latents), got in_channels={in_channels}"
        )
