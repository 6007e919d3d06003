"""`RAHFProcessor` and `RAHFImageProcessor`: images and prompts to RAHF inputs, augmented prompts, and the
keyword-sequence codec.

`RAHFProcessor` is a transformers `ProcessorMixin` holding a `RAHFImageProcessor` and T5's tokenizer, so that it saves
in transformers' own layout and loads with `AutoProcessor.from_pretrained(folder)` (importing this module, or
`from rahf import RAHFProcessor`, registers both classes for `RAHFConfig`). A saved processor folder holds:

- `processor_config.json`: `processor_class`, the RAHF settings (`variant`, `task_names`, `task_strings`,
  `max_text_length`, `max_target_length`) and, under `image_processor`, the image processor's settings (`size`,
  `image_mean`, `image_std`, `resample`, `image_processor_type`), which transformers 5 nests here rather than writing a
  separate preprocessor_config.json;
- the tokenizer's files (`tokenizer.json`, `tokenizer_config.json`).

Folders written before the processor was a `ProcessorMixin` (`rahf_processor_config.json` with flat settings, and the
tokenizer's files) still load with `RAHFProcessor.from_pretrained`.

Diffusers pipelines carry the processor as a component with no registration of their own: it derives from
transformers' `ProcessorMixin`, which diffusers saves and loads with `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    # Load-bearing import: diffusers finds a component's load method by looking up the base classes it knows (this one
    # among them) as attributes of the module that model_index.json names, here `rahf.processing_rahf`.
    ProcessorMixin,
)
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import PROCESSOR_NAME

from .configuration_rahf import (
    DEFAULT_IMAGE_MEAN,
    DEFAULT_IMAGE_STD,
    MIN_TEXT_LENGTH,
    VARIANTS,
    RAHFConfig,
    check_image_statistics,
    check_int,
)
from .image_io import MAX_IMAGE_PIXELS_ENV, ImageTooLargeError, max_image_pixels, open_image
from .keywords import MARKER, decode_keyword_indices, encode_keyword_target, split_prompt_words
from .pretrained_paths import resolve_pretrained_path

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = PROCESSOR_NAME  # "processor_config.json"
# What processors saved before the ProcessorMixin wrote their settings to (flat, without the image processor's nesting).
LEGACY_PROCESSOR_CONFIG_NAME = "rahf_processor_config.json"
ImageInput = Image.Image | np.ndarray | str | os.PathLike | bytes
# The hub options of `from_pretrained` (AutoProcessor passes some of them): a processor is read from a local folder only.
_HUB_LOADING_KWARGS = frozenset(
    {
        "cache_dir",
        "code_revision",
        "force_download",
        "local_files_only",
        "proxies",
        "repo_type",
        "revision",
        "token",
        "trust_remote_code",
        "user_agent",
        "_from_auto",
        "_from_pipeline",
    }
)
_HOW_TO_SAVE = "the processor with `processor.save_pretrained(dir)` (or `rahf init-model`)"


def save_processor_config(
    save_directory: str | os.PathLike,
    config: dict,
    tokenizer: PreTrainedTokenizerBase | None,
    config_name: str = LEGACY_PROCESSOR_CONFIG_NAME,
) -> None:
    """Writes a plain processor's `config` as `config_name` (indented JSON) and its tokenizer, if any, into
    `save_directory`, creating it (the layout of `rahf.baselines.BaselineProcessor`, and of `RAHFProcessor` before it
    was a `ProcessorMixin`)."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    (save_directory / config_name).write_text(json.dumps(config, indent=2) + "\n")


def load_processor_config(
    pretrained_path: str | os.PathLike, how_to_save: str, config_name: str = LEGACY_PROCESSOR_CONFIG_NAME
) -> tuple[Path, dict]:
    """The folder and the constructor keywords in its `config_name` (without `processor_class`). A folder without
    `config_name` raises a ValueError that ends "save {how_to_save} next to the model"."""
    path = Path(pretrained_path)
    cfg_file = path / config_name
    if not cfg_file.is_file():
        raise ValueError(f"{str(path)!r} has no {config_name}; save {how_to_save} next to the model")
    try:
        kwargs = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON ({err}); save {how_to_save} again") from None
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"{str(cfg_file)!r} must hold a JSON object of processor settings, got a {type(kwargs).__name__}; save "
            f"{how_to_save} again"
        )
    kwargs.pop("processor_class", None)
    return path, kwargs


def _check_pixel_count(width: int, height: int, cap: int, what: str) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"{what} is {width} x {height} pixels: pass an image with at least one pixel")
    if width * height > cap:
        raise ImageTooLargeError(
            f"{what} is {width} x {height} = {width * height:,} pixels, more than the cap of {cap:,}; raise the cap "
            f"with {MAX_IMAGE_PIXELS_ENV}=N (or max_image_pixels=N) if the image is genuine"
        )


def _array_to_image(arr: np.ndarray, cap: int) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        hint = " (channels first: transpose it to (H, W, C))" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else ""
        raise ValueError(
            f"an image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}{hint}"
        )
    # Checked before any conversion, which would copy the array.
    _check_pixel_count(arr.shape[1], arr.shape[0], cap, f"the image array of shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind not in "uif":
        raise ValueError(f"an image array must hold numbers (uint8, or floats in [0, 1]), got dtype {arr.dtype}")
    elif arr.dtype != np.uint8:
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise ValueError("the image array holds NaN or infinite values: pass finite pixel values")
            if arr.max() <= 1.0:
                arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def load_image(image: ImageInput, max_pixels: int | None = None) -> Image.Image:
    """A PIL image, array, path or encoded bytes -> an RGB PIL image, whatever its mode (RGBA, L, P, I;16, CMYK, ...).

    Transparent pixels are composited on white; 16-bit and 32-bit greyscale are scaled to 8 bits by their range.
    An image of more than `max_pixels` pixels (default: `rahf.image_io.max_image_pixels()`, 40 MP or
    `RAHF_MAX_IMAGE_PIXELS`) is refused with `ImageTooLargeError`, a `ValueError`; a file is checked from its header,
    before it is decoded.
    """
    cap = max_image_pixels(max_pixels)
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        image = open_image(image, max_pixels=cap)
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image, cap)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a numpy array, a path or image bytes, got {type(image).__name__}")
    _check_pixel_count(image.width, image.height, cap, f"the {image.mode} image")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def check_prompts(text: Sequence[str] | str, uids: Sequence[str | None] | None = None) -> list[str]:
    """The prompts as a list, after checking that each is a str with at least one word (as
    `rahf.keywords.split_prompt_words` splits it); errors name the prompt's index and, when `uids` is given, its
    record."""
    if isinstance(text, str):
        text = [text]
    prompts = list(text)
    for i, prompt in enumerate(prompts):
        record = f" (record {uids[i]!r})" if uids is not None and i < len(uids) and uids[i] is not None else ""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i}{record} must be a str, got {type(prompt).__name__}")
        if not split_prompt_words(prompt):
            raise ValueError(
                f"prompt {i}{record} is empty ({prompt!r}): RAHF rates an image against a prompt with at least one "
                "word; give it its prompt or leave it out"
            )
    return prompts


def load_saved_tokenizer(path: str | os.PathLike, how_to_save: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the local folder `path`; a folder without one is a ValueError that says how to save
    it."""
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"could not load the tokenizer saved in {str(path)!r} ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"save {how_to_save}"
        ) from None


def _check_task_names(task_names: Sequence[str]) -> list[str]:
    names = list(task_names) if isinstance(task_names, (list, tuple)) else None
    if not names or any(not isinstance(t, str) or not t.strip() for t in names) or len(set(names)) != len(names):
        raise ValueError(
            f"`task_names` must be a non-empty list of distinct task names (the model's `config.task_names`), got "
            f"{task_names!r}; save the processor again with RAHFProcessor.from_config(config).save_pretrained(dir)"
        )
    return names


def _check_task_strings(task_strings: dict[str, str], task_names: list[str], variant: str) -> dict[str, str]:
    if not isinstance(task_strings, dict) or any(
        not isinstance(k, str) or not isinstance(v, str) or not v.strip() for k, v in task_strings.items()
    ):
        raise ValueError(
            f"`task_strings` must map each task to a non-empty text, got {task_strings!r}; write e.g. "
            '{"overall": "overall score"}'
        )
    missing = [t for t in task_names if t not in task_strings]
    if variant != "multi_head" and missing:
        raise ValueError(
            f"`task_strings` has no text for the tasks {missing}: the augmented-prompt variant prefixes every prompt "
            "with its task's text; add them"
        )
    return dict(task_strings)


def _check_size(size: Any, where: str) -> int:
    """`size` (an int, or transformers' `{"height": s, "width": s}`) -> the side of the square it names."""
    if isinstance(size, dict):
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(
                f'`size` must be one side or a square {{"height": s, "width": s}}, got {size!r}: RAHF\'s vision towers '
                f'take square images; write e.g. {{"height": 384, "width": 384}} in {where}'
            )
        size = size["height"]
    return check_int("size", size, example=384, where=where)


def _check_resample(resample: Any, where: str) -> int:
    try:
        if isinstance(resample, bool):
            raise ValueError
        return int(Image.Resampling(resample))
    except (ValueError, TypeError):
        choices = {r.name: r.value for r in Image.Resampling}
        raise ValueError(
            f"`resample` must be a PIL resampling filter, one of {choices}, got {resample!r}; write 3 (bicubic) in "
            f"{where}"
        ) from None


class RAHFImageProcessor(BaseImageProcessor):
    r"""
    RAHF's image preprocessing: any image (PIL of any mode, array, path or encoded bytes; see [`load_image`]) to RGB,
    resized to the square the vision tower takes, scaled to [0, 1] and normalised per channel, in float32.

    None of transformers' image processors reproduces it exactly: they neither composite transparency on white, nor
    scale 16-bit greyscale by its range, nor refuse oversized files from their headers before decoding.

    Args:
        size (`int` or `dict[str, int]`, *optional*, defaults to 224):
            Side of the square output, or `{"height": s, "width": s}`.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel mean subtracted after scaling to [0, 1].
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel standard deviation divided by after subtracting the mean.
        resample (`int`, *optional*, defaults to `PIL.Image.Resampling.BICUBIC`):
            The PIL filter of the resize.

    Examples:

    ```python
    >>> from PIL import Image
    >>> from rahf.processing_rahf import RAHFImageProcessor
    >>> RAHFImageProcessor(size=32)(Image.new("RGBA", (50, 20)))["pixel_values"].shape
    torch.Size([1, 3, 32, 32])
    ```
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int | dict[str, int] = 224,
        image_mean: Sequence[float] = DEFAULT_IMAGE_MEAN,
        image_std: Sequence[float] = DEFAULT_IMAGE_STD,
        resample: int = Image.Resampling.BICUBIC,
        **kwargs: Any,
    ) -> None:
        # Bookkeeping keys that transformers writes into a saved image processor's settings and hands back on load.
        for key in ("image_processor_type", "processor_class"):
            kwargs.pop(key, None)
        where = f"the `image_processor` entry of {PROCESSOR_CONFIG_NAME}"
        if kwargs:
            raise ValueError(
                f"unknown image processor settings {sorted(kwargs)}; RAHFImageProcessor takes size, image_mean, "
                f"image_std and resample: remove or rename them in {where}"
            )
        super().__init__()
        side = _check_size(size, where)
        self.size = {"height": side, "width": side}
        self.image_mean = check_image_statistics("image_mean", image_mean)
        self.image_std = check_image_statistics("image_std", image_std, positive=True)
        self.resample = _check_resample(resample, where)

    @property
    def image_size(self) -> int:
        """Side of the square images this processor makes."""
        return self.size["height"]

    def preprocess(
        self,
        images: Sequence[ImageInput] | ImageInput,
        max_image_pixels: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Images of any size and mode -> `pixel_values` (B, 3, size, size), normalised float32.

        Args:
            images: one image or a sequence of them.
            max_image_pixels: the largest image accepted, in pixels (default: `rahf.image_io.max_image_pixels()`);
                larger ones are refused with `ImageTooLargeError` (see [`load_image`]).
            return_tensors: `"pt"` (or None) for a torch tensor, `"np"` for a numpy array.
        """
        if kwargs:
            raise ValueError(
                f"RAHFImageProcessor takes no call-time settings {sorted(kwargs)}: set size, image_mean, image_std or "
                "resample when building it, and pass only images, max_image_pixels and return_tensors"
            )
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}")
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, bytes)):
            images = [images]
        side = self.image_size
        arrays = []
        for image in images:
            rgb = load_image(image, max_pixels=max_image_pixels)
            rgb = rgb.resize((side, side), Image.Resampling(self.resample))
            arrays.append(np.asarray(rgb, dtype=np.float32) / 255.0)
        if not arrays:
            raise ValueError("`images` is empty: pass at least one image")
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        pixel_values = (batch - mean) / std
        return BatchFeature({"pixel_values": pixel_values.numpy() if return_tensors == "np" else pixel_values})


class RAHFProcessor(ProcessorMixin):
    r"""
    Prepares RAHF inputs: resizes and normalises images (with its [`RAHFImageProcessor`]), tokenizes prompts (with task
    strings in the augmented-prompt variant), encodes the ` 0`-marked keyword targets and decodes generated sequences
    back to prompt-word indices.

    A transformers `ProcessorMixin`: `save_pretrained(dir)` writes `processor_config.json` and the tokenizer's files,
    and `RAHFProcessor.from_pretrained(dir)` or `AutoProcessor.from_pretrained(dir)` reads them back (folders in the
    older `rahf_processor_config.json` layout load too).

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]): T5's tokenizer, or the offline one of [`build_offline_tokenizer`].
        image_processor ([`RAHFImageProcessor`] or `dict`, *optional*): the image preprocessing, or its settings; built
            from `image_size`, `image_mean` and `image_std` when not given.
        image_size (`int`, *optional*): side of the square image the vision tower takes.
        image_mean (`list[float]`, *optional*), image_std (`list[float]`, *optional*): per-channel normalisation.
            `image_size`, `image_mean` and `image_std` are needed without `image_processor`, and override its values
            with one.
        variant (`str`): `"multi_head"` or `"augmented_prompt"`.
        task_strings (`dict[str, str]`): task -> text prepended to the prompt (augmented prompt).
        task_names (`list[str]`): the model's tasks in output order (`config.task_names`).
        max_text_length (`int`), max_target_length (`int`): token limits of prompts and keyword targets.

    Examples:

    ```python
    >>> from rahf import RAHFConfig, RAHFProcessor
    >>> processor = RAHFProcessor.from_config(RAHFConfig.from_json_file("configs/model/tiny.json"))
    >>> processor.keyword_target(["a", "red", "cat"], [1, 0, 1])
    'a red 0 cat'
    >>> processor.decode_keywords(["a red 0 cat"], ["a red cat"])
    [[1]]
    ```
    """

    # Annotations for readers and type checkers; ProcessorMixin sets both in __init__.
    tokenizer: PreTrainedTokenizerBase
    image_processor: RAHFImageProcessor

    # Transformers reads the sub-processors from the parameters whose names contain "tokenizer" / "image_processor", in
    # this order; the tokenizer first, so that `RAHFProcessor(tokenizer, image_size=..., ...)` still builds one.
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: RAHFImageProcessor | dict[str, Any] | None = None,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        variant: str | None = None,
        task_strings: dict[str, str] | None = None,
        task_names: Sequence[str] | None = None,
        max_text_length: int = 128,
        max_target_length: int = 192,
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "`tokenizer` is required: pass T5's tokenizer or rahf.tokenization.build_offline_tokenizer()"
            )
        where = PROCESSOR_CONFIG_NAME
        image_processor = _build_image_processor(image_processor, image_size, image_mean, image_std, where)
        if variant not in VARIANTS:
            raise ValueError(
                f"`variant` must be one of {list(VARIANTS)}, got {variant!r}; write one of them in {where}"
            )
        self.variant = variant
        self.task_names = _check_task_names(task_names)
        self.task_strings = _check_task_strings(task_strings, self.task_names, variant)
        self.max_text_length = check_int("max_text_length", max_text_length, MIN_TEXT_LENGTH, 128, where)
        self.max_target_length = check_int("max_target_length", max_target_length, MIN_TEXT_LENGTH, 192, where)
        super().__init__(tokenizer=tokenizer, image_processor=image_processor)

    @property
    def image_size(self) -> int:
        """Side of the square image the vision tower takes (the image processor's `size`)."""
        return self.image_processor.image_size

    @property
    def image_mean(self) -> list[float]:
        """Per-channel mean of the image normalisation (the image processor's)."""
        return list(self.image_processor.image_mean)

    @property
    def image_std(self) -> list[float]:
        """Per-channel standard deviation of the image normalisation (the image processor's)."""
        return list(self.image_processor.image_std)

    # ----------------------------------------------------------------------------------------------------------------
    # Construction, saving, loading

    @classmethod
    def from_config(cls, config: RAHFConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> RAHFProcessor:
        """The processor that matches `config`: T5's tokenizer when `text_model_name_or_path` is set, else the
        offline one sized to the T5 vocabulary; image statistics from the vision tower's preprocessor config."""
        mean, std = config.image_mean, config.image_std
        if tokenizer is None:
            if config.text_model_name_or_path:
                name = resolve_pretrained_path(
                    config.text_model_name_or_path, "text_model_name_or_path", what="a T5 folder or hub id"
                )
                tokenizer = AutoTokenizer.from_pretrained(name)
            else:
                from .tokenization import build_offline_tokenizer

                tokenizer = build_offline_tokenizer(vocab_size=min(config.text_config.vocab_size, 4096))
        if len(tokenizer) > config.text_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but `text_config.vocab_size` is "
                f"{config.text_config.vocab_size}; raise vocab_size or use a smaller tokenizer"
            )
        if config.vision_model_name_or_path:
            mean, std = _image_stats_of(config.vision_model_name_or_path, mean, std)
        return cls(
            tokenizer=tokenizer,
            image_processor=RAHFImageProcessor(size=config.image_size, image_mean=mean, image_std=std),
            variant=config.variant,
            task_strings=config.task_strings,
            task_names=config.task_names,
            max_text_length=config.max_text_length,
            max_target_length=config.max_target_length,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, flag: str = "pretrained_path", **kwargs: Any
    ) -> RAHFProcessor:
        """Loads the processor saved in a local folder by `save_pretrained`, in the current layout
        (`processor_config.json`) or the older one (`rahf_processor_config.json`).

        Args:
            pretrained_model_name_or_path: the folder (a model folder, or a pipeline's `reward_processor/`).
            flag: the argument's name in error messages.
            kwargs: `subfolder=`, hub options (ignored: the folder is local), and processor settings that replace the
                saved ones (e.g. `max_text_length=64`).
        """
        subfolder = kwargs.pop("subfolder", None) or ""
        for key in _HUB_LOADING_KWARGS:
            kwargs.pop(key, None)
        folder = resolve_pretrained_path(
            pretrained_model_name_or_path, flag, what="a saved model folder", allow_hub=False
        )
        path = Path(folder) / subfolder
        expected = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer"}
        unknown = sorted(set(kwargs) - expected)
        if unknown:
            raise ValueError(
                f"RAHFProcessor.from_pretrained got unknown keyword arguments {unknown}; it takes subfolder=, hub "
                f"options and the processor settings {sorted(expected)}"
            )
        if (path / PROCESSOR_CONFIG_NAME).is_file():
            settings, config_file = _read_processor_config(path / PROCESSOR_CONFIG_NAME, cls.__name__)
        elif (path / LEGACY_PROCESSOR_CONFIG_NAME).is_file():
            # Written before the processor was a ProcessorMixin: flat settings, read as keywords of the constructor.
            path, settings = load_processor_config(path, _HOW_TO_SAVE)
            config_file = path / LEGACY_PROCESSOR_CONFIG_NAME
            expected -= {"image_processor"}
            logger.info("%s is in the older processor layout; save_pretrained writes %s", config_file, PROCESSOR_NAME)
        else:
            raise ValueError(f"{str(path)!r} has no {PROCESSOR_CONFIG_NAME}; save {_HOW_TO_SAVE} next to the model")
        unknown = sorted(set(settings) - expected)
        if unknown:
            raise ValueError(
                f"{str(config_file)!r} has unknown settings {unknown}; the processor takes {sorted(expected)}: remove or "
                "rename them"
            )
        tokenizer = load_saved_tokenizer(path, _HOW_TO_SAVE)
        try:
            return cls(tokenizer=tokenizer, **{**settings, **kwargs})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{str(config_file)!r}: {err}") from None

    # ----------------------------------------------------------------------------------------------------------------
    # Images

    def preprocess_images(self, images: Sequence[ImageInput], max_image_pixels: int | None = None) -> torch.Tensor:
        """Images of any size and mode -> `pixel_values` (B, 3, image_size, image_size), normalised. Images above
        `max_image_pixels` pixels are refused (see `load_image`)."""
        return self.image_processor(images, max_image_pixels=max_image_pixels)["pixel_values"]

    # ----------------------------------------------------------------------------------------------------------------
    # Prompts

    def task_prompt(self, prompt: str, task: str | None) -> str:
        """The text the T5 encoder reads: the prompt, prefixed with the task string in the augmented-prompt variant."""
        if self.variant == "multi_head" or task is None:
            return prompt
        if task not in self.task_strings:
            raise ValueError(f"unknown task {task!r}; the model's tasks are {self.task_names}")
        return f"{self.task_strings[task]}: {prompt}"

    def kept_word_count(self, prompt: str) -> int:
        """How many of the prompt's words survive truncation to `max_text_length` tokens (with the longest task
        string in front, in the augmented-prompt variant), so that word labels stay aligned with what the model
        reads."""
        words = split_prompt_words(prompt)
        prefix = ""
        if self.variant != "multi_head":
            prefix = max((self.task_prompt("", t) for t in self.task_names), key=len)
        enc = self.tokenizer(
            prefix + prompt, truncation=True, max_length=self.max_text_length, return_offsets_mapping=True
        )
        if len(enc["input_ids"]) < self.max_text_length:
            return len(words)
        end = max((e for s, e in enc["offset_mapping"] if e > s), default=0) - len(prefix)
        # Word i survives when its last character was read.
        count, pos = 0, 0
        for word in words:
            pos = prompt.index(word, pos) + len(word)
            if pos > end:
                break
            count += 1
        return count

    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput | None = None,
        text: Sequence[str] | str | None = None,
        tasks: Sequence[str] | None = None,
        keyword_labels: Sequence[Sequence[int]] | None = None,
        return_tensors: str | None = "pt",
        max_image_pixels: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Builds model inputs.

        Args:
            images: one image per prompt (any size or mode).
            text: the prompts.
            tasks: augmented-prompt variant: the tasks to run for each image (default: all of `task_names`); rows
                are image-major. Ignored by the multi-head variant.
            keyword_labels: per prompt, one label per prompt word (1 aligned, 0 misaligned): adds `labels`, the
                tokenized ` 0`-marked target.
            max_image_pixels: the largest image accepted, in pixels (see `load_image`).

        Returns:
            `pixel_values` (B, 3, H, W), `input_ids` / `attention_mask` (R, L), `image_index` (R,), `task_ids` (R,)
            in the augmented-prompt variant, and `labels` (B, T) when `keyword_labels` is given.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt', got {return_tensors!r}")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, bytes)):
                images = [images]
            out["pixel_values"] = self.preprocess_images(images, max_image_pixels=max_image_pixels)
        if text is not None:
            prompts = check_prompts(text)
            if images is not None and len(prompts) != len(out["pixel_values"]):
                raise ValueError(
                    f"got {len(out['pixel_values'])} images and {len(prompts)} prompts: pass one prompt per image"
                )
            out.update(self.encode_prompts(prompts, tasks))
            if keyword_labels is not None:
                out["labels"] = self.encode_keyword_targets(prompts, keyword_labels)
        return out

    def encode_prompts(self, prompts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Tokenizes prompts (one row each, or one row per (prompt, task) in the augmented-prompt variant)."""
        prompts = check_prompts(prompts)
        if self.variant == "multi_head":
            rows, task_ids, image_index = prompts, None, list(range(len(prompts)))
        else:
            tasks = list(tasks) if tasks is not None else list(self.task_names)
            unknown = [t for t in tasks if t not in self.task_names]
            if unknown:
                raise ValueError(f"unknown tasks {unknown}; the model's tasks are {self.task_names}")
            rows = [self.task_prompt(p, t) for p in prompts for t in tasks]
            task_ids = [self.task_names.index(t) for _ in prompts for t in tasks]
            image_index = [i for i in range(len(prompts)) for _ in tasks]
        # One tokenization: lengths for the warning, then our own truncation and padding.
        ids = self.tokenizer(rows, truncation=False)["input_ids"]
        self._warn_truncation([len(x) for x in ids])
        enc = self.tokenizer.pad(
            {"input_ids": [self._truncate(x) for x in ids]}, padding="longest", return_tensors="pt"
        )
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out["image_index"] = torch.tensor(image_index, dtype=torch.long)
        if task_ids is not None:
            out["task_ids"] = torch.tensor(task_ids, dtype=torch.long)
        return out

    def _truncate(self, ids: list[int]) -> list[int]:
        """Cuts token ids to `max_text_length` as the tokenizer's own truncation does: a closing special token
        (T5's `</s>`) stays last."""
        if len(ids) <= self.max_text_length:
            return ids
        if ids[-1] in self.tokenizer.all_special_ids:
            return ids[: self.max_text_length - 1] + ids[-1:]
        return ids[: self.max_text_length]

    def _warn_truncation(self, lengths: Sequence[int]) -> None:
        over = [i for i, n in enumerate(lengths) if n > self.max_text_length]
        if over:
            logger.warning(
                "%d prompt(s) longer than max_text_length=%d tokens were truncated (first: row %d, %d tokens); "
                "their words past the limit are neither read nor labelled",
                len(over),
                self.max_text_length,
                over[0],
                lengths[over[0]],
            )

    # ----------------------------------------------------------------------------------------------------------------
    # The keyword codec

    def keyword_target(self, words: Sequence[str], labels: Sequence[int]) -> str:
        """(prompt words, labels) -> target text with ` 0` after each misaligned word (label 0)."""
        return encode_keyword_target(words, labels)

    def encode_keyword_targets(self, prompts: Sequence[str], keyword_labels: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prompts and their word labels -> `labels` (B, T) token ids, -100 on padding.

        Words that truncation drops from the prompt are dropped from the target too, so that the model is never
        asked to mark a word it did not read.
        """
        prompts = check_prompts(prompts)
        keyword_labels = list(keyword_labels)
        if len(keyword_labels) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts and {len(keyword_labels)} lists of word labels: pass one per prompt"
            )
        targets = []
        for i, (prompt, labels) in enumerate(zip(prompts, keyword_labels)):
            words = split_prompt_words(prompt)
            if len(words) != len(labels):
                raise ValueError(
                    f"prompt {i} has {len(words)} words but {len(labels)} word labels; labels follow "
                    f"rahf.keywords.split_prompt_words({prompt!r})"
                )
            keep = self.kept_word_count(prompt)
            target = self.keyword_target(words[:keep], list(labels)[:keep])
            while keep > 0 and len(self.tokenizer(target)["input_ids"]) > self.max_target_length:
                keep -= 1
                target = self.keyword_target(words[:keep], list(labels)[:keep])
            targets.append(target)
        enc = self.tokenizer(
            targets, padding="longest", truncation=True, max_length=self.max_target_length, return_tensors="pt"
        )
        ids = enc["input_ids"].clone()
        ids[enc["attention_mask"] == 0] = -100
        return ids

    @property
    def marker_token_id(self) -> int:
        """Token id of the ` 0` marker as it follows a word in keyword targets (for threshold decoding)."""
        word = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        marked = self.tokenizer(f"a {MARKER}", add_special_tokens=False)["input_ids"]
        if len(marked) != len(word) + 1 or marked[: len(word)] != word:
            raise ValueError(
                f"this tokenizer writes the keyword marker ' {MARKER}' as {marked[len(word) :]} rather than one token; "
                "threshold decoding (`keyword_threshold`) needs a single-token marker: leave keyword_threshold unset"
            )
        return int(marked[-1])

    def decode_keywords(self, sequences: torch.Tensor | Sequence[str], prompts: Sequence[str]) -> list[list[int]]:
        """Generated token ids (or texts) -> per prompt, the sorted indices of its misaligned words."""
        if isinstance(sequences, torch.Tensor):
            texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        else:
            texts = list(sequences)
        return [decode_keyword_indices(t, split_prompt_words(p)) for t, p in zip(texts, prompts)]


def _build_image_processor(
    image_processor: RAHFImageProcessor | dict[str, Any] | None,
    image_size: int | None,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
    where: str,
) -> RAHFImageProcessor:
    """The processor's image processor: `image_processor` (or one built from its settings), with `image_size`,
    `image_mean` and `image_std` replacing its values when given; without one, built from those three."""
    if image_processor is None:
        if image_size is None:
            raise ValueError(
                "pass `image_processor` (a RAHFImageProcessor) or `image_size`, `image_mean` and `image_std`; e.g. "
                "RAHFProcessor.from_config(config)"
            )
        settings: dict[str, Any] = {}
    elif isinstance(image_processor, RAHFImageProcessor):
        settings = image_processor.to_dict()
    elif isinstance(image_processor, dict):
        settings = dict(image_processor)
        found = settings.get("image_processor_type", RAHFImageProcessor.__name__)
        if found != RAHFImageProcessor.__name__:
            raise ValueError(
                f"`image_processor` is a {found}'s settings, but RAHFProcessor takes a RAHFImageProcessor; write "
                f'"image_processor_type": "RAHFImageProcessor" in {where}, with size, image_mean and image_std'
            )
    else:
        raise ValueError(
            f"`image_processor` must be a RAHFImageProcessor (or a dict of its settings), got a "
            f"{type(image_processor).__name__}: RAHF's images are prepared by its own image processor"
        )
    if image_size is not None:
        settings["size"] = check_int("image_size", image_size, example=384, where=where)
    if image_mean is not None or "image_mean" not in settings:
        settings["image_mean"] = check_image_statistics("image_mean", image_mean)
    if image_std is not None or "image_std" not in settings:
        settings["image_std"] = check_image_statistics("image_std", image_std, positive=True)
    if isinstance(image_processor, RAHFImageProcessor) and (image_size, image_mean, image_std) == (None, None, None):
        return image_processor
    return RAHFImageProcessor(**settings)


def _read_processor_config(config_file: Path, class_name: str) -> tuple[dict[str, Any], Path]:
    """The constructor keywords saved in a `processor_config.json` (without transformers' bookkeeping keys)."""
    try:
        settings = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({err}); save {_HOW_TO_SAVE} again") from None
    if not isinstance(settings, dict):
        raise ValueError(
            f"{str(config_file)!r} must hold a JSON object of processor settings, got a {type(settings).__name__}; "
            f"save {_HOW_TO_SAVE} again"
        )
    found = settings.pop("processor_class", class_name)
    if found != class_name:
        raise ValueError(
            f"{str(config_file)!r} holds the settings of a {found}, not of a {class_name}; load it with that class "
            "(or AutoProcessor), or save a RAHF processor there"
        )
    # auto_map names remote code, which a local RAHF processor never needs; a chat template has no use here.
    for key in ("auto_map", "chat_template"):
        settings.pop(key, None)
    return settings, config_file


def _image_stats_of(path: str, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """Reads image_mean / image_std from a pretrained tower's preprocessor_config.json when it has one."""
    local = Path(path) / "preprocessor_config.json"
    try:
        if local.is_file():
            cfg = json.loads(local.read_text())
        else:
            from huggingface_hub import hf_hub_download

            cfg = json.loads(Path(hf_hub_download(path, "preprocessor_config.json")).read_text())
    except Exception as err:  # a missing file is normal for bare towers; keep the config's statistics
        logger.info("no preprocessor_config.json for %s (%s); using image_mean=%s image_std=%s", path, err, mean, std)
        return mean, std
    if not isinstance(cfg, dict):
        cfg = {}
    # A tower's statistics replace the config's, so a bad one must be caught here, naming where it came from.
    try:
        return (
            check_image_statistics("image_mean", cfg.get("image_mean", mean)),
            check_image_statistics("image_std", cfg.get("image_std", std), positive=True),
        )
    except ValueError as err:
        raise ValueError(f"the preprocessor_config.json of {path!r}: {err}") from None


# Registered for RAHFConfig so that AutoProcessor / AutoImageProcessor load a saved folder (they find the classes by the
# names in processor_config.json). One class serves both of transformers' image backends: it needs neither.
AutoImageProcessor.register(
    RAHFConfig, image_processor_classes={"pil": RAHFImageProcessor, "torchvision": RAHFImageProcessor}, exist_ok=True
)
AutoProcessor.register(RAHFConfig, RAHFProcessor, exist_ok=True)

__all__ = [
    "LEGACY_PROCESSOR_CONFIG_NAME",
    "PROCESSOR_CONFIG_NAME",
    "RAHFImageProcessor",
    "RAHFProcessor",
    "check_prompts",
    "load_image",
    "load_processor_config",
    "load_saved_tokenizer",
    "save_processor_config",
]
