"""The baselines' preprocessing: [`BaselineProcessor`] (`RAHFProcessor`'s interface, so that the RAHF collator and
trainer use it unchanged) and how a CLIP baseline's processor is built from a checkpoint or offline."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, PreTrainedTokenizerBase
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..pretrained_paths import resolve_pretrained_path
from ..processing_rahf import ImageInput, load_image, load_processor_config, save_processor_config

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PROCESSOR_CONFIG_NAME",
    "RESIZE_MODES",
    "BaselineProcessor",
    "clip_processor",
    "offline_tokenizer",
    "preprocessor_side",
    "read_preprocessor_config",
]

PROCESSOR_CONFIG_NAME = "rahf_baseline_processor_config.json"
# transformers' own statistics (ResNet's ImageNet ones, OpenAI CLIP's), as lists: they are written to JSON configs.
IMAGENET_MEAN = list(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = list(IMAGENET_DEFAULT_STD)
CLIP_MEAN = list(OPENAI_CLIP_MEAN)
CLIP_STD = list(OPENAI_CLIP_STD)
RESIZE_MODES = ("squash", "crop")


class BaselineProcessor:
    r"""
    Image (and, for CLIP, prompt) preprocessing of the baselines, with `RAHFProcessor`'s interface so that the RAHF
    collator and trainer use it unchanged. Keyword labels are accepted and ignored: no baseline writes keywords.

    Args:
        image_size (`int`): side of the square image the model takes.
        image_mean (`list[float]`), image_std (`list[float]`): per-channel normalisation.
        tokenizer ([`PreTrainedTokenizerBase`], *optional*): the text tokenizer (CLIP baselines); without one, prompts
            are ignored.
        max_text_length (`int`, *optional*, defaults to 77): longest tokenized prompt (CLIP's context length).
        resize_mode (`str`, *optional*, defaults to `"squash"`): `"squash"` resizes the whole image to the square
            (heatmaps then cover the whole image); `"crop"` resizes the short side and centre-crops, as CLIP's own
            image processor does.

    Examples:

    ```python
    >>> from rahf.baselines import BaselineProcessor
    >>> processor = BaselineProcessor(image_size=224)
    >>> processor(images=[image], text=["a cat"])["pixel_values"].shape
    torch.Size([1, 3, 224, 224])
    ```
    """

    def __init__(
        self,
        image_size: int,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_text_length: int = 77,
        resize_mode: str = "squash",
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {list(RESIZE_MODES)}, got {resize_mode!r}")
        if int(image_size) < 1:
            raise ValueError(f"`image_size` must be positive, got {image_size!r}")
        self.image_size = int(image_size)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.tokenizer = tokenizer
        self.max_text_length = int(max_text_length)
        self.resize_mode = resize_mode

    def to_dict(self) -> dict:
        return {
            "processor_class": type(self).__name__,
            "image_size": self.image_size,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "max_text_length": self.max_text_length,
            "resize_mode": self.resize_mode,
            "has_tokenizer": self.tokenizer is not None,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        save_processor_config(save_directory, self.to_dict(), self.tokenizer, PROCESSOR_CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike) -> BaselineProcessor:
        folder = resolve_pretrained_path(pretrained_path, "pretrained_path", allow_hub=False)
        path, kwargs = load_processor_config(
            folder, "the baseline's processor with `processor.save_pretrained(dir)`", PROCESSOR_CONFIG_NAME
        )
        has_tokenizer = kwargs.pop("has_tokenizer", False)
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
        return cls(tokenizer=tokenizer, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        if self.resize_mode == "squash":
            return image.resize((size, size), Image.Resampling.BICUBIC)
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        return image.crop((left, top, left + size, top + size))

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images of any size and mode -> `pixel_values` (B, 3, image_size, image_size), normalised."""
        arrays = [np.asarray(self._resize(load_image(im)), dtype=np.float32) / 255.0 for im in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (batch - mean) / std

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer: the model it belongs to does not read prompts")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} must be a str, got {type(prompt).__name__}")
        enc = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput | None = None,
        text: Sequence[str] | str | None = None,
        tasks: Sequence[str] | None = None,
        keyword_labels: Sequence[Sequence[int]] | None = None,
        return_tensors: str | None = "pt",
    ) -> dict[str, torch.Tensor]:
        """`pixel_values` (B, 3, H, W), plus `input_ids` / `attention_mask` (B, L) when the processor has a tokenizer.

        `tasks` and `keyword_labels` are accepted for `RAHFProcessor` compatibility and ignored.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt', got {return_tensors!r}")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
                images = [images]
            out["pixel_values"] = self.preprocess_images(images)
        if text is not None and self.tokenizer is not None:
            out.update(self.encode_prompts(text))
            if images is not None and out["input_ids"].shape[0] != out["pixel_values"].shape[0]:
                raise ValueError(
                    f"got {out['pixel_values'].shape[0]} images and {out['input_ids'].shape[0]} prompts: pass one "
                    "prompt per image"
                )
        return out


def read_preprocessor_config(path: str | os.PathLike) -> dict:
    """A pretrained model's preprocessor_config.json (local folder or hub), or {} when it has none."""
    local = Path(path) / "preprocessor_config.json"
    try:
        if local.is_file():
            return json.loads(local.read_text())
        if Path(path).exists():
            return {}
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(path), "preprocessor_config.json")).read_text())
    except Exception as err:  # a bare checkpoint has none: the caller keeps its defaults
        logger.info("no preprocessor_config.json for %s (%s); using default image statistics", path, err)
        return {}


def preprocessor_side(value: Any) -> int | None:
    """An image processor's `size` / `crop_size` entry (int, or a dict) -> one side, when it says one."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "width"):
            if key in value:
                return int(value[key])
    return None


def offline_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """The offline byte-level BPE tokenizer, at most 4096 tokens and no more than the text tower takes."""
    from ..tokenization import build_offline_tokenizer

    return build_offline_tokenizer(vocab_size=min(vocab_size, 4096))


def clip_processor(
    clip_config: CLIPConfig,
    name_or_path: str | None,
    max_text_length: int | None = None,
    resize_mode: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> BaselineProcessor:
    """CLIP's tokenizer and image statistics from `name_or_path` when given, else the offline tokenizer."""
    image_size = int(clip_config.vision_config.image_size)
    mean, std, crop = CLIP_MEAN, CLIP_STD, False
    if name_or_path:
        pre = read_preprocessor_config(name_or_path)
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        image_size = preprocessor_side(pre.get("crop_size")) or preprocessor_side(pre.get("size")) or image_size
        crop = bool(pre.get("do_center_crop", False))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    elif tokenizer is None:
        tokenizer = offline_tokenizer(clip_config.text_config.vocab_size)
    if len(tokenizer) > clip_config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the CLIP text tower's vocab_size is "
            f"{clip_config.text_config.vocab_size}; use the checkpoint's own tokenizer"
        )
    limit = int(clip_config.text_config.max_position_embeddings)
    return BaselineProcessor(
        image_size=image_size,
        image_mean=mean,
        image_std=std,
        tokenizer=tokenizer,
        max_text_length=min(max_text_length or limit, limit),
        resize_mode=resize_mode or ("crop" if crop else "squash"),
    )
