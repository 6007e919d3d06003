"""The registry of baselines ([`BASELINES`]: name -> factory, description, trainable) and the two ways in:
[`build_baseline`] by name and [`load_rater`] for a saved folder, a CLIP checkpoint or a name."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .build import build_trainable
from .clip import RAHFCLIPConfig
from .raters import CLIP_MODES, BaselineRater, CenterPriorRater, CLIPRater, saved_model_type
from .resnet import RAHFResNetConfig

logger = logging.getLogger(__name__)

__all__ = ["BASELINES", "BaselineSpec", "build_baseline", "load_rater"]


@dataclass(frozen=True)
class BaselineSpec:
    """A baseline of the registry: `factory(**kwargs) -> rater`, what it is, whether `rahf train` trains it."""

    factory: Callable[..., Any]
    description: str
    trainable: bool = False


def _trainable_rater(model_type: str) -> Callable[..., BaselineRater]:
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


def _clip_rater(mode: str) -> Callable[..., CLIPRater]:
    def factory(
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        processor_name_or_path: str | os.PathLike | None = None,
        seed: int = 0,
        **kwargs: Any,
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


def build_baseline(model_type: str, **kwargs: Any) -> Any:
    """A rater for the baseline `model_type` (see `BASELINES`); `kwargs` go to its factory.

    Trainable ones (`resnet50`, `clip_finetuned`) take `model_config`, `seed`, `pretrained_model_name_or_path`; CLIP
    ones take `pretrained_model_name_or_path` (a tiny random CLIP without it) and `processor_name_or_path`;
    `center_prior` takes `sigma` and `peak`.
    """
    if model_type not in BASELINES:
        raise _unknown(model_type)
    return BASELINES[model_type].factory(**kwargs)


def _config_model_type(path: Path) -> str | None:
    """config.json's `model_type` in `path`, or None when it has no config.json (unreadable JSON is a ValueError)."""
    return saved_model_type(path) if (path / "config.json").is_file() else None


def load_rater(
    model_dir_or_type: str | os.PathLike,
    model_type: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    **kwargs: Any,
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
        from ..predictor import RichFeedbackPredictor

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
