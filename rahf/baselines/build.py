"""Building trainable baselines, what `rahf train --model_type resnet50|clip_finetuned` calls: the trainable model
types, their classes, and [`build_trainable`] (a model and its [`BaselineProcessor`])."""

from __future__ import annotations

import json
import os

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..configs import resolve_config_path
from .clip import RAHFCLIPConfig, RAHFCLIPModel, tiny_clip_config
from .processing import BaselineProcessor, clip_processor, read_preprocessor_config
from .resnet import RAHFResNetConfig, RAHFResNetModel, tiny_resnet_config

__all__ = ["TRAINABLE_CLASSES", "TRAINABLE_MODEL_TYPES", "build_trainable", "processor_for"]

TRAINABLE_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "resnet50": (RAHFResNetConfig, RAHFResNetModel),
    "clip_finetuned": (RAHFCLIPConfig, RAHFCLIPModel),
}
TRAINABLE_MODEL_TYPES: tuple[str, ...] = tuple(TRAINABLE_CLASSES)


def processor_for(model: PreTrainedModel) -> BaselineProcessor:
    """The [`BaselineProcessor`] that a freshly built trainable baseline takes (image statistics of its pretrained
    backbone when it has one; CLIP's tokenizer for the CLIP baseline)."""
    config = model.config
    if isinstance(config, RAHFResNetConfig):
        mean, std = config.image_mean, config.image_std
        if config.backbone_name_or_path:
            pre = read_preprocessor_config(config.backbone_name_or_path)
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        return BaselineProcessor(image_size=config.image_size, image_mean=mean, image_std=std)
    if isinstance(config, RAHFCLIPConfig):
        return clip_processor(
            config.clip_config,
            config.clip_model_name_or_path,
            max_text_length=config.max_text_length,
            resize_mode="squash",
        )
    raise TypeError(f"no baseline processor for {type(config).__name__}")


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
    if model_type not in TRAINABLE_CLASSES:
        raise ValueError(
            f"unknown trainable `model_type` {model_type!r}; trainable baselines: {list(TRAINABLE_MODEL_TYPES)}"
        )
    config_cls, model_cls = TRAINABLE_CLASSES[model_type]
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
    return model, processor_for(model)
