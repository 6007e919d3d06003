"""The ResNet baseline (the paper's "ResNet-50" rows of Tables 1 and 2): [`RAHFResNetConfig`], [`RAHFResNetModel`],
registered with AutoConfig / AutoModel as `rahf_resnet`, and the tiny offline configuration."""

from __future__ import annotations

import math
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel, ResNetConfig, ResNetModel

from ..configuration_rahf import DEFAULT_HEATMAP_NAMES, DEFAULT_SCORE_NAMES
from ..modeling_rahf import RAHFHeatmapHead, RAHFOutput, SafetensorsOnlyMixin
from .heads import baseline_losses, check_output_names, init_own, mark_own, mlp
from .processing import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["RAHFResNetConfig", "RAHFResNetModel", "RAHFResNetPreTrainedModel", "tiny_resnet_config"]


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

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.score_names = list(DEFAULT_SCORE_NAMES if self.score_names is None else self.score_names)
        self.heatmap_names = list(DEFAULT_HEATMAP_NAMES if self.heatmap_names is None else self.heatmap_names)
        check_output_names(self.score_names, self.heatmap_names)
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
    """Loading, saving (safetensors only) and initialisation of [`RAHFResNetModel`]."""

    config_class = RAHFResNetConfig
    base_model_prefix = "rahf_resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ResNetStage"]

    def _init_weights(self, module: nn.Module) -> None:
        init_own(module)


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
    ) -> None:
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
        self.score_head = mlp(channels, config.score_head_hidden_sizes, len(config.score_names))
        mark_own(self.heatmap_head, self.score_head)
        self.heatmap_head.out._rahf_heatmap_out = True
        self.post_init()

    @classmethod
    def from_pretrained_backbone(
        cls, config: RAHFResNetConfig, backbone_name_or_path: str | None = None, **kwargs: Any
    ) -> RAHFResNetModel:
        """Builds the baseline with a pretrained ResNet (hub id or local folder, e.g. `microsoft/resnet-50`, whose
        `ResNetForImageClassification` weights load into the backbone) and fresh heads.

        `config.resnet_config` is replaced by the checkpoint's. `kwargs` go to `ResNetModel.from_pretrained`.
        """
        path = backbone_name_or_path or config.backbone_name_or_path
        if not path:
            raise ValueError("pass `backbone_name_or_path` (e.g. 'microsoft/resnet-50') or set it in the config")
        config = config.__class__.from_dict(config.to_dict())  # never mutate the caller's config
        kwargs = {"use_safetensors": True, **kwargs}  # never unpickle a backbone
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
        **kwargs: Any,
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
        loss, heatmap_loss, score_loss = baseline_losses(self.config, heatmaps, heatmap_labels, scores, score_labels)
        out = RAHFOutput(loss=loss, heatmaps=heatmaps, scores=scores, heatmap_loss=heatmap_loss, score_loss=score_loss)
        return out if return_dict else out.to_tuple()


def tiny_resnet_config(**overrides: Any) -> RAHFResNetConfig:
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


AutoConfig.register(RAHFResNetConfig.model_type, RAHFResNetConfig, exist_ok=True)
AutoModel.register(RAHFResNetConfig, RAHFResNetModel, exist_ok=True)
