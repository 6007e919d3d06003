"""`RichFeedbackPredictor`: one-call inference: images + prompts -> scores, heatmaps and misaligned words."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .configuration_rahf import KEYWORDS_TASK
from .image_io import max_image_pixels as resolve_max_image_pixels
from .keywords import split_prompt_words
from .modeling_rahf import RAHFModel
from .pretrained_paths import resolve_pretrained_path
from .processing_rahf import ImageInput, RAHFProcessor, check_prompts, load_image

logger = logging.getLogger(__name__)

OUTPUT_GROUPS = ("scores", "heatmaps", "keywords")


@dataclass
class RichFeedback:
    """Rich feedback on one image.

    Attributes:
        prompt: the prompt the image was rated against.
        scores: score name -> value in [0, 1] (higher is better).
        heatmaps: heatmap name -> float32 (H, W) array in [0, 1] at the input image's size.
        misaligned_words: the prompt words the model marks as not shown in the image.
        misaligned_word_indices: their indices in `rahf.split_prompt_words(prompt)`.
    """

    prompt: str
    scores: dict[str, float] = field(default_factory=dict)
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    misaligned_words: list[str] = field(default_factory=list)
    misaligned_word_indices: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (heatmaps left out: they are pictures)."""
        return {
            "prompt": self.prompt,
            "scores": {k: float(v) for k, v in self.scores.items()},
            "misaligned_words": list(self.misaligned_words),
            "misaligned_word_indices": list(self.misaligned_word_indices),
        }


def as_image_prompt_lists(
    images: Sequence[ImageInput] | ImageInput, prompts: Sequence[str] | str
) -> tuple[list, list[str]]:
    """One image or a sequence, and one prompt (for every image) or one per image -> two lists of the same length."""
    if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, bytes)):
        images = [images]
    images = list(images)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images and {len(prompts)} prompts: pass one prompt, or one per image")
    return images, prompts


def fill_feedback(
    results: Sequence[RichFeedback],
    images: Sequence[Image.Image],
    scores: np.ndarray | None,
    heatmaps: torch.Tensor | None,
    config,
    want_scores: Container[str],
    want_heatmaps: Container[str],
) -> None:
    """Writes a batch's outputs into each image's `RichFeedback`: the wanted `config.score_names` from `scores`
    (B, num_scores), and the wanted `config.heatmap_names` from `heatmaps` (B, num_heatmaps, S, S), each resized
    bilinearly to its image's (H, W) and clamped to [0, 1] as float32."""
    for i, (feedback, image) in enumerate(zip(results, images)):
        for j, name in enumerate(config.score_names):
            if name in want_scores:
                feedback.scores[name] = float(scores[i, j])
        for j, name in enumerate(config.heatmap_names):
            if name in want_heatmaps:
                resized = F.interpolate(
                    heatmaps[i : i + 1, j : j + 1],
                    size=(image.height, image.width),
                    mode="bilinear",
                    align_corners=False,
                )
                feedback.heatmaps[name] = resized[0, 0].clamp(0, 1).cpu().numpy().astype(np.float32)


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    """`batch_size` as an int >= 1, else a ValueError that names it (bools and floats are refused)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`{name}` must be an int >= 1 (images per forward pass), got {batch_size!r}; pass e.g. 8")
    return batch_size


def _check_model_and_processor(model: RAHFModel, processor: RAHFProcessor) -> None:
    """A processor saved for another model would feed it images or task rows it was not built for. What a
    processor-like object does not say (a stand-in in tests) is not compared."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "task_names"):
        raise ValueError(f"`model` must be a RAHFModel, got a {type(model).__name__}")
    missing = object()
    mismatches = []
    for name in ("image_size", "variant", "task_names"):
        mine, theirs = getattr(processor, name, missing), getattr(config, name)
        if mine is not missing and (list(mine) if name == "task_names" else mine) != theirs:
            mismatches.append(f"{name} {mine!r} vs the model's {theirs!r}")
    if mismatches:
        raise ValueError(
            f"the processor does not match the model ({'; '.join(mismatches)}); save the model's own processor with "
            "RAHFProcessor.from_config(model.config).save_pretrained(dir)"
        )


class RichFeedbackPredictor:
    r"""
    Runs a trained RAHF model on images of any size: scores, heatmaps (at each image's own size) and misaligned words.

    The vision tower runs once per image however many outputs are asked for; in the augmented-prompt variant the
    task prompts of a batch go through the T5 encoder together. Keywords are decoded greedily, or at a marker
    threshold: `keyword_threshold` here, else the model's `config.keyword_threshold` (see [`RAHFConfig`]).

    Examples:

    ```python
    >>> from rahf import RichFeedbackPredictor
    >>> predictor = RichFeedbackPredictor.from_pretrained("demo-output/models/rahf_multi_head")
    >>> [feedback] = predictor(["cat.png"], ["a cat on a wooden table"])
    >>> feedback.scores["plausibility"], feedback.heatmaps["implausibility"].shape, feedback.misaligned_words
    ```
    """

    def __init__(
        self,
        model: RAHFModel,
        processor: RAHFProcessor,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        keyword_threshold: float | None = None,
        max_image_pixels: int | None = None,
    ):
        _check_model_and_processor(model, processor)
        self.batch_size = check_batch_size(batch_size)
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise ValueError(
                f"`max_new_tokens` must be None (the model's max_target_length) or an int >= 1, got {max_new_tokens!r}"
            )
        if keyword_threshold is not None and (
            isinstance(keyword_threshold, bool)
            or not isinstance(keyword_threshold, (int, float))
            or not 0.0 < keyword_threshold < 1.0
        ):
            raise ValueError(
                f"`keyword_threshold` must be None (the model's own setting) or a probability in (0, 1), got "
                f"{keyword_threshold!r}"
            )
        # None: the cap in force when images are read (RAHF_MAX_IMAGE_PIXELS, else 40 MP); checked now all the same.
        if max_image_pixels is not None:
            max_image_pixels = resolve_max_image_pixels(max_image_pixels)
        self.max_image_pixels = max_image_pixels
        self.model = model.eval()
        self.processor = processor
        # None: the model's own setting (config.keyword_threshold; None there = greedy decoding)
        self.keyword_threshold = keyword_threshold
        if device is not None:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls,
        pretrained_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> RichFeedbackPredictor:
        """Loads the model (safetensors) and its processor from a local folder written by `save_pretrained`.

        `kwargs` (e.g. `batch_size`, `max_image_pixels`) go to the constructor. The folder must exist: a missing one
        is a ValueError, never a model-hub lookup.
        """
        folder = resolve_pretrained_path(
            pretrained_path, "pretrained_path", what="a saved model folder", allow_hub=False
        )
        # Checked before anything loads, so that a bad argument or folder costs no load; the model's config.json
        # first, as the tokenizer reads it too.
        if "batch_size" in kwargs:
            check_batch_size(kwargs["batch_size"])
        RAHFModel.check_pretrained_folder(folder, "pretrained_path")
        processor = RAHFProcessor.from_pretrained(folder)
        model = RAHFModel.from_pretrained(folder, dtype=dtype) if dtype else RAHFModel.from_pretrained(folder)
        return cls(model, processor, device=device, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _resolve_outputs(self, outputs: Iterable[str] | None) -> list[str]:
        cfg = self.model.config
        if outputs is None:
            return list(cfg.task_names)
        if isinstance(outputs, str):
            outputs = [outputs]
        tasks: list[str] = []
        for name in outputs:
            if name == "scores":
                tasks += cfg.score_names
            elif name == "heatmaps":
                tasks += cfg.heatmap_names
            elif name in cfg.task_names:
                tasks.append(name)
            else:
                raise ValueError(
                    f"unknown output {name!r}; ask for any of {list(OUTPUT_GROUPS)} or of the tasks {cfg.task_names}"
                )
        return [t for t in cfg.task_names if t in set(tasks)]  # model order, no duplicates

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput,
        prompts: Sequence[str] | str,
        outputs: Iterable[str] | None = None,
        show_progress: bool = False,
    ) -> list[RichFeedback]:
        """Rates `images` against `prompts` (one prompt per image, or one for all).

        Args:
            outputs: which outputs to compute: any of `"scores"`, `"heatmaps"`, `"keywords"` or task names such as
                `"plausibility"`; all by default.
        """
        images, prompts = as_image_prompt_lists(images, prompts)
        check_prompts(prompts)  # all of them, before any batch runs
        tasks = self._resolve_outputs(outputs)
        # Read at call time, so that a batch_size set after construction is checked too.
        batch_size = check_batch_size(self.batch_size)
        results: list[RichFeedback] = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="RAHF", disable=not show_progress):
            batch = images[start : start + batch_size]
            batch_images = [load_image(im, max_pixels=self.max_image_pixels) for im in batch]
            results += self._predict_batch(batch_images, prompts[start : start + batch_size], tasks)
        return results

    def _keyword_decoding(self) -> dict[str, Any]:
        threshold = (
            self.keyword_threshold if self.keyword_threshold is not None else self.model.config.keyword_threshold
        )
        if threshold is None:
            return {}
        return {"keyword_threshold": threshold, "marker_token_id": self.processor.marker_token_id}

    def _predict_batch(self, images: list[Image.Image], prompts: list[str], tasks: list[str]) -> list[RichFeedback]:
        cfg = self.model.config
        device = self.device
        dtype = next(self.model.parameters()).dtype
        pixel_values = self.processor.preprocess_images(images, max_image_pixels=self.max_image_pixels)
        pixel_values = pixel_values.to(device, dtype)
        image_embeds = self.model.get_image_features(pixel_values)  # (B, N, d): the only vision-tower call

        results = [RichFeedback(prompt=p) for p in prompts]
        dense_tasks = [t for t in tasks if t != KEYWORDS_TASK]
        fused = None
        if dense_tasks:
            enc = self.processor.encode_prompts(prompts, tasks=dense_tasks)
            enc = {k: v.to(device) for k, v in enc.items()}
            if cfg.variant == "multi_head" and KEYWORDS_TASK in tasks:
                # One fusion pass for both: multi-head rows are the same prompts for scores, heatmaps and keywords.
                fused, _ = self.model.fuse(image_embeds[enc["image_index"]], enc["input_ids"], enc["attention_mask"])
            out = self.model(image_embeds=image_embeds, fused_hidden_states=fused, **enc)
            heatmaps = out.heatmaps.float()  # (B, H, S, S)
            scores = out.scores.float().cpu().numpy()  # (B, num_scores)
            fill_feedback(results, images, scores, heatmaps, cfg, dense_tasks, dense_tasks)
        if KEYWORDS_TASK in tasks:
            enc = self.processor.encode_prompts(prompts, tasks=[KEYWORDS_TASK])
            sequences = self.model.generate_keywords(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                image_embeds=image_embeds,
                image_index=enc["image_index"].to(device),
                fused_hidden_states=fused,
                max_new_tokens=self.max_new_tokens,
                **self._keyword_decoding(),
            )
            for feedback, indices in zip(results, self.processor.decode_keywords(sequences, prompts)):
                words = split_prompt_words(feedback.prompt)
                feedback.misaligned_word_indices = indices
                feedback.misaligned_words = [words[k] for k in indices]
        return results


__all__ = [
    "EXAMPLE_IMAGE",
    "EXAMPLE_PROMPT",
    "RichFeedback",
    "RichFeedbackPredictor",
    "as_image_prompt_lists",
    "check_batch_size",
    "fill_feedback",
    "predict_to_folder",
]


# --------------------------------------------------------------------------------------------------------------------
# Folders of feedback (`rahf predict`)

# An example input that ships with rahf (the demo rates it).
EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"
EXAMPLE_PROMPT = "a red circle above a blue square on a wooden table"


def predict_to_folder(
    model: str,
    images: list[str],
    prompts: list[str],
    out: str,
    device: str | None = None,
    batch_size: int = 8,
    max_image_pixels: int | None = None,
) -> list[dict]:
    """Runs the predictor and writes, per image, `feedback.json`, the two heatmap PNGs and `overlay.png`.

    Every argument is checked before the model loads; images above `max_image_pixels` pixels (default: 40 MP, or
    `RAHF_MAX_IMAGE_PIXELS`) are refused from their header, before they are decoded.
    """
    from .image_io import ImageTooLargeError
    from .image_io import max_image_pixels as resolve_max_image_pixels
    from .pretrained_paths import resolve_pretrained_path
    from .processing_rahf import check_prompts
    from .viz import heatmap_to_image, overlay_heatmaps

    check_batch_size(batch_size, "--batch_size")
    cap = resolve_max_image_pixels(max_image_pixels)
    folder = resolve_pretrained_path(model, "--model", what="a saved model folder", allow_hub=False)
    if not images:
        raise ValueError("no --image given: pass at least one image file")
    if len(prompts) not in (1, len(images)):
        raise ValueError(
            f"got {len(images)} images and {len(prompts)} --prompt values: give one prompt for all images, or one "
            "per image"
        )
    try:
        check_prompts(prompts)
    except ValueError as err:
        raise ValueError(f"--prompt: {err}") from None
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"`--out` {out!r} is a file; pass a folder (each image gets OUT/<stem>/)")
    stems = [Path(p).stem for p in images]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--image names must have distinct stems (each gets a folder OUT/<stem>/), got {stems}")
    try:
        loaded = [load_image(p, max_pixels=cap) for p in images]  # fails early, naming the file that is not an image
    except ImageTooLargeError as err:
        raise ImageTooLargeError(f"{err} (here: --max_image_pixels N)") from None
    predictor = RichFeedbackPredictor.from_pretrained(
        folder, device=device, batch_size=batch_size, max_image_pixels=cap
    )
    feedbacks = predictor(loaded, prompts, show_progress=len(images) > batch_size)
    summaries = []
    for stem, image, feedback in zip(stems, loaded, feedbacks):
        folder = Path(out) / stem
        folder.mkdir(parents=True, exist_ok=True)
        summary = feedback.to_dict()
        (folder / "feedback.json").write_text(json.dumps(summary, indent=2) + "\n")
        for name, heat in feedback.heatmaps.items():
            heatmap_to_image(heat).save(folder / f"{name}.png")
        overlay_heatmaps(image, feedback.heatmaps).save(folder / "overlay.png")
        summaries.append(summary)
    logger.info("wrote feedback on %d image(s) to %s", len(images), out)
    return summaries
