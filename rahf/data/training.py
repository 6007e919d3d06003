"""Training input over the canonical data set: a torch `Dataset` with the augmentations of docs/reference.md (section 6).

Augmentations (each with its probability, applied in this order, all with PIL/numpy):
- random crop keeping 80-100% of each side (p 0.5), the same box, in relative coordinates, for image and heatmaps;
- light colour jitter: brightness, contrast and saturation factors in [0.9, 1.1] (p 0.1);
- JPEG re-encoding at quality 70-100 (p 0.1);
- greyscale, converted back to 3 channels (p 0.1).

Word swaps (`word_swap_rate` > 0, off by default; not in the paper): a record whose annotators marked no misaligned
word may have one of its prompt words replaced by another of the same group (`word_swap_groups`, e.g. colours or
shapes), which makes that word misaligned with the unchanged image. The keyword target marks it; the labels the swap
makes unknown (the alignment and overall scores and the misalignment heatmap) become NaN, which the model's loss
skips. The image-only labels (plausibility, aesthetics, the implausibility heatmap) stay.

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
import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from datasets import Dataset
from PIL import Image, ImageEnhance

from ..keywords import replace_prompt_word, split_prompt_words
from .schema import HEATMAP_COLUMNS, HEATMAP_NAMES, SCORE_NAMES

logger = logging.getLogger(__name__)

__all__ = ["RichFeedbackTorchDataset", "load_word_swap_groups", "resize_heatmap"]

# What a swapped prompt word leaves unknown: the image no longer matches the prompt in an unknown place and amount.
WORD_SWAP_UNKNOWN_SCORES = ("alignment", "overall")
WORD_SWAP_UNKNOWN_HEATMAPS = ("misalignment",)


def resize_heatmap(heatmap: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float32 map -> (size, size): area averaging when shrinking (keeps thin marks' mass), else bilinear."""
    height, width = heatmap.shape
    if (height, width) == (size, size):
        return heatmap.astype(np.float32, copy=False)
    interpolation = cv2.INTER_AREA if size <= min(height, width) else cv2.INTER_LINEAR
    out = cv2.resize(heatmap.astype(np.float32, copy=False), (size, size), interpolation=interpolation)
    return np.clip(out, 0.0, 1.0)


def load_word_swap_groups(groups: dict[str, Any] | str | os.PathLike) -> dict[str, list[str]]:
    """Checks word-swap groups (`{group name: [interchangeable words]}`, or a JSON file of that) and returns them.

    Each group needs at least two distinct words, a word may belong to one group only, and each word must be a single
    prompt word (no space or `,.?!":;`), as `split_prompt_words` finds them.
    """
    source = "word_swap_groups"
    if not isinstance(groups, dict):
        path = Path(groups)
        if not path.is_file():
            raise ValueError(
                f"`word_swap_groups` {str(path)!r} is not a file; pass a JSON file of {{group: [words]}}, such as "
                "the word_swap_groups.json that `rahf data synth` writes"
            )
        source = str(path)
        try:
            groups = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from err
        if not isinstance(groups, dict):
            raise ValueError(f"{source}: must hold a JSON object {{group: [words]}}, got {type(groups).__name__}")
    owner: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for name, words in groups.items():
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{source}: group {name!r} must be a list of words, got {words!r}")
        unique = list(dict.fromkeys(words))
        if len(unique) < 2:
            raise ValueError(f"{source}: group {name!r} needs two or more distinct words to swap between, got {words}")
        for word in unique:
            if split_prompt_words(word) != [word]:
                raise ValueError(f"{source}: {word!r} in group {name!r} is not a single prompt word")
            if word in owner:
                raise ValueError(
                    f"{source}: {word!r} is in groups {owner[word]!r} and {name!r}; a word may belong to one group"
                )
            owner[word] = name
        out[str(name)] = unique
    if not out:
        raise ValueError(f"{source}: no groups; give at least one {{group: [words]}}")
    return out


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
        word_swap_rate (`float`, *optional*, defaults to 0.0): probability that a record with no misaligned word has
            one of its words in `word_swap_groups` swapped for another of its group (see the module docstring).
        word_swap_groups (`dict[str, list[str]]` or path, *optional*): `{group: [interchangeable words]}`, or a JSON
            file of it; needed when `word_swap_rate` > 0.

    Each item is a dict: `image` (PIL RGB, to be resized by the processor), `heatmaps` (float32 tensor
    (2, heatmap_size, heatmap_size) in [0, 1], implausibility then misalignment), `scores` (float32 tensor (4,) in
    `SCORE_NAMES` order; NaN where a word swap made a label unknown), `prompt`, `prompt_words`, `word_labels`,
    `word_swap` (None, or the swap's `index`, `from` and `to` words), `uid` and `sample_seed` (an int fixed by
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
        word_swap_rate: float = 0.0,
        word_swap_groups: dict[str, Any] | str | os.PathLike | None = None,
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
        if not 0.0 <= word_swap_rate <= 1.0:
            raise ValueError(f"`word_swap_rate` must be a probability in [0, 1], got {word_swap_rate!r}")
        if word_swap_rate > 0 and word_swap_groups is None:
            raise ValueError(
                "`word_swap_rate` > 0 needs `word_swap_groups` ({group: [interchangeable words]}, or a JSON file)"
            )
        self.word_swap_rate = float(word_swap_rate)
        self.word_swap_groups = load_word_swap_groups(word_swap_groups) if word_swap_groups is not None else None
        self._swap_group_of = {w: g for g, words in (self.word_swap_groups or {}).items() for w in words}
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
        heatmaps = torch.from_numpy(np.stack([resize_heatmap(m, self.heatmap_size) for m in maps]))
        scores = torch.tensor([row[name] for name in SCORE_NAMES], dtype=torch.float32)
        prompt, word_labels = row["prompt"], [int(x) for x in row["word_labels"]]
        swap = self._draw_word_swap(prompt, word_labels, index) if self.word_swap_rate > 0 else None
        if swap is not None:
            position, old, new = swap
            prompt = replace_prompt_word(prompt, position, new)
            word_labels[position] = 0
            scores[[SCORE_NAMES.index(n) for n in WORD_SWAP_UNKNOWN_SCORES]] = float("nan")
            heatmaps[[HEATMAP_NAMES.index(n) for n in WORD_SWAP_UNKNOWN_HEATMAPS]] = float("nan")
        return {
            "image": image,
            "heatmaps": heatmaps,
            "scores": scores,
            "prompt": prompt,
            "prompt_words": split_prompt_words(prompt) if swap is not None else list(row["prompt_words"]),
            "word_labels": word_labels,
            "word_swap": None if swap is None else {"index": swap[0], "from": swap[1], "to": swap[2]},
            "uid": row["uid"],
            # Draws made after loading (e.g. which tasks of the augmented-prompt variant this step trains) take
            # their own generator from this seed, a function of (seed, epoch, index) too.
            "sample_seed": int(np.random.default_rng([self.seed, self.epoch, index, 1]).integers(2**62)),
        }

    def _draw_word_swap(self, prompt: str, word_labels: list[int], index: int) -> tuple[int, str, str] | None:
        """(word position, old word, new word) when this item's prompt gets a swapped word this epoch, else None.

        Only records with no misaligned word are swapped (a swap could otherwise land on a word already wrong); the
        draws use their own stream of (seed, epoch, index), so they never shift the image augmentations."""
        if 0 in word_labels:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index, 2])
        if rng.random() >= self.word_swap_rate:
            return None
        words = split_prompt_words(prompt)
        candidates = [i for i, w in enumerate(words) if w in self._swap_group_of]
        if not candidates:
            return None
        position = candidates[int(rng.integers(len(candidates)))]
        old = words[position]
        others = [w for w in self.word_swap_groups[self._swap_group_of[old]] if w != old]
        return position, old, others[int(rng.integers(len(others)))]

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
