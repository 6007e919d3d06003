"""`rahf init-model`: a new (untrained, or with the pretrained towers a preset names) RAHF model and its processor,
built from a `configs/model/*.json` preset and written to a folder.

Examples:

```python
>>> from rahf.init_model import init_model
>>> init_model("configs/model/tiny.json", "models/tiny")
PosixPath('models/tiny')
```
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .configs import resolve_config_path
from .configuration_rahf import RAHFConfig
from .modeling_rahf import RAHFModel
from .processing_rahf import RAHFProcessor

logger = logging.getLogger(__name__)

__all__ = ["build_rahf_model", "init_model", "read_model_preset"]


def init_model(config_path: str, out: str, seed: int = 0) -> Path:
    """Writes an untrained model + processor from a `configs/model/*.json` preset (pretrained towers if it names
    them)."""
    config = read_model_preset(config_path)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`--out` {out!r} is a file; pass a folder to write the model into")
    torch.manual_seed(seed)
    model = build_rahf_model(config)
    processor = RAHFProcessor.from_config(model.config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info("wrote an untrained %s RAHF model to %s", config.variant, out_dir)
    return out_dir


def build_rahf_model(config: RAHFConfig) -> RAHFModel:
    """A new RAHF model of `config`: with the pretrained towers it names (`vision_model_name_or_path`,
    `text_model_name_or_path`), else with random weights."""
    if config.vision_model_name_or_path or config.text_model_name_or_path:
        return RAHFModel.from_pretrained_towers(config)
    return RAHFModel(config)


def read_model_preset(config_path: str | os.PathLike, flag: str = "--config", **overrides) -> RAHFConfig:
    """The RAHF config of a JSON preset (a file, or a shipped `configs/model/*.json` name), with `overrides` (e.g.
    `variant="augmented_prompt"`) applied to its fields; a missing, unreadable or invalid one is a ValueError naming
    the file."""
    config_class = RAHFConfig
    path = resolve_config_path(config_path, flag)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"`{flag}` {str(config_path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"`{flag}` {str(config_path)!r} must hold a JSON object, got a {type(data).__name__}")
    found = data.get("model_type", config_class.model_type)
    if found != config_class.model_type:
        raise ValueError(
            f"`{flag}` {str(config_path)!r} is a {found!r} preset; rahf init-model builds {config_class.model_type!r} "
            "models (baselines are built by `rahf train --model_type ...`)"
        )
    data.update(overrides)
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
