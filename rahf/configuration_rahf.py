"""`RAHFConfig`: the configuration of the RAHF model (a vision tower, a T5 text model, and the prediction heads)."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, T5Config
from transformers.configuration_utils import SubConfigSpec

VARIANTS = ("multi_head", "augmented_prompt")
VISION_MODEL_TYPES = ("vit", "siglip_vision_model", "clip_vision_model")
DEFAULT_SCORE_NAMES = ["plausibility", "alignment", "aesthetics", "overall"]
DEFAULT_HEATMAP_NAMES = ["implausibility", "misalignment"]
KEYWORDS_TASK = "keywords"
DEFAULT_TASK_STRINGS = {
    "implausibility": "implausibility heatmap",
    "misalignment": "misalignment heatmap",
    "plausibility": "plausibility score",
    "alignment": "alignment score",
    "aesthetics": "aesthetics score",
    "overall": "overall score",
    KEYWORDS_TASK: "misaligned keywords",
}


@strict(accept_kwargs=True)
class RAHFConfig(PreTrainedConfig):
    r"""
    Configuration of a [`RAHFModel`] (Rich Automatic Human Feedback, Liang et al., CVPR 2024, Fig. 3).

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower: a ViT (`model_type="vit"`, the default), SigLIP vision
            (`"siglip_vision_model"`) or CLIP vision (`"clip_vision_model"`) configuration.
        text_config (`dict` or `T5Config`, *optional*):
            The T5 model that fuses image and prompt tokens (encoder) and writes the keyword sequence (decoder).
        variant (`str`, *optional*, defaults to `"multi_head"`):
            `"multi_head"`: one pass gives every heatmap and score. `"augmented_prompt"`: the prompt is prefixed with
            a task string and each pass gives one heatmap or one score.
        heatmap_size (`int`, *optional*, defaults to 384):
            Side of the predicted (square) heatmaps, in pixels.
        score_names (`list[str]`, *optional*, defaults to `["plausibility", "alignment", "aesthetics", "overall"]`):
            Names of the predicted scores, in output order.
        heatmap_names (`list[str]`, *optional*, defaults to `["implausibility", "misalignment"]`):
            Names of the predicted heatmaps, in output order.
        task_strings (`dict[str, str]`, *optional*):
            For the augmented-prompt variant: the text prepended to the prompt for each heatmap, each score and
            `"keywords"`.
        heatmap_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the per-pixel heatmap loss in the loss.
        heatmap_loss (`str`, *optional*, defaults to `"mse"`):
            Per-pixel heatmap loss: `"mse"` (the paper's) or `"bce"` (binary cross-entropy against the soft [0, 1]
            targets). On mostly empty maps the MSE's gradient through the output sigmoid vanishes where the
            prediction is near 0, the BCE's does not (`configs/model/tiny.json` uses it for that reason).
        score_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the score MSE in the loss.
        sequence_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the keyword-sequence cross-entropy in the loss.
        heatmap_head_channels (`int`, *optional*, defaults to 256):
            Channels of the first heatmap-head convolution; each transposed convolution halves them (at least 8).
        score_head_channels (`int`, *optional*, defaults to 256):
            Channels of the score-head convolutions.
        score_head_num_convs (`int`, *optional*, defaults to 6):
            Number of 3x3 convolutions in the score head before its MLP.
        score_head_hidden_size (`int`, *optional*, defaults to 512):
            Hidden width of the score head's MLP.
        image_token_pool (`int`, *optional*, defaults to 1):
            Average-pool the vision tower's patch tokens over `image_token_pool` x `image_token_pool` windows before
            they join the prompt tokens. 1 (the paper's): every patch token goes to the fusion encoder. A small-patch
            tower (fine detail) with pooling keeps the fusion encoder's sequence, and its cost, as short as a
            large-patch tower's. The tower's patch grid must be divisible by it.
        decoder_attends_to (`str`, *optional*, defaults to `"all"`):
            `"all"`: the T5 decoder cross-attends to the fused image and text tokens (the paper's Fig. 3); `"text"`:
            to the text positions only (the first author's re-implementation).
        keyword_threshold (`float`, *optional*):
            How keywords are decoded. `None` (the paper's): greedy decoding. A probability in (0, 1): the decoder
            writes the ` 0` marker after a word exactly when the marker's probability there is at least this, and
            otherwise the likeliest other token, so a lower value trades precision for recall. `rahf train
            --calibrate_keyword_threshold` picks it on the validation split and saves it here.
        max_text_length (`int`, *optional*, defaults to 128):
            Longest tokenized prompt (with its task string); longer prompts are truncated with a warning.
        max_target_length (`int`, *optional*, defaults to 192):
            Longest tokenized keyword sequence (the prompt with its ` 0` markers).
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel mean used to normalise images (the vision tower's own).
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel standard deviation used to normalise images.
        vision_model_name_or_path (`str`, *optional*):
            Hub id or local folder of pretrained vision-tower weights, used by [`RAHFModel.from_pretrained_towers`].
        text_model_name_or_path (`str`, *optional*):
            Hub id or local folder of a pretrained T5 (weights and tokenizer).

    Examples:

    ```python
    >>> from rahf import RAHFConfig, RAHFModel

    >>> config = RAHFConfig.from_json_file("configs/model/tiny.json")
    >>> model = RAHFModel(config)
    ```
    """

    model_type = "rahf"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": T5Config,
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    variant: str = "multi_head"
    heatmap_size: int = 384
    score_names: list[str] | None = None
    heatmap_names: list[str] | None = None
    task_strings: dict[str, str] | None = None
    heatmap_loss_weight: float = 1.0
    heatmap_loss: Literal["mse", "bce"] = "mse"
    score_loss_weight: float = 1.0
    sequence_loss_weight: float = 1.0
    heatmap_head_channels: int = 256
    score_head_channels: int = 256
    score_head_num_convs: int = 6
    score_head_hidden_size: int = 512
    image_token_pool: int = 1
    decoder_attends_to: Literal["all", "text"] = "all"
    keyword_threshold: float | None = None
    max_text_length: int = 128
    max_target_length: int = 192
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    vision_model_name_or_path: str | None = None
    text_model_name_or_path: str | None = None
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.vision_config.model_type not in VISION_MODEL_TYPES:
            raise ValueError(
                f"`vision_config.model_type` must be one of {list(VISION_MODEL_TYPES)}, "
                f"got {self.vision_config.model_type!r}"
            )
        if self.heatmap_loss not in ("mse", "bce"):
            raise ValueError(f"`heatmap_loss` must be 'mse' or 'bce', got {self.heatmap_loss!r}")
        if self.decoder_attends_to not in ("all", "text"):
            raise ValueError(f"`decoder_attends_to` must be 'all' or 'text', got {self.decoder_attends_to!r}")
        if self.keyword_threshold is not None and not 0.0 < float(self.keyword_threshold) < 1.0:
            raise ValueError(
                f"`keyword_threshold` must be None (greedy decoding) or a probability in (0, 1), "
                f"got {self.keyword_threshold!r}"
            )
        self.score_names = list(self.score_names or DEFAULT_SCORE_NAMES)
        self.heatmap_names = list(self.heatmap_names or DEFAULT_HEATMAP_NAMES)
        names = self.heatmap_names + self.score_names
        if len(set(names)) != len(names) or KEYWORDS_TASK in names:
            raise ValueError(
                f"`heatmap_names` and `score_names` must be distinct and may not contain {KEYWORDS_TASK!r}, got {names}"
            )
        task_strings = dict(DEFAULT_TASK_STRINGS)
        task_strings.update(self.task_strings or {})
        missing = [t for t in self.task_names if t not in task_strings]
        if missing:
            raise ValueError(f"`task_strings` has no entry for the tasks {missing}; add e.g. {{'{missing[0]}': '...'}}")
        self.task_strings = {t: task_strings[t] for t in self.task_names}
        self.image_mean = list(self.image_mean or [0.5, 0.5, 0.5])
        self.image_std = list(self.image_std or [0.5, 0.5, 0.5])
        # T5 starts decoding from the pad token; v5 configs built from a dict may not say so.
        if getattr(self.text_config, "pad_token_id", None) is None:
            self.text_config.pad_token_id = 0
        if getattr(self.text_config, "eos_token_id", None) is None:
            self.text_config.eos_token_id = 1
        if getattr(self.text_config, "decoder_start_token_id", None) is None:
            self.text_config.decoder_start_token_id = self.text_config.pad_token_id
        if self.heatmap_size < 1:
            raise ValueError(f"`heatmap_size` must be positive, got {self.heatmap_size}")
        pool = self.image_token_pool
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or self.tower_grid % pool:
            raise ValueError(
                f"`image_token_pool` must be an int >= 1 that divides the vision tower's patch grid "
                f"({self.tower_grid} = image_size // patch_size), got {pool!r}"
            )

    @property
    def task_names(self) -> list[str]:
        """All tasks in output order: the heatmaps, the scores, then `"keywords"`."""
        return list(self.heatmap_names) + list(self.score_names) + [KEYWORDS_TASK]

    @property
    def image_size(self) -> int:
        size = self.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def tower_grid(self) -> int:
        """Side of the vision tower's own patch grid (image_size // patch_size)."""
        patch = self.vision_config.patch_size
        patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        return self.image_size // patch

    @property
    def patch_grid(self) -> int:
        """Side of the grid of image tokens the fusion encoder sees (and the heads read): the tower's, pooled."""
        return self.tower_grid // self.image_token_pool


__all__ = ["RAHFConfig"]

# So that AutoConfig (and AutoTokenizer, which reads config.json next to a saved tokenizer) knows RAHF.
AutoConfig.register(RAHFConfig.model_type, RAHFConfig, exist_ok=True)
