"""Seeded builders of tiny components, shared by rahf's tests, its benchmarks and users' own tests.

Everything here is built offline from code: no hub, no downloads (as `diffusers.utils.testing_utils` does).
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerFast

from .configuration_rahf import RAHFConfig
from .modeling_rahf import RAHFModel
from .processing_rahf import RAHFProcessor
from .tokenization import build_offline_tokenizer

if TYPE_CHECKING:
    from ._testing_diffusers import (
        tiny_amused_inpaint_pipeline,
        tiny_amused_pipeline,
        tiny_sd_inpaint_pipeline,
        tiny_sd_pipeline,
    )

TINY_VOCAB_SIZE = 512


def tiny_rahf_config(variant: str = "multi_head", vision_model_type: str = "vit", **overrides) -> RAHFConfig:
    """A RAHF config small enough for unit tests (hidden size 32, 2 layers, 4 heads, 32 px images)."""
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    if vision_model_type not in ("vit", "siglip_vision_model", "clip_vision_model"):
        raise ValueError(
            f"`vision_model_type` must be vit, siglip_vision_model or clip_vision_model, got {vision_model_type!r}"
        )
    vision["model_type"] = vision_model_type
    text = {
        "model_type": "t5",
        "vocab_size": TINY_VOCAB_SIZE,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "dropout_rate": 0.0,
        "tie_word_embeddings": False,
    }
    kwargs = dict(
        variant=variant,
        heatmap_size=16,
        vision_config=vision,
        text_config=text,
        heatmap_head_channels=16,
        score_head_channels=16,
        score_head_num_convs=1,
        score_head_hidden_size=16,
        max_text_length=32,
        max_target_length=48,
    )
    kwargs.update(overrides)
    return RAHFConfig(**kwargs)


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    return build_offline_tokenizer(vocab_size=vocab_size)


def tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The offline byte-level BPE tokenizer (built once per process, a fresh copy per call)."""
    return copy.deepcopy(_tokenizer(vocab_size))


def tiny_rahf_model(variant: str = "multi_head", seed: int = 0, **config_overrides) -> RAHFModel:
    """A randomly initialised tiny RAHF model, identical for the same seed."""
    config = tiny_rahf_config(variant, **config_overrides)
    torch.manual_seed(seed)
    return RAHFModel(config).eval()


def tiny_rahf_processor(variant: str = "multi_head", **config_overrides) -> RAHFProcessor:
    """The processor that matches `tiny_rahf_model(variant)`."""
    config = tiny_rahf_config(variant, **config_overrides)
    return RAHFProcessor.from_config(config, tokenizer=tiny_tokenizer(min(config.text_config.vocab_size, 4096)))


def __getattr__(name: str):
    # The diffusers builders live apart so that importing rahf.testing for RAHF alone stays light.
    if name in (
        "tiny_sd_pipeline",
        "tiny_sd_inpaint_pipeline",
        "tiny_amused_pipeline",
        "tiny_amused_inpaint_pipeline",
    ):
        from . import _testing_diffusers

        return getattr(_testing_diffusers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "tiny_amused_inpaint_pipeline",
    "tiny_amused_pipeline",
    "tiny_rahf_config",
    "tiny_rahf_model",
    "tiny_rahf_processor",
    "tiny_sd_inpaint_pipeline",
    "tiny_sd_pipeline",
    "tiny_tokenizer",
]
