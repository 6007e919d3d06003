"""rahf: Rich Automatic Human Feedback for text-to-image generation (Liang et al., CVPR 2024).

Names are imported lazily, so that `rahf data ...` and other light commands start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "RAHFConfig": ".configuration_rahf",
    "RAHFModel": ".modeling_rahf",
    "RAHFOutput": ".modeling_rahf",
    "RAHFPreTrainedModel": ".modeling_rahf",
    "RAHFProcessor": ".processing_rahf",
    "load_image": ".processing_rahf",
    "RichFeedback": ".predictor",
    "RichFeedbackPredictor": ".predictor",
    "decode_keyword_indices": ".keywords",
    "encode_keyword_target": ".keywords",
    "split_prompt_words": ".keywords",
}

__all__ = [
    "RAHFConfig",
    "RAHFModel",
    "RAHFOutput",
    "RAHFPreTrainedModel",
    "RAHFProcessor",
    "RichFeedback",
    "RichFeedbackPredictor",
    "decode_keyword_indices",
    "encode_keyword_target",
    "load_image",
    "split_prompt_words",
]

if TYPE_CHECKING:
    from .configuration_rahf import RAHFConfig
    from .keywords import decode_keyword_indices, encode_keyword_target, split_prompt_words
    from .modeling_rahf import RAHFModel, RAHFOutput, RAHFPreTrainedModel
    from .predictor import RichFeedback, RichFeedbackPredictor
    from .processing_rahf import RAHFProcessor, load_image


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
