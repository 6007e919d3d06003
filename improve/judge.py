"""The measuring world's judge: our stand-in for the paper's human raters, never a reward.

It is trained on its own, independently drawn synthetic scenes (its own seed, none of the images RAHF or the generator
trained on) with the exact labels the renderer knows: per pixel, the planted artifacts and each object's colour and
shape; per image, the background. On an image it segments artifacts and objects, then rates

- **plausibility** from the artifacts it finds, with the renderer's own formula for the latent score
  (4.6 minus, per artifact, 1.0 + 6 x its share of the image; on the 1-5 scale, mapped to [0, 1] by (s - 1) / 4);
- **alignment** GenEval-style: the share of the prompt's requirements that the objects it finds meet (each group's
  colour and shape present, each group's count exact, the relation between the groups, the background);
- **overall**: the mean of the two.

Objects are the connected blobs of its foreground; each blob's colour is the majority of its per-pixel colour labels,
its shape is read off the blob (the image around it and its mask) by a small classifier, trained in a second stage on the
blobs the segmenter itself finds in the training scenes, each labelled with the shape of the object it overlaps.

`python -m rahf.improve.judge --config configs/improve/judge_synth.yaml` renders the scenes, trains the segmenter and
reports its accuracy on held-out scenes of its own (`OUTPUT/final/judge_report.json`).

Examples:

```python
>>> from rahf.improve.judge import SynthJudge
>>> judge = SynthJudge.from_pretrained("runs/judge_synth/final")
>>> [verdict] = judge([image], ["two red stars above a blue hexagon on a wooden table"])
>>> verdict.scores, verdict.requirements, verdict.artifact_mask.shape
```
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from rahf.data.synth_scenes import (
    BACKGROUND_KEYS,
    COLOUR_NAMES,
    SHAPE_NAMES,
    SceneRequest,
    parse_scene_prompt,
    scene_labels,
)
from rahf.job_args import check_finite_numbers, check_int_fields, parse_job_args
from rahf.training_utils import atomic_directory

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGED_SCORES",
    "JudgeTrainingArguments",
    "JudgeVerdict",
    "SceneObject",
    "SynthJudge",
    "SynthJudgeConfig",
    "SynthJudgeModel",
    "check_scene",
    "judged_plausibility",
    "main",
    "train_judge",
]

JUDGED_SCORES = ("plausibility", "alignment", "overall")
SHAPE_CROP = 32
# The renderer's latent plausibility per artifact: 0.7 + 0.5 x severity (severities in [0.3, 1], mean about 0.65).
ARTIFACT_PENALTY = 1.0
ARTIFACT_AREA_PENALTY = 6.0


# --------------------------------------------------------------------------------------------------------------------
# The segmenter


class SynthJudgeConfig(PretrainedConfig):
    """Configuration of [`SynthJudgeModel`].

    Args:
        channels (`list[int]`, *optional*, defaults to `[32, 64, 128, 128]`): widths of the encoder stages (each after
            the first halves the resolution).
        image_size (`int`, *optional*, defaults to 64): the input side in pixels.
        min_artifact_area (`int`, *optional*, defaults to 12): artifact blobs smaller than this (pixels) are ignored.
        min_object_area (`int`, *optional*, defaults to 8): object blobs smaller than this are ignored.
    """

    model_type = "rahf_synth_judge"

    def __init__(
        self,
        channels: list[int] | None = None,
        image_size: int = 64,
        min_artifact_area: int = 12,
        min_object_area: int = 8,
        **kwargs,
    ):
        self.channels = list(channels or [32, 64, 128, 128])
        self.image_size = int(image_size)
        self.min_artifact_area = int(min_artifact_area)
        self.min_object_area = int(min_object_area)
        self.num_colours = len(COLOUR_NAMES) + 1  # + background
        self.num_shapes = len(SHAPE_NAMES) + 1
        self.num_backgrounds = len(BACKGROUND_KEYS)
        super().__init__(**kwargs)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
    )


class SynthJudgeModel(PreTrainedModel):
    """A small UNet at half resolution: RGB in [0, 1] (B, 3, H, W) -> per-pixel artifact logit (B, 1, H, W), colour
    and shape logits
    (B, 1 + colours, H, W), (B, 1 + shapes, H, W) and background logits (B, backgrounds)."""

    config_class = SynthJudgeConfig
    base_model_prefix = "judge"
    main_input_name = "pixel_values"

    def __init__(self, config: SynthJudgeConfig):
        super().__init__(config)
        c = config.channels
        # Stride-2 stem: the labels are read at half resolution and the logits upsampled (objects are >= 10 px wide),
        # a quarter of the cost of full-resolution features.
        self.stem = nn.Conv2d(3, c[0], 4, stride=2, padding=1)
        self.down = nn.ModuleList([_block(c[0] if i == 0 else c[i - 1], c[i]) for i in range(len(c))])
        self.up = nn.ModuleList([_block(c[i] + c[i - 1], c[i - 1]) for i in range(len(c) - 1, 0, -1)])
        self.artifact = nn.Conv2d(c[0], 1, 1)
        self.colour = nn.Conv2d(c[0], config.num_colours, 1)
        self.shape = nn.Conv2d(c[0], config.num_shapes, 1)
        self.background = nn.Linear(c[-1], config.num_backgrounds)
        # A shape is read off its blob (the image around it and its mask, cropped square, SHAPE_CROP px): per-pixel
        # shape labels are weak inside an object, where every pixel looks alike whatever the outline.
        self.shape_classifier = nn.Sequential(
            nn.Conv2d(4, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, config.num_shapes - 1),
        )  # fmt: skip
        self.post_init()

    def classify_shapes(self, crops: torch.Tensor) -> torch.Tensor:
        """Blob crops (N, 4, SHAPE_CROP, SHAPE_CROP): RGB in [0, 1] and the blob's mask -> shape logits (N, shapes)."""
        return self.shape_classifier(crops)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        size = pixel_values.shape[-2:]
        x = self.stem((pixel_values - 0.5) / 0.25)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        background = self.background(x.mean(dim=(2, 3)))
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))

        def full(head: nn.Module) -> torch.Tensor:
            return F.interpolate(head(x), size=size, mode="bilinear", align_corners=False)

        return {"artifact": full(self.artifact), "colour": full(self.colour), "shape": full(self.shape),
                "background": background}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# From segmentation to verdict


@dataclass
class SceneObject:
    """One object found in an image: its colour, shape, centroid (x, y) in pixels and area."""

    colour: str
    shape: str
    centroid: tuple[float, float]
    area: int


def _components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    import cv2

    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [labels == k for k in range(1, count) if (labels == k).sum() >= min_area]


def _majority(labels: np.ndarray, blob: np.ndarray, num_classes: int) -> int:
    """The most frequent non-background label (1..num_classes) of `labels` inside `blob`, as a 0-based index."""
    return int(np.bincount(labels[blob].astype(np.int64), minlength=num_classes + 1)[1:].argmax())


def blob_crop(image: np.ndarray, blob: np.ndarray, size: int = SHAPE_CROP) -> np.ndarray:
    """The square around a blob (its bounding box and a 3 px margin) of the image (uint8 (H, W, 3)) and of the blob's
    mask, resized to `size` x `size`: float32 (4, size, size), RGB in [0, 1] then the mask."""
    import cv2

    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0) + 6
    top, left = int(round((y0 + y1 - side) / 2)), int(round((x0 + x1 - side) / 2))
    padded = np.pad(image, ((side, side), (side, side), (0, 0)), mode="edge")
    mask = np.pad(blob.astype(np.float32), side)
    rgb = padded[top + side : top + 2 * side, left + side : left + 2 * side].astype(np.float32) / 255.0
    m = mask[top + side : top + 2 * side, left + side : left + 2 * side]
    rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    m = cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA)
    return np.concatenate([rgb.transpose(2, 0, 1), m[None]], axis=0)


def objects_from_labels(
    colour: np.ndarray, shape: np.ndarray | None, min_area: int, shape_of=None
) -> list[SceneObject]:
    """Objects from per-pixel colour labels (0 background): one per connected blob of foreground, with its majority
    colour, and its shape from `shape_of(blobs) -> [shape index]` (the judge's classifier) when given, else the
    majority of `shape` labels (exact labels)."""
    objects = []
    blobs = _components(colour > 0, min_area)
    shapes = shape_of(blobs) if shape_of is not None and blobs else None
    for k, blob in enumerate(blobs):
        ys, xs = np.nonzero(blob)
        c = _majority(colour, blob, len(COLOUR_NAMES))
        s = shapes[k] if shapes is not None else _majority(shape, blob, len(SHAPE_NAMES))
        objects.append(
            SceneObject(COLOUR_NAMES[c], SHAPE_NAMES[s], (float(xs.mean()), float(ys.mean())), int(blob.sum()))
        )
    return objects


def check_scene(request: SceneRequest, objects: list[SceneObject], background: str | None) -> dict[str, bool]:
    """The prompt's requirements and whether `objects` / `background` meet them (GenEval-style): per group
    `g<i>:present` (its colour and shape) and `g<i>:count`, `relation` when there are two groups, and `background`."""
    result: dict[str, bool] = {}
    members = []
    for i, group in enumerate(request.groups):
        found = [o for o in objects if o.colour == group.colour and o.shape == group.shape]
        members.append(found)
        result[f"g{i}:present"] = bool(found)
        result[f"g{i}:count"] = len(found) == group.count
    if len(request.groups) == 2:
        a, b = members
        ok = bool(a) and bool(b)
        if ok and request.relation != "next to":
            ax, ay = np.mean([o.centroid for o in a], axis=0)
            bx, by = np.mean([o.centroid for o in b], axis=0)
            ok = {"above": ay < by, "below": ay > by, "left of": ax < bx, "right of": ax > bx}[request.relation]
        result["relation"] = bool(ok)
    if request.background is not None:
        result["background"] = background == request.background
    return result


def judged_plausibility(artifact_areas: list[int], image_area: int) -> float:
    """The renderer's latent plausibility formula on the artifacts found, on [0, 1]."""
    latent = 4.6 - sum(ARTIFACT_PENALTY + ARTIFACT_AREA_PENALTY * a / image_area for a in artifact_areas)
    return float((np.clip(latent, 1.0, 5.0) - 1.0) / 4.0)


@dataclass
class JudgeVerdict:
    """The judge's rating of one image: `scores` (plausibility, alignment, overall in [0, 1]), the `requirements` it
    checked, the `objects` and `background` it saw, and the `artifact_mask` (bool (H, W)) it found."""

    scores: dict[str, float]
    requirements: dict[str, bool]
    objects: list[SceneObject]
    background: str
    artifact_mask: np.ndarray
    artifact_areas: list[int] = field(default_factory=list)


class SynthJudge:
    """Rates images of the synthetic world against their prompts (see the module docstring).

    Args:
        model ([`SynthJudgeModel`]): the trained segmenter.
        device (`str`, *optional*): where it runs (default: CPU).
        batch_size (`int`, *optional*, defaults to 64): images per forward pass.
    """

    def __init__(self, model: SynthJudgeModel, device: str | torch.device | None = None, batch_size: int = 64):
        self.model = model.to(device or "cpu").eval().requires_grad_(False)
        self.batch_size = int(batch_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> SynthJudge:
        from rahf.pretrained_paths import resolve_pretrained_path

        folder = resolve_pretrained_path(path, "judge", what="a judge folder (rahf.improve.judge)", allow_hub=False)
        return cls(SynthJudgeModel.from_pretrained(folder, use_safetensors=True), **kwargs)

    @property
    def size(self) -> int:
        return self.model.config.image_size

    def _arrays(self, images) -> list[np.ndarray]:
        """The images as uint8 (H, W, 3) at the judge's size."""
        arrays = []
        for image in images:
            image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            image = image.convert("RGB")
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.uint8))
        return arrays

    @torch.no_grad()
    def read_shapes(self, image: np.ndarray, blobs: list[np.ndarray]) -> list[int]:
        """The shape index of each blob of `image` (uint8 (H, W, 3) at the judge's size), by the shape classifier."""
        device = next(self.model.parameters()).device
        crops = torch.from_numpy(np.stack([blob_crop(image, b) for b in blobs])).to(device)
        return self.model.classify_shapes(crops).argmax(1).cpu().tolist()

    @torch.no_grad()
    def segment(self, images) -> list[dict[str, np.ndarray | str]]:
        """Per image: `artifact` (bool (H, W)), `colour` and `shape` (int labels, 0 background), `background`."""
        return self._segment_arrays(self._arrays(images))

    def _segment_arrays(self, arrays: list[np.ndarray]) -> list[dict[str, np.ndarray | str]]:
        out = []
        device = next(self.model.parameters()).device
        for start in range(0, len(arrays), self.batch_size):
            batch = np.stack(arrays[start : start + self.batch_size]).astype(np.float32) / 255.0
            pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
            pred = self.model(pixels)
            artifact = (pred["artifact"][:, 0] > 0).cpu().numpy()
            colour = pred["colour"].argmax(1).cpu().numpy()
            shape = pred["shape"].argmax(1).cpu().numpy()
            background = pred["background"].argmax(1).cpu().numpy()
            for k in range(pixels.shape[0]):
                out.append({"artifact": artifact[k], "colour": colour[k], "shape": shape[k],
                            "background": BACKGROUND_KEYS[int(background[k])]})  # fmt: skip
        return out

    def __call__(self, images, prompts: list[str] | str) -> list[JudgeVerdict]:
        """One verdict per image; `prompts` is one per image, or one for all."""
        images = list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts: pass one prompt per image")
        config = self.model.config
        verdicts = []
        arrays = self._arrays(images)
        for image, seg, prompt in zip(arrays, self._segment_arrays(arrays), prompts):
            request = parse_scene_prompt(prompt)
            blobs = _components(seg["artifact"], config.min_artifact_area)
            areas = [int(b.sum()) for b in blobs]
            objects = objects_from_labels(
                seg["colour"],
                None,
                config.min_object_area,
                shape_of=lambda blobs, im=image: self.read_shapes(im, blobs),
            )
            requirements = check_scene(request, objects, seg["background"])
            plausibility = judged_plausibility(areas, self.size * self.size)
            alignment = float(np.mean(list(requirements.values()))) if requirements else 1.0
            mask = np.zeros_like(seg["artifact"], dtype=bool)
            for b in blobs:
                mask |= b
            scores = {"plausibility": plausibility, "alignment": alignment,
                      "overall": (plausibility + alignment) / 2.0}  # fmt: skip
            verdicts.append(JudgeVerdict(scores, requirements, objects, seg["background"], mask, areas))
        return verdicts


# --------------------------------------------------------------------------------------------------------------------
# The judge's own scenes


def render_judge_scenes(seed: int, count: int, split: str, image_size: int = 64) -> dict[str, np.ndarray | list]:
    """`count` scenes of the synthetic renderer under the judge's own `seed`, with their exact labels and truths."""
    from tqdm.auto import tqdm

    from rahf.data.synth import SynthConfig, render_example

    config = SynthConfig(num_train=count, num_validation=count, num_test=count, image_size=image_size, seed=seed)
    images = np.empty((count, image_size, image_size, 3), np.uint8)
    colour = np.empty((count, image_size, image_size), np.int8)
    shape = np.empty((count, image_size, image_size), np.int8)
    artifact = np.empty((count, image_size, image_size), bool)
    background = np.empty(count, np.int64)
    truths = []
    for i in tqdm(range(count), desc=f"judge scenes ({split})", unit="img", leave=False):
        image, truth = render_example(split, i, config)
        labels = scene_labels(truth, image_size)
        images[i], colour[i], shape[i], artifact[i] = image, labels["colour"], labels["shape"], labels["artifact"]
        background[i] = BACKGROUND_KEYS.index(truth["background"])
        truths.append({k: truth[k] for k in ("prompt", "objects", "true_scores", "background")})
    return {"images": images, "colour": colour, "shape": shape, "artifact": artifact, "background": background,
            "truths": truths}  # fmt: skip


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What generated images look like beside rendered ones: blurred (some through a 4x bottleneck), noisier, a little
    off in brightness and contrast. Labels stay as rendered."""
    b = pixels.shape[0]
    out = pixels
    squeeze = torch.rand(b, generator=generator) < 0.3
    if squeeze.any():
        small = F.interpolate(out[squeeze], scale_factor=0.25, mode="bilinear", antialias=True)
        out = out.clone()
        out[squeeze] = F.interpolate(small, size=pixels.shape[-2:], mode="bilinear")
    # A Gaussian blur of its own width per image, as one grouped convolution per axis.
    sigma = (torch.rand(b, generator=generator) * 1.2 * (torch.rand(b, generator=generator) < 0.7)).clamp_min(1e-3)
    radius = 3
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(xs[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(3, dim=0)  # (B * 3, 7)
    h, w = out.shape[-2:]
    flat = F.pad(out.reshape(1, b * 3, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernels.view(b * 3, 1, 1, -1), groups=b * 3)
    flat = F.conv2d(flat, kernels.view(b * 3, 1, -1, 1), groups=b * 3)
    out = flat.reshape(b, 3, h, w)
    gain = 1 + 0.2 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    noise = torch.randn(out.shape, generator=generator) * 0.04 * torch.rand(b, 1, 1, 1, generator=generator)
    return (out * gain + shift + noise).clamp(0, 1)


# --------------------------------------------------------------------------------------------------------------------
# Training and the held-out report


@dataclass
class JudgeTrainingArguments:
    """Everything `python -m rahf.improve.judge` needs. Each field is a `--flag`; `--config` YAML sets defaults."""

    config: str | None = field(default=None, metadata={"help": "YAML file of arguments (keys = flag names)"})
    output_dir: str = field(default="judge-output", metadata={"help": "the judge (final/) and its report"})
    seed: int = field(
        default=7919,
        metadata={"help": "the judge's own scene seed: it must differ from the seed of the data RAHF trained on"},
    )
    num_train: int = field(default=16000, metadata={"help": "scenes to train on"})
    num_test: int = field(default=1000, metadata={"help": "held-out scenes of the judge's own, for its report"})
    image_size: int = field(default=64, metadata={"help": "scene side in pixels"})
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128], metadata={"help": "encoder widths"})
    max_train_steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    train_batch_size: int = field(default=64, metadata={"help": "scenes per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate (cosine to a tenth)"})
    artifact_weight: float = field(default=3.0, metadata={"help": "weight of the artifact loss"})
    augment: bool = field(default=True, metadata={"help": "blur, bottleneck, noise and light jitter"})
    shape_steps: int = field(default=800, metadata={"help": "steps of the shape classifier (the second stage)"})

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        check_int_fields(
            self,
            positive=("num_train", "num_test", "image_size", "max_train_steps", "train_batch_size", "shape_steps"),
        )
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate!r}")


def _losses(model: SynthJudgeModel, batch: dict[str, torch.Tensor], artifact_weight: float) -> torch.Tensor:
    pred = model(batch["pixels"])
    artifact = batch["artifact"].float()
    pos = artifact.mean().clamp(1e-3, 0.5)
    artifact_loss = F.binary_cross_entropy_with_logits(pred["artifact"][:, 0], artifact,
                                                       pos_weight=((1 - pos) / pos).sqrt())  # fmt: skip
    colour_loss = F.cross_entropy(pred["colour"], batch["colour"])
    shape_loss = F.cross_entropy(pred["shape"], batch["shape"])
    background_loss = F.cross_entropy(pred["background"], batch["background"])
    return artifact_weight * artifact_loss + colour_loss + shape_loss + 0.3 * background_loss


def evaluate_judge(judge: SynthJudge, scenes: dict[str, Any]) -> dict[str, Any]:
    """The judge's accuracy on scenes with known truth: artifact pixels (IoU, precision, recall) and images (any
    artifact or none), objects (the multiset of (colour, shape) found equal to the painted one), every requirement
    verdict against the one the exact labels give, and the correlation of its scores with the truth."""
    from rahf.metrics import plcc

    images = [Image.fromarray(im) for im in scenes["images"]]
    prompts = [t["prompt"] for t in scenes["truths"]]
    verdicts = judge(images, prompts)
    size = judge.size
    tp = fp = fn = 0
    image_hits = 0
    object_hits = 0
    agree = total = 0
    per_requirement: dict[str, list[int]] = {}
    judged_p, true_p, judged_a, oracle_a = [], [], [], []
    for k, (verdict, truth) in enumerate(zip(verdicts, scenes["truths"])):
        gt = scenes["artifact"][k]
        tp += int((verdict.artifact_mask & gt).sum())
        fp += int((verdict.artifact_mask & ~gt).sum())
        fn += int((~verdict.artifact_mask & gt).sum())
        image_hits += int(verdict.artifact_mask.any() == gt.any())
        painted = [o for o in truth["objects"] if o["painted"]]
        truth_objects = objects_from_labels(
            scenes["colour"][k].astype(np.int64),
            scenes["shape"][k].astype(np.int64),
            judge.model.config.min_object_area,
        )
        found = sorted((o.colour, o.shape) for o in verdict.objects)
        object_hits += int(found == sorted((o["colour"], o["shape"]) for o in painted))
        oracle = check_scene(parse_scene_prompt(truth["prompt"]), truth_objects, truth["background"])
        for name, value in oracle.items():
            ok = verdict.requirements.get(name) == value
            agree += ok
            total += 1
            per_requirement.setdefault(name.split(":")[-1], []).append(int(ok))
        judged_p.append(verdict.scores["plausibility"])
        true_p.append((truth["true_scores"]["plausibility"] - 1) / 4)
        judged_a.append(verdict.scores["alignment"])
        oracle_a.append(float(np.mean(list(oracle.values()))))
    n = len(verdicts)
    return {
        "num_scenes": n,
        "artifact_pixel_iou": tp / max(tp + fp + fn, 1),
        "artifact_pixel_precision": tp / max(tp + fp, 1),
        "artifact_pixel_recall": tp / max(tp + fn, 1),
        "artifact_image_accuracy": image_hits / n,
        "object_set_accuracy": object_hits / n,
        "requirement_agreement": agree / max(total, 1),
        "requirement_agreement_by_kind": {k: float(np.mean(v)) for k, v in sorted(per_requirement.items())},
        "plausibility_plcc_vs_truth": plcc(judged_p, true_p),
        "alignment_plcc_vs_exact_labels": plcc(judged_a, oracle_a),
        "alignment_mean_abs_error_vs_exact_labels": float(np.mean(np.abs(np.asarray(judged_a) - oracle_a))),
        "image_size": size,
    }


def train_judge(args: JudgeTrainingArguments) -> dict[str, Any]:
    """Renders the judge's scenes, trains the segmenter, and writes `OUTPUT/final` (model + `judge_report.json`)."""
    from tqdm.auto import tqdm

    from rahf.training_utils import build_lr_scheduler, build_optimizer

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train = render_judge_scenes(args.seed, args.num_train, "train", args.image_size)
    test = render_judge_scenes(args.seed, args.num_test, "test", args.image_size)
    model = SynthJudgeModel(SynthJudgeConfig(channels=args.channels, image_size=args.image_size))
    optimizer = build_optimizer(model.parameters(), learning_rate=args.learning_rate, weight_decay=1e-4,
                                decay_1d=False)  # fmt: skip
    schedule = build_lr_scheduler(optimizer, "cosine", min(200, args.max_train_steps // 10), args.max_train_steps,
                                  lr_end=args.learning_rate / 10)  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    to_tensor = {
        "pixels": lambda idx: torch.from_numpy(train["images"][idx]).permute(0, 3, 1, 2).float() / 255.0,
        "colour": lambda idx: torch.from_numpy(train["colour"][idx].astype(np.int64)),
        "shape": lambda idx: torch.from_numpy(train["shape"][idx].astype(np.int64)),
        "artifact": lambda idx: torch.from_numpy(train["artifact"][idx]),
        "background": lambda idx: torch.from_numpy(train["background"][idx]),
    }
    model.train()
    losses = []
    progress = tqdm(range(args.max_train_steps), desc="judge", unit="step")
    for step in progress:
        idx = torch.randint(0, args.num_train, (args.train_batch_size,), generator=generator).numpy()
        batch = {k: f(idx) for k, f in to_tensor.items()}
        if args.augment:
            batch["pixels"] = _augment(batch["pixels"], generator)
        loss = _losses(model, batch, args.artifact_weight)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the judge's loss is {float(loss)} at step {step + 1}; lower --learning_rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    model.eval()
    judge = SynthJudge(model)
    shape_accuracy = _train_shape_classifier(judge, train, args, generator)
    report = evaluate_judge(judge, test)
    report["shape_classifier_train_accuracy"] = shape_accuracy
    report.update({"seed": args.seed, "num_train": args.num_train, "train_seconds": time.perf_counter() - start,
                   "final_loss": float(np.mean(losses[-100:])), "args": asdict(args)})  # fmt: skip
    final = Path(args.output_dir) / "final"
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp)
        (tmp / "judge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("judge: %s", {k: v for k, v in report.items() if isinstance(v, float)})
    return report


def _shape_examples(judge: SynthJudge, scenes: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of the blobs the trained segmenter finds in `scenes`, each labelled with the shape of the painted object
    it overlaps most (IoU >= 0.5): the shape classifier learns on the masks it will see, not on exact ones."""
    crops, labels = [], []
    segments = judge.segment([Image.fromarray(im) for im in scenes["images"]])
    min_area = judge.model.config.min_object_area
    for k, seg in enumerate(segments):
        truth = _components(scenes["colour"][k] > 0, min_area)
        for blob in _components(seg["colour"] > 0, min_area):
            ious = [(blob & t).sum() / (blob | t).sum() for t in truth]
            if not ious or max(ious) < 0.5:
                continue
            crops.append(blob_crop(scenes["images"][k], blob))
            labels.append(_majority(scenes["shape"][k], truth[int(np.argmax(ious))], len(SHAPE_NAMES)))
    if not crops:  # a segmenter that finds nothing yet (a few steps of training): the exact blobs, so training runs
        for k in range(len(scenes["images"])):
            for blob in _components(scenes["colour"][k] > 0, min_area):
                crops.append(blob_crop(scenes["images"][k], blob))
                labels.append(_majority(scenes["shape"][k], blob, len(SHAPE_NAMES)))
    return torch.from_numpy(np.stack(crops)), torch.tensor(labels)


def _train_shape_classifier(
    judge: SynthJudge, train: dict[str, Any], args: JudgeTrainingArguments, generator: torch.Generator
) -> float:
    """The second stage: the shape classifier on the segmenter's own blobs of the training scenes; returns its
    accuracy on them (the held-out figure is in the report)."""
    from tqdm.auto import tqdm

    model = judge.model
    crops, labels = _shape_examples(judge, train)
    classifier = model.shape_classifier.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in tqdm(range(args.shape_steps), desc="judge shapes", unit="step", leave=False):
        idx = torch.randint(0, len(labels), (128,), generator=generator)
        x = crops[idx].clone()
        if args.augment:
            x[:, :3] = _augment(x[:, :3], generator)
        loss = F.cross_entropy(model.classify_shapes(x), labels[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    classifier.eval().requires_grad_(False)
    with torch.no_grad():
        predicted = torch.cat(
            [model.classify_shapes(crops[i : i + 512]).argmax(1) for i in range(0, len(labels), 512)]
        )
    return float((predicted == labels).float().mean())


def parse_judge_args(argv: list[str] | None = None) -> JudgeTrainingArguments:
    return parse_job_args(JudgeTrainingArguments, argv, prog="python -m rahf.improve.judge",
                          description="Train the measuring world's judge on its own synthetic scenes.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_judge(parse_judge_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
