"""Rewards for improving generators, chosen by name: RAHF scores as differentiable rewards on image tensors.

Every reward has one signature, `fn(images, prompts, metadata) -> (scores, info)`; guidance, best-of-N filtering and
fine-tuning all look rewards up here with `get_reward`.

Scale of the built-in rewards: a RAHF score is in [0, 1], higher is better (the data set maps the 1-5 Likert ratings by
(s - 1) / 4); `"-implausibility"` / `"-misalignment"` are minus the mean predicted heat, in [-1, 0]; `"rahf_mix"` is a
weighted sum of scores (equal weights of 1/4 by default, so also in [0, 1]). `info["scores"]` always holds the four
scores of every image, so that a gain in one can be weighed against the others.

Examples:

```python
>>> import torch
>>> from rahf.improve.reward import get_reward, list_rewards
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

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from rahf.pipelines.rahf_guided import RAHFReward, RewardFn, rahf_pixel_values

from rahf.job_args import parse_weight_spec
from rahf.modeling_rahf import RAHFModel
from rahf.predictor import RichFeedbackPredictor
from rahf.processing_rahf import ImageInput, RAHFProcessor, load_image

__all__ = [
    "RAHFReward",
    "RewardFn",
    "get_reward",
    "images_to_tensor",
    "list_rewards",
    "parse_weights",
    "signed_weights",
    "rahf_pixel_values",
    "register_reward",
]

# name -> factory(reward_model=..., reward_processor=..., **kwargs) -> RewardFn
_REWARDS: dict[str, Callable[..., RewardFn]] = {}

SCORE_REWARDS = ("plausibility", "alignment", "aesthetics", "overall")
HEATMAP_REWARDS = ("-implausibility", "-misalignment")


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


def signed_weights(weights: dict[str, float]) -> dict[str, float]:
    """`{"aesthetics": 0.7, "-implausibility": 0.3}` -> `{"aesthetics": 0.7, "implausibility": -0.3}`: a leading `-`
    negates, as in the reward names, and the registry's weights name the output itself."""
    out: dict[str, float] = {}
    for name, weight in weights.items():
        sign, output = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
        out[output] = out.get(output, 0.0) + sign * float(weight)
    return out


def parse_weights(spec: str) -> dict[str, float]:
    """`"aesthetics=0.7,-implausibility=0.3"` -> `{"aesthetics": 0.7, "implausibility": -0.3}` (a leading `-` negates,
    as in the reward names), for command lines."""
    weights = parse_weight_spec(spec, "reward", "aesthetics=0.7,-implausibility=0.3")
    if isinstance(weights, str):
        raise ValueError(f"reward {spec!r} is not NAME=WEIGHT; write e.g. 'aesthetics=0.7,-implausibility=0.3'")
    return signed_weights(weights)


def get_reward(
    name_or_weights: str | dict[str, float],
    reward_model: RAHFModel | RichFeedbackPredictor | str | os.PathLike | None = None,
    reward_processor: RAHFProcessor | None = None,
    **kwargs,
) -> RewardFn:
    """The reward registered as `name_or_weights`, or a RAHF weighted mix for a dict such as
    `{"aesthetics": 0.7, "implausibility": -0.3}` (or the string `"aesthetics=0.7,-implausibility=0.3"`).

    Args:
        name_or_weights: a name from `list_rewards()`, output name -> weight, or `"NAME=WEIGHT,..."`.
        reward_model: a `RAHFModel`, a `RichFeedbackPredictor`, or a folder written by `save_pretrained` (model and
            processor); RAHF rewards need it.
        reward_processor: the model's `RAHFProcessor` (read from the folder or the predictor when not given).
        kwargs: passed to the factory (e.g. `report_all_scores=False` to skip the scores the reward does not use).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if isinstance(name_or_weights, str) and "=" in name_or_weights:
        name_or_weights = parse_weights(name_or_weights)
    if isinstance(name_or_weights, dict):
        return rahf_mix(reward_model, reward_processor, weights=name_or_weights, **kwargs)
    if name_or_weights not in _REWARDS:
        raise ValueError(
            f"unknown reward {name_or_weights!r}; the known rewards are {list_rewards()} (or pass a dict of weights, "
            "e.g. {'aesthetics': 0.5, 'plausibility': 0.5}, or register one with @register_reward)"
        )
    return _REWARDS[name_or_weights](reward_model=reward_model, reward_processor=reward_processor, **kwargs)
