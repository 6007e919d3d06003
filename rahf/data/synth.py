"""The embedded default data set: procedurally rendered scenes with planted flaws, so that the ground truth is known.

Each image shows coloured shapes (with counts and spatial relations) on a photograph, a texture or a plain background,
rendered from a prompt. Some images get local artifacts (implausibility) and some disagree with their prompt
(misalignment). Simulated annotators mark the flaws they see, as people do in RichHF-18K (points, misaligned words and
four 1-5 Likert scores), and their raw annotations go through `rahf.data.consolidate` like any user's.

Layout of the output folder:

```
DIR/dataset_dict.json, DIR/{train,validation,test}/   the canonical DatasetDict (`datasets.load_from_disk(DIR)`)
DIR/raw/images/{uid}.png                             the rendered images
DIR/raw/annotations.jsonl                            one line per (image, annotator), as `rahf data consolidate` reads
DIR/raw/ground_truth.jsonl                           one line per image: what was planted (see below)
DIR/raw/synth_config.json                            the `SynthConfig` used
DIR/word_swap_groups.json                            the prompt vocabulary's interchangeable words (colours, shapes,
                                                     counts, relations), for `rahf train --word_swap_groups`
DIR/consolidation_report.json                        the consolidation's report (invalid lines; always empty here)
```

A ground-truth line holds `uid`, `split`, `image`, `prompt`, `prompt_words`, `background`, `groups` (what the prompt
asks for: count, colour, shape and the indices of their words), `relation`, `rendered_relation`, `objects` (one per
object slot, with `painted: false` for an object that should be there but was not drawn), `artifacts` and
`misalignments` (each with `kind`, `box` = `[x0, y0, x1, y1]` in pixels, end exclusive, `area` and `mask`, an
uncompressed COCO-style run-length encoding that `decode_rle` reads), the unions `artifact_mask` and
`misalignment_mask`, `misaligned_word_indices` (indices into `rahf.keywords.split_prompt_words(prompt)`),
`true_scores` (the latent 1-5 scores the annotators perceive with noise) and `annotators`.

How the latent scores follow the flaws (all on the 1-5 scale, then clipped to [1, 5]):

- plausibility = 4.6 + N(0, 0.2) - sum over artifacts of (0.7 + 0.5 * severity + 6 * area / image area), where an
  artifact's severity in [0.3, 1] grows with how much it changed the pixels under it;
- alignment = 4.7 + N(0, 0.2) - sum over misalignments of their weight (colour 1.2, shape 1.4, count 1.0, missing
  object 1.8, swapped relation 1.0; times 0.75 when only one object of a group is affected);
- aesthetics = a background base (photo 3.6, wood 3.6, gradient 3.4, texture 3.3, plain 2.8) + N(0, 0.35)
  - 0.35 per artifact - 0.15 per object beyond three;
- overall = 0.35 plausibility + 0.35 alignment + 0.3 aesthetics + N(0, 0.15).

Each simulated annotator (drawn from a pool with fixed personal traits) rates round(latent + bias + N(0, sd)) on the
Likert grid 1..5, misses a flaw with a small probability (more often a small one), marks a few jittered points over
each flaw it sees, misses or adds a misaligned word now and then, and never marks a flaw that is not there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from datasets import DatasetDict
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from rahf.constants import SCORE_NAMES
from rahf.data.schema import save_rich_feedback
from rahf.keywords import split_prompt_words

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

# RGB in [0, 1]. Saturated and far apart so that a changed colour is unambiguous even at 64 px.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.12, 0.30, 0.90),
    "yellow": (0.98, 0.88, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.50, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.07, 0.07, 0.07),
}
SHAPES: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "hexagon": "hexagons",
    "cross": "crosses",
}
COUNT_WORDS = {2: "two", 3: "three"}
# relation -> (its words, the relation it becomes when the two groups swap places, or None when a swap is invisible)
RELATIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "above": (("above",), "below"),
    "below": (("below",), "above"),
    "left of": (("left", "of"), "right of"),
    "right of": (("right", "of"), "left of"),
    "next to": (("next", "to"), None),
}
# background key -> (family, prompt phrases to pick from)
BACKGROUNDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "astronaut": ("photo", ("in front of an astronaut photo", "in front of a photo of an astronaut")),
    "coffee": ("photo", ("in front of a coffee cup photo", "in front of a photo of coffee")),
    "chelsea": ("photo", ("in front of a cat photo", "in front of a photo of a cat")),
    "rocket": ("photo", ("in front of a rocket photo", "in front of a photo of a rocket")),
    "camera": ("photo", ("in front of a cameraman photo", "in front of a black and white photo")),
    "brick": ("texture", ("on a brick wall", "in front of a brick wall")),
    "grass": ("texture", ("on grass", "on the grass")),
    "gravel": ("texture", ("on gravel", "on a gravel path")),
    "wood": ("wood", ("on a wooden table", "on a wooden floor")),
    "gradient": ("gradient", ("on a gradient background", "on a colourful gradient")),
    "plain_white": ("plain", ("on a white background",)),
    "plain_grey": ("plain", ("on a grey background",)),
    "plain_beige": ("plain", ("on a beige background",)),
}
_PLAIN_RGB = {"plain_white": (0.95, 0.95, 0.95), "plain_grey": (0.55, 0.55, 0.57), "plain_beige": (0.92, 0.86, 0.72)}
_TEXTURE_TINT = {"brick": (1.25, 0.62, 0.48), "grass": (0.55, 1.05, 0.40), "gravel": (1.0, 0.93, 0.82)}
_AESTHETIC_BASE = {"photo": 3.6, "wood": 3.6, "gradient": 3.4, "texture": 3.3, "plain": 2.8}

ARTIFACT_KINDS = ("swirl", "duplicated_patch", "melt", "smear", "broken_edges", "noise_blotch", "channel_shift")
_WARP_KINDS = ("swirl", "melt", "smear", "broken_edges")
MISALIGNMENT_KINDS = ("colour", "shape", "count", "missing", "relation")
# How often each misalignment kind is picked (among those the scene allows). Colour leads: at 64 px it is the flaw a
# tiny model (and a person) sees first; shapes, counts and relations stay, less often.
MISALIGNMENT_KIND_WEIGHTS = {"colour": 0.5, "shape": 0.15, "count": 0.1, "missing": 0.2, "relation": 0.05}
_ALIGNMENT_PENALTY = {"colour": 1.2, "shape": 1.4, "count": 1.0, "missing": 1.8, "relation": 1.0}


WORD_SWAP_GROUPS_FILE = "word_swap_groups.json"


def word_swap_groups() -> dict[str, list[str]]:
    """The prompt words that can stand in for one another (`rahf train --word_swap_groups`): colours, singular and
    plural shapes, counts above one, and the two axes of the relations."""
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "shapes": list(SHAPES.values()),
        "count": [COUNT_WORDS[n] for n in sorted(COUNT_WORDS)],
        "vertical": ["above", "below"],
        "horizontal": ["left", "right"],
    }


@dataclass
class SynthConfig:
    """How the synthetic rich-feedback set is generated.

    Args:
        num_train (`int`, *optional*, defaults to 8000): images in the `train` split.
        num_validation (`int`, *optional*, defaults to 500): images in the `validation` split.
        num_test (`int`, *optional*, defaults to 500): images in the `test` split.
        image_size (`int`, *optional*, defaults to 64): side of the square images, in pixels (at least 32).
        seed (`int`, *optional*, defaults to 0): everything (scenes, flaws, annotators) is a function of the seed.
        artifact_rate (`float`, *optional*, defaults to 0.6): probability that an image gets local artifacts
            (1 to `max_artifacts` of them, fewer being likelier).
        misalignment_rate (`float`, *optional*, defaults to 0.5): probability that an image disagrees with its prompt
            (1 or, when the scene allows, 2 misalignments).
        num_annotators (`int`, *optional*, defaults to 3): simulated annotators per image, as in RichHF-18K.
        annotator_pool_size (`int`, *optional*, defaults to 12): annotators to draw from, each with fixed traits
            (score bias and noise, miss rate, diligence, point jitter, word errors).
        annotator_noise (`float`, *optional*, defaults to 1.0): scales every annotator error; 0 gives perfect
            annotators (no misses, no jitter, Likert rounding of the latent scores only), which tests use.
        max_artifacts (`int`, *optional*, defaults to 3): most artifacts planted in one image.
        artifact_radius (`tuple[float, float]`, *optional*, defaults to `(0.14, 0.22)`): range of an artifact's
            radius, as a share of the image side.
        misalignment_kind_weights (`dict[str, float]`, *optional*): relative frequency of each misalignment kind
            (`colour`, `shape`, `count`, `missing`, `relation`) among those a scene allows; defaults to
            `MISALIGNMENT_KIND_WEIGHTS` (colour 0.5, missing 0.2, shape 0.15, count 0.1, relation 0.05).
        artifact_min_change (`float`, *optional*, defaults to 0.2): an artifact is only planted where it changes the
            pixels under it by at least this much (mean over its region of the largest channel change, in [0, 1]);
            weaker ones are redrawn, as no annotator could see them.

    Examples:
        >>> from rahf.data.synth import SynthConfig, generate_synthetic
        >>> config = SynthConfig(num_train=100, num_validation=20, num_test=20, seed=1, artifact_rate=0.8)
        >>> dataset_dict = generate_synthetic("data/synth-small", config)
    """

    num_train: int = 8000
    num_validation: int = 500
    num_test: int = 500
    image_size: int = 64
    seed: int = 0
    artifact_rate: float = 0.6
    misalignment_rate: float = 0.5
    num_annotators: int = 3
    annotator_pool_size: int = 12
    annotator_noise: float = 1.0
    max_artifacts: int = 3
    artifact_radius: tuple[float, float] = (0.14, 0.22)
    artifact_min_change: float = 0.2
    misalignment_kind_weights: dict[str, float] = field(default_factory=lambda: dict(MISALIGNMENT_KIND_WEIGHTS))

    def __post_init__(self) -> None:
        for name in ("num_train", "num_validation", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
        if self.num_train + self.num_validation + self.num_test == 0:
            raise ValueError("`num_train`, `num_validation` and `num_test` are all 0: ask for at least one image")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(
                f"`image_size` must be an int >= 32 (objects and flaws need room), got {self.image_size!r}"
            )
        for name in ("artifact_rate", "misalignment_rate"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"`{name}` is a probability and must lie in [0, 1], got {value!r}")
        if not isinstance(self.num_annotators, int) or self.num_annotators < 1:
            raise ValueError(f"`num_annotators` must be an int >= 1, got {self.num_annotators!r}")
        if self.annotator_pool_size < self.num_annotators:
            raise ValueError(
                f"`annotator_pool_size` ({self.annotator_pool_size}) must be at least `num_annotators` "
                f"({self.num_annotators}): each image needs distinct annotators"
            )
        if self.annotator_noise < 0:
            raise ValueError(f"`annotator_noise` must be >= 0 (0 = perfect annotators), got {self.annotator_noise!r}")
        if not isinstance(self.max_artifacts, int) or self.max_artifacts < 1:
            raise ValueError(f"`max_artifacts` must be an int >= 1, got {self.max_artifacts!r}")
        self.artifact_radius = tuple(float(v) for v in self.artifact_radius)
        if len(self.artifact_radius) != 2 or not 0.0 < self.artifact_radius[0] <= self.artifact_radius[1] <= 0.5:
            raise ValueError(
                f"`artifact_radius` must be (min, max) with 0 < min <= max <= 0.5 (shares of the image side), "
                f"got {self.artifact_radius!r}"
            )
        weights = self.misalignment_kind_weights
        if (
            not isinstance(weights, dict)
            or set(weights) != set(MISALIGNMENT_KINDS)
            or any(not float(w) >= 0 for w in weights.values())
            or not sum(float(w) for w in weights.values()) > 0
        ):
            raise ValueError(
                f"`misalignment_kind_weights` must give a non-negative weight to each of {list(MISALIGNMENT_KINDS)} "
                f"(not all 0), got {weights!r}"
            )
        self.misalignment_kind_weights = {k: float(weights[k]) for k in MISALIGNMENT_KINDS}
        if not 0.0 <= float(self.artifact_min_change) < 1.0:
            raise ValueError(f"`artifact_min_change` must lie in [0, 1), got {self.artifact_min_change!r}")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


# --------------------------------------------------------------------------------------------------------------------
# Run-length masks


def encode_rle(mask: np.ndarray) -> dict[str, list[int]]:
    """Boolean (H, W) mask -> `{"size": [H, W], "counts": [...]}`, COCO's uncompressed RLE.

    Runs are counted in column-major order and start with a run of zeros (possibly empty), so that
    `pycocotools.mask.frPyObjects(rle, H, W)` reads it too.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D (H, W), got shape {mask.shape}")
    flat = mask.flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """`encode_rle`'s output -> boolean (H, W) mask."""
    height, width = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {height} * {width} = {height * width}")
    flat = np.repeat(np.arange(counts.size) % 2 == 1, counts)
    return flat.reshape((height, width), order="F")


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def load_ground_truth(data_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Reads `DIR/raw/ground_truth.jsonl` of a synthetic set into `{uid: record}`, masks left as RLE (`decode_rle`)."""
    path = Path(data_dir) / "raw" / "ground_truth.jsonl"
    if not path.is_file():
        raise ValueError(
            f"`data_dir` {str(data_dir)!r} has no raw/ground_truth.jsonl: is it a `rahf data synth` output?"
        )
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["uid"]: r for r in records}


# --------------------------------------------------------------------------------------------------------------------
# Backgrounds


@cache
def _source_image(name: str) -> Image.Image:
    from skimage import data as skdata

    array = getattr(skdata, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8), mode="RGB")


def _crop_resize(source: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    width, height = source.size
    side = int(min(width, height) * rng.uniform(0.55, 1.0))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    out = source.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    return np.asarray(out, dtype=np.float32) / 255.0


def _smooth_noise(size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with features about `scale` pixels wide, in roughly [-1, 1]."""
    coarse = max(2, int(round(size / scale)))
    small = rng.standard_normal((coarse, coarse)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC) / 1.5


def _render_background(key: str, size: int, rng: np.random.Generator) -> np.ndarray:
    family = BACKGROUNDS[key][0]
    if family == "photo":
        return _crop_resize(_source_image(key), size, rng)
    if family == "texture":
        grey = _crop_resize(_source_image(key), size, rng)[..., :1]
        return np.clip(grey * np.asarray(_TEXTURE_TINT[key], dtype=np.float32), 0.0, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if family == "wood":
        angle = rng.uniform(-0.3, 0.3)
        along = xx * math.sin(angle) + yy * math.cos(angle)
        grain = np.sin((along * rng.uniform(14, 24) + 1.5 * _smooth_noise(size, size / 3, rng)) * math.pi)
        fine = 0.35 * _smooth_noise(size, 2.0, rng)
        t = np.clip(0.5 + 0.35 * grain + 0.15 * fine, 0, 1)[..., None]
        dark, light = np.array([0.45, 0.27, 0.12], np.float32), np.array([0.78, 0.55, 0.32], np.float32)
        return dark + (light - dark) * t
    if family == "gradient":
        hues = rng.uniform(0, 1, size=2)
        c0, c1 = (_hsv_to_rgb(h, rng.uniform(0.35, 0.7), rng.uniform(0.75, 0.95)) for h in hues)
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        t = np.clip((t + 0.71) / 1.42, 0, 1)[..., None]
        return (c0 + (c1 - c0) * t).astype(np.float32)
    rgb = np.asarray(_PLAIN_RGB[key], dtype=np.float32)
    vignette = 1.0 - 0.08 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)[..., None]
    return np.clip(rgb * vignette, 0, 1).astype(np.float32)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    hsv = np.array([[[h * 179.0, s * 255.0, v * 255.0]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


# --------------------------------------------------------------------------------------------------------------------
# Objects


def _shape_polygon(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of a shape, y pointing down."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a) + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "hexagon":
        return [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        return [
            (
                (1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5) + 0.08,
            )
            for k in range(10)
        ]
    if shape == "cross":
        a, b = 0.3, 0.9
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")


def _shape_alpha(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of `shape` centred at (cx, cy), drawn supersampled."""
    ss = 4 if size <= 256 else 2
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    r = radius * ss
    x, y = (cx + 0.5) * ss, (cy + 0.5) * ss
    if shape == "circle":
        draw.ellipse([x - 0.9 * r, y - 0.9 * r, x + 0.9 * r, y + 0.9 * r], fill=255)
    else:
        draw.polygon([(x + px * r, y + py * r) for px, py in _shape_polygon(shape)], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _paint_object(image: np.ndarray, slot: dict[str, Any]) -> np.ndarray:
    size = image.shape[0]
    colour = np.asarray(COLOURS[slot["colour"]], dtype=np.float32)
    outline = np.full(3, 0.55, np.float32) if slot["colour"] == "black" else colour * 0.35
    border = max(0.8, size / 64.0)
    outer = _shape_alpha(slot["shape"], slot["cx"], slot["cy"], slot["radius"] + border, size)
    inner = slot["alpha"]
    yy = np.arange(size, dtype=np.float32)[:, None, None]
    shading = 1.08 - 0.16 * np.clip((yy - (slot["cy"] - slot["radius"])) / (2 * slot["radius"]), 0, 1)
    fill = np.clip(colour * shading, 0, 1)
    image = image * (1 - outer[..., None]) + outline * outer[..., None]
    return image * (1 - inner[..., None]) + fill * inner[..., None]


# Normalised regions (x0, y0, x1, y1) for one group, or for the first and second group of a relation.
_REGIONS = {
    None: ((0.10, 0.12, 0.90, 0.88),),
    "above": ((0.08, 0.05, 0.92, 0.48), (0.08, 0.52, 0.92, 0.95)),
    "below": ((0.08, 0.52, 0.92, 0.95), (0.08, 0.05, 0.92, 0.48)),
    "left of": ((0.05, 0.10, 0.48, 0.90), (0.52, 0.10, 0.95, 0.90)),
    "right of": ((0.52, 0.10, 0.95, 0.90), (0.05, 0.10, 0.48, 0.90)),
}


def _layout(
    region: tuple[float, ...], count: int, size: int, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) in pixels for `count` objects spread along the longer side of `region`."""
    x0, y0, x1, y1 = (v * size for v in region)
    width, height = x1 - x0, y1 - y0
    horizontal = width >= height
    along, across = (width, height) if horizontal else (height, width)
    cell = along / count
    diameter = min(cell * rng.uniform(0.68, 0.84), across * rng.uniform(0.6, 0.8), size * 0.42)
    radius = diameter / 2
    out = []
    for k in range(count):
        a = (k + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        slack = max(0.0, across / 2 - radius - 1)
        b = across / 2 + rng.uniform(-0.5, 0.5) * slack
        cx, cy = (x0 + a, y0 + b) if horizontal else (x0 + b, y0 + a)
        out.append((float(cx), float(cy), float(radius)))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Artifacts


def _blob(size: int, cx: float, cy: float, radius: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An irregular ellipse: (hard mask, soft alpha with a ~1.5 px ramp)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    aspect = rng.uniform(0.7, 1.0)
    dx, dy = xx - cx, yy - cy
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / radius
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / (radius * aspect)
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    wobble = 1.0 + 0.15 * np.sin(rng.integers(2, 5) * theta + rng.uniform(0, 2 * math.pi))
    inside = wobble - rho  # > 0 inside, in units of the radius
    alpha = np.clip(inside * radius * aspect / 1.5 + 0.5, 0, 1)
    return inside > 0, alpha.astype(np.float32)


def _apply_artifact(
    kind: str,
    image: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    rng: np.random.Generator,
    slots: list[dict[str, Any]],
) -> tuple[np.ndarray, np.ndarray] | None:
    """Plants one artifact of `kind`; returns (new image, its region) or None when the kind cannot be placed here."""
    from skimage.transform import swirl

    size = image.shape[0]
    mask, alpha = _blob(size, cx, cy, radius, rng)
    a3 = alpha[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "swirl":
        strength = rng.uniform(4.0, 8.0) * rng.choice([-1.0, 1.0])
        effect = swirl(image, center=(cx, cy), strength=strength, radius=radius * 1.6, mode="reflect")
    elif kind == "duplicated_patch":
        # A copy of (part of) another object, pasted where it does not belong: a ghost limb.
        sources = [s for s in slots if s["painted"] and math.hypot(s["cx"] - cx, s["cy"] - cy) > 1.6 * radius]
        if not sources:
            return None
        src = sources[int(rng.integers(len(sources)))]
        sx = src["cx"] + rng.uniform(-0.4, 0.4) * src["radius"]
        sy = src["cy"] + rng.uniform(-0.4, 0.4) * src["radius"]
        shift = np.float32([[1, 0, sx - cx], [0, 1, sy - cy]])
        effect = cv2.warpAffine(
            image, shift, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
        )
        if rng.random() < 0.5:  # a mirrored copy reads even more wrong
            local = cv2.getRotationMatrix2D((cx, cy), float(rng.uniform(-60, 60)), 1.0)
            effect = cv2.warpAffine(effect, local, (size, size), borderMode=cv2.BORDER_REFLECT)
    elif kind == "melt":
        top = cy - radius
        drip = radius * rng.uniform(0.6, 1.1) * np.clip((yy - top) / (2 * radius), 0, 1)
        wave = 0.25 * radius * np.sin(yy / max(1.0, radius / 3) + rng.uniform(0, 6.3))
        map_x = (xx + wave * alpha).astype(np.float32)
        map_y = (yy - drip * alpha).astype(np.float32)
        effect = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        effect = cv2.GaussianBlur(effect, (0, 0), max(0.6, radius / 8))
    elif kind == "smear":
        length = max(3, int(round(radius * rng.uniform(0.9, 1.4))) | 1)
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0
        rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (length, length))
        kernel /= max(kernel.sum(), 1e-6)
        effect = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)
    elif kind == "broken_edges":
        # A jagged crack through the blob; the piece beyond it slides off.
        phi = rng.uniform(0, 2 * math.pi)
        proj = (xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)
        along = -(xx - cx) * math.sin(phi) + (yy - cy) * math.cos(phi)
        jag = 0.18 * radius * np.sign(np.sin(along * rng.uniform(1.2, 2.2))) + _smooth_noise(size, 2.0, rng)
        cut = proj + jag
        step = radius * rng.uniform(0.35, 0.6)
        shift = np.float32([[1, 0, step * math.cos(phi)], [0, 1, step * math.sin(phi)]])
        shifted = cv2.warpAffine(image, shift, (size, size), borderMode=cv2.BORDER_REFLECT)
        effect = np.where((cut > 0)[..., None], shifted, image)
        crack = np.clip(1.0 - np.abs(cut) / max(0.8, radius / 6), 0, 1)[..., None]
        effect = effect * (1 - 0.75 * crack)
    elif kind == "noise_blotch":
        noise = cv2.resize(
            rng.standard_normal((max(2, size // 2), max(2, size // 2), 3)).astype(np.float32),
            (size, size),
            interpolation=cv2.INTER_NEAREST,
        )
        tint = rng.uniform(0, 1, size=3).astype(np.float32)
        effect = np.clip(0.55 * image + 0.45 * tint + 0.3 * noise, 0, 1)
    elif kind == "channel_shift":
        k = max(2, int(round(radius * rng.uniform(0.35, 0.6))))
        effect = image.copy()
        effect[..., 0] = np.roll(image[..., 0], k, axis=1)
        effect[..., 2] = np.roll(image[..., 2], -k, axis=0)
        order = [(1, 2, 0), (2, 0, 1), (2, 1, 0)][int(rng.integers(3))]
        effect = 0.35 * effect + 0.65 * effect[..., list(order)]
    else:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {ARTIFACT_KINDS}")
    out = image * (1 - a3) + np.clip(effect, 0, 1).astype(np.float32) * a3
    return out.astype(np.float32), mask


# --------------------------------------------------------------------------------------------------------------------
# Scenes


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: list | tuple, weights: list[float] | None = None) -> Any:
    if weights is not None:
        p = np.asarray(weights, dtype=np.float64)
        return options[int(rng.choice(len(options), p=p / p.sum()))]
    return options[int(rng.integers(len(options)))]


def _plan_scene(rng: np.random.Generator, background_rgb: np.ndarray) -> dict[str, Any]:
    """The prompt: 1 or 2 groups of (count, colour, shape), a relation between them, a setting."""
    far = [c for c, rgb in COLOURS.items() if np.linalg.norm(np.asarray(rgb) - background_rgb) > 0.35]
    num_groups = 1 if rng.random() < 0.4 else 2
    groups = []
    for _ in range(num_groups):
        count = int(_pick(rng, [1, 2, 3], [0.6, 0.25, 0.15]))
        colour = _pick(rng, [c for c in far if c not in {g["colour"] for g in groups}] or far)
        shape = _pick(rng, [s for s in SHAPES if s not in {g["shape"] for g in groups}])
        groups.append({"count": count, "colour": colour, "shape": shape})
    relation = _pick(rng, list(RELATIONS)) if num_groups == 2 else None
    return {"groups": groups, "relation": relation}


def _prompt_words(plan: dict[str, Any], setting: str) -> tuple[list[str], list[dict[str, int]], list[int]]:
    """Words of the prompt, the word index of each group's count/colour/noun, and the relation's word indices."""
    words: list[str] = []
    roles = []
    relation_idx: list[int] = []
    for g, group in enumerate(plan["groups"]):
        if g == 1:
            rel_words = RELATIONS[plan["relation"]][0]
            relation_idx = list(range(len(words), len(words) + len(rel_words)))
            words.extend(rel_words)
        count_word = COUNT_WORDS.get(group["count"], _article(group["colour"]))
        noun = SHAPES[group["shape"]] if group["count"] > 1 else group["shape"]
        roles.append({"count": len(words), "colour": len(words) + 1, "noun": len(words) + 2})
        words.extend([count_word, group["colour"], noun])
    words.extend(setting.split())
    return words, roles, relation_idx


def _choose_misalignments(
    plan: dict[str, Any], rng: np.random.Generator, background_rgb: np.ndarray, kind_weights: dict[str, float]
) -> list[dict[str, Any]]:
    groups = plan["groups"]
    chosen: list[dict[str, Any]] = []
    n = 1 if rng.random() < 0.75 else 2
    for _ in range(n):
        options = []
        for g, group in enumerate(groups):
            taken = {m["kind"] for m in chosen if m.get("group") == g}
            if any(m["kind"] in ("missing", "relation") for m in chosen):
                break  # a missing group or swapped pair already breaks the scene; keep the story readable
            for kind in ("colour", "shape"):
                if kind not in taken:
                    options.append((kind, g))
            if group["count"] > 1 and "count" not in taken:
                options.append(("count", g))
            if len(groups) == 2 and not chosen:
                options.append(("missing", g))
        if len(groups) == 2 and not chosen and RELATIONS[plan["relation"]][1] is not None:
            options.append(("relation", None))
        options = [(k, g) for k, g in options if kind_weights[k] > 0]
        if not options:
            break
        kind, g = _pick(rng, options, [kind_weights[k] for k, _ in options])
        entry: dict[str, Any] = {"kind": kind, "group": g}
        if kind == "colour":
            group = groups[g]
            ref = np.asarray(COLOURS[group["colour"]])
            candidates = [
                c
                for c, rgb in COLOURS.items()
                if np.linalg.norm(np.asarray(rgb) - ref) > 0.45
                and np.linalg.norm(np.asarray(rgb) - background_rgb) > 0.35
            ]
            entry["rendered"] = _pick(rng, candidates or [c for c in COLOURS if c != group["colour"]])
            entry["partial"] = bool(group["count"] > 1 and rng.random() < 0.5)
        elif kind == "shape":
            entry["rendered"] = _pick(rng, [s for s in SHAPES if s != groups[g]["shape"]])
            entry["partial"] = bool(groups[g]["count"] > 1 and rng.random() < 0.5)
        elif kind == "count":
            entry["rendered"] = int(_pick(rng, [c for c in (1, 2, 3) if c != groups[g]["count"]]))
        chosen.append(entry)
    return chosen


def _true_scores(
    artifacts: list[dict[str, Any]],
    misalignments: list[dict[str, Any]],
    family: str,
    num_objects: int,
    rng: np.random.Generator,
    image_area: int,
) -> dict[str, float]:
    plaus = 4.6 + rng.normal(0, 0.2)
    for a in artifacts:
        plaus -= 0.7 + 0.5 * a["severity"] + 6.0 * a["area"] / image_area
    align = 4.7 + rng.normal(0, 0.2)
    for m in misalignments:
        align -= _ALIGNMENT_PENALTY[m["kind"]] * (0.75 if m.get("partial") else 1.0)
    aesth = _AESTHETIC_BASE[family] + rng.normal(0, 0.35) - 0.35 * len(artifacts) - 0.15 * max(0, num_objects - 3)
    plaus, align, aesth = (float(np.clip(v, 1, 5)) for v in (plaus, align, aesth))
    overall = float(np.clip(0.35 * plaus + 0.35 * align + 0.3 * aesth + rng.normal(0, 0.15), 1, 5))
    return {"plausibility": plaus, "alignment": align, "aesthetics": aesth, "overall": overall}


def render_example(split: str, index: int, config: SynthConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Renders image `index` of `split`: (uint8 (H, W, 3) image, its ground truth with numpy masks).

    The result depends only on (config.seed, split, index) and the scene settings of `config`, never on the
    annotator settings or on the other images, so that images can be rendered in any order or process.
    """
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index, 0])
    size = config.image_size
    bg_key = _pick(rng, list(BACKGROUNDS))
    family, phrases = BACKGROUNDS[bg_key]
    image = _render_background(bg_key, size, rng)
    bg_rgb = image.reshape(-1, 3).mean(axis=0)
    plan = _plan_scene(rng, bg_rgb)
    setting = _pick(rng, phrases)
    words, roles, relation_idx = _prompt_words(plan, setting)
    prompt = " ".join(words)
    assert split_prompt_words(prompt) == words, f"prompt {prompt!r} does not split into its own words"

    misalignments = (
        _choose_misalignments(plan, rng, bg_rgb, config.misalignment_kind_weights)
        if rng.random() < config.misalignment_rate
        else []
    )

    # What is drawn: per group, the rendered count/colour/shape, and per object slot which flaw touches it.
    relation = plan["relation"]
    if any(m["kind"] == "relation" for m in misalignments):
        relation = RELATIONS[relation][1]
    if relation == "next to":
        relation = "left of" if rng.random() < 0.5 else "right of"
    regions = _REGIONS[relation]
    slots: list[dict[str, Any]] = []
    flaw_slots: dict[int, list[int]] = {i: [] for i in range(len(misalignments))}
    for g, group in enumerate(plan["groups"]):
        mods = {i: m for i, m in enumerate(misalignments) if m.get("group") == g}
        count_mod = next(((i, m) for i, m in mods.items() if m["kind"] == "count"), None)
        layout_count = max(group["count"], count_mod[1]["rendered"]) if count_mod else group["count"]
        positions = _layout(regions[g], layout_count, size, rng)
        painted = [True] * layout_count
        if count_mod:
            i, m = count_mod
            if m["rendered"] > group["count"]:
                extra = list(range(group["count"], layout_count))
            else:
                extra = sorted(rng.choice(layout_count, group["count"] - m["rendered"], replace=False).tolist())
                for k in extra:
                    painted[k] = False
            flaw_slots[i].extend(len(slots) + k for k in extra)
        for i, m in mods.items():
            if m["kind"] == "missing":
                painted = [False] * layout_count
                flaw_slots[i].extend(len(slots) + k for k in range(layout_count))
        drawn = [k for k in range(layout_count) if painted[k]]
        attr = {"colour": [group["colour"]] * layout_count, "shape": [group["shape"]] * layout_count}
        for i, m in mods.items():
            if m["kind"] in ("colour", "shape"):
                targets = [drawn[int(rng.integers(len(drawn)))]] if m["partial"] and len(drawn) > 1 else drawn
                m["partial"] = len(targets) < len(drawn)
                for k in targets:
                    attr[m["kind"]][k] = m["rendered"]
                flaw_slots[i].extend(len(slots) + k for k in targets)
        for i, m in enumerate(misalignments):
            if m["kind"] == "relation":
                flaw_slots[i].extend(len(slots) + k for k in drawn)
        for k, (cx, cy, radius) in enumerate(positions):
            slot = {
                "group": g,
                "colour": attr["colour"][k],
                "shape": attr["shape"][k],
                "cx": cx,
                "cy": cy,
                "radius": radius,
                "painted": painted[k],
            }
            slot["alpha"] = _shape_alpha(slot["shape"], cx, cy, radius, size)
            slots.append(slot)
    for slot in slots:
        if slot["painted"]:
            image = _paint_object(image, slot)

    # Misaligned words and regions.
    truth_misalignments = []
    misaligned_words: set[int] = set()
    for i, m in enumerate(misalignments):
        g = m.get("group")
        if m["kind"] == "colour":
            idx = [roles[g]["colour"]]
        elif m["kind"] == "shape":
            idx = [roles[g]["noun"]]
        elif m["kind"] == "count":
            idx = [roles[g]["count"]]
        elif m["kind"] == "missing":
            idx = [roles[g]["colour"], roles[g]["noun"]]
        else:
            idx = relation_idx[:1]
        # Where the object is, or would have been: the slot's shape grown by a little, as an annotator would point.
        region = np.zeros((size, size), dtype=bool)
        for s in flaw_slots[i]:
            region |= slots[s]["alpha"] > 0.25
        region = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        misaligned_words.update(idx)
        truth_misalignments.append(
            {
                "kind": m["kind"],
                "group": g,
                "word_indices": idx,
                "words": [words[j] for j in idx],
                "expected": _expected(plan, m),
                "rendered": m.get("rendered", _rendered_default(m, relation)),
                "partial": bool(m.get("partial", False)),
                "mask_array": region,
            }
        )

    # Artifacts, last, so that they may also break a misaligned object.
    artifacts = []
    if rng.random() < config.artifact_rate:
        n_artifacts = int(
            _pick(rng, list(range(1, config.max_artifacts + 1)), [0.6 * 0.5**k for k in range(config.max_artifacts)])
        )
        painted_slots = [s for s in slots if s["painted"]]
        for _ in range(n_artifacts):
            kind = _pick(rng, list(ARTIFACT_KINDS))
            for attempt in range(8):
                if attempt == 5:  # this kind stays invisible here (e.g. a swirl on flat colours): try another one
                    kind = _pick(rng, [k for k in ARTIFACT_KINDS if k != kind])
                radius = rng.uniform(*config.artifact_radius) * size
                if painted_slots and rng.random() < 0.8:
                    s = painted_slots[int(rng.integers(len(painted_slots)))]
                    ang = rng.uniform(0, 2 * math.pi)
                    # Warps only show where there is an edge to warp: centre them on the object's outline.
                    lo, hi = (0.55, 1.0) if kind in _WARP_KINDS else (0.0, 0.7)
                    off = rng.uniform(lo, hi) * s["radius"]
                    cx, cy = s["cx"] + off * math.cos(ang), s["cy"] + off * math.sin(ang)
                else:
                    cx, cy = rng.uniform(radius, size - radius, size=2)
                cx = float(np.clip(cx, radius * 0.6, size - radius * 0.6))
                cy = float(np.clip(cy, radius * 0.6, size - radius * 0.6))
                if any(math.hypot(cx - a["cx"], cy - a["cy"]) < 1.5 * radius for a in artifacts):
                    continue  # keep artifacts apart, so that each is its own flaw
                result = _apply_artifact(kind, image, cx, cy, radius, rng, slots)
                if result is None:
                    continue
                new_image, mask = result
                change = np.abs(new_image - image).max(axis=-1)[mask].mean() if mask.any() else 0.0
                if change < config.artifact_min_change:  # invisible (e.g. a swirl over a flat colour): nobody sees it
                    continue
                image = new_image
                artifacts.append(
                    {
                        "kind": kind,
                        "cx": cx,
                        "cy": cy,
                        "radius": float(radius),
                        "severity": float(np.clip(change / 0.3, 0.3, 1.0)),
                        "mask_array": mask,
                        "area": int(mask.sum()),
                    }
                )
                break

    scores = _true_scores(artifacts, truth_misalignments, family, sum(s["painted"] for s in slots), rng, size * size)
    image_u8 = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    truth = {
        "prompt": prompt,
        "prompt_words": words,
        "background": bg_key,
        "background_family": family,
        # What the prompt asks for, with the index of each group's count, colour and noun word in `prompt_words`.
        "groups": [{**group, "word_indices": roles[g]} for g, group in enumerate(plan["groups"])],
        "relation": plan["relation"],
        "relation_word_indices": relation_idx,
        "rendered_relation": relation,
        "objects": [
            {
                "group": s["group"],
                "colour": s["colour"],
                "shape": s["shape"],
                "painted": s["painted"],
                "center": [round(s["cx"], 2), round(s["cy"], 2)],
                "radius": round(s["radius"], 2),
                "box": _box(s["alpha"] > 0.25),
            }
            for s in slots
        ],
        "artifacts": artifacts,
        "misalignments": truth_misalignments,
        "misaligned_word_indices": sorted(misaligned_words),
        "true_scores": scores,
    }
    return image_u8, truth


def _expected(plan: dict[str, Any], m: dict[str, Any]) -> Any:
    if m["kind"] == "relation":
        return plan["relation"]
    group = plan["groups"][m["group"]]
    return {"colour": group["colour"], "shape": group["shape"], "count": group["count"], "missing": group["count"]}[
        m["kind"]
    ]


def _rendered_default(m: dict[str, Any], relation: str) -> Any:
    return relation if m["kind"] == "relation" else 0  # "missing": none drawn


# --------------------------------------------------------------------------------------------------------------------
# Simulated annotators


def _annotator_pool(config: SynthConfig) -> list[dict[str, Any]]:
    rng = np.random.default_rng([config.seed, 99])
    pool = []
    for k in range(config.annotator_pool_size):
        pool.append(
            {
                "id": f"annotator_{k:02d}",
                "bias": {name: float(rng.normal(0, 0.25)) for name in SCORE_NAMES},
                "score_sd": float(rng.uniform(0.3, 0.55)),
                "miss_rate": float(rng.uniform(0.05, 0.2)),
                "diligence": float(rng.uniform(0.7, 1.3)),
                "jitter": float(rng.uniform(0.01, 0.03)),  # point jitter, as a share of the image size
                "word_miss": float(rng.uniform(0.05, 0.15)),
                "word_spurious": float(rng.uniform(0.02, 0.08)),
            }
        )
    return pool


def _points_on(mask: np.ndarray, k: int, jitter_px: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """`k` points spread over `mask` (farthest-point sampling from a point near its centre), then jittered."""
    ys, xs = np.nonzero(mask)
    coords = np.stack([xs, ys], axis=1).astype(np.float64)
    centre = coords.mean(axis=0)
    first = int(np.argmin(((coords - centre) ** 2).sum(axis=1)))
    chosen = [first]
    dist = ((coords - coords[first]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist + rng.uniform(0, 1e-3, size=dist.shape)))
        chosen.append(nxt)
        dist = np.minimum(dist, ((coords - coords[nxt]) ** 2).sum(axis=1))
    size = mask.shape[0]
    pts = coords[chosen] + rng.normal(0, jitter_px, size=(len(chosen), 2)) if jitter_px > 0 else coords[chosen]
    pts = np.clip(pts, 0, size - 1)
    return [(round(float(x), 1), round(float(y), 1)) for x, y in pts]


def _annotate(
    truth: dict[str, Any], annotators: list[dict[str, Any]], config: SynthConfig, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """What each annotator reports for one image: points, misaligned words and 1-5 Likert scores."""
    size = config.image_size
    noise = config.annotator_noise
    disk_area = math.pi * (size / 20.0) ** 2
    words = truth["prompt_words"]
    content = [i for i, w in enumerate(words) if w in COLOURS or w in SHAPES or w in SHAPES.values()]
    out = []
    for ann in annotators:
        points: list[dict[str, Any]] = []
        flagged_words: set[int] = set()
        flaws = [("implausibility", a) for a in truth["artifacts"]] + [
            ("misalignment", m) for m in truth["misalignments"]
        ]
        for kind, flaw in flaws:
            mask = flaw["mask_array"]
            area = int(mask.sum())
            if area == 0:
                continue
            small = 1.0 + max(0.0, 1.0 - area / (4 * disk_area))  # small flaws are missed up to twice as often
            if rng.random() < noise * ann["miss_rate"] * small:
                continue
            k = int(np.clip(round(ann["diligence"] * area / (1.5 * disk_area)) + int(rng.integers(0, 2)), 1, 8))
            if noise == 0:
                k = int(np.clip(round(area / (1.5 * disk_area)) + 1, 1, 8))
            for x, y in _points_on(mask, k, noise * ann["jitter"] * size, rng):
                points.append({"x": x, "y": y, "kind": kind})
            if kind == "misalignment":
                for idx in flaw["word_indices"]:
                    if rng.random() >= noise * ann["word_miss"]:
                        flagged_words.add(idx)
        if content and rng.random() < noise * ann["word_spurious"]:
            flagged_words.add(int(content[int(rng.integers(len(content)))]))
        scores = {}
        for name in SCORE_NAMES:
            value = truth["true_scores"][name] + noise * (ann["bias"][name] + rng.normal(0, ann["score_sd"]))
            scores[name] = int(np.clip(np.round(value), 1, 5))
        out.append(
            {
                "annotator": ann["id"],
                "points": points,
                "misaligned_word_indices": sorted(flagged_words),
                "scores": scores,
            }
        )
    return out


# --------------------------------------------------------------------------------------------------------------------
# The whole set


def _truth_record(uid: str, split: str, image_name: str, truth: dict[str, Any], annotators: list[str]) -> dict:
    record = {"uid": uid, "split": split, "image": image_name}
    record.update({k: v for k, v in truth.items() if k not in ("artifacts", "misalignments")})
    artifact_union = None
    record["artifacts"] = []
    for a in truth["artifacts"]:
        mask = a["mask_array"]
        artifact_union = mask if artifact_union is None else artifact_union | mask
        record["artifacts"].append(
            {
                "kind": a["kind"],
                "box": _box(mask),
                "area": a["area"],
                "severity": round(a["severity"], 4),
                "center": [round(a["cx"], 2), round(a["cy"], 2)],
                "radius": round(a["radius"], 2),
                "mask": encode_rle(mask),
            }
        )
    record["misalignments"] = []
    misalignment_union = None
    for m in truth["misalignments"]:
        mask = m["mask_array"]
        misalignment_union = mask if misalignment_union is None else misalignment_union | mask
        entry = {k: v for k, v in m.items() if k != "mask_array"}
        entry.update({"box": _box(mask), "area": int(mask.sum()), "mask": encode_rle(mask)})
        record["misalignments"].append(entry)
    record["true_scores"] = {k: round(v, 4) for k, v in truth["true_scores"].items()}
    record["artifact_mask"] = encode_rle(artifact_union) if artifact_union is not None else None
    record["misalignment_mask"] = encode_rle(misalignment_union) if misalignment_union is not None else None
    record["annotators"] = annotators
    return record


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    ours = ["raw", "dataset_dict.json", "consolidation_report.json", WORD_SWAP_GROUPS_FILE, *SPLITS]
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"`out_dir` {str(out)!r} exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise ValueError(
                    f"`out_dir` {str(out)!r} is not empty; choose another folder or pass overwrite=True (--overwrite)"
                )
            unknown = sorted(p.name for p in out.iterdir() if p.name not in ours)
            if unknown:
                raise ValueError(
                    f"`out_dir` {str(out)!r} holds files that a synthetic set does not write ({unknown[:5]}); "
                    "refusing to overwrite it: choose another folder"
                )
            for name in ours:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    (out / "raw" / "images").mkdir(parents=True, exist_ok=True)


def generate_synthetic(
    out_dir: str | Path, config: SynthConfig | None = None, *, overwrite: bool = False
) -> DatasetDict:
    """Renders the synthetic rich-feedback set into `out_dir` and returns the consolidated `DatasetDict`.

    The raw per-annotator annotations go through `rahf.data.consolidate.consolidate_records`, the same code that
    `rahf data consolidate` runs on people's annotations. Same config (seed included) -> byte-identical
    `raw/annotations.jsonl`, `raw/ground_truth.jsonl` and images.

    Examples:
        >>> from rahf.data.synth import SynthConfig, generate_synthetic
        >>> dd = generate_synthetic("synth-tiny", SynthConfig(num_train=8, num_validation=2, num_test=2))
        >>> dd["train"][0]["prompt"]  # e.g. 'two red stars above a blue hexagon on a wooden table'
    """
    from rahf.data.consolidate import REPORT_NAME, consolidate_records

    config = config if config is not None else SynthConfig()
    if not isinstance(config, SynthConfig):
        raise TypeError(f"`config` must be a SynthConfig, got {type(config).__name__}")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    raw = out / "raw"
    images_dir = raw / "images"
    (raw / "synth_config.json").write_text(json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
    (out / WORD_SWAP_GROUPS_FILE).write_text(json.dumps(word_swap_groups(), indent=2) + "\n")

    jobs = [(split, i) for split in SPLITS for i in range(config.split_sizes()[split])]
    pool = _annotator_pool(config)
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    truths: list[dict[str, Any]] = []

    # One process: a spawned worker would pay the import of `rahf` (torch, transformers; ~10 s on 2 cores), more
    # than the whole default set takes to render.
    for split, index in tqdm(jobs, desc="rendering synthetic set", unit="img"):
        image, truth = render_example(split, index, config)
        uid = f"synth-{split}-{index:05d}"
        name = f"{uid}.png"
        Image.fromarray(image, mode="RGB").save(images_dir / name, format="PNG")
        # Annotators get their own random stream, so that annotator settings never change the scenes.
        ann_rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index, 1])
        picked = [pool[k] for k in sorted(ann_rng.choice(len(pool), config.num_annotators, replace=False))]
        for ann in _annotate(truth, picked, config, ann_rng):
            records.append({"uid": uid, "image": name, "prompt": truth["prompt"], "split": split, **ann})
        truths.append(_truth_record(uid, split, name, truth, [a["id"] for a in picked]))
    render_s = time.perf_counter() - start

    with (raw / "annotations.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    with (raw / "ground_truth.jsonl").open("w", encoding="utf-8") as f:
        for t in truths:
            f.write(json.dumps(t, sort_keys=True) + "\n")

    start = time.perf_counter()
    # Consolidate what was written, read back from the file, so that the set is exactly what
    # `rahf data consolidate --annotations OUT/raw/annotations.jsonl --images OUT/raw/images` makes of it.
    with (raw / "annotations.jsonl").open(encoding="utf-8") as f:
        written = [json.loads(line) for line in f]
    dataset_dict, invalid = consolidate_records(written, images_dir, source=str(raw / "annotations.jsonl"))
    if invalid:
        # Our own records must always be valid: anything reported here is a bug in this module or in consolidation.
        raise RuntimeError(f"consolidation rejected {len(invalid)} synthetic records, first: {invalid[0]}")
    save_rich_feedback(dataset_dict, out)  # also for an empty split, which plain save_to_disk cannot reload
    splits = {k: len(v) for k, v in dataset_dict.items()}
    report = {
        "lines": len(records),
        "valid_lines": len(records),
        "images": sum(splits.values()),
        "splits": splits,
        "invalid": invalid,
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    logger.info(
        "synthetic set: %s images rendered in %.1fs, consolidated and saved in %.1fs -> %s",
        len(jobs),
        render_s,
        time.perf_counter() - start,
        out,
    )
    return dataset_dict


# --------------------------------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `synth` to the `rahf data` subcommands."""
    defaults = SynthConfig()
    parser = subparsers.add_parser(
        "synth",
        help="write the synthetic rich-feedback set (the embedded default)",
        description=(
            "Renders scenes of coloured shapes on photos and textures with planted artifacts and misalignments, "
            "simulates three annotators, consolidates their annotations and saves the canonical DatasetDict. "
            "The planted ground truth goes to OUT/raw/ground_truth.jsonl."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--num_train", type=int, default=defaults.num_train, help="images in the train split")
    parser.add_argument("--num_validation", type=int, default=defaults.num_validation, help="images in validation")
    parser.add_argument("--num_test", type=int, default=defaults.num_test, help="images in the test split")
    parser.add_argument("--image_size", type=int, default=defaults.image_size, help="image side in pixels (>= 32)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed; same seed, same data")
    parser.add_argument(
        "--artifact_rate",
        type=float,
        default=defaults.artifact_rate,
        help="probability that an image gets local artifacts",
    )
    parser.add_argument(
        "--misalignment_rate",
        type=float,
        default=defaults.misalignment_rate,
        help="probability that an image disagrees with its prompt",
    )
    parser.add_argument(
        "--num_annotators", type=int, default=defaults.num_annotators, help="simulated annotators per image"
    )
    parser.add_argument(
        "--annotator_noise",
        type=float,
        default=defaults.annotator_noise,
        help="scale of annotator errors (0 = perfect annotators)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous synthetic set in --out")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(SynthConfig)}
    config = SynthConfig(**{k: v for k, v in vars(args).items() if k in names})
    dataset_dict = generate_synthetic(args.out, config, overwrite=args.overwrite)
    logger.info("wrote %s", {k: len(v) for k, v in dataset_dict.items()})
    return 0
