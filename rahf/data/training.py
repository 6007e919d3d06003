"""Training input over the canonical data set: a torch `Dataset` with the augmentations of REFERENCE.md.

Augmentations (each with its probability, applied in this order, all with PIL/numpy):
- random crop keeping 80-100% of each side (p 0.5), the same box, in relative coordinates, for image and heatmaps;
- light colour jitter: brightness, contrast and saturation factors in [0.9, 1.1] (p 0.1);
- JPEG re-encoding at quality 70-100 (p 0.1);
- greyscale, converted back to 3 channels (p 0.1).

The random draws depend only on (seed, epoch, index), so a resumed run, or any worker layout, sees the same
augmentations: call `set_epoch(epoch)` at the start of each epoch (with `persistent_workers=True` in a `DataLoader`,
the workers keep the epoch they were started with; use non-persistent workers, or a sampler-driven epoch).

Examples:
    >>> from rahf.data.schema import load_rich_feedback
    >>> from rahf.data.training import RichFeedbackTorchDataset
    >>> train = RichFeedbackTorchDataset(load_rich_feedback("data/synth")["train"], heatmap_size=64, augment=True)
    >>> train.set_epoch(3)
    >>> item = train[0]
    >>> item["heatmaps"].shape, item["scores"].shape
    (torch.Size([2, 64, 64]), torch.Size([4]))
"""

from __future__ import annotations

import io
import logging
from typing import Any

import cv2
import numpy as np
import torch
from datasets import Dataset
from PIL import Image, ImageEnhance

from .schema import HEATMAP_COLUMNS, SCORE_NAMES

logger = logging.getLogger(__name__)

__all__ = ["RichFeedbackTorchDataset", "resize_heatmap"]


def resize_heatmap(heatmap: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float32 map -> (size, size): area averaging when shrinking (keeps thin marks' mass), else bilinear."""
    height, width = heatmap.shape
    if (height, width) == (size, size):
        return heatmap.astype(np.float32, copy=False)
    interpolation = cv2.INTER_AREA if size <= min(height, width) else cv2.INTER_LINEAR
    out = cv2.resize(heatmap.astype(np.float32, copy=False), (size, size), interpolation=interpolation)
    return np.clip(out, 0.0, 1.0)


def _crop_box(size: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """Relative (left, top, right, bottom) -> a pixel box of an image of `size` = (width, height), never empty."""
    width, height = size
    left, top, right, bottom = box
    x0, y0 = int(round(left * width)), int(round(top * height))
    x1, y1 = int(round(right * width)), int(round(bottom * height))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


class RichFeedbackTorchDataset(torch.utils.data.Dataset):
    """A split of the canonical data set as training items, with deterministic augmentation.

    Args:
        split (`datasets.Dataset`): one split with the canonical columns (`rahf.data.schema.FEATURES`).
        heatmap_size (`int`): side of the square heatmaps returned (the model's output heatmap size).
        augment (`bool`, *optional*, defaults to `False`): apply the augmentations below.
        seed (`int`, *optional*, defaults to 0): with the epoch and the index, fixes every random draw.
        crop_p (`float`, *optional*, defaults to 0.5): probability of a random crop.
        crop_min (`float`, *optional*, defaults to 0.8): smallest kept fraction of each side in a crop.
        color_jitter_p (`float`, *optional*, defaults to 0.1): probability of colour jitter.
        color_jitter (`float`, *optional*, defaults to 0.1): brightness/contrast/saturation factors in [1 - j, 1 + j].
        jpeg_p (`float`, *optional*, defaults to 0.1): probability of a JPEG re-encoding.
        jpeg_quality (`tuple[int, int]`, *optional*, defaults to (70, 100)): JPEG quality range, inclusive.
        grayscale_p (`float`, *optional*, defaults to 0.1): probability of greyscale (returned as 3 channels).

    Each item is a dict: `image` (PIL RGB, to be resized by the processor), `heatmaps` (float32 tensor
    (2, heatmap_size, heatmap_size) in [0, 1], implausibility then misalignment), `scores` (float32 tensor (4,) in
    `SCORE_NAMES` order), `prompt`, `prompt_words`, `word_labels`, `uid` and `sample_seed` (an int fixed by
    (seed, epoch, index), for the collator's own draws).

    Examples:
        >>> ds = RichFeedbackTorchDataset(split, heatmap_size=96, augment=True, seed=0)
        >>> ds.set_epoch(1)
        >>> ds[0]["heatmaps"].shape
        torch.Size([2, 96, 96])
    """

    def __init__(
        self,
        split: Dataset,
        heatmap_size: int,
        augment: bool = False,
        seed: int = 0,
        *,
        crop_p: float = 0.5,
        crop_min: float = 0.8,
        color_jitter_p: float = 0.1,
        color_jitter: float = 0.1,
        jpeg_p: float = 0.1,
        jpeg_quality: tuple[int, int] = (70, 100),
        grayscale_p: float = 0.1,
    ) -> None:
        if not isinstance(split, Dataset):
            raise ValueError(f"`split` must be a datasets.Dataset (one split), got {type(split).__name__}")
        needed = ["uid", "image", "prompt", *SCORE_NAMES, *HEATMAP_COLUMNS, "prompt_words", "word_labels"]
        missing = [column for column in needed if column not in split.column_names]
        if missing:
            raise ValueError(
                f"`split` lacks the column(s) {missing}; build it with rahf.data (see rahf.data.schema.FEATURES)"
            )
        if not isinstance(heatmap_size, int) or heatmap_size < 1:
            raise ValueError(f"`heatmap_size` must be a positive int (the model's heatmap side), got {heatmap_size!r}")
        for name, p in (("crop_p", crop_p), ("color_jitter_p", color_jitter_p), ("jpeg_p", jpeg_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1], got {p!r}")
        if not 0.0 <= grayscale_p <= 1.0:
            raise ValueError(f"`grayscale_p` must be a probability in [0, 1], got {grayscale_p!r}")
        if not 0.0 < crop_min <= 1.0:
            raise ValueError(f"`crop_min` must be in (0, 1], got {crop_min!r}; 0.8 keeps 80-100% of each side")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(
                f"`color_jitter` must be in [0, 1), got {color_jitter!r}; 0.1 means factors in [0.9, 1.1]"
            )
        low, high = jpeg_quality
        if not 1 <= low <= high <= 100:
            raise ValueError(f"`jpeg_quality` must be (low, high) with 1 <= low <= high <= 100, got {jpeg_quality!r}")
        self.split = split
        self.heatmap_size = heatmap_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.crop_p = crop_p
        self.crop_min = crop_min
        self.color_jitter_p = color_jitter_p
        self.color_jitter = color_jitter
        self.jpeg_p = jpeg_p
        self.jpeg_quality = (int(low), int(high))
        self.grayscale_p = grayscale_p

    def __len__(self) -> int:
        return len(self.split)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation draws of `epoch` (call it before each epoch, also after resuming)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item `index` in the current epoch: a function of (seed, epoch, index) only."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} records")
        row = self.split[index]
        image = row["image"].convert("RGB")
        maps = [np.asarray(row[column].convert("L"), dtype=np.float32) / 255.0 for column in HEATMAP_COLUMNS]
        if self.augment:
            image, maps = self._augment(image, maps, self.rng(index))
        heatmaps = np.stack([resize_heatmap(m, self.heatmap_size) for m in maps])
        return {
            "image": image,
            "heatmaps": torch.from_numpy(heatmaps),
            "scores": torch.tensor([row[name] for name in SCORE_NAMES], dtype=torch.float32),
            "prompt": row["prompt"],
            "prompt_words": list(row["prompt_words"]),
            "word_labels": list(row["word_labels"]),
            "uid": row["uid"],
            # Draws made after loading (e.g. which tasks of the augmented-prompt variant this step trains) take
            # their own generator from this seed, a function of (seed, epoch, index) too.
            "sample_seed": int(np.random.default_rng([self.seed, self.epoch, index, 1]).integers(2**62)),
        }

    def _augment(
        self, image: Image.Image, maps: list[np.ndarray], rng: np.random.Generator
    ) -> tuple[Image.Image, list[np.ndarray]]:
        # Every draw happens whatever the coin flips give, so the draws of one augmentation never shift another's.
        do_crop, do_jitter, do_jpeg, do_gray = rng.random(4) < (
            self.crop_p,
            self.color_jitter_p,
            self.jpeg_p,
            self.grayscale_p,
        )
        keep_w, keep_h = rng.uniform(self.crop_min, 1.0, size=2)
        left, top = rng.uniform(0.0, 1.0, size=2) * (1.0 - keep_w, 1.0 - keep_h)
        factors = rng.uniform(1.0 - self.color_jitter, 1.0 + self.color_jitter, size=3)
        quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        if do_crop:
            box = (left, top, left + keep_w, top + keep_h)
            image = image.crop(_crop_box(image.size, box))
            cropped = []
            for heatmap in maps:
                x0, y0, x1, y1 = _crop_box((heatmap.shape[1], heatmap.shape[0]), box)
                cropped.append(heatmap[y0:y1, x0:x1])
            maps = cropped
        if do_jitter:
            image = ImageEnhance.Brightness(image).enhance(float(factors[0]))
            image = ImageEnhance.Contrast(image).enhance(float(factors[1]))
            image = ImageEnhance.Color(image).enhance(float(factors[2]))
        if do_jpeg:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            image = Image.open(buffer).convert("RGB")
        if do_gray:
            image = image.convert("L").convert("RGB")
        return image, maps
