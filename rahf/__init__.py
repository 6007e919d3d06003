"""rahf: Rich Automatic Human Feedback for text-to-image generation (Liang et al., CVPR 2024)."""

from transformers import AutoConfig, AutoModel

from .configuration_rahf import RAHFConfig
from .keywords import decode_keyword_indices, encode_keyword_target, split_prompt_words
from .modeling_rahf import RAHFModel, RAHFOutput, RAHFPreTrainedModel
from .predictor import RichFeedback, RichFeedbackPredictor
from .processing_rahf import RAHFProcessor, load_image

__version__ = "0.1.0"

# So that AutoConfig / AutoModel (and AutoTokenizer, which reads config.json next to the tokenizer) know RAHF.
AutoConfig.register(RAHFConfig.model_type, RAHFConfig, exist_ok=True)
AutoModel.register(RAHFConfig, RAHFModel, exist_ok=True)

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
