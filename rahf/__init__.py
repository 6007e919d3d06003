"""rahf: Rich Automatic Human Feedback for text-to-image generation (Liang et al., CVPR 2024).

Names are imported lazily, so that `rahf data ...` and other light commands start without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "RAHFConfig": ".configuration_rahf",
    "RAHFModel": ".modeling_rahf",
    "RAHFOutput": ".modeling_rahf",
    "RAHFPreTrainedModel": ".modeling_rahf",
    "RAHFProcessor": ".processing_rahf",
    "RAHFImageProcessor": ".processing_rahf",
    "load_image": ".processing_rahf",
    "RichFeedback": ".predictor",
    "RichFeedbackPredictor": ".predictor",
    "predict_to_folder": ".predictor",
    "init_model": ".init_model",
    "RAHFReward": ".reward",
    "get_reward": ".reward",
    "list_rewards": ".reward",
    "decode_keyword_indices": ".keywords",
    "encode_keyword_target": ".keywords",
    "split_prompt_words": ".keywords",
}

__all__ = [
    "RAHFReward",
    "get_reward",
    "init_model",
    "list_rewards",
    "predict_to_folder",
    "RAHFConfig",
    "RAHFModel",
    "RAHFOutput",
    "RAHFPreTrainedModel",
    "RAHFImageProcessor",
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
    from .init_model import init_model
    from .keywords import decode_keyword_indices, encode_keyword_target, split_prompt_words
    from .modeling_rahf import RAHFModel, RAHFOutput, RAHFPreTrainedModel
    from .predictor import RichFeedback, RichFeedbackPredictor, predict_to_folder
    from .processing_rahf import RAHFImageProcessor, RAHFProcessor, load_image
    from .reward import RAHFReward, get_reward, list_rewards


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
