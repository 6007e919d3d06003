"""Helpers shared by the training tests: a tiny canonical data set and a tiny model preset, built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from PIL import Image

from rahf.data.schema import FEATURES, SCORE_NAMES
from rahf.testing import tiny_rahf_config

WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "above", "below", "on", "wooden", "table"]


def make_tiny_dataset(
    path: str | Path, sizes: dict[str, int] | None = None, image_size: int = 32, seed: int = 0
) -> Path:
    """A canonical DatasetDict (random images, one square blob per heatmap, random scores and word labels)."""
    sizes = sizes or {"train": 16, "validation": 8, "test": 4}
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in sizes.items():
        rows: dict[str, list] = {name: [] for name in FEATURES}
        for i in range(count):
            words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(3, 7)))]
            maps = []
            for _ in range(2):
                heat = np.zeros((image_size, image_size), np.uint8)
                if rng.random() < 0.6:
                    y, x = rng.integers(4, image_size - 4, size=2)
                    heat[y - 3 : y + 3, x - 3 : x + 3] = 255
                maps.append(Image.fromarray(heat, mode="L"))
            rows["uid"].append(f"{split}-{i:03d}")
            rows["image"].append(Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)))
            rows["prompt"].append(" ".join(words))
            for name in SCORE_NAMES:
                rows[name].append(float(rng.random()))
            rows["implausibility_map"].append(maps[0])
            rows["misalignment_map"].append(maps[1])
            rows["prompt_words"].append(words)
            rows["word_labels"].append([int(v) for v in rng.random(len(words)) < 0.8])
        splits[split] = Dataset.from_dict(rows, features=FEATURES)
    DatasetDict(splits).save_to_disk(str(path))
    return Path(path)


def write_tiny_model_config(path: str | Path, dropout: float = 0.1, **overrides) -> Path:
    """The tiny test preset as a configs/model-style JSON, with dropout on so that RNG state matters for resuming."""
    config = tiny_rahf_config(**overrides)
    config.text_config.dropout_rate = dropout
    config.vision_config.hidden_dropout_prob = dropout
    config.to_json_file(str(path))
    return Path(path)


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from rahf import RAHFModel

    return RAHFModel.from_pretrained(str(model_dir)).state_dict()
