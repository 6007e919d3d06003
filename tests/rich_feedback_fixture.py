"""A tiny canonical rich-feedback data set built in code (seeded), for the evaluation and baseline tests.

Built here rather than with `rahf.data.synth` so that these tests exercise only the evaluation and baseline code.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

from rahf.keywords import split_prompt_words

SCORE_NAMES = ("plausibility", "alignment", "aesthetics", "overall")
FEATURES = Features(
    {
        "uid": Value("string"),
        "image": Image(mode="RGB"),
        "prompt": Value("string"),
        **{name: Value("float32") for name in SCORE_NAMES},
        "implausibility_map": Image(mode="L"),
        "misalignment_map": Image(mode="L"),
        "prompt_words": List(Value("string")),
        "word_labels": List(Value("int32")),
    }
)
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star"]


def _blob(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.clip(1.0 - np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / r, 0.0, 1.0)


def tiny_records(
    n: int = 8,
    image_size: tuple[int, int] = (40, 48),
    map_size: tuple[int, int] | None = None,
    seed: int = 0,
    offset: int = 0,
) -> dict[str, list]:
    """`n` records; images (W, H) = `image_size`, maps at `map_size` (default: the image's). Every third record has
    an empty implausibility map and every fourth an empty misalignment map."""
    rng = np.random.default_rng(seed)
    w, h = image_size
    mw, mh = map_size or image_size
    rows: dict[str, list] = {k: [] for k in FEATURES}
    for k in range(n):
        i = k + offset
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        prompt = f"a {colour} {shape} number {i} above a wooden table"
        words = split_prompt_words(prompt)
        labels = [1] * len(words)
        for j in rng.choice(len(words), size=int(rng.integers(0, 3)), replace=False):
            labels[int(j)] = 0
        image = (rng.random((h, w, 3)) * 80).astype(np.uint8)
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        image[_blob(h, w, cy, cx, 0.2 * min(h, w)) > 0] = (220, 40, 40)
        maps = {}
        for name, empty_every in (("implausibility_map", 3), ("misalignment_map", 4)):
            if k % empty_every == 0:
                heat = np.zeros((mh, mw))
            else:
                heat = _blob(mh, mw, rng.uniform(0.2, 0.8) * mh, rng.uniform(0.2, 0.8) * mw, 0.25 * min(mh, mw))
            maps[name] = PILImage.fromarray(np.round(heat * 255).astype(np.uint8), mode="L")
        rows["uid"].append(f"uid-{i}")
        rows["image"].append(PILImage.fromarray(image, mode="RGB"))
        rows["prompt"].append(prompt)
        for s in SCORE_NAMES:
            rows[s].append(float(rng.random()))
        rows["implausibility_map"].append(maps["implausibility_map"])
        rows["misalignment_map"].append(maps["misalignment_map"])
        rows["prompt_words"].append(words)
        rows["word_labels"].append(labels)
    return rows


def tiny_split(n: int = 8, **kwargs) -> Dataset:
    return Dataset.from_dict(tiny_records(n, **kwargs), features=FEATURES)


def tiny_dataset_dict(n_train: int = 6, n_validation: int = 4, n_test: int = 8, **kwargs) -> DatasetDict:
    return DatasetDict(
        {
            "train": tiny_split(n_train, seed=1, offset=100, **kwargs),
            "validation": tiny_split(n_validation, seed=2, offset=200, **kwargs),
            "test": tiny_split(n_test, seed=3, offset=0, **kwargs),
        }
    )


def gt_of(split: Dataset) -> dict[str, dict]:
    """prompt -> the record's ground truth as floats, for oracle raters."""
    out = {}
    for row in split:
        out[row["prompt"]] = {
            "scores": {s: float(row[s]) for s in SCORE_NAMES},
            "implausibility": np.asarray(row["implausibility_map"], dtype=np.float32) / 255.0,
            "misalignment": np.asarray(row["misalignment_map"], dtype=np.float32) / 255.0,
            "keywords": [i for i, label in enumerate(row["word_labels"]) if label == 0],
        }
    return out
