"""The one reward interface of rahf: RAHF as a differentiable reward on image tensors (and on PIL images), the
registry of rewards by name, and the one parser of reward specs. Guidance, best-of-N filtering, fine-tuning and every
later loop take their reward from here.

Every reward has one signature, `fn(images, prompts, metadata) -> (scores, info)` (`RewardFn`): `images` a
(B, 3, H, W) float tensor in [0, 1] or a list of PIL images, `scores` a (B,) tensor (higher is better), `info` a dict.

Scale of the built-in rewards: a RAHF score is in [0, 1], higher is better (the data set maps the 1-5 Likert ratings by
(s - 1) / 4); `"-implausibility"` / `"-misalignment"` are minus the mean predicted heat, in [-1, 0]; `"rahf_mix"` is a
weighted sum of scores (equal weights of 1/4 by default, so also in [0, 1]). `info["scores"]` always holds the four
scores of every image, so that a gain in one can be weighed against the others.

A reward spec, as users write it (`--reward`): a name (`"overall"`, `"-implausibility"`) or a weighted mix
(`"aesthetics=0.7,-implausibility=0.3"`, where a leading `-` negates, as in the names); `parse_reward` turns it into a
name or `{output: signed weight}` once, and `get_reward` / `load_reward` take either form.

Examples:

```python
>>> import torch
>>> from rahf.reward import get_reward, list_rewards
>>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor
>>> reward = get_reward("aesthetics", reward_model=tiny_rahf_model(), reward_processor=tiny_rahf_processor())
>>> scores, info = reward(torch.rand(2, 3, 32, 32), ["a red cat", "a dog"], None)
>>> scores.shape, sorted(info["scores"])
(torch.Size([2]), ['aesthetics', 'alignment', 'overall', 'plausibility'])
>>> "-implausibility" in list_rewards()
True
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .constants import HEATMAP_NAMES, SCORE_NAMES
from .modeling_rahf import RAHFModel
from .predictor import RichFeedbackPredictor
from .processing_rahf import ImageInput, RAHFProcessor, load_image

__all__ = [
    "HEATMAP_REWARDS",
    "RAHFReward",
    "RewardFn",
    "SCORE_REWARDS",
    "get_reward",
    "images_to_tensor",
    "list_rewards",
    "load_reward",
    "parse_reward",
    "rahf_pixel_values",
    "register_reward",
    "score_table",
]

RewardFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]
"""`fn(images, prompts, metadata) -> (scores (B,), info)`: the signature of every reward."""

# name -> factory(reward_model=..., reward_processor=..., **kwargs) -> RewardFn
_REWARDS: dict[str, Callable[..., RewardFn]] = {}

SCORE_REWARDS = SCORE_NAMES
HEATMAP_REWARDS = tuple(f"-{name}" for name in HEATMAP_NAMES)


# --------------------------------------------------------------------------------------------------------------------
# RAHF as a differentiable reward


def rahf_pixel_values(images: torch.Tensor, processor: RAHFProcessor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> RAHF `pixel_values`, with torch ops only so that gradients flow.

    Mirrors `RAHFProcessor.preprocess_images` (bicubic resize to `image_size`, values kept in [0, 1], per-channel
    normalisation), which works on PIL images and cannot be differentiated.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"`images` must be a (batch, 3, height, width) tensor in [0, 1], got shape {tuple(images.shape)}"
        )
    size = processor.image_size
    if tuple(images.shape[-2:]) != (size, size):
        # antialias=True matches PIL's bicubic when shrinking; the clamp matches its clipping to [0, 255].
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0.0, 1.0)
    mean = images.new_tensor(processor.image_mean).view(1, 3, 1, 1)
    std = images.new_tensor(processor.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


class RAHFReward:
    r"""
    RAHF as a differentiable reward: a weighted sum of predicted scores and heatmap means, on image tensors.

    Scale: each RAHF score is a sigmoid output in [0, 1], higher is better (the canonical data set maps the 1-5 Likert
    ratings by (s - 1) / 4); a heatmap term is the mean predicted heat in [0, 1] of a heatmap, so a weight of -1
    (`"-implausibility"`) gives a reward in [-1, 0]. Weights are used as given (not normalised): weights that sum to 1
    over scores keep the reward in [0, 1].

    The reward model is frozen (`requires_grad_(False)`, eval mode); gradients flow to the images only. In the
    augmented-prompt variant only the task rows the reward needs are run (plus the other scores, without gradient
    cost to speak of, when `report_all_scores`).

    Args:
        reward_model ([`RAHFModel`]): the RAHF model (either variant).
        reward_processor ([`RAHFProcessor`]): its processor (image size and normalisation, tokenizer, task strings).
        weights (`dict[str, float]`): output name -> weight; names are `config.score_names` or `config.heatmap_names`.
        report_all_scores (`bool`, *optional*, defaults to `True`): also put every score of every image in `info`, so
            that reward hacking (one score up, the others down) is visible.

    Examples:

    ```python
    >>> import torch
    >>> from rahf.testing import tiny_rahf_model, tiny_rahf_processor
    >>> reward = RAHFReward.from_target(tiny_rahf_model(), tiny_rahf_processor(), "aesthetics")
    >>> images = torch.rand(2, 3, 64, 64, requires_grad=True)
    >>> scores, info = reward(images, ["a red cat", "a blue dog"])
    >>> scores.shape, sorted(info["scores"])
    (torch.Size([2]), ['aesthetics', 'alignment', 'overall', 'plausibility'])
    >>> scores.sum().backward(); images.grad.shape
    torch.Size([2, 3, 64, 64])
    ```
    """

    def __init__(
        self,
        reward_model: RAHFModel,
        reward_processor: RAHFProcessor,
        weights: dict[str, float],
        report_all_scores: bool = True,
    ):
        if reward_model is None or reward_processor is None:
            raise ValueError(
                "a RAHF reward needs both `reward_model` and `reward_processor`; pass them, or a callable reward"
            )
        config = reward_model.config
        known = list(config.score_names) + list(config.heatmap_names)
        if not weights:
            raise ValueError(f"`weights` is empty; give at least one of {known} a weight, e.g. {{'aesthetics': 1.0}}")
        for name, weight in weights.items():
            if name not in known:
                raise ValueError(
                    f"unknown RAHF output {name!r} in the reward weights; the model's outputs are {known}"
                )
            if not math.isfinite(float(weight)):
                raise ValueError(f"the weight of {name!r} must be a finite number, got {weight!r}")
        self.reward_model = reward_model.requires_grad_(False).eval()
        self.reward_processor = reward_processor
        self.weights = {name: float(w) for name, w in weights.items()}
        self.report_all_scores = bool(report_all_scores)
        self._encoded: dict[tuple, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_target(
        cls, reward_model: RAHFModel, reward_processor: RAHFProcessor, target: str | dict[str, float], **kwargs
    ) -> RAHFReward:
        """`"aesthetics"` (a score), `"-implausibility"` (minus a heatmap's mean; `-` negates any output) or a dict of
        weights such as `{"aesthetics": 0.5, "implausibility": -0.5}`."""
        if isinstance(target, dict):
            return cls(reward_model, reward_processor, dict(target), **kwargs)
        if not isinstance(target, str):
            raise TypeError(f"a RAHF reward target is a str or a dict of weights, got {type(target).__name__}")
        sign, name = (-1.0, target[1:]) if target.startswith("-") else (1.0, target)
        config = reward_model.config
        known = list(config.score_names) + [f"-{h}" for h in config.heatmap_names]
        if name not in list(config.score_names) + list(config.heatmap_names):
            raise ValueError(f"unknown RAHF reward {target!r}; use one of {known}, or a dict of weights")
        return cls(reward_model, reward_processor, {name: sign}, **kwargs)

    @property
    def tasks(self) -> list[str]:
        """The model tasks one call runs, in model order."""
        config = self.reward_model.config
        wanted = set(self.weights) | (set(config.score_names) if self.report_all_scores else set())
        return [t for t in config.task_names if t in wanted]

    def _encode(self, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        # A guided run asks about the same prompts at every step: tokenize them once.
        key = (tuple(prompts), tuple(self.tasks), str(device))
        if key not in self._encoded:
            self._encoded = {
                key: {k: v.to(device) for k, v in self.reward_processor.encode_prompts(prompts, self.tasks).items()}
            }
        return self._encoded[key]

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Scores images (B, 3, H, W) in [0, 1] against their prompts.

        Returns:
            `scores` (`torch.Tensor` of shape `(B,)`, float32, differentiable w.r.t. `images`) and `info`: `"scores"`
            (score name -> `(B,)` detached tensor; all scores when `report_all_scores`, else those weighted) and
            `"heatmap_means"` (heatmap name -> `(B,)` detached tensor, for the weighted heatmaps).
        """
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts: pass one prompt per image")
        model = self.reward_model
        param = next(model.parameters())
        pixel_values = rahf_pixel_values(images.to(param.device, torch.float32), self.reward_processor).to(param.dtype)
        out = model(pixel_values=pixel_values, **self._encode(prompts, param.device))
        config = model.config
        scores = out.scores.float()  # (B, num_scores), NaN where a task was not run
        heatmaps = out.heatmaps.float()  # (B, num_heatmaps, S, S)
        reward = scores.new_zeros(images.shape[0])
        heatmap_means: dict[str, torch.Tensor] = {}
        for name, weight in self.weights.items():
            if name in config.score_names:
                term = scores[:, config.score_names.index(name)]
            else:
                term = heatmaps[:, config.heatmap_names.index(name)].mean(dim=(1, 2))
                heatmap_means[name] = term.detach()
            reward = reward + weight * term
        reported = (
            config.score_names if self.report_all_scores else [n for n in config.score_names if n in self.weights]
        )
        info = {
            "scores": {name: scores[:, config.score_names.index(name)].detach() for name in reported},
            "heatmap_means": heatmap_means,
        }
        return reward, info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={self.weights}, variant={self.reward_model.config.variant!r})"


# --------------------------------------------------------------------------------------------------------------------
# The registry


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Registers a reward factory under `name`.

    The factory is called by `get_reward(name, reward_model=..., reward_processor=..., **kwargs)` with those keyword
    arguments and returns the reward: a callable `fn(images, prompts, metadata) -> (scores, info)` where `images` is a
    (B, 3, H, W) float tensor in [0, 1], `scores` a (B,) tensor (higher is better) and `info` a dict.

    Examples:

    ```python
    >>> @register_reward("brightness")
    ... def brightness(reward_model=None, reward_processor=None):
    ...     return lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {})
    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a reward name must be a non-empty str, got {name!r}")

    def decorator(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        _REWARDS[name] = factory
        return factory

    return decorator


def list_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REWARDS)


def _resolve_model(
    reward_model: RAHFModel | RichFeedbackPredictor | str | os.PathLike | None, reward_processor: RAHFProcessor | None
) -> tuple[RAHFModel, RAHFProcessor]:
    if isinstance(reward_model, RichFeedbackPredictor):
        return reward_model.model, reward_processor or reward_model.processor
    if isinstance(reward_model, (str, os.PathLike)):
        path = reward_model
        reward_model = RAHFModel.from_pretrained(path)
        reward_processor = reward_processor or RAHFProcessor.from_pretrained(path)
    if reward_model is None or reward_processor is None:
        raise ValueError(
            "RAHF rewards need `reward_model` (a RAHFModel, a RichFeedbackPredictor or a saved model folder) and, with "
            "a RAHFModel, `reward_processor`"
        )
    return reward_model, reward_processor


def images_to_tensor(images: Sequence[ImageInput], size: int | None = None) -> torch.Tensor:
    """PIL images, arrays or paths -> a (B, 3, H, W) float tensor in [0, 1]; resized (bicubic) to `size` x `size` when
    given, else all must share one size."""
    arrays = []
    for image in images:
        rgb = load_image(image)
        if size is not None and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}: pass `size` to resize them to one")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)


class _TensorOrImagesReward:
    """Wraps a tensor reward so that it also takes lists of PIL images (best-of-N), converted at RAHF's input size."""

    def __init__(self, reward: RAHFReward):
        self.reward = reward

    def __call__(self, images, prompts: Sequence[str], metadata: dict[str, Any] | None = None):
        if not isinstance(images, torch.Tensor):
            if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
                images = [images]
            images = images_to_tensor(list(images), size=self.reward.reward_processor.image_size)
        elif images.dtype == torch.uint8:
            images = images.float() / 255.0
        return self.reward(images, prompts, metadata)

    def __getattr__(self, name: str):
        if name == "reward":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.reward, name)

    def __repr__(self) -> str:
        return repr(self.reward)


def _rahf_factory(weights: dict[str, float]) -> Callable[..., RewardFn]:
    def factory(reward_model=None, reward_processor=None, report_all_scores: bool = True) -> RewardFn:
        model, processor = _resolve_model(reward_model, reward_processor)
        return _TensorOrImagesReward(RAHFReward(model, processor, weights, report_all_scores=report_all_scores))

    return factory


for _name in SCORE_REWARDS:
    register_reward(_name)(_rahf_factory({_name: 1.0}))
for _name in HEATMAP_REWARDS:
    register_reward(_name)(_rahf_factory({_name[1:]: -1.0}))


@register_reward("rahf_mix")
def rahf_mix(
    reward_model=None, reward_processor=None, weights: dict[str, float] | None = None, report_all_scores: bool = True
) -> RewardFn:
    """A weighted sum of RAHF outputs: scores, and heatmap means (negative weights reward little heat). Equal weights
    of 1/4 on the four scores by default."""
    weights = dict(weights) if weights else {name: 0.25 for name in SCORE_REWARDS}
    return _rahf_factory(weights)(reward_model, reward_processor, report_all_scores=report_all_scores)


def parse_reward(spec: str | dict[str, float]) -> str | dict[str, float]:
    """A reward spec, parsed once: a name stays a name (`"overall"`, `"-implausibility"`); a weighted mix
    `"aesthetics=0.7,-implausibility=0.3"` (or the dict `{"aesthetics": 0.7, "-implausibility": 0.3}`) becomes
    `{output: signed weight}`, here `{"aesthetics": 0.7, "implausibility": -0.3}`: a leading `-` negates, as in the
    reward names, and the weights name the RAHF output itself.

    Raises:
        ValueError: an empty spec, a part that is not NAME=WEIGHT, or a weight that is not a finite number.
    """
    example = "aesthetics=0.7,-implausibility=0.3"
    if isinstance(spec, dict):
        pairs = [(str(k), v) for k, v in spec.items()]
    else:
        text = str(spec).strip()
        if not text:
            raise ValueError(f"the reward is empty; pass a name such as 'overall', or a mix such as {example!r}")
        if "=" not in text and "," not in text:
            return text
        pairs = []
        for part in text.split(","):
            name, sep, weight = (x.strip() for x in part.partition("="))
            if not sep or not name.lstrip("-"):
                raise ValueError(f"reward {text!r}: {part.strip()!r} is not NAME=WEIGHT; write e.g. {example!r}")
            pairs.append((name, weight))
    weights: dict[str, float] = {}
    for name, weight in pairs:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise ValueError(
                f"reward {spec!r}: {name}={weight} is not NAME=WEIGHT with a number as the weight; "
                f"write e.g. {example!r}"
            ) from None
        if not math.isfinite(value):
            raise ValueError(f"reward {spec!r}: the weight of {name!r} must be a finite number, got {weight!r}")
        sign, output = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
        weights[output] = weights.get(output, 0.0) + sign * value
    return weights


def get_reward(
    name_or_weights: str | dict[str, float],
    reward_model: RAHFModel | RichFeedbackPredictor | str | os.PathLike | None = None,
    reward_processor: RAHFProcessor | None = None,
    **kwargs,
) -> RewardFn:
    """The reward registered as `name_or_weights`, or a RAHF weighted mix for a spec such as
    `"aesthetics=0.7,-implausibility=0.3"` (see `parse_reward`; an already parsed dict of signed weights works too).

    Args:
        name_or_weights: a name from `list_rewards()`, a `"NAME=WEIGHT,..."` mix, or `{output: signed weight}`.
        reward_model: a `RAHFModel`, a `RichFeedbackPredictor`, or a folder written by `save_pretrained` (model and
            processor); RAHF rewards need it.
        reward_processor: the model's `RAHFProcessor` (read from the folder or the predictor when not given).
        kwargs: passed to the factory (e.g. `report_all_scores=False` to skip the scores the reward does not use).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    name_or_weights = parse_reward(name_or_weights)
    if isinstance(name_or_weights, dict):
        return rahf_mix(reward_model, reward_processor, weights=name_or_weights, **kwargs)
    if name_or_weights not in _REWARDS:
        raise ValueError(
            f"unknown reward {name_or_weights!r}; the known rewards are {list_rewards()} (or pass a dict of weights, "
            "e.g. {'aesthetics': 0.5, 'plausibility': 0.5}, or register one with @register_reward)"
        )
    return _REWARDS[name_or_weights](reward_model=reward_model, reward_processor=reward_processor, **kwargs)


def load_reward(
    spec: str | dict[str, float],
    reward_model: str | os.PathLike,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> RewardFn:
    """The reward `spec` (see `parse_reward`) on the RAHF model saved in the folder `reward_model`, run without
    gradients: what the jobs that rank images (best-of-N, validation) use."""
    from .pretrained_paths import resolve_pretrained_path

    path = resolve_pretrained_path(reward_model, "reward_model", what="a RAHF model folder (save_pretrained)")
    predictor = RichFeedbackPredictor.from_pretrained(path, device=device, batch_size=batch_size)
    reward = get_reward(spec, reward_model=predictor)

    def no_grad_reward(images, prompts, metadata=None):
        with torch.no_grad():
            return reward(images, prompts, metadata)

    return no_grad_reward


def score_table(info: dict[str, Any], count: int) -> dict[str, list[float]]:
    """Every per-image value of a reward's `info` as floats: `info["scores"]` by name and `info["heatmap_means"]` as
    `<name>_mean`, for the `count` images scored."""
    table: dict[str, list[float]] = {}
    sources = [("", info.get("scores") or {}), ("_mean", info.get("heatmap_means") or {})]
    for suffix, values_by_name in sources:
        for name, values in values_by_name.items():
            values = torch.as_tensor(values).detach().float().reshape(-1).cpu()
            if values.numel() == count:
                table[f"{name}{suffix}"] = [float(v) for v in values]
    return table
