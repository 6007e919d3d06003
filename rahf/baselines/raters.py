"""The raters: [`BaselineRater`] (a trained baseline), [`CLIPRater`] (off-the-shelf CLIP score, PickScore and CLIP
gradient) and [`CenterPriorRater`] (the floor), each with `RichFeedbackPredictor`'s interface, and what they share:
which outputs to compute, what a rater produces, heatmaps resized to an image."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, PreTrainedModel

from ..configuration_rahf import DEFAULT_HEATMAP_NAMES, DEFAULT_SCORE_NAMES, KEYWORDS_TASK
from ..modeling_rahf import check_safetensors_folder
from ..predictor import RichFeedback, as_image_prompt_lists, fill_feedback
from ..pretrained_paths import resolve_pretrained_path
from ..processing_rahf import ImageInput, load_image
from .build import TRAINABLE_CLASSES
from .clip import tiny_clip_config
from .processing import BaselineProcessor, clip_processor

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MODES",
    "BaselineRater",
    "CLIPRater",
    "CenterPriorRater",
    "rater_capabilities",
    "resize_map",
    "resolve_outputs",
    "saved_model_type",
]

CLIP_MODES = ("clip_score", "pickscore", "clip_gradient")


def resolve_outputs(outputs: Iterable[str] | str | None, capabilities: dict) -> tuple[set[str], set[str], bool]:
    """`outputs` (None, groups or names) -> (score names, heatmap names, keywords) this rater should compute."""
    scores, heatmaps = list(capabilities["scores"]), list(capabilities["heatmaps"])
    if outputs is None:
        return set(scores), set(heatmaps), bool(capabilities["keywords"])
    if isinstance(outputs, str):
        outputs = [outputs]
    want_s, want_h, want_k = set(), set(), False
    known = ["scores", "heatmaps", KEYWORDS_TASK, *DEFAULT_SCORE_NAMES, *DEFAULT_HEATMAP_NAMES, *scores, *heatmaps]
    for name in outputs:
        if name == "scores":
            want_s |= set(scores)
        elif name == "heatmaps":
            want_h |= set(heatmaps)
        elif name == KEYWORDS_TASK:
            want_k = bool(capabilities["keywords"])
        elif name in known:  # a known output this rater cannot produce is simply absent
            want_s |= {name} & set(scores)
            want_h |= {name} & set(heatmaps)
        else:
            raise ValueError(f"unknown output {name!r}; ask for any of {sorted(set(known))}")
    return want_s, want_h, want_k


def rater_capabilities(rater: Any) -> dict | None:
    """`{"scores": [...], "heatmaps": [...], "keywords": bool}`: what `rater` produces, or None when it cannot say.

    Baselines have a `capabilities` attribute; a `RichFeedbackPredictor` is read from its model's config.
    """
    caps = getattr(rater, "capabilities", None)
    if isinstance(caps, dict):
        return {
            "scores": list(caps.get("scores", [])),
            "heatmaps": list(caps.get("heatmaps", [])),
            "keywords": bool(caps.get("keywords", False)),
        }
    config = getattr(getattr(rater, "model", None), "config", None)
    if config is not None and hasattr(config, "score_names") and hasattr(config, "heatmap_names"):
        tasks = getattr(config, "task_names", [])
        return {
            "scores": list(config.score_names),
            "heatmaps": list(config.heatmap_names),
            "keywords": KEYWORDS_TASK in tasks,
        }
    return None


def resize_map(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A heatmap (float32) at `height` x `width`: area-averaged when it shrinks, bilinear when it grows."""
    if heat.shape == (height, width):
        return heat.astype(np.float32, copy=False)
    shrink = height <= heat.shape[0] and width <= heat.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(heat.astype(np.float32, copy=False), (width, height), interpolation=interpolation)


def saved_model_type(folder: Path) -> str | None:
    """config.json's `model_type` in a saved folder (None when it has none); unreadable JSON is a ValueError."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(folder)!r} has no config.json; pass a folder written by `save_pretrained`")
    try:
        data = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({err}); save the model again") from None
    return data.get("model_type") if isinstance(data, dict) else None


class BaselineRater:
    r"""
    Rates images with a trainable baseline ([`RAHFResNetModel`], [`RAHFCLIPModel`]) and its [`BaselineProcessor`]:
    the interface of `RichFeedbackPredictor`, heatmaps at each input image's size.

    Examples:

    ```python
    >>> from rahf.baselines import BaselineRater
    >>> rater = BaselineRater.from_pretrained("runs/resnet50/final")
    >>> [feedback] = rater(["cat.png"], ["a cat"])
    >>> feedback.scores["plausibility"], feedback.heatmaps["implausibility"].shape
    ```
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: BaselineProcessor,
        device: str | torch.device | None = None,
        batch_size: int = 8,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        if device is not None:
            self.model.to(device)
        self.batch_size = int(batch_size)

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, **kwargs: Any) -> BaselineRater:
        """Loads a trainable baseline (safetensors only, never unpickled) and its processor from a local folder."""
        folder = resolve_pretrained_path(pretrained_path, "pretrained_path", allow_hub=False)
        check_safetensors_folder(folder)
        model_type = saved_model_type(Path(folder))
        classes = {config_cls.model_type: model_cls for config_cls, model_cls in TRAINABLE_CLASSES.values()}
        if model_type not in classes:
            raise ValueError(
                f"{str(pretrained_path)!r} holds a {model_type!r} model, not a trainable baseline ({sorted(classes)})"
            )
        model = classes[model_type].from_pretrained(folder)
        return cls(model, BaselineProcessor.from_pretrained(folder), **kwargs)

    @property
    def capabilities(self) -> dict:
        cfg = self.model.config
        return {"scores": list(cfg.score_names), "heatmaps": list(cfg.heatmap_names), "keywords": False}

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput,
        prompts: Sequence[str] | str,
        outputs: Iterable[str] | None = None,
        show_progress: bool = False,
    ) -> list[RichFeedback]:
        images, prompts = as_image_prompt_lists(images, prompts)
        want_s, want_h, _ = resolve_outputs(outputs, self.capabilities)
        cfg = self.model.config
        device = next(self.model.parameters()).device
        results: list[RichFeedback] = []
        for start in tqdm(range(0, len(images), self.batch_size), desc=cfg.model_type, disable=not show_progress):
            batch_images = [load_image(im) for im in images[start : start + self.batch_size]]
            batch_prompts = prompts[start : start + self.batch_size]
            enc = self.processor(images=batch_images, text=batch_prompts)
            out = self.model(**{k: v.to(device) for k, v in enc.items()})
            scores = out.scores.float().cpu().numpy() if out.scores is not None else None
            heatmaps = out.heatmaps.float() if out.heatmaps is not None else None
            batch_results = [RichFeedback(prompt=prompt) for prompt in batch_prompts]
            fill_feedback(batch_results, batch_images, scores, heatmaps, cfg, want_s, want_h)
            results += batch_results
        return results


class CLIPRater:
    r"""
    Off-the-shelf CLIP baselines, from one CLIP model:

    - `mode="clip_score"`: the cosine of the image and text embeddings as the `alignment` score (Table 1, "CLIP
      (off-the-shelf)");
    - `mode="pickscore"`: a PickScore checkpoint (a `CLIPModel`): `exp(logit_scale) * cosine`, PickScore's own
      score, reported against every score column as in the paper's Table 1 (its scale is PickScore's, not [0, 1]:
      only the correlations mean something);
    - `mode="clip_gradient"`: the `misalignment` heatmap `abs(d cosine / d pixels)`, max over colour channels,
      Gaussian-smoothed and min-max normalised to [0, 1] at the image's size (Table 3, "CLIP gradient").

    Images are squashed to CLIP's input square for the gradient map (so the map covers the whole image) and
    preprocessed as the checkpoint's image processor says (short-side resize and centre crop) for the scores.

    Examples:

    ```python
    >>> from rahf.baselines import CLIPRater
    >>> rater = CLIPRater.from_pretrained("openai/clip-vit-large-patch14", mode="clip_gradient")
    >>> [feedback] = rater(["cat.png"], ["a cat on a wooden table"])
    >>> feedback.heatmaps["misalignment"].shape  # the image's (H, W)
    ```
    """

    def __init__(
        self,
        model: CLIPModel,
        processor: BaselineProcessor,
        mode: str = "clip_score",
        device: str | torch.device | None = None,
        batch_size: int = 8,
        smoothing_sigma: float = 0.02,
        score_names: Sequence[str] | None = None,
    ) -> None:
        if mode not in CLIP_MODES:
            raise ValueError(f"`mode` must be one of {list(CLIP_MODES)}, got {mode!r}")
        if processor.tokenizer is None:
            raise ValueError("CLIP raters need a processor with a tokenizer (CLIP's own, or the offline one)")
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.processor = processor
        self.mode = mode
        self.batch_size = int(batch_size)
        self.smoothing_sigma = float(smoothing_sigma)
        if score_names is None:
            score_names = {"clip_score": ["alignment"], "pickscore": list(DEFAULT_SCORE_NAMES)}.get(mode, [])
        self.score_names = list(score_names)
        self.heatmap_names = ["misalignment"] if mode == "clip_gradient" else []

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        mode: str = "clip_score",
        processor_name_or_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> CLIPRater:
        """Loads a `CLIPModel` checkpoint (hub id or folder) with the tokenizer and image statistics of
        `processor_name_or_path` (default: the checkpoint itself; PickScore's is
        `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`)."""
        model = CLIPModel.from_pretrained(pretrained_model_name_or_path, use_safetensors=True)
        processor = clip_processor(model.config, str(processor_name_or_path or pretrained_model_name_or_path))
        return cls(model, processor, mode=mode, **kwargs)

    @classmethod
    def from_config(
        cls, config: CLIPConfig | None = None, mode: str = "clip_score", seed: int = 0, **kwargs: Any
    ) -> CLIPRater:
        """A random CLIP (the tiny offline one by default) with the offline tokenizer, for tests and offline demos."""
        config = config or tiny_clip_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        return cls(model, clip_processor(config, None), mode=mode, **kwargs)

    @property
    def capabilities(self) -> dict:
        return {"scores": list(self.score_names), "heatmaps": list(self.heatmap_names), "keywords": False}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cosine(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image = self.model.get_image_features(pixel_values=pixel_values).pooler_output  # (B, P)
        text = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)  # (B,)

    @torch.enable_grad()
    def gradient_maps(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[np.ndarray]:
        """`abs(d cosine / d pixels)`, max over channels, smoothed, at each image's size, min-max normalised."""
        squash = BaselineProcessor(
            self.processor.image_size,
            self.processor.image_mean,
            self.processor.image_std,
            tokenizer=self.processor.tokenizer,
            max_text_length=self.processor.max_text_length,
            resize_mode="squash",
        )
        enc = {k: v.to(self.device) for k, v in squash(images=list(images), text=list(prompts)).items()}
        pixel_values = enc["pixel_values"].detach().requires_grad_(True)
        cosine = self._cosine(pixel_values, enc["input_ids"], enc["attention_mask"])
        # Samples do not interact in CLIP, so the gradient of the sum is each sample's own gradient.
        (grad,) = torch.autograd.grad(cosine.sum(), pixel_values)
        saliency = grad.abs().amax(dim=1).float().cpu().numpy()  # (B, h, w)
        maps = []
        for sal, image in zip(saliency, images):
            if self.smoothing_sigma > 0:
                sal = gaussian_filter(sal, sigma=self.smoothing_sigma * max(sal.shape))
            sal = resize_map(sal, image.height, image.width)
            lo, hi = float(sal.min()), float(sal.max())
            sal = (sal - lo) / (hi - lo) if hi > lo else np.zeros_like(sal)
            maps.append(sal.astype(np.float32))
        return maps

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """The cosine (`clip_score`) or `exp(logit_scale) * cosine` (`pickscore`) of each (image, prompt): (B,)."""
        enc = {k: v.to(self.device) for k, v in self.processor(images=list(images), text=list(prompts)).items()}
        cosine = self._cosine(enc["pixel_values"], enc["input_ids"], enc["attention_mask"])
        if self.mode == "pickscore":
            cosine = self.model.logit_scale.exp() * cosine
        return cosine.float().cpu().numpy()

    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput,
        prompts: Sequence[str] | str,
        outputs: Iterable[str] | None = None,
        show_progress: bool = False,
    ) -> list[RichFeedback]:
        images, prompts = as_image_prompt_lists(images, prompts)
        want_s, want_h, _ = resolve_outputs(outputs, self.capabilities)
        results: list[RichFeedback] = []
        for start in tqdm(range(0, len(images), self.batch_size), desc=self.mode, disable=not show_progress):
            batch_images = [load_image(im) for im in images[start : start + self.batch_size]]
            batch_prompts = prompts[start : start + self.batch_size]
            batch = [RichFeedback(prompt=p) for p in batch_prompts]
            if want_s:
                values = self.scores(batch_images, batch_prompts)
                for feedback, value in zip(batch, values):
                    feedback.scores = {name: float(value) for name in self.score_names if name in want_s}
            if want_h:
                for feedback, heat in zip(batch, self.gradient_maps(batch_images, batch_prompts)):
                    feedback.heatmaps = {name: heat for name in self.heatmap_names if name in want_h}
            results += batch
        return results


class CenterPriorRater:
    r"""
    The floor of the heatmap tables: the same centred Gaussian for every image and heatmap, no scores, no keywords.

    Args:
        sigma (`float`, *optional*, defaults to 0.25): the Gaussian's standard deviation, as a fraction of each side.
        peak (`float` or `dict[str, float]`, *optional*, defaults to 1.0): its value at the centre (per heatmap when a
            dict). Only MSE depends on it (CC, KLD, SIM, NSS and AUC-Judd are scale-free); [`~CenterPriorRater.fit`]
            picks the least-squares peak on training maps, so that its MSE is a fair floor too.
        heatmap_names (`list[str]`, *optional*): defaults to `["implausibility", "misalignment"]`.

    Examples:

    ```python
    >>> from rahf.baselines import CenterPriorRater
    >>> rater = CenterPriorRater().fit(dataset["train"])
    >>> rater([image], ["a cat"])[0].heatmaps["implausibility"].max()
    ```
    """

    def __init__(
        self,
        sigma: float = 0.25,
        peak: float | dict[str, float] = 1.0,
        heatmap_names: Sequence[str] | None = None,
    ) -> None:
        if not sigma > 0:
            raise ValueError(f"`sigma` must be positive (a fraction of the image side, e.g. 0.25), got {sigma!r}")
        self.sigma = float(sigma)
        self.heatmap_names = list(heatmap_names or DEFAULT_HEATMAP_NAMES)
        peaks = peak if isinstance(peak, dict) else {name: peak for name in self.heatmap_names}
        self.peak = {name: float(peaks.get(name, 1.0)) for name in self.heatmap_names}

    @property
    def capabilities(self) -> dict:
        return {"scores": [], "heatmaps": list(self.heatmap_names), "keywords": False}

    def gaussian(self, height: int, width: int) -> np.ndarray:
        """The unit-peak centred Gaussian, (height, width) float32."""
        y = (np.arange(height, dtype=np.float64) + 0.5) / height - 0.5
        x = (np.arange(width, dtype=np.float64) + 0.5) / width - 0.5
        g = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * self.sigma**2))
        return g.astype(np.float32)

    def fit(self, split: Dataset, max_examples: int = 256) -> CenterPriorRater:
        """Sets each heatmap's peak to the least-squares fit `sum(G * g) / sum(g * g)` over (up to `max_examples`)
        ground-truth maps of a canonical split (columns `<name>_map`); returns self."""
        n = min(len(split), max_examples)
        if n == 0:
            raise ValueError("`split` is empty: nothing to fit the centre prior's peak on")
        for name in self.heatmap_names:
            column = f"{name}_map"
            if column not in split.column_names:
                raise ValueError(f"`split` has no column {column!r} to fit the {name!r} peak on")
            num = den = 0.0
            for image in split.select(range(n))[column]:
                gt = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
                g = self.gaussian(*gt.shape).astype(np.float64)
                num += float((gt * g).sum())
                den += float((g * g).sum())
            self.peak[name] = max(num / den, 0.0) if den > 0 else 0.0
        logger.info("centre prior peaks fitted on %d maps: %s", n, {k: round(v, 4) for k, v in self.peak.items()})
        return self

    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput,
        prompts: Sequence[str] | str,
        outputs: Iterable[str] | None = None,
        show_progress: bool = False,
    ) -> list[RichFeedback]:
        images, prompts = as_image_prompt_lists(images, prompts)
        _, want_h, _ = resolve_outputs(outputs, self.capabilities)
        results = []
        for image, prompt in zip(images, prompts):
            width, height = image.size if isinstance(image, Image.Image) else load_image(image).size
            g = self.gaussian(height, width)
            heatmaps = {
                name: np.clip(self.peak[name] * g, 0.0, 1.0).astype(np.float32)
                for name in self.heatmap_names
                if name in want_h
            }
            results.append(RichFeedback(prompt=prompt, heatmaps=heatmaps))
        return results
