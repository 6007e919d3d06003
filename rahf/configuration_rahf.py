"""`RAHFConfig`: the configuration of the RAHF model (a vision tower, a T5 text model, and the prediction heads)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig, T5Config
from transformers.configuration_utils import SubConfigSpec

from .constants import HEATMAP_NAMES, SCORE_NAMES

VARIANTS = ("multi_head", "augmented_prompt")
VISION_MODEL_TYPES = ("vit", "siglip_vision_model", "clip_vision_model")
DEFAULT_SCORE_NAMES = list(SCORE_NAMES)
DEFAULT_HEATMAP_NAMES = list(HEATMAP_NAMES)
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


DEFAULT_IMAGE_MEAN = [0.5, 0.5, 0.5]
DEFAULT_IMAGE_STD = [0.5, 0.5, 0.5]
# The shortest useful token limit: one prompt token and T5's closing `</s>`.
MIN_TEXT_LENGTH = 2


# --------------------------------------------------------------------------------------------------------------------
# Field checks, shared with the processor's config: each error names the field, the value received and the fix.


def _got(value: Any) -> str:
    kind = type(value).__name__
    return f"{value!r} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def _written_as_number(value: Any, kind: type) -> Any:
    """The number a quoted JSON value such as "32" spells, or None."""
    if not isinstance(value, str):
        return None
    try:
        number = kind(value.strip())
    except ValueError:
        return None
    return number if kind is int or math.isfinite(number) else None


def check_int(field: str, value: Any, minimum: int = 1, example: int = 1, where: str = "config.json") -> int:
    """`value` as an int >= `minimum`, else a ValueError naming `field` and saying what to write in `where` (bools
    and floats are refused)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    spelled = _written_as_number(value, int)
    if spelled is not None and spelled >= minimum:
        fix = f"write {spelled} in {where}"
    elif isinstance(value, float) and value.is_integer() and value >= minimum:
        fix = f"write {int(value)} in {where}"
    else:
        fix = f"write a whole number such as {example} in {where}"
    raise ValueError(f"`{field}` must be {what}, got {_got(value)}; {fix}")


def check_real(
    field: str, value: Any, minimum: float | None = None, example: float = 1.0, none_means: str | None = None
) -> float:
    """`value` as a finite float (>= `minimum` when given), else a ValueError naming `field`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (minimum is None or value >= minimum):
        return float(value)
    what = "a finite number" + (f" >= {minimum:g}" if minimum is not None else "")
    if none_means:
        what = f"None ({none_means}) or {what}"
    spelled = _written_as_number(value, float)
    fix = (
        f"write {spelled:g} in config.json"
        if spelled is not None and (minimum is None or spelled >= minimum)
        else (f"write a number such as {example:g} in config.json")
    )
    raise ValueError(f"`{field}` must be {what}, got {_got(value)}; {fix}")


def check_image_statistics(
    field: str, value: Any, default: Sequence[float] | None = None, positive: bool = False
) -> list[float]:
    """Per-channel image statistics: three finite numbers (positive ones for a standard deviation); None gives
    `default` when there is one."""
    if value is None and default is not None:
        return list(default)
    example = "[0.5, 0.5, 0.5]"
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(
            f"`{field}` must be a list of 3 numbers (one per RGB channel), got {_got(value)}; write e.g. {example}"
        )
    for channel, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(
                f"`{field}` must hold 3 finite numbers, got {list(value)!r} (channel {channel} is {_got(x)}); "
                f"write e.g. {example}"
            )
        if positive and x <= 0:
            raise ValueError(
                f"`{field}` must hold 3 numbers > 0 (images are divided by it), got {list(value)!r}; write e.g. "
                f"{example}"
            )
    return [float(x) for x in value]


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"`{field}` must be one of {list(choices)}, got {_got(value)}; write one of them in config.json")


def _check_heatmap_size(value: Any) -> int:
    # Heatmaps are square: a pair is accepted when its sides agree, and stored as one side.
    if isinstance(value, (list, tuple)) and len(value) == 2:
        sides = [check_int("heatmap_size", side, example=384) for side in value]
        if sides[0] != sides[1]:
            raise ValueError(
                f"`heatmap_size` must be one side (heatmaps are square), got {list(value)!r}; write e.g. {sides[0]}"
            )
        return sides[0]
    return check_int("heatmap_size", value, example=384)


def _check_names(field: str, value: Any, default: Sequence[str]) -> list[str]:
    if value is None:
        return list(default)
    example = json.dumps(list(default))
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"`{field}` must be a non-empty list of names, got {_got(value)}; write e.g. {example}, or leave it out "
            "for that default"
        )
    bad = [x for x in value if not isinstance(x, str) or not x.strip() or x != x.strip()]
    if bad:
        raise ValueError(
            f"`{field}` must hold non-empty names without surrounding spaces, got {list(value)!r} (bad: {bad!r}); "
            f"write e.g. {example}"
        )
    return list(value)


def _check_task_strings(value: Any, task_names: Sequence[str]) -> dict[str, str]:
    if value is not None and not isinstance(value, dict):
        raise ValueError(
            f"`task_strings` must be None or a mapping task -> text, got {_got(value)}; write e.g. "
            f'{{"{task_names[0]}": "{DEFAULT_TASK_STRINGS.get(task_names[0], task_names[0])}"}}'
        )
    value = dict(value or {})
    # Names of default tasks this config does not have are dropped silently (a config re-built with fewer scores
    # keeps its old mapping); anything else is a misspelt task.
    unknown = [k for k in value if k not in task_names and k not in DEFAULT_TASK_STRINGS]
    if unknown:
        raise ValueError(
            f"`task_strings` has entries for {unknown}, which are not tasks of this model; its tasks are "
            f"{list(task_names)}: rename or remove them"
        )
    bad = {k: v for k, v in value.items() if not isinstance(v, str) or not v.strip()}
    if bad:
        raise ValueError(f'`task_strings` values must be non-empty texts, got {bad!r}; write e.g. "overall score"')
    task_strings = {**DEFAULT_TASK_STRINGS, **value}
    missing = [t for t in task_names if t not in task_strings]
    if missing:
        raise ValueError(f"`task_strings` has no entry for the tasks {missing}; add e.g. {{'{missing[0]}': '...'}}")
    return {t: task_strings[t] for t in task_names}


def _build_sub_config(key: str, value: Any, spec: SubConfigSpec) -> PreTrainedConfig:
    if isinstance(value, PreTrainedConfig):
        return value
    if value is not None and not isinstance(value, dict):
        raise ValueError(
            f"`{key}` must be a mapping of {key.split('_')[0]}-tower settings (or a config object), got "
            f'{_got(value)}; write e.g. {{"model_type": "{spec.model_type}", ...}} or leave it out for the default'
        )
    model_types = VISION_MODEL_TYPES if key == "vision_config" else (T5Config.model_type,)
    model_type = (value or {}).get("model_type", spec.model_type)
    if model_type not in model_types:
        raise ValueError(
            f"`{key}.model_type` must be one of {list(model_types)}, got {_got(model_type)}; write one of them"
        )
    try:
        config, _ = spec.create_subconfig(key, value)
    except (StrictDataclassError, TypeError, ValueError) as err:
        # The tower's own config checks its field types; say which field in our terms.
        match = re.search(r"field '([^']+)'", str(err))
        if match and isinstance(value, dict) and match.group(1) in value:
            name, bad = match.group(1), value[match.group(1)]
            spelled = _written_as_number(bad, int)
            fix = f"write {spelled}" if spelled is not None else "write it as the tower's config documents"
            raise ValueError(f"`{key}.{name}` has the wrong type, got {_got(bad)}; {fix} in config.json") from None
        cause = err.__cause__ if isinstance(err, StrictDataclassError) and err.__cause__ is not None else err
        raise ValueError(f"`{key}` is not a valid {model_type} config: {cause}; fix it in config.json") from None
    return config


def _check_vision_config(config: PreTrainedConfig) -> None:
    def side(name: str) -> int:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        return check_int(f"vision_config.{name}", value, example=16 if name == "patch_size" else 384)

    image_size, patch_size = side("image_size"), side("patch_size")
    if patch_size > image_size:
        raise ValueError(
            f"`vision_config.patch_size` ({patch_size}) is larger than `vision_config.image_size` ({image_size}): "
            "the tower would see no patch; lower patch_size or raise image_size"
        )
    check_int("vision_config.hidden_size", getattr(config, "hidden_size", None), example=768)
    channels = getattr(config, "num_channels", 3)
    if channels != 3:
        raise ValueError(
            f"`vision_config.num_channels` must be 3 (the processor gives RGB images), got {_got(channels)}; write 3"
        )


def _check_text_config(config: PreTrainedConfig) -> None:
    if not isinstance(config, T5Config):
        raise ValueError(f'`text_config` must be a T5 config (model_type "t5"), got a {type(config).__name__}')
    for name, example in (("vocab_size", 32128), ("d_model", 768), ("num_layers", 12), ("num_heads", 12)):
        check_int(f"text_config.{name}", getattr(config, name, None), example=example)
    if config.num_decoder_layers is not None:
        check_int("text_config.num_decoder_layers", config.num_decoder_layers, example=12)


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
            Side of the predicted (square) heatmaps, in pixels (a pair of equal sides is read as one side).
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
        head_structure (`str`, *optional*, defaults to `"shared"`):
            `"shared"` (the paper's Fig. 3): one heatmap head for all heatmaps and one score head for all scores.
            `"separate"`: one head per heatmap and one per score, the heatmap heads in the first author's
            re-implementation's structure (LayerNorm after each convolution, a residual block after each upsampling
            stage).
        score_head_pooling (`str`, *optional*, defaults to `"mean"`):
            How the score head reduces its feature map before the MLP: `"mean"` (global average pool) or
            `"flatten"` (the whole map, as the re-implementation does: the MLP's first layer then has
            `score_head_channels * patch_grid**2` inputs).
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
    head_structure: Literal["shared", "separate"] = "shared"
    score_head_pooling: Literal["mean", "flatten"] = "mean"
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

    def __post_init__(self, **kwargs: Any) -> None:
        # Sub-configs are built here, not by the base class, so that a bad one is an error naming its field.
        for key, spec in self.sub_configs_defaults.items():
            setattr(self, key, _build_sub_config(key, getattr(self, key), spec))
        super().__post_init__(**kwargs)
        _check_vision_config(self.vision_config)
        _check_text_config(self.text_config)
        self.variant = _check_choice("variant", self.variant, VARIANTS)
        self.heatmap_size = _check_heatmap_size(self.heatmap_size)
        self.score_names = _check_names("score_names", self.score_names, DEFAULT_SCORE_NAMES)
        self.heatmap_names = _check_names("heatmap_names", self.heatmap_names, DEFAULT_HEATMAP_NAMES)
        names = self.heatmap_names + self.score_names
        if len(set(names)) != len(names) or KEYWORDS_TASK in names:
            raise ValueError(
                f"`heatmap_names` and `score_names` must be distinct and may not contain {KEYWORDS_TASK!r}, got {names}"
            )
        self.task_strings = _check_task_strings(self.task_strings, self.task_names)
        for name in ("heatmap_loss_weight", "score_loss_weight", "sequence_loss_weight"):
            setattr(self, name, check_real(name, getattr(self, name), minimum=0.0, example=1.0))
        self.heatmap_loss = _check_choice("heatmap_loss", self.heatmap_loss, ("mse", "bce"))
        for name, minimum, example in (
            ("heatmap_head_channels", 1, 256),
            ("score_head_channels", 1, 256),
            ("score_head_num_convs", 0, 6),
            ("score_head_hidden_size", 1, 512),
            ("max_text_length", MIN_TEXT_LENGTH, 128),
            ("max_target_length", MIN_TEXT_LENGTH, 192),
        ):
            setattr(self, name, check_int(name, getattr(self, name), minimum=minimum, example=example))
        self.decoder_attends_to = _check_choice("decoder_attends_to", self.decoder_attends_to, ("all", "text"))
        self.head_structure = _check_choice("head_structure", self.head_structure, ("shared", "separate"))
        self.score_head_pooling = _check_choice("score_head_pooling", self.score_head_pooling, ("mean", "flatten"))
        if self.keyword_threshold is not None:
            threshold = check_real(
                "keyword_threshold", self.keyword_threshold, example=0.5, none_means="greedy decoding"
            )
            if not 0.0 < threshold < 1.0:
                raise ValueError(
                    f"`keyword_threshold` must be None (greedy decoding) or a probability in (0, 1), "
                    f"got {self.keyword_threshold!r}; write e.g. 0.5, or null for greedy decoding"
                )
            self.keyword_threshold = threshold
        self.image_mean = check_image_statistics("image_mean", self.image_mean, default=DEFAULT_IMAGE_MEAN)
        self.image_std = check_image_statistics("image_std", self.image_std, default=DEFAULT_IMAGE_STD, positive=True)
        for name in ("vision_model_name_or_path", "text_model_name_or_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(
                    f"`{name}` must be None or a hub id / folder (a non-empty str), got {_got(value)}; write a path "
                    'such as "google/vit-base-patch16-384", or null for a randomly initialised tower'
                )
        if not isinstance(self.is_encoder_decoder, bool):
            raise ValueError(f"`is_encoder_decoder` must be true or false, got {_got(self.is_encoder_decoder)}")
        # T5 starts decoding from the pad token; v5 configs built from a dict may not say so.
        if getattr(self.text_config, "pad_token_id", None) is None:
            self.text_config.pad_token_id = 0
        if getattr(self.text_config, "eos_token_id", None) is None:
            self.text_config.eos_token_id = 1
        if getattr(self.text_config, "decoder_start_token_id", None) is None:
            self.text_config.decoder_start_token_id = self.text_config.pad_token_id
        pool = self.image_token_pool
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or self.tower_grid % pool:
            raise ValueError(
                f"`image_token_pool` must be an int >= 1 that divides the vision tower's patch grid "
                f"({self.tower_grid} = image_size // patch_size), got {_got(pool)}"
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


__all__ = ["RAHFConfig", "check_image_statistics", "check_int", "check_real"]

# So that AutoConfig (and AutoTokenizer, which reads config.json next to a saved tokenizer) knows RAHF.
AutoConfig.register(RAHFConfig.model_type, RAHFConfig, exist_ok=True)
