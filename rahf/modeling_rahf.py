"""`RAHFModel`: the Rich Automatic Human Feedback model of Liang et al. (CVPR 2024, Fig. 3).

A vision tower turns the image into tokens; they are projected to the T5 width, concatenated with the prompt's T5
embeddings and fused by the T5 encoder. The fused image tokens, reshaped to a feature map, feed a heatmap head and a
score head; the T5 decoder writes the prompt back with ` 0` after each misaligned word.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionModel,
    PreTrainedModel,
    SiglipVisionModel,
    T5ForConditionalGeneration,
    ViTModel,
)
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, logging

from .configuration_rahf import KEYWORDS_TASK, RAHFConfig
from .pretrained_paths import resolve_pretrained_path

logger = logging.get_logger(__name__)

# Heatmaps are mostly empty; starting the heatmap logits here (sigmoid ~ 0.018) saves the first steps of training
# from learning "predict zero".
_HEATMAP_BIAS_INIT = -4.0


def _build_vision_tower(config) -> nn.Module:
    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False)
    if config.model_type == "siglip_vision_model":
        return SiglipVisionModel(config)
    if config.model_type == "clip_vision_model":
        return CLIPVisionModel(config)
    raise ValueError(f"unsupported vision tower model_type {config.model_type!r}")


@dataclass
class RAHFOutput(ModelOutput):
    """
    Output of [`RAHFModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Weighted sum of the heatmap MSE, score MSE and sequence cross-entropy, when labels are given.
        heatmaps (`torch.FloatTensor` of shape `(batch_size, num_heatmaps, heatmap_size, heatmap_size)`, *optional*):
            Predicted heatmaps in [0, 1], in `config.heatmap_names` order. In the augmented-prompt variant, heatmaps
            of tasks not requested are NaN.
        scores (`torch.FloatTensor` of shape `(batch_size, num_scores)`, *optional*):
            Predicted scores in [0, 1], in `config.score_names` order (NaN where not requested).
        sequence_logits (`torch.FloatTensor` of shape `(num_keyword_rows, target_length, vocab_size)`, *optional*):
            Decoder logits of the keyword sequence (teacher forcing), one row per image.
        heatmap_loss (`torch.FloatTensor` of shape `()`, *optional*): per-pixel heatmap MSE (or BCE, `config.heatmap_loss`)
            over the known pixels; 0 when no pixel of the batch is known (checking would stall the host for the device).
        score_loss (`torch.FloatTensor` of shape `()`, *optional*): score MSE over the known scores; 0 when none is.
        sequence_loss (`torch.FloatTensor` of shape `()`, *optional*): token cross-entropy of the keyword sequence.
    """

    loss: torch.FloatTensor | None = None
    heatmaps: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    sequence_logits: torch.FloatTensor | None = None
    heatmap_loss: torch.FloatTensor | None = None
    score_loss: torch.FloatTensor | None = None
    sequence_loss: torch.FloatTensor | None = None


def _masked_mean(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """The mean of `values` where `known`, 0 where nothing is known: no boolean indexing and no `if known.any()`, so
    that the loss never makes the host wait for the device (each would be a sync per step on a GPU)."""
    return torch.where(known, values, 0.0).sum() / known.sum().clamp_min(1)


class RAHFHeatmapHead(nn.Module):
    """Feature map -> conv -> transposed convs (x2 each) -> 1x1 conv, resized to `heatmap_size`: the heatmap's logits
    (a sigmoid gives the heatmap; the BCE loss works on the logits, so that saturated pixels keep their gradient)."""

    def __init__(self, in_channels: int, channels: int, grid: int, heatmap_size: int, out_channels: int):
        super().__init__()
        self.heatmap_size = heatmap_size
        num_up = max(0, math.ceil(math.log2(heatmap_size / grid))) if heatmap_size > grid else 0
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU()]
        c = channels
        for _ in range(num_up):
            c_out = max(c // 2, 8)
            layers += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1), nn.ReLU()]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.body(features))  # (B, C, H', W')
        if logits.shape[-1] != self.heatmap_size:
            logits = F.interpolate(logits, size=(self.heatmap_size,) * 2, mode="bilinear", align_corners=False)
        return logits


class RAHFScoreHead(nn.Module):
    """Feature map -> 3x3 convs -> global average pool (or, with `pooling="flatten"`, the whole map flattened) -> MLP
    -> sigmoid."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_convs: int,
        hidden_size: int,
        num_scores: int,
        pooling: str = "mean",
        grid: int | None = None,
    ):
        super().__init__()
        if pooling not in ("mean", "flatten") or (pooling == "flatten" and not grid):
            raise ValueError(f"`pooling` must be 'mean', or 'flatten' with the feature map's `grid`, got {pooling!r}")
        self.pooling = pooling
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
            c = channels
        self.convs = nn.Sequential(*layers)
        width = c * grid * grid if pooling == "flatten" else c
        self.mlp = nn.Sequential(nn.Linear(width, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_scores))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.convs(features)  # (B, C, g, g)
        pooled = x.flatten(1) if self.pooling == "flatten" else x.mean(dim=(2, 3))  # (B, C * g * g) or (B, C)
        return torch.sigmoid(self.mlp(pooled))


class RAHFLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RAHFResidualBlock(nn.Module):
    """x + (conv 3x3 -> LayerNorm -> ReLU -> conv 3x3 -> LayerNorm)(x), then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            RAHFLayerNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            RAHFLayerNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class RAHFSeparateHeatmapHead(nn.Module):
    """One heatmap's head in the re-implementation's structure: a wide 3x3 convolution with LayerNorm, then upsampling
    stages (a stride-2 transposed convolution with LayerNorm, then a residual block), a 1x1 convolution to one channel,
    resized to `heatmap_size`: the heatmap's logits."""

    def __init__(self, in_channels: int, channels: int, grid: int, heatmap_size: int):
        super().__init__()
        self.heatmap_size = heatmap_size
        num_up = max(0, math.ceil(math.log2(heatmap_size / grid))) if heatmap_size > grid else 0
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, padding=1),
            RAHFLayerNorm2d(channels),
            nn.ReLU(),
        ]
        c = channels
        for _ in range(num_up):
            c_out = max(c // 2, 8)
            layers += [
                nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1),
                RAHFLayerNorm2d(c_out),
                nn.ReLU(),
                RAHFResidualBlock(c_out),
            ]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.body(features))  # (B, 1, H', W')
        if logits.shape[-1] != self.heatmap_size:
            logits = F.interpolate(logits, size=(self.heatmap_size,) * 2, mode="bilinear", align_corners=False)
        return logits


class RAHFHeadSet(nn.Module):
    """One head per output (`config.head_structure = "separate"`): all of them stacked along dim 1, or, given
    `head_index` (one per row), each row through its own head."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features: torch.Tensor, head_index: torch.Tensor | None = None) -> torch.Tensor:
        if head_index is None:
            return torch.cat([head(features) for head in self.heads], dim=1)  # (B, n, ...)
        out = None
        for k, head in enumerate(self.heads):
            rows = torch.nonzero(head_index == k).flatten()
            if not len(rows):
                continue
            pred = head(features[rows])  # (R_k, 1, ...)
            if out is None:
                out = pred.new_zeros((features.shape[0], *pred.shape[1:]))
            out = out.index_copy(0, rows, pred)
        assert out is not None, "head_index selects no head"
        return out  # (B, 1, ...)


class KeywordMarkerThresholdLogitsProcessor(LogitsProcessor):
    """Keyword decoding at a marker threshold: the ` 0` marker is written exactly when its probability is at least
    `threshold` (and the previous token is not already a marker); otherwise it is ruled out and greedy search takes
    the likeliest other token. `threshold=0.5` is greedy decoding up to ties."""

    def __init__(self, marker_token_id: int, threshold: float):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be a probability in (0, 1), got {threshold!r}")
        self.marker_token_id = int(marker_token_id)
        self.threshold = float(threshold)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        marker = self.marker_token_id
        p = scores.float().softmax(dim=-1)[:, marker]
        write = (p >= self.threshold) & (input_ids[:, -1] != marker)
        out = scores.clone()
        low = torch.finfo(out.dtype).min
        out[write] = low
        out[write, marker] = 0.0
        out[~write, marker] = low
        return out


SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# Weight files that only unpickling could read.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safetensors_folder(folder: str | os.PathLike, shown: str | None = None) -> None:
    """Raises a ValueError unless the local `folder` holds safetensors weights; one that holds only pickled weights
    (`pytorch_model.bin`, ...) is named with the command that converts it. Nothing is ever unpickled."""
    folder = Path(folder)
    shown = shown or str(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if any(name in names for name in SAFETENSORS_WEIGHTS):
        return
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES) or n == "pytorch_model.bin.index.json"]
    if not pickles:
        raise ValueError(
            f"`{shown}` holds no model.safetensors; pass a folder written by `save_pretrained` (or `rahf init-model`, "
            "`rahf train`)"
        )
    name = "pytorch_model.bin" if "pytorch_model.bin" in pickles else pickles[0]
    pickled = (folder / name).as_posix()
    target = (folder / "model.safetensors").as_posix()
    convert = (
        f'python -c "import torch; from safetensors.torch import save_file; save_file({{k: v.clone().contiguous() '
        f"for k, v in torch.load('{pickled}', weights_only=True).items()}}, '{target}', metadata={{'format': 'pt'}})\""
    )
    raise ValueError(
        f"`{shown}` holds {name} but no model.safetensors; rahf loads weights from safetensors only (never "
        f"unpickles): convert it, if you trust the file, with {convert}"
    )


def _check_saved_config(model_class: type, folder: Path, shown: str) -> None:
    """Reads `folder`/config.json as `model_class.config_class` would, so that a bad one is an error naming the file
    (and the field, by the config's own checks) instead of a traceback from inside the loader."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"`{shown}` has no config.json; pass a folder written by `save_pretrained`")
    try:
        data = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"`{config_file}` is not valid JSON ({err}); fix it or save the model again") from None
    if not isinstance(data, dict):
        raise ValueError(f"`{config_file}` must hold a JSON object, got a {type(data).__name__}")
    config_class = model_class.config_class
    expected = config_class.model_type
    found = data.get("model_type")
    if found != expected:
        raise ValueError(
            f"`{shown}` holds a {found!r} model (config.json's model_type), not a {expected!r} one; pass a folder "
            f"written by {model_class.__name__}.save_pretrained"
        )
    try:
        config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{config_file}`: {err}") from None


class SafetensorsOnlyMixin:
    """`from_pretrained` that loads safetensors weights only (never unpickles) and turns the usual mistakes with a
    local folder (missing, no safetensors, a bad config.json) into one clear ValueError, before transformers' loader
    runs. A missing folder that looks local is never looked up on the model hub."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        if kwargs.get("use_safetensors") is False or kwargs.get("weights_only") is False:
            raise ValueError(
                f"{cls.__name__}.from_pretrained loads safetensors only: drop `use_safetensors=False` / "
                "`weights_only=False`, and convert pickled weights to model.safetensors"
            )
        kwargs["use_safetensors"] = True
        name = cls.check_pretrained_folder(
            pretrained_model_name_or_path,
            subfolder=kwargs.get("subfolder") or "",
            check_config=kwargs.get("config") is None,
        )
        return super().from_pretrained(name, *model_args, **kwargs)

    @classmethod
    def check_pretrained_folder(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        flag: str = "pretrained_model_name_or_path",
        subfolder: str = "",
        check_config: bool = True,
    ) -> str:
        """What `from_pretrained` checks before loading, without loading: returns the name to load (a folder or a
        hub id); a missing local-looking folder, one without safetensors weights, or a bad config.json is a
        ValueError naming `flag`, the folder and the fix."""
        name = resolve_pretrained_path(pretrained_model_name_or_path, flag)
        folder = Path(name).expanduser() / subfolder
        if folder.is_dir():
            check_safetensors_folder(folder, name)
            if check_config:
                _check_saved_config(cls, folder, name)
        return name


class RAHFPreTrainedModel(SafetensorsOnlyMixin, PreTrainedModel):
    config_class = RAHFConfig
    base_model_prefix = "rahf"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # Attention lives in the towers (ViT/SigLIP/CLIP and T5), which run it through
    # `F.scaled_dot_product_attention` ("sdpa", transformers' default) or in eager form ("eager", the reference the
    # tests compare with): `RAHFModel(config).set_attn_implementation(...)` or
    # `RAHFModel.from_pretrained(path, attn_implementation=...)` switches both towers at once. T5 has no
    # flash-attention path in transformers (its relative position bias is an additive mask), so SDPA is the fast one.
    _supports_sdpa = True
    _no_split_modules = ["T5Block", "ViTLayer", "SiglipEncoderLayer", "CLIPEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only our own layers: the towers initialise themselves (or come pretrained).
        if not getattr(module, "_rahf_own", False):
            return
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if getattr(module, "_rahf_heatmap_out", False):
            nn.init.constant_(module.bias, _HEATMAP_BIAS_INIT)


class RAHFModel(RAHFPreTrainedModel):
    r"""
    The RAHF model: predicts scores, heatmaps and the misaligned prompt words of a generated image.

    Examples:

    ```python
    >>> from rahf import RAHFConfig, RAHFModel, RAHFProcessor
    >>> from PIL import Image

    >>> config = RAHFConfig.from_json_file("configs/model/tiny.json")
    >>> model, processor = RAHFModel(config), RAHFProcessor.from_config(config)
    >>> inputs = processor(images=[Image.new("RGB", (64, 64))], text=["a red circle"], return_tensors="pt")
    >>> out = model(**inputs)
    >>> out.heatmaps.shape, out.scores.shape
    (torch.Size([1, 2, 32, 32]), torch.Size([1, 4]))
    ```
    """

    def __init__(self, config: RAHFConfig, vision_model: nn.Module | None = None, text_model: nn.Module | None = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else _build_vision_tower(config.vision_config)
        self.text_model = text_model if text_model is not None else T5ForConditionalGeneration(config.text_config)
        d_model = config.text_config.d_model
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, d_model)
        multi = config.variant == "multi_head"
        score_args = (config.score_head_channels, config.score_head_num_convs, config.score_head_hidden_size)
        score_kwargs = {"pooling": config.score_head_pooling, "grid": config.patch_grid}
        if config.head_structure == "separate":
            self.heatmap_head = RAHFHeadSet(
                [
                    RAHFSeparateHeatmapHead(
                        d_model, config.heatmap_head_channels, config.patch_grid, config.heatmap_size
                    )
                    for _ in config.heatmap_names
                ]
            )
            self.score_head = RAHFHeadSet(
                [RAHFScoreHead(d_model, *score_args, 1, **score_kwargs) for _ in config.score_names]
            )
        else:
            self.heatmap_head = RAHFHeatmapHead(
                d_model,
                config.heatmap_head_channels,
                config.patch_grid,
                config.heatmap_size,
                len(config.heatmap_names) if multi else 1,
            )
            self.score_head = RAHFScoreHead(
                d_model, *score_args, len(config.score_names) if multi else 1, **score_kwargs
            )
        for head in (self.visual_projection, self.heatmap_head, self.score_head):
            for m in head.modules():
                m._rahf_own = True
            for m in head.modules():
                if isinstance(m, (RAHFHeatmapHead, RAHFSeparateHeatmapHead)):
                    m.out._rahf_heatmap_out = True
        self.post_init()
        # The blocks FSDP wraps one by one (accelerate's transformer wrap policy takes these when no class is named):
        # only those this model holds, since a class named but absent is an error there (post_init gathers the
        # towers' lists, and SigLIP's names its text half).
        present = {type(m).__name__ for m in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    # ----------------------------------------------------------------------------------------------------------------
    # Building from pretrained towers

    @classmethod
    def from_pretrained_towers(
        cls,
        config: RAHFConfig,
        vision_model_name_or_path: str | None = None,
        text_model_name_or_path: str | None = None,
        **kwargs,
    ) -> RAHFModel:
        """Builds RAHF with pretrained towers (hub ids or local folders) and freshly initialised heads.

        `config.vision_config` / `config.text_config` are replaced by the towers' own configurations. Paths default
        to `config.vision_model_name_or_path` / `config.text_model_name_or_path`; a tower with no path is random.
        `kwargs` (e.g. `revision`, `dtype`) go to each tower's `from_pretrained`.
        """
        vision_path = vision_model_name_or_path or config.vision_model_name_or_path
        text_path = text_model_name_or_path or config.text_model_name_or_path
        # A mistyped local tower is an error here, not a model-hub lookup.
        if vision_path:
            vision_path = resolve_pretrained_path(
                vision_path, "vision_model_name_or_path", what="a vision-tower folder"
            )
        if text_path:
            text_path = resolve_pretrained_path(text_path, "text_model_name_or_path", what="a T5 folder or hub id")
        config = config.__class__.from_dict(config.to_dict())  # never mutate the caller's config
        vision_model = text_model = None
        if vision_path:
            tower_config = AutoConfig.from_pretrained(vision_path, **kwargs)
            model_type = tower_config.model_type
            if model_type in ("siglip", "clip"):  # a full dual-encoder checkpoint: take its vision half
                tower_config = tower_config.vision_config
            tower_cls = {
                "vit": ViTModel,
                "siglip_vision_model": SiglipVisionModel,
                "clip_vision_model": CLIPVisionModel,
            }.get(tower_config.model_type)
            if tower_cls is None:
                raise ValueError(
                    f"`vision_model_name_or_path`={vision_path!r} is a {model_type!r} model; RAHF takes a ViT, "
                    "SigLIP or CLIP vision tower"
                )
            extra = {"add_pooling_layer": False} if tower_cls is ViTModel else {}
            vision_model = tower_cls.from_pretrained(vision_path, **extra, **{"use_safetensors": True, **kwargs})
            config.vision_config = vision_model.config
            config.vision_model_name_or_path = str(vision_path)
        if text_path:
            text_model = T5ForConditionalGeneration.from_pretrained(text_path, **{"use_safetensors": True, **kwargs})
            config.text_config = text_model.config
            config.text_model_name_or_path = str(text_path)
        return cls(config, vision_model=vision_model, text_model=text_model)

    # ----------------------------------------------------------------------------------------------------------------
    # The three stages of Fig. 3

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, N, d_model) projected patch tokens (the class token, if any, dropped; pooled
        `config.image_token_pool` x `config.image_token_pool` when that is above 1)."""
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, T, D_v)
        grid, pool = self.config.tower_grid, self.config.image_token_pool
        hidden = hidden[:, -grid * grid :]  # ViT and CLIP put a class token first
        if pool > 1:  # (B, g*g, D) -> (B, (g/p)*(g/p), D), row-major like the tower's own tokens
            maps = hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], grid, grid)
            hidden = F.avg_pool2d(maps, pool).flatten(2).transpose(1, 2)
        return self.visual_projection(hidden)  # (B, N, d_model)

    def fuse(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (R, N, d) and prompt ids (R, L) -> fused tokens (R, N + L, d) and their mask (R, N + L)."""
        text_embeds = self.text_model.get_input_embeddings()(input_ids)  # (R, L, d)
        inputs_embeds = torch.cat([image_embeds.to(text_embeds.dtype), text_embeds], dim=1)  # (R, N + L, d)
        mask = self._fusion_mask(image_embeds.shape[1], input_ids, attention_mask)  # (R, N + L)
        fused = self.text_model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        return fused, mask

    @staticmethod
    def _fusion_mask(
        num_image_tokens: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_mask = attention_mask.new_ones((attention_mask.shape[0], num_image_tokens))
        return torch.cat([image_mask, attention_mask], dim=1)  # (R, N + L)

    def _reuse_fused(
        self, fused_hidden_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_image_tokens = fused_hidden_states.shape[1] - input_ids.shape[1]
        if fused_hidden_states.shape[0] != input_ids.shape[0] or num_image_tokens <= 0:
            raise ValueError(
                f"`fused_hidden_states` of shape {tuple(fused_hidden_states.shape)} does not match `input_ids` of "
                f"shape {tuple(input_ids.shape)}: pass the first output of `fuse` for these same rows"
            )
        return fused_hidden_states, self._fusion_mask(num_image_tokens, input_ids, attention_mask)

    def _feature_map(self, fused: torch.Tensor) -> torch.Tensor:
        grid = self.config.patch_grid
        image_tokens = fused[:, : grid * grid]  # (R, N, d)
        return image_tokens.transpose(1, 2).reshape(fused.shape[0], -1, grid, grid)  # (R, d, g, g)

    def _decoder_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.config.decoder_attends_to == "text":
            mask = mask.clone()
            mask[:, : self.config.patch_grid**2] = 0
        return mask

    # ----------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        heatmap_labels: torch.Tensor | None = None,
        score_labels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        fused_hidden_states: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RAHFOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`):
                Images from [`RAHFProcessor`]. Not needed when `image_embeds` is given.
            input_ids (`torch.LongTensor` of shape `(num_rows, text_length)`):
                Prompt token ids: one row per image (multi-head), or one row per (image, task) (augmented prompt).
            attention_mask (`torch.LongTensor` of shape `(num_rows, text_length)`, *optional*):
                1 for real tokens, 0 for padding.
            task_ids (`torch.LongTensor` of shape `(num_rows,)`, *optional*):
                Augmented-prompt variant: index of each row's task in `config.task_names`.
            image_index (`torch.LongTensor` of shape `(num_rows,)`, *optional*):
                Which image each row belongs to; defaults to `num_rows // batch_size` consecutive rows per image.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, num_patches, d_model)`, *optional*):
                Output of [`~RAHFModel.get_image_features`], to reuse the vision tower's work.
            heatmap_labels (`torch.FloatTensor` of shape `(batch_size, num_heatmaps, heatmap_size, heatmap_size)`, *optional*):
                Target heatmaps in [0, 1]; NaN pixels are unknown and left out of the loss.
            score_labels (`torch.FloatTensor` of shape `(batch_size, num_scores)`, *optional*):
                Target scores in [0, 1]; NaN entries are unknown and left out of the loss.
            labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
                Token ids of the ` 0`-marked keyword sequence, -100 on padding.
            decoder_input_ids (`torch.LongTensor` of shape `(num_keyword_rows, target_length)`, *optional*):
                Decoder inputs, when not derived from `labels`.
            fused_hidden_states (`torch.FloatTensor` of shape `(num_rows, num_patches + text_length, d_model)`, *optional*):
                The first output of [`~RAHFModel.fuse`] for these rows, to reuse the fusion encoder's work (scoring
                and keyword decoding of the same rows); `image_embeds` is still needed for the batch size.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cfg = self.config
        if input_ids is None:
            raise ValueError("`input_ids` is required: tokenize the prompts with RAHFProcessor")
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("pass either `pixel_values` or `image_embeds`")
            image_embeds = self.get_image_features(pixel_values)  # (B, N, d)
        batch_size, num_rows = image_embeds.shape[0], input_ids.shape[0]
        if image_index is None:
            if num_rows % batch_size:
                raise ValueError(
                    f"{num_rows} prompt rows for {batch_size} images: pass `image_index` to say which image each "
                    "row belongs to"
                )
            image_index = torch.arange(batch_size, device=input_ids.device).repeat_interleave(num_rows // batch_size)
        multi = cfg.variant == "multi_head"
        if not multi and task_ids is None:
            raise ValueError("the augmented-prompt variant needs `task_ids` (RAHFProcessor returns them)")

        if fused_hidden_states is not None:
            fused, mask = self._reuse_fused(fused_hidden_states, input_ids, attention_mask)
        else:
            fused, mask = self.fuse(image_embeds[image_index], input_ids, attention_mask)  # (R, N + L, d)
        feature_map = self._feature_map(fused)  # (R, d, g, g)
        num_h, num_s = len(cfg.heatmap_names), len(cfg.score_names)
        size = cfg.heatmap_size

        if multi:
            rows_h = rows_s = rows_k = torch.arange(num_rows, device=fused.device)
            heatmap_logits = self.heatmap_head(feature_map)  # (R, num_h, S, S)
            scores = self.score_head(feature_map)  # (R, num_s)
            if num_rows != batch_size:  # several prompts per image (unusual): the last row of each image wins
                heatmap_logits = heatmap_logits.new_full((batch_size, num_h, size, size), float("-inf")).index_copy(
                    0, image_index, heatmap_logits
                )
                scores = scores.new_zeros(batch_size, num_s).index_copy(0, image_index, scores)
        else:
            task_ids = task_ids.to(fused.device)
            rows_h = torch.nonzero(task_ids < num_h).flatten()
            rows_s = torch.nonzero((task_ids >= num_h) & (task_ids < num_h + num_s)).flatten()
            rows_k = torch.nonzero(task_ids == cfg.task_names.index(KEYWORDS_TASK)).flatten()
            heatmap_logits = fused.new_full((batch_size, num_h, size, size), float("nan"))
            scores = fused.new_full((batch_size, num_s), float("nan"))
            separate = cfg.head_structure == "separate"  # then each task row goes through its own head
            if len(rows_h):
                index = (task_ids[rows_h],) if separate else ()
                pred = self.heatmap_head(feature_map[rows_h], *index)[:, 0]  # (R_h, S, S)
                heatmap_logits = heatmap_logits.index_put((image_index[rows_h], task_ids[rows_h]), pred)
            if len(rows_s):
                index = (task_ids[rows_s] - num_h,) if separate else ()
                pred = self.score_head(feature_map[rows_s], *index)[:, 0]  # (R_s,)
                scores = scores.index_put((image_index[rows_s], task_ids[rows_s] - num_h), pred)

        heatmaps = torch.sigmoid(heatmap_logits)  # NaN (a task not asked for) stays NaN

        # Keyword sequence (teacher forcing), only when asked for: inference uses `generate_keywords`.
        sequence_logits = None
        keyword_labels = None
        if (labels is not None or decoder_input_ids is not None) and len(rows_k):
            keyword_labels = labels[image_index[rows_k]] if labels is not None else None
            dec = self.text_model(
                encoder_outputs=BaseModelOutput(last_hidden_state=fused[rows_k]),
                attention_mask=self._decoder_mask(mask[rows_k]),
                labels=keyword_labels,
                decoder_input_ids=decoder_input_ids,
            )
            sequence_logits = dec.logits  # (R_k, T, V)

        loss = heatmap_loss = score_loss = sequence_loss = None
        terms = []
        if heatmap_labels is not None:
            heatmap_labels = heatmap_labels.to(heatmaps.dtype)
            if heatmap_labels.shape != heatmaps.shape:
                raise ValueError(
                    f"`heatmap_labels` must have shape {tuple(heatmaps.shape)} (batch, heatmaps, size, size), "
                    f"got {tuple(heatmap_labels.shape)}"
                )
            # NaN predictions are tasks not asked for; NaN labels are unknown (e.g. after a word swap): both skipped.
            known = ~torch.isnan(heatmaps) & ~torch.isnan(heatmap_labels)
            target = torch.where(known, heatmap_labels, 0.0).float()
            if cfg.heatmap_loss == "bce":
                # On the logits, in float32: no clamp, so saturated pixels keep their gradient, and autocast-safe.
                per_pixel = F.binary_cross_entropy_with_logits(
                    torch.where(known, heatmap_logits, 0.0).float(), target, reduction="none"
                )
            else:
                per_pixel = (torch.where(known, heatmaps, 0.0).float() - target) ** 2
            heatmap_loss = _masked_mean(per_pixel, known).to(heatmaps.dtype)
            terms.append(cfg.heatmap_loss_weight * heatmap_loss)
        if score_labels is not None:
            score_labels = score_labels.to(scores.dtype)
            if score_labels.shape != scores.shape:
                raise ValueError(
                    f"`score_labels` must have shape {tuple(scores.shape)}, got {tuple(score_labels.shape)}"
                )
            known = ~torch.isnan(scores) & ~torch.isnan(score_labels)
            error = (torch.where(known, scores, 0.0) - torch.where(known, score_labels, 0.0)) ** 2
            score_loss = _masked_mean(error, known)
            terms.append(cfg.score_loss_weight * score_loss)
        if keyword_labels is not None and sequence_logits is not None:
            sequence_loss = F.cross_entropy(
                sequence_logits.flatten(0, 1).float(),
                keyword_labels.flatten().to(sequence_logits.device),
                ignore_index=-100,
            )
            terms.append(cfg.sequence_loss_weight * sequence_loss)
        if terms:
            loss = torch.stack(terms).sum()

        out = RAHFOutput(
            loss=loss,
            heatmaps=heatmaps,
            scores=scores,
            sequence_logits=sequence_logits,
            heatmap_loss=heatmap_loss,
            score_loss=score_loss,
            sequence_loss=sequence_loss,
        )
        return out if return_dict else out.to_tuple()

    @torch.no_grad()
    def generate_keywords(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        keyword_threshold: float | None = None,
        marker_token_id: int | None = None,
        fused_hidden_states: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy-decodes the ` 0`-marked keyword sequence for each row of `input_ids` -> (R, T) token ids.

        In the augmented-prompt variant the rows must carry the keywords task string (RAHFProcessor does this).
        `keyword_threshold` (default: `config.keyword_threshold`) decodes at a marker threshold (see
        [`RAHFConfig`]); it needs `marker_token_id`, the id of the ` 0` marker (`RAHFProcessor.marker_token_id`).
        Decoding keeps the decoder's keys and values between steps (the KV cache, self- and cross-attention), so a
        step costs one token's pass; `use_cache=False` recomputes the whole prefix each step, with the same tokens.
        `fused_hidden_states` (the first output of [`~RAHFModel.fuse`] for these rows) skips the fusion encoder.
        """
        threshold = keyword_threshold if keyword_threshold is not None else self.config.keyword_threshold
        if threshold is not None:
            if marker_token_id is None:
                raise ValueError(
                    "decoding at a `keyword_threshold` needs `marker_token_id` (RAHFProcessor.marker_token_id)"
                )
            processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
            processors.append(KeywordMarkerThresholdLogitsProcessor(marker_token_id, threshold))
            generate_kwargs["logits_processor"] = processors
        if fused_hidden_states is not None:
            fused, mask = self._reuse_fused(fused_hidden_states, input_ids, attention_mask)
        else:
            if image_embeds is None:
                image_embeds = self.get_image_features(pixel_values)
            if image_index is None:
                image_index = torch.arange(image_embeds.shape[0], device=input_ids.device)
            fused, mask = self.fuse(image_embeds[image_index], input_ids, attention_mask)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("num_beams", 1)
        generate_kwargs.setdefault("use_cache", True)
        return self.text_model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=fused),
            attention_mask=self._decoder_mask(mask),
            max_new_tokens=max_new_tokens or self.config.max_target_length,
            **generate_kwargs,
        )


__all__ = [
    "KeywordMarkerThresholdLogitsProcessor",
    "RAHFModel",
    "RAHFOutput",
    "RAHFPreTrainedModel",
    "SafetensorsOnlyMixin",
    "check_safetensors_folder",
]

AutoModel.register(RAHFConfig, RAHFModel, exist_ok=True)
