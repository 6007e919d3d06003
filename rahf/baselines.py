"""The paper's baselines (§4.2.1, Tables 1-3), each a rater with `RichFeedbackPredictor`'s interface.

`rater(images, prompts, outputs=None) -> list[RichFeedback]`, with only the outputs a baseline can produce:

| name | what | outputs | trainable |
|---|---|---|---|
| `resnet50` | ResNet-50, fully connected score head, transposed-conv heatmap head | 4 scores, 2 heatmaps | yes |
| `clip_finetuned` | CLIP towers + an MLP on the fused image/text embeddings | 4 scores | yes |
| `clip_score` | off-the-shelf CLIP: cosine of the image and text embeddings | alignment | no |
| `pickscore` | a PickScore checkpoint (a CLIP): `exp(logit_scale) * cosine` for every score column | 4 scores | no |
| `clip_gradient` | `abs(d cosine / d pixels)` of CLIP, max over channels, smoothed, normalised | misalignment | no |
| `center_prior` | a centred Gaussian for both heatmaps: the floor | 2 heatmaps | no |

Design for the trainer. A trainable baseline is a `PreTrainedModel` with its own config (registered with AutoConfig /
AutoModel, saved as safetensors) and comes with a [`BaselineProcessor`] that has the same interface as
`RAHFProcessor` (`__call__(images=, text=, keyword_labels=)`, `preprocess_images`, `save_pretrained`,
`from_pretrained`), so that `rahf.data.collate.RAHFCollator` builds its batches unchanged. Its `forward` takes that
batch (`pixel_values`, `input_ids`, `attention_mask`, `heatmap_labels`, `score_labels`, ...), ignores what it does not
use, and returns a [`~rahf.modeling_rahf.RAHFOutput`] (`loss`, `heatmaps`, `scores`, `heatmap_loss`, `score_loss`).
Its config has `heatmap_size`, `score_names` and `heatmap_names` as `RAHFConfig` does. Offline, every baseline starts
from tiny random towers; with weights (`backbone_name_or_path`, `clip_model_name_or_path`, a checkpoint path) the same
code loads them.

Examples:

```python
>>> from rahf.baselines import build_baseline, build_trainable, load_rater
>>> model, processor = build_trainable("resnet50", "configs/model/resnet50.json", seed=0)  # microsoft/resnet-50
>>> rater = load_rater("runs/resnet50/final")  # a trained baseline, a RAHF model folder, or "center_prior"
>>> pick = load_rater("yuvalkirstain/PickScore_v1", model_type="pickscore",
...                   processor_name_or_path="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
>>> [feedback] = pick(["cat.png"], ["a cat on a wooden table"])
```
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ResNetConfig,
    ResNetModel,
)

from .configs import resolve_config_path
from .configuration_rahf import DEFAULT_HEATMAP_NAMES, DEFAULT_SCORE_NAMES, KEYWORDS_TASK
from .modeling_rahf import RAHFHeatmapHead, RAHFOutput, SafetensorsOnlyMixin, check_safetensors_folder
from .predictor import RichFeedback, as_image_prompt_lists, fill_feedback
from .pretrained_paths import resolve_pretrained_path
from .processing_rahf import ImageInput, load_image, load_processor_config, save_processor_config

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "TRAINABLE_MODEL_TYPES",
    "BaselineProcessor",
    "BaselineRater",
    "BaselineSpec",
    "CLIPRater",
    "CenterPriorRater",
    "RAHFCLIPConfig",
    "RAHFCLIPModel",
    "RAHFResNetConfig",
    "RAHFResNetModel",
    "build_baseline",
    "build_trainable",
    "load_rater",
    "rater_capabilities",
    "tiny_clip_config",
    "tiny_resnet_config",
]

PROCESSOR_CONFIG_NAME = "rahf_baseline_processor_config.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# As RAHF's heatmap head: heatmaps are mostly empty, so the logits start where sigmoid is ~0.018.
_HEATMAP_BIAS_INIT = -4.0
RESIZE_MODES = ("squash", "crop")
CLIP_MODES = ("clip_score", "pickscore", "clip_gradient")


# ====================================================================================================================
# Processor


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
    ):
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


def _read_preprocessor_config(path: str | os.PathLike) -> dict:
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


def _side(value: Any) -> int | None:
    """An image processor's `size` / `crop_size` entry (int, or a dict) -> one side, when it says one."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "width"):
            if key in value:
                return int(value[key])
    return None


# ====================================================================================================================
# Tiny offline configurations (what `build_trainable` / `build_baseline` use without a preset or checkpoint)


def tiny_resnet_config(**overrides) -> RAHFResNetConfig:
    """A ResNet baseline small enough for CPU tests and the demo: 3 basic stages of 8-32 channels, 64 px images."""
    kwargs = dict(
        resnet_config={"embedding_size": 8, "hidden_sizes": [8, 16, 32], "depths": [1, 1, 1], "layer_type": "basic"},
        image_size=64,
        heatmap_size=32,
        heatmap_head_channels=32,
        score_head_hidden_sizes=[32],
    )
    kwargs.update(overrides)
    return RAHFResNetConfig(**kwargs)


def tiny_clip_config(vocab_size: int = 512, image_size: int = 32, **overrides) -> CLIPConfig:
    """A random CLIP (width 32, 2 layers, 4 heads); its text tower takes the offline tokenizer (pad 0, eos 1)."""
    kwargs = dict(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    kwargs.update(overrides)
    return CLIPConfig(**kwargs)


def _offline_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    from .tokenization import build_offline_tokenizer

    return build_offline_tokenizer(vocab_size=min(vocab_size, 4096))


def _mark_own(*modules: nn.Module) -> None:
    for head in modules:
        for m in head.modules():
            m._rahf_own = True


@torch.no_grad()
def _init_own(module: nn.Module) -> None:
    # Only our own heads: the towers initialise themselves (or come pretrained).
    if not getattr(module, "_rahf_own", False):
        return
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if getattr(module, "_rahf_heatmap_out", False):
        nn.init.constant_(module.bias, _HEATMAP_BIAS_INIT)


def _mlp(in_features: int, hidden_sizes: Sequence[int], out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def _check_names(score_names: list[str], heatmap_names: list[str]) -> None:
    names = list(score_names) + list(heatmap_names)
    if len(set(names)) != len(names) or KEYWORDS_TASK in names:
        raise ValueError(f"`score_names` and `heatmap_names` must be distinct and not {KEYWORDS_TASK!r}, got {names}")


# ====================================================================================================================
# ResNet-50 baseline


@strict(accept_kwargs=True)
class RAHFResNetConfig(PreTrainedConfig):
    r"""
    Configuration of the ResNet baseline ([`RAHFResNetModel`]): a ResNet backbone with a fully connected score head and
    a transposed-convolution heatmap head (the paper's "ResNet-50" rows of Tables 1 and 2).

    Args:
        resnet_config (`dict` or `ResNetConfig`, *optional*):
            The backbone; defaults to ResNet-50's architecture (random unless `backbone_name_or_path` is loaded).
        image_size (`int`, *optional*, defaults to 224):
            Side of the square input image.
        heatmap_size (`int`, *optional*, defaults to 384):
            Side of the predicted (square) heatmaps.
        score_names (`list[str]`, *optional*, defaults to `["plausibility", "alignment", "aesthetics", "overall"]`):
            Names of the predicted scores, in output order.
        heatmap_names (`list[str]`, *optional*, defaults to `["implausibility", "misalignment"]`):
            Names of the predicted heatmaps, in output order.
        score_head_hidden_sizes (`list[int]`, *optional*, defaults to `[512, 256]`):
            Widths of the fully connected layers between the pooled features and the scores.
        heatmap_head_channels (`int`, *optional*, defaults to 256):
            Channels of the first heatmap-head convolution; each transposed convolution (x2) halves them (at least 8).
        separate_backbones (`bool`, *optional*, defaults to `False`):
            `True`: one backbone for the scores and another for the heatmaps, as the paper fine-tunes "two ResNet-50
            models"; `False`: one shared backbone (half the cost).
        heatmap_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the per-pixel heatmap MSE in the loss.
        score_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the score MSE in the loss.
        image_mean (`list[float]`, *optional*, defaults to ImageNet's):
            Per-channel mean used to normalise images.
        image_std (`list[float]`, *optional*, defaults to ImageNet's):
            Per-channel standard deviation used to normalise images.
        backbone_name_or_path (`str`, *optional*):
            Hub id or local folder of pretrained ResNet weights (e.g. `"microsoft/resnet-50"`), used by
            [`RAHFResNetModel.from_pretrained_backbone`] and [`build_trainable`].

    Examples:

    ```python
    >>> from rahf.baselines import RAHFResNetConfig, RAHFResNetModel
    >>> model = RAHFResNetModel(RAHFResNetConfig(heatmap_size=64))
    ```
    """

    model_type = "rahf_resnet"
    sub_configs_defaults = {"resnet_config": ResNetConfig}

    resnet_config: dict | PreTrainedConfig | None = None
    image_size: int = 224
    heatmap_size: int = 384
    score_names: list[str] | None = None
    heatmap_names: list[str] | None = None
    score_head_hidden_sizes: list[int] | None = None
    heatmap_head_channels: int = 256
    separate_backbones: bool = False
    heatmap_loss_weight: float = 1.0
    score_loss_weight: float = 1.0
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    backbone_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.score_names = list(DEFAULT_SCORE_NAMES if self.score_names is None else self.score_names)
        self.heatmap_names = list(DEFAULT_HEATMAP_NAMES if self.heatmap_names is None else self.heatmap_names)
        _check_names(self.score_names, self.heatmap_names)
        self.score_head_hidden_sizes = list(
            [512, 256] if self.score_head_hidden_sizes is None else self.score_head_hidden_sizes
        )
        self.image_mean = list(self.image_mean or IMAGENET_MEAN)
        self.image_std = list(self.image_std or IMAGENET_STD)
        for name in ("image_size", "heatmap_size", "heatmap_head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")

    @property
    def output_stride(self) -> int:
        """How many input pixels one backbone feature-map cell spans (stem x4, then x2 per later stage)."""
        stages = len(self.resnet_config.depths)
        first = 2 if self.resnet_config.downsample_in_first_stage else 1
        return 4 * first * 2 ** (stages - 1)


class RAHFResNetPreTrainedModel(SafetensorsOnlyMixin, PreTrainedModel):
    config_class = RAHFResNetConfig
    base_model_prefix = "rahf_resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ResNetStage"]

    def _init_weights(self, module: nn.Module) -> None:
        _init_own(module)


class RAHFResNetModel(RAHFResNetPreTrainedModel):
    r"""
    The ResNet baseline: backbone feature map -> transposed convolutions -> sigmoid heatmaps; pooled features ->
    fully connected layers -> sigmoid scores. It reads no prompt.

    Examples:

    ```python
    >>> from rahf.baselines import RAHFResNetModel, tiny_resnet_config, BaselineProcessor
    >>> model = RAHFResNetModel(tiny_resnet_config())
    >>> processor = BaselineProcessor.from_pretrained("runs/resnet50/final")
    >>> out = model(**processor(images=[image]))
    >>> out.heatmaps.shape, out.scores.shape
    (torch.Size([1, 2, 32, 32]), torch.Size([1, 4]))
    ```
    """

    def __init__(
        self,
        config: RAHFResNetConfig,
        resnet: nn.Module | None = None,
        score_resnet: nn.Module | None = None,
    ):
        super().__init__(config)
        self.resnet = resnet if resnet is not None else ResNetModel(config.resnet_config)
        self.score_resnet = None
        if config.separate_backbones:
            self.score_resnet = score_resnet if score_resnet is not None else ResNetModel(config.resnet_config)
        channels = config.resnet_config.hidden_sizes[-1]
        grid = max(1, math.ceil(config.image_size / config.output_stride))
        self.heatmap_head = RAHFHeatmapHead(
            channels, config.heatmap_head_channels, grid, config.heatmap_size, len(config.heatmap_names)
        )
        self.score_head = _mlp(channels, config.score_head_hidden_sizes, len(config.score_names))
        _mark_own(self.heatmap_head, self.score_head)
        self.heatmap_head.out._rahf_heatmap_out = True
        self.post_init()

    @classmethod
    def from_pretrained_backbone(
        cls, config: RAHFResNetConfig, backbone_name_or_path: str | None = None, **kwargs
    ) -> RAHFResNetModel:
        """Builds the baseline with a pretrained ResNet (hub id or local folder, e.g. `microsoft/resnet-50`, whose
        `ResNetForImageClassification` weights load into the backbone) and fresh heads.

        `config.resnet_config` is replaced by the checkpoint's. `kwargs` go to `ResNetModel.from_pretrained`.
        """
        path = backbone_name_or_path or config.backbone_name_or_path
        if not path:
            raise ValueError("pass `backbone_name_or_path` (e.g. 'microsoft/resnet-50') or set it in the config")
        config = config.__class__.from_dict(config.to_dict())  # never mutate the caller's config
        resnet = ResNetModel.from_pretrained(path, **kwargs)
        score_resnet = ResNetModel.from_pretrained(path, **kwargs) if config.separate_backbones else None
        config.resnet_config = resnet.config
        config.backbone_name_or_path = str(path)
        return cls(config, resnet=resnet, score_resnet=score_resnet)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        heatmap_labels: torch.Tensor | None = None,
        score_labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RAHFOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                Images from [`BaselineProcessor`].
            heatmap_labels (`torch.FloatTensor` of shape `(batch_size, num_heatmaps, heatmap_size, heatmap_size)`, *optional*):
                Target heatmaps in [0, 1].
            score_labels (`torch.FloatTensor` of shape `(batch_size, num_scores)`, *optional*):
                Target scores in [0, 1].
            kwargs: the rest of a RAHF batch (`input_ids`, `attention_mask`, `labels`, ...), ignored: this baseline
                reads no prompt and writes no keywords.

        Returns:
            [`RAHFOutput`] with `heatmaps` (B, num_heatmaps, S, S), `scores` (B, num_scores), and the losses when
            labels are given.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None:
            raise ValueError("`pixel_values` is required: preprocess the images with BaselineProcessor")
        features = self.resnet(pixel_values=pixel_values).last_hidden_state  # (B, C, g, g)
        heatmaps = torch.sigmoid(self.heatmap_head(features))  # (B, num_h, S, S)
        if self.score_resnet is not None:
            pooled = self.score_resnet(pixel_values=pixel_values).pooler_output.flatten(1)  # (B, C)
        else:
            pooled = features.mean(dim=(2, 3))  # (B, C): what ResNet's own pooler computes
        scores = torch.sigmoid(self.score_head(pooled))  # (B, num_s)
        loss, heatmap_loss, score_loss = _losses(self.config, heatmaps, heatmap_labels, scores, score_labels)
        out = RAHFOutput(loss=loss, heatmaps=heatmaps, scores=scores, heatmap_loss=heatmap_loss, score_loss=score_loss)
        return out if return_dict else out.to_tuple()


def _losses(
    config,
    heatmaps: torch.Tensor | None,
    heatmap_labels: torch.Tensor | None,
    scores: torch.Tensor | None,
    score_labels: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Weighted heatmap MSE (per pixel) + score MSE, as RAHF's loss without the sequence term."""
    terms, heatmap_loss, score_loss = [], None, None
    if heatmaps is not None and heatmap_labels is not None:
        if heatmap_labels.shape != heatmaps.shape:
            raise ValueError(
                f"`heatmap_labels` must have shape {tuple(heatmaps.shape)} (batch, heatmaps, size, size), got "
                f"{tuple(heatmap_labels.shape)}"
            )
        heatmap_loss = F.mse_loss(heatmaps, heatmap_labels.to(heatmaps.dtype))
        terms.append(config.heatmap_loss_weight * heatmap_loss)
    if scores is not None and score_labels is not None:
        if score_labels.shape != scores.shape:
            raise ValueError(f"`score_labels` must have shape {tuple(scores.shape)}, got {tuple(score_labels.shape)}")
        score_loss = F.mse_loss(scores, score_labels.to(scores.dtype))
        terms.append(config.score_loss_weight * score_loss)
    loss = torch.stack(terms).sum() if terms else None
    return loss, heatmap_loss, score_loss


# ====================================================================================================================
# CLIP fine-tuned baseline


@strict(accept_kwargs=True)
class RAHFCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of the fine-tuned CLIP baseline ([`RAHFCLIPModel`]): CLIP's image and text embeddings, fused, and an
    MLP predicting the scores (the paper's "CLIP (fine-tuned)" row of Table 1).

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The CLIP model; random unless `clip_model_name_or_path` is loaded.
        fusion (`str`, *optional*, defaults to `"concat"`):
            `"concat"`: the MLP reads [image; text] embeddings; `"multiply"`: their element-wise product.
        score_names (`list[str]`, *optional*, defaults to `["plausibility", "alignment", "aesthetics", "overall"]`):
            Names of the predicted scores, in output order.
        heatmap_names (`list[str]`, *optional*, defaults to `[]`):
            This baseline predicts no heatmap; the field exists because the trainer reads it.
        heatmap_size (`int`, *optional*, defaults to 16):
            Side to which the trainer's data set resizes the (unused) ground-truth heatmaps; small saves time.
        score_head_hidden_sizes (`list[int]`, *optional*, defaults to `[512]`):
            Widths of the MLP's hidden layers.
        freeze_towers (`bool`, *optional*, defaults to `False`):
            `True`: only the MLP trains; `False`: the towers are fine-tuned too (the paper "fine-tunes a CLIP model").
        score_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the score MSE.
        max_text_length (`int`, *optional*):
            Longest tokenized prompt; defaults to the text tower's `max_position_embeddings` (77 for CLIP).
        clip_model_name_or_path (`str`, *optional*):
            Hub id or local folder of a pretrained CLIP (e.g. `"openai/clip-vit-large-patch14"`), with its tokenizer
            and preprocessor config.

    Examples:

    ```python
    >>> from rahf.baselines import RAHFCLIPConfig, RAHFCLIPModel, tiny_clip_config
    >>> model = RAHFCLIPModel(RAHFCLIPConfig(clip_config=tiny_clip_config(), fusion="multiply"))
    ```
    """

    model_type = "rahf_clip"
    sub_configs_defaults = {"clip_config": CLIPConfig}

    clip_config: dict | PreTrainedConfig | None = None
    fusion: str = "concat"
    score_names: list[str] | None = None
    heatmap_names: list[str] | None = None
    heatmap_size: int = 16
    score_head_hidden_sizes: list[int] | None = None
    freeze_towers: bool = False
    score_loss_weight: float = 1.0
    max_text_length: int | None = None
    clip_model_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.fusion not in ("concat", "multiply"):
            raise ValueError(f"`fusion` must be 'concat' or 'multiply', got {self.fusion!r}")
        self.score_names = list(DEFAULT_SCORE_NAMES if self.score_names is None else self.score_names)
        self.heatmap_names = list(self.heatmap_names or [])
        if self.heatmap_names:
            raise ValueError(
                f"the CLIP baseline predicts no heatmaps; `heatmap_names` must be empty, got {self.heatmap_names}"
            )
        _check_names(self.score_names, self.heatmap_names)
        self.score_head_hidden_sizes = list(
            [512] if self.score_head_hidden_sizes is None else self.score_head_hidden_sizes
        )
        if self.max_text_length is None:
            self.max_text_length = int(self.clip_config.text_config.max_position_embeddings)
        if self.heatmap_size < 1:
            raise ValueError(f"`heatmap_size` must be positive, got {self.heatmap_size}")


class RAHFCLIPPreTrainedModel(SafetensorsOnlyMixin, PreTrainedModel):
    config_class = RAHFCLIPConfig
    base_model_prefix = "rahf_clip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        _init_own(module)


class RAHFCLIPModel(RAHFCLIPPreTrainedModel):
    r"""
    The fine-tuned CLIP baseline: L2-normalised CLIP image and text embeddings, concatenated (or multiplied), layer-
    normalised, then an MLP and a sigmoid per score.

    Examples:

    ```python
    >>> from rahf.baselines import build_trainable
    >>> model, processor = build_trainable("clip_finetuned", None, seed=0)  # tiny random CLIP, offline tokenizer
    >>> out = model(**processor(images=[image], text=["a cat"]))
    >>> out.scores.shape
    torch.Size([1, 4])
    ```
    """

    def __init__(self, config: RAHFCLIPConfig, clip: CLIPModel | None = None):
        super().__init__(config)
        self.clip = clip if clip is not None else CLIPModel(config.clip_config)
        # The contrastive temperature takes no part in this loss: freezing it keeps DDP from waiting for its gradient.
        self.clip.logit_scale.requires_grad_(False)
        if config.freeze_towers:
            self.clip.requires_grad_(False)
        dim = config.clip_config.projection_dim
        in_features = 2 * dim if config.fusion == "concat" else dim
        self.fusion_norm = nn.LayerNorm(in_features)
        self.score_head = _mlp(in_features, config.score_head_hidden_sizes, len(config.score_names))
        _mark_own(self.fusion_norm, self.score_head)
        self.post_init()

    @classmethod
    def from_pretrained_clip(cls, config: RAHFCLIPConfig, clip_model_name_or_path: str | None = None, **kwargs):
        """Builds the baseline with a pretrained CLIP (hub id or local folder) and a fresh MLP."""
        path = clip_model_name_or_path or config.clip_model_name_or_path
        if not path:
            raise ValueError(
                "pass `clip_model_name_or_path` (e.g. 'openai/clip-vit-large-patch14') or set it in the config"
            )
        config = config.__class__.from_dict(config.to_dict())
        clip = CLIPModel.from_pretrained(path, **kwargs)
        config.clip_config = clip.config
        config.clip_model_name_or_path = str(path)
        return cls(config, clip=clip)

    def embed(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image (B, P) and text (B, P) embeddings."""
        image = self.clip.get_image_features(pixel_values=pixel_values).pooler_output  # (B, P)
        text = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B, P)
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        score_labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RAHFOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                Images from [`BaselineProcessor`].
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`):
                Prompt token ids (CLIP's tokenizer), one row per image.
            attention_mask (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                1 for real tokens, 0 for padding.
            score_labels (`torch.FloatTensor` of shape `(batch_size, num_scores)`, *optional*):
                Target scores in [0, 1].
            kwargs: the rest of a RAHF batch (`heatmap_labels`, `labels`, `image_index`, ...), ignored.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None or input_ids is None:
            raise ValueError("`pixel_values` and `input_ids` are required: build them with the baseline's processor")
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"got {pixel_values.shape[0]} images and {input_ids.shape[0]} prompt rows: pass one prompt per image"
            )
        image, text = self.embed(pixel_values, input_ids, attention_mask)
        fused = torch.cat([image, text], dim=-1) if self.config.fusion == "concat" else image * text  # (B, F)
        scores = torch.sigmoid(self.score_head(self.fusion_norm(fused)))  # (B, num_s)
        loss, _, score_loss = _losses(self.config, None, None, scores, score_labels)
        out = RAHFOutput(loss=loss, scores=scores, score_loss=score_loss)
        return out if return_dict else out.to_tuple()


AutoConfig.register(RAHFResNetConfig.model_type, RAHFResNetConfig, exist_ok=True)
AutoModel.register(RAHFResNetConfig, RAHFResNetModel, exist_ok=True)
AutoConfig.register(RAHFCLIPConfig.model_type, RAHFCLIPConfig, exist_ok=True)
AutoModel.register(RAHFCLIPConfig, RAHFCLIPModel, exist_ok=True)

_TRAINABLE_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "resnet50": (RAHFResNetConfig, RAHFResNetModel),
    "clip_finetuned": (RAHFCLIPConfig, RAHFCLIPModel),
}
TRAINABLE_MODEL_TYPES: tuple[str, ...] = tuple(_TRAINABLE_CLASSES)


# ====================================================================================================================
# Building trainable baselines (what `rahf train --model_type resnet50|clip_finetuned` calls)


def _processor_for(model: PreTrainedModel) -> BaselineProcessor:
    config = model.config
    if isinstance(config, RAHFResNetConfig):
        mean, std = config.image_mean, config.image_std
        if config.backbone_name_or_path:
            pre = _read_preprocessor_config(config.backbone_name_or_path)
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        return BaselineProcessor(image_size=config.image_size, image_mean=mean, image_std=std)
    if isinstance(config, RAHFCLIPConfig):
        return _clip_processor(
            config.clip_config,
            config.clip_model_name_or_path,
            max_text_length=config.max_text_length,
            resize_mode="squash",
        )
    raise TypeError(f"no baseline processor for {type(config).__name__}")


def _clip_processor(
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
        pre = _read_preprocessor_config(name_or_path)
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        image_size = _side(pre.get("crop_size")) or _side(pre.get("size")) or image_size
        crop = bool(pre.get("do_center_crop", False))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    elif tokenizer is None:
        tokenizer = _offline_tokenizer(clip_config.text_config.vocab_size)
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


def build_trainable(
    model_type: str,
    model_config_path_or_none: str | os.PathLike | None = None,
    seed: int = 0,
    pretrained_model_name_or_path: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, BaselineProcessor]:
    """A trainable baseline and its processor, for `rahf train --model_type resnet50|clip_finetuned`.

    Args:
        model_type: `"resnet50"` or `"clip_finetuned"`.
        model_config_path_or_none: a JSON config (e.g. `configs/model/resnet50.json`, whose `backbone_name_or_path`
            / `clip_model_name_or_path` load pretrained weights); `None` builds the tiny offline configuration.
        seed: seeds the random initialisation (the global RNG is left as it was).
        pretrained_model_name_or_path: a folder written by `save_pretrained` (model + processor) to continue from;
            overrides the config.
    """
    if model_type not in _TRAINABLE_CLASSES:
        raise ValueError(
            f"unknown trainable `model_type` {model_type!r}; trainable baselines: {list(TRAINABLE_MODEL_TYPES)}"
        )
    config_cls, model_cls = _TRAINABLE_CLASSES[model_type]
    if pretrained_model_name_or_path:
        model = model_cls.from_pretrained(pretrained_model_name_or_path)
        return model, BaselineProcessor.from_pretrained(pretrained_model_name_or_path)
    if model_config_path_or_none is None:
        config = tiny_resnet_config() if model_type == "resnet50" else RAHFCLIPConfig(clip_config=tiny_clip_config())
    else:
        path = resolve_config_path(model_config_path_or_none, "model_config")
        data = json.loads(path.read_text())
        found = data.get("model_type", config_cls.model_type)
        if found != config_cls.model_type:
            raise ValueError(
                f"{str(path)!r} is a {found!r} config but `model_type` {model_type!r} needs a "
                f"{config_cls.model_type!r} one (e.g. configs/model/{model_type}.json)"
            )
        config = config_cls.from_dict(data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(config, RAHFResNetConfig) and config.backbone_name_or_path:
            model = RAHFResNetModel.from_pretrained_backbone(config)
        elif isinstance(config, RAHFCLIPConfig) and config.clip_model_name_or_path:
            model = RAHFCLIPModel.from_pretrained_clip(config)
        else:
            model = model_cls(config)
    return model, _processor_for(model)


# ====================================================================================================================
# Raters


def _resolve_outputs(outputs: Iterable[str] | str | None, capabilities: dict) -> tuple[set[str], set[str], bool]:
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


def _resize_map(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    if heat.shape == (height, width):
        return heat.astype(np.float32, copy=False)
    shrink = height <= heat.shape[0] and width <= heat.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(heat.astype(np.float32, copy=False), (width, height), interpolation=interpolation)


def _saved_model_type(folder: Path) -> str | None:
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
    ):
        self.model = model.eval()
        self.processor = processor
        if device is not None:
            self.model.to(device)
        self.batch_size = int(batch_size)

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike, **kwargs) -> BaselineRater:
        """Loads a trainable baseline (safetensors only, never unpickled) and its processor from a local folder."""
        folder = resolve_pretrained_path(pretrained_path, "pretrained_path", allow_hub=False)
        check_safetensors_folder(folder)
        model_type = _saved_model_type(Path(folder))
        classes = {config_cls.model_type: model_cls for config_cls, model_cls in _TRAINABLE_CLASSES.values()}
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
        want_s, want_h, _ = _resolve_outputs(outputs, self.capabilities)
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
    ):
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
        **kwargs,
    ) -> CLIPRater:
        """Loads a `CLIPModel` checkpoint (hub id or folder) with the tokenizer and image statistics of
        `processor_name_or_path` (default: the checkpoint itself; PickScore's is
        `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`)."""
        model = CLIPModel.from_pretrained(pretrained_model_name_or_path)
        processor = _clip_processor(model.config, str(processor_name_or_path or pretrained_model_name_or_path))
        return cls(model, processor, mode=mode, **kwargs)

    @classmethod
    def from_config(
        cls, config: CLIPConfig | None = None, mode: str = "clip_score", seed: int = 0, **kwargs
    ) -> CLIPRater:
        """A random CLIP (the tiny offline one by default) with the offline tokenizer, for tests and offline demos."""
        config = config or tiny_clip_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        return cls(model, _clip_processor(config, None), mode=mode, **kwargs)

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
            sal = _resize_map(sal, image.height, image.width)
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
        want_s, want_h, _ = _resolve_outputs(outputs, self.capabilities)
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
    ):
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

    def fit(self, split, max_examples: int = 256) -> CenterPriorRater:
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
        _, want_h, _ = _resolve_outputs(outputs, self.capabilities)
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


# ====================================================================================================================
# Registry


@dataclass(frozen=True)
class BaselineSpec:
    """A baseline of the registry: `factory(**kwargs) -> rater`, what it is, whether `rahf train` trains it."""

    factory: Callable[..., Any]
    description: str
    trainable: bool = False


def _trainable_rater(model_type: str):
    def factory(
        model_config: str | os.PathLike | None = None,
        seed: int = 0,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
    ) -> BaselineRater:
        model, processor = build_trainable(model_type, model_config, seed, pretrained_model_name_or_path)
        return BaselineRater(model, processor, device=device, batch_size=batch_size)

    return factory


def _clip_rater(mode: str):
    def factory(
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        processor_name_or_path: str | os.PathLike | None = None,
        seed: int = 0,
        **kwargs,
    ) -> CLIPRater:
        if pretrained_model_name_or_path:
            return CLIPRater.from_pretrained(
                pretrained_model_name_or_path, mode=mode, processor_name_or_path=processor_name_or_path, **kwargs
            )
        logger.warning(
            "%s: no checkpoint given, using a tiny random CLIP (offline); pass a CLIP checkpoint path", mode
        )
        return CLIPRater.from_config(None, mode=mode, seed=seed, **kwargs)

    return factory


BASELINES: dict[str, BaselineSpec] = {
    "resnet50": BaselineSpec(
        _trainable_rater("resnet50"), "ResNet-50 with score and transposed-conv heatmap heads", trainable=True
    ),
    "clip_finetuned": BaselineSpec(_trainable_rater("clip_finetuned"), "CLIP towers + MLP score head", trainable=True),
    "clip_score": BaselineSpec(_clip_rater("clip_score"), "off-the-shelf CLIP cosine as the alignment score"),
    "pickscore": BaselineSpec(_clip_rater("pickscore"), "PickScore checkpoint's score for every score column"),
    "clip_gradient": BaselineSpec(_clip_rater("clip_gradient"), "CLIP gradient map as the misalignment heatmap"),
    "center_prior": BaselineSpec(CenterPriorRater, "centred Gaussian heatmaps (the floor)"),
}


def _unknown(model_type: str) -> ValueError:
    return ValueError(f"unknown baseline `model_type` {model_type!r}; known baselines: {sorted(BASELINES)}")


def build_baseline(model_type: str, **kwargs) -> Any:
    """A rater for the baseline `model_type` (see `BASELINES`); `kwargs` go to its factory.

    Trainable ones (`resnet50`, `clip_finetuned`) take `model_config`, `seed`, `pretrained_model_name_or_path`; CLIP
    ones take `pretrained_model_name_or_path` (a tiny random CLIP without it) and `processor_name_or_path`;
    `center_prior` takes `sigma` and `peak`.
    """
    if model_type not in BASELINES:
        raise _unknown(model_type)
    return BASELINES[model_type].factory(**kwargs)


def _config_model_type(path: Path) -> str | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("model_type")


def load_rater(
    model_dir_or_type: str | os.PathLike,
    model_type: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    **kwargs,
) -> Any:
    """The rater for a saved model folder or a parameter-free baseline name.

    - a folder with a RAHF model (`model_type` "rahf" in its config.json) -> `RichFeedbackPredictor`;
    - a folder with a trained baseline (`rahf_resnet`, `rahf_clip`) -> [`BaselineRater`];
    - a CLIP checkpoint (folder or hub id) with `model_type` `clip_score`, `pickscore` or `clip_gradient` ->
      [`CLIPRater`] (`processor_name_or_path=` in `kwargs` when the tokenizer lives elsewhere, as PickScore's does);
    - a baseline name (`center_prior`, ...) -> `build_baseline(name, **kwargs)`.

    A training run's folder is accepted too: its `final/` model is used.
    """
    if model_type is not None and model_type not in BASELINES and model_type != "rahf":
        raise ValueError(f"unknown `model_type` {model_type!r}; known: {['rahf', *sorted(BASELINES)]}")
    source = str(model_dir_or_type)
    path = Path(source)
    if not path.exists() and source in BASELINES:
        if model_type not in (None, source):
            raise ValueError(f"`model_type` {model_type!r} disagrees with the baseline name {source!r}")
        extra = {"device": device, "batch_size": batch_size} if source != "center_prior" else {}
        return build_baseline(source, **extra, **kwargs)
    if model_type in CLIP_MODES:
        return CLIPRater.from_pretrained(source, mode=model_type, device=device, batch_size=batch_size, **kwargs)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"
    if not path.is_dir():
        raise ValueError(
            f"`model` {source!r} is neither a model folder nor a baseline name; pass a folder written by "
            f"save_pretrained (e.g. a training run's final/) or one of {sorted(BASELINES)}"
        )
    found = _config_model_type(path)
    if found is None:
        raise ValueError(f"{str(path)!r} has no config.json: pass a folder written by save_pretrained")
    if found == "rahf":
        if model_type not in (None, "rahf"):
            raise ValueError(
                f"{str(path)!r} holds a RAHF model, but `model_type` is {model_type!r}; drop --model_type"
            )
        from .predictor import RichFeedbackPredictor

        return RichFeedbackPredictor.from_pretrained(path, device=device, batch_size=batch_size, **kwargs)
    by_config = {RAHFResNetConfig.model_type: "resnet50", RAHFCLIPConfig.model_type: "clip_finetuned"}
    if found in by_config:
        if model_type not in (None, by_config[found]):
            raise ValueError(
                f"{str(path)!r} holds a {by_config[found]!r} baseline, but `model_type` is {model_type!r}; "
                "drop --model_type"
            )
        return BaselineRater.from_pretrained(path, device=device, batch_size=batch_size, **kwargs)
    if found == "clip":
        raise ValueError(
            f"{str(path)!r} is a CLIP checkpoint: say how to use it with `model_type` one of {list(CLIP_MODES)}"
        )
    raise ValueError(
        f"{str(path)!r} holds a {found!r} model, which rahf cannot rate with; known: rahf, {sorted(BASELINES)}"
    )
