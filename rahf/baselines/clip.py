"""The fine-tuned CLIP baseline (the paper's "CLIP (fine-tuned)" row of Table 1): [`RAHFCLIPConfig`],
[`RAHFCLIPModel`], registered with AutoConfig / AutoModel as `rahf_clip`, and the tiny offline CLIP configuration."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, PreTrainedConfig, PreTrainedModel

from ..configuration_rahf import DEFAULT_SCORE_NAMES
from ..modeling_rahf import RAHFOutput, SafetensorsOnlyMixin
from .heads import baseline_losses, check_output_names, init_own, mark_own, mlp

__all__ = ["RAHFCLIPConfig", "RAHFCLIPModel", "RAHFCLIPPreTrainedModel", "tiny_clip_config"]


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

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.fusion not in ("concat", "multiply"):
            raise ValueError(f"`fusion` must be 'concat' or 'multiply', got {self.fusion!r}")
        self.score_names = list(DEFAULT_SCORE_NAMES if self.score_names is None else self.score_names)
        self.heatmap_names = list(self.heatmap_names or [])
        if self.heatmap_names:
            raise ValueError(
                f"the CLIP baseline predicts no heatmaps; `heatmap_names` must be empty, got {self.heatmap_names}"
            )
        check_output_names(self.score_names, self.heatmap_names)
        self.score_head_hidden_sizes = list(
            [512] if self.score_head_hidden_sizes is None else self.score_head_hidden_sizes
        )
        if self.max_text_length is None:
            self.max_text_length = int(self.clip_config.text_config.max_position_embeddings)
        if self.heatmap_size < 1:
            raise ValueError(f"`heatmap_size` must be positive, got {self.heatmap_size}")


class RAHFCLIPPreTrainedModel(SafetensorsOnlyMixin, PreTrainedModel):
    """Loading, saving (safetensors only) and initialisation of [`RAHFCLIPModel`]."""

    config_class = RAHFCLIPConfig
    base_model_prefix = "rahf_clip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        init_own(module)


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

    def __init__(self, config: RAHFCLIPConfig, clip: CLIPModel | None = None) -> None:
        super().__init__(config)
        self.clip = clip if clip is not None else CLIPModel(config.clip_config)
        # The contrastive temperature takes no part in this loss: freezing it keeps DDP from waiting for its gradient.
        self.clip.logit_scale.requires_grad_(False)
        if config.freeze_towers:
            self.clip.requires_grad_(False)
        dim = config.clip_config.projection_dim
        in_features = 2 * dim if config.fusion == "concat" else dim
        self.fusion_norm = nn.LayerNorm(in_features)
        self.score_head = mlp(in_features, config.score_head_hidden_sizes, len(config.score_names))
        mark_own(self.fusion_norm, self.score_head)
        self.post_init()

    @classmethod
    def from_pretrained_clip(
        cls, config: RAHFCLIPConfig, clip_model_name_or_path: str | None = None, **kwargs: Any
    ) -> RAHFCLIPModel:
        """Builds the baseline with a pretrained CLIP (hub id or local folder) and a fresh MLP."""
        path = clip_model_name_or_path or config.clip_model_name_or_path
        if not path:
            raise ValueError(
                "pass `clip_model_name_or_path` (e.g. 'openai/clip-vit-large-patch14') or set it in the config"
            )
        config = config.__class__.from_dict(config.to_dict())
        clip = CLIPModel.from_pretrained(path, **{"use_safetensors": True, **kwargs})  # never unpickle a tower
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
        **kwargs: Any,
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
        loss, _, score_loss = baseline_losses(self.config, None, None, scores, score_labels)
        out = RAHFOutput(loss=loss, scores=scores, score_loss=score_loss)
        return out if return_dict else out.to_tuple()


def tiny_clip_config(vocab_size: int = 512, image_size: int = 32, **overrides: Any) -> CLIPConfig:
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


AutoConfig.register(RAHFCLIPConfig.model_type, RAHFCLIPConfig, exist_ok=True)
AutoModel.register(RAHFCLIPConfig, RAHFCLIPModel, exist_ok=True)
