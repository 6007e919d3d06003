"""Raw per-annotator rich-feedback annotations (JSONL) -> the canonical data set, consolidated as in the paper (§3.2).

`rahf data consolidate --annotations FILE.jsonl --images DIR --out DIR`

Annotation format: one JSON object per line, one line per (image, annotator):

    {"uid": "img-0001",                      # stable id of the image (string)
     "image": "train/img-0001.png",          # path relative to --images (no "..", not absolute)
     "prompt": "a red circle above a blue square",
     "split": "train",                       # "train" | "validation" | "test"
     "annotator": "a1",                      # annotator id (string or integer), unique per uid
     "points": [{"x": 12.5, "y": 40, "kind": "implausibility"},   # pixels of the image: 0 <= x < width,
                {"x": 30, "y": 8, "kind": "misalignment"}],       # 0 <= y < height; kind names the heatmap
     "misaligned_word_indices": [1],         # 0-based indices into split_prompt_words(prompt)
     "scores": {"plausibility": 4, "alignment": 2, "aesthetics": 3.5, "overall": 3}}   # 1-5 Likert

Every line of one uid must give the same image, prompt and split. Extra keys are ignored; blank lines are skipped.

Consolidation, per image:
- each point becomes a disk of radius height / 20 (pixels whose centre is within the radius); an annotator's map is
  the union of their disks of that kind (1 inside, 0 outside); the image's map is the mean of its annotators' maps,
  an annotator with no point of that kind counting as an empty map; stored as 0..255 mode "L" at the image's size;
- scores are averaged over the annotators, then mapped to [0, 1] by (s - 1) / 4;
- a word is misaligned (label 0) when a strict majority of the image's annotators marked it;
- the annotators' own 1-5 scores are kept in the extra column `annotator_scores` (a list of
  {"annotator", "plausibility", "alignment", "aesthetics", "overall"}), for agreement statistics.

Lines that are not valid (bad JSON, missing keys, wrong types, unknown split, points outside the image, word indices
beyond the prompt, scores outside 1-5, missing image, an image/prompt/split that disagrees with an earlier line of
the same uid, a repeated annotator) are left out and reported with their line number and reason; so are images that
end up with no valid line. `DIR/consolidation_report.json` holds the counts and that list.

Examples:
    >>> from rahf.data.consolidate import consolidate_records
    >>> ds, invalid = consolidate_records(records, "images/")  # records: an iterable of dicts as above
    >>> ds["train"][0]["implausibility_map"].mode
    'L'
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict, Features, List, Value
from PIL import Image
from tqdm.auto import tqdm

from ..keywords import split_prompt_words
from .schema import (
    FEATURES,
    HEATMAP_NAMES,
    SCORE_NAMES,
    SPLITS,
    encoded_image,
    prepare_output_dir,
    save_rich_feedback,
    scratch_dir,
    write_splits,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ANNOTATOR_SCORES_FEATURE",
    "CONSOLIDATED_FEATURES",
    "REQUIRED_KEYS",
    "consolidate",
    "consolidate_records",
    "disk_radius",
    "register",
]

REQUIRED_KEYS = ("uid", "image", "prompt", "split", "annotator", "points", "misaligned_word_indices", "scores")
ANNOTATOR_SCORES_FEATURE = List({"annotator": Value("string"), **{name: Value("float32") for name in SCORE_NAMES}})
CONSOLIDATED_FEATURES = Features({**FEATURES, "annotator_scores": ANNOTATOR_SCORES_FEATURE})
REPORT_NAME = "consolidation_report.json"


def disk_radius(height: int) -> float:
    """Radius in pixels of the disk drawn around each annotated point: 1/20 of the image height (paper §3.2)."""
    return height / 20.0


@dataclass
class _Annotation:
    line: int
    annotator: str
    points: list[tuple[float, float, str]]
    word_indices: list[int]
    scores: dict[str, float]


@dataclass
class _Image:
    uid: str
    image: str
    prompt: str
    split: str
    first_line: int
    width: int
    height: int
    annotations: list[_Annotation] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_safe_relative(path: str) -> bool:
    if "\x00" in path or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return False
    return ".." not in path.replace("\\", "/").split("/")


class _ImageSizes:
    """Image sizes from their headers, read once per file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, tuple[int, int] | str] = {}

    def get(self, relative: str) -> tuple[int, int] | str:
        """(width, height), or the reason the image cannot be used."""
        if relative not in self.cache:
            path = self.root / relative
            if not path.is_file():
                self.cache[relative] = f"image not found: {str(path)!r}"
            else:
                try:
                    with Image.open(path) as img:
                        self.cache[relative] = img.size
                except Exception as err:  # PIL raises many types on broken files: never crash on one
                    self.cache[relative] = f"unreadable image {str(path)!r}: {err}"
        return self.cache[relative]


def _check_line(record: Any, sizes: _ImageSizes) -> tuple[_Annotation | None, dict[str, Any] | None, str | None]:
    """(annotation, its image's identity, None) for a valid line, else (None, partial identity, reason)."""
    if not isinstance(record, Mapping):
        return None, None, f"not a JSON object (got {type(record).__name__})"
    uid = record.get("uid")
    ident = {"uid": uid if isinstance(uid, str) and uid else None}
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        return None, ident, f"missing key(s) {missing}; every line needs {list(REQUIRED_KEYS)}"
    if ident["uid"] is None:
        return None, ident, f"'uid' must be a non-empty string, got {uid!r}"
    image, prompt, split, annotator = record["image"], record["prompt"], record["split"], record["annotator"]
    if not isinstance(image, str) or not image:
        return None, ident, f"'image' must be a non-empty string path relative to --images, got {image!r}"
    if not _is_safe_relative(image):
        return None, ident, f"unsafe image path {image!r}: it must be relative to --images, without '..'"
    if not isinstance(prompt, str):
        return None, ident, f"'prompt' must be a string, got {prompt!r}"
    if split not in SPLITS:
        return None, ident, f"'split' must be one of {list(SPLITS)}, got {split!r}"
    if isinstance(annotator, bool) or not isinstance(annotator, (str, int)) or annotator == "":
        return None, ident, f"'annotator' must be a non-empty string or an integer, got {annotator!r}"
    ident.update(image=image, prompt=prompt, split=split)

    size = sizes.get(image)
    if isinstance(size, str):
        return None, ident, size
    width, height = size

    points = record["points"]
    if not isinstance(points, list):
        return None, ident, f"'points' must be a list of {{'x', 'y', 'kind'}} objects, got {points!r}"
    parsed_points = []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping) or not all(k in point for k in ("x", "y", "kind")):
            return None, ident, f"points[{i}] must be an object with 'x', 'y' and 'kind', got {point!r}"
        x, y, kind = point["x"], point["y"], point["kind"]
        if not _is_number(x) or not _is_number(y):
            return None, ident, f"points[{i}]: 'x' and 'y' must be finite numbers, got x={x!r}, y={y!r}"
        if kind not in HEATMAP_NAMES:
            return None, ident, f"points[{i}]: 'kind' must be one of {list(HEATMAP_NAMES)}, got {kind!r}"
        if not (0 <= x < width and 0 <= y < height):
            return None, ident, f"points[{i}] = ({x}, {y}) is outside the {width}x{height} image {image!r}"
        parsed_points.append((float(x), float(y), kind))

    indices = record["misaligned_word_indices"]
    n_words = len(split_prompt_words(prompt))
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        return None, ident, f"'misaligned_word_indices' must be a list of integers, got {indices!r}"
    bad = [i for i in indices if not 0 <= i < n_words]
    if bad:
        return None, ident, f"'misaligned_word_indices' {bad} out of range: the prompt has {n_words} words"

    scores = record["scores"]
    if not isinstance(scores, Mapping):
        return None, ident, f"'scores' must be an object with keys {list(SCORE_NAMES)}, got {scores!r}"
    missing_scores = [name for name in SCORE_NAMES if name not in scores]
    if missing_scores:
        return None, ident, f"'scores' lacks {missing_scores}; it needs {list(SCORE_NAMES)} on the 1-5 scale"
    for name in SCORE_NAMES:
        value = scores[name]
        if not _is_number(value) or not 1 <= value <= 5:
            return None, ident, f"scores[{name!r}] must be a number in [1, 5], got {value!r}"
    annotation = _Annotation(
        line=-1,
        annotator=str(annotator),
        points=parsed_points,
        word_indices=sorted(set(indices)),
        scores={name: float(scores[name]) for name in SCORE_NAMES},
    )
    return annotation, ident, None


def _conflict(entry: _Image, ident: dict[str, Any], annotation: _Annotation) -> str | None:
    """Why a valid line cannot join the image its uid already names (other image, prompt or split; an annotator who
    already annotated it), or None."""
    for key in ("image", "prompt", "split"):
        if ident[key] != getattr(entry, key):
            return (
                f"{key!r} {ident[key]!r} differs from {getattr(entry, key)!r} given for uid {entry.uid!r} "
                f"on line {entry.first_line}"
            )
    previous = next((a for a in entry.annotations if a.annotator == annotation.annotator), None)
    if previous is not None:
        return f"annotator {annotation.annotator!r} already annotated uid {entry.uid!r} on line {previous.line}"
    return None


def _heatmap(points: Iterable[list[tuple[float, float]]], n_annotators: int, width: int, height: int) -> np.ndarray:
    """Mean over annotators of each annotator's union of disks, as uint8 0..255. `points`: one list per annotator."""
    radius = disk_radius(height)
    total = np.zeros((height, width), dtype=np.float32)
    for annotator_points in points:
        if not annotator_points:
            continue
        union = np.zeros((height, width), dtype=bool)
        for x, y in annotator_points:
            # Only the disk's bounding box is touched: O(r^2) per point instead of O(H*W).
            x0, x1 = max(0, math.floor(x - radius)), min(width, math.ceil(x + radius) + 1)
            y0, y1 = max(0, math.floor(y - radius)), min(height, math.ceil(y + radius) + 1)
            ys, xs = np.ogrid[y0:y1, x0:x1]
            union[y0:y1, x0:x1] |= (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
        total += union
    mean = total / max(n_annotators, 1)
    return np.clip(np.rint(mean * 255.0), 0, 255).astype(np.uint8)


def _png_l(array: np.ndarray) -> dict[str, Any]:
    out = io.BytesIO()
    Image.fromarray(array, mode="L").save(out, format="PNG")
    return {"bytes": out.getvalue(), "path": None}


def _build(entry: _Image, images_dir: Path) -> dict[str, Any]:
    """The canonical example of one image; raises `ValueError`/`OSError` when the image cannot be decoded."""
    image_value = encoded_image((images_dir / entry.image).read_bytes(), "RGB")
    width, height = entry.width, entry.height
    annotations = entry.annotations
    n = len(annotations)
    maps = {}
    for kind in HEATMAP_NAMES:
        per_annotator = [[(x, y) for x, y, k in a.points if k == kind] for a in annotations]
        maps[f"{kind}_map"] = _png_l(_heatmap(per_annotator, n, width, height))
    words = split_prompt_words(entry.prompt)
    votes = Counter(i for a in annotations for i in a.word_indices)
    labels = [0 if 2 * votes[i] > n else 1 for i in range(len(words))]
    scores = {name: float((np.mean([a.scores[name] for a in annotations]) - 1.0) / 4.0) for name in SCORE_NAMES}
    return {
        "uid": entry.uid,
        "image": image_value,
        "prompt": entry.prompt,
        **scores,
        **maps,
        "prompt_words": words,
        "word_labels": labels,
        "annotator_scores": [{"annotator": a.annotator, **a.scores} for a in annotations],
    }


def _consolidate(
    lines: Iterable[tuple[int, Any]],
    images_dir: str | Path,
    *,
    source: str,
    cache_dir: str | Path | None,
) -> tuple[DatasetDict, list[dict[str, Any]], dict[str, int]]:
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ValueError(f"`images_dir` {str(images_dir)!r} is not a folder; pass the folder the 'image' paths are in")
    sizes = _ImageSizes(images_dir)
    entries: dict[str, _Image] = {}
    invalid: list[dict[str, Any]] = []
    invalid_lines_of: dict[str, list[int]] = {}
    n_lines = 0
    n_valid = 0
    for line_no, record in tqdm(lines, desc=f"reading {source}", unit=" lines", leave=False):
        n_lines += 1
        if isinstance(record, _JSONError):
            invalid.append({"line": line_no, "uid": None, "reason": f"not valid JSON: {record.message}"})
            continue
        annotation, ident, reason = _check_line(record, sizes)  # reason is None exactly when annotation is not
        uid = ident.get("uid") if ident else None
        if annotation is not None:
            entry = entries.get(uid)
            if entry is None:
                width, height = sizes.get(ident["image"])  # type: ignore[misc]  # valid lines have a size
                entries[uid] = _Image(uid, ident["image"], ident["prompt"], ident["split"], line_no, width, height)
            else:
                reason = _conflict(entry, ident, annotation)
        if reason is not None:
            invalid.append({"line": line_no, "uid": uid, "reason": reason})
            if uid is not None:
                invalid_lines_of.setdefault(uid, []).append(line_no)
            continue
        annotation.line = line_no
        entries[uid].annotations.append(annotation)  # type: ignore[index]
        n_valid += 1

    # An entry is made by its first valid line, so every entry has an annotation; a uid with only invalid lines has
    # none and is reported once more as a whole.
    for uid, line_numbers in invalid_lines_of.items():
        if uid not in entries:
            invalid.append(
                {
                    "line": None,
                    "uid": uid,
                    "reason": f"no valid annotator line for uid {uid!r} (invalid lines: {line_numbers}); left out",
                }
            )

    def examples() -> Iterator[tuple[str, dict[str, Any]]]:
        for split in SPLITS:
            for entry in (e for e in entries.values() if e.split == split):
                try:
                    example = _build(entry, images_dir)
                except Exception as err:  # PIL raises many types on broken files: never crash on one
                    invalid.append(
                        {"line": None, "uid": entry.uid, "reason": f"image {entry.image!r} cannot be decoded: {err}"}
                    )
                    continue
                yield split, example

    progress = tqdm(examples(), total=len(entries), desc="consolidating", unit=" images")
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="rahf-consolidate-") as tmp:  # read into memory, then deleted
            ds = write_splits(progress, tmp, features=CONSOLIDATED_FEATURES, in_memory=True)
    else:
        ds = write_splits(progress, cache_dir, features=CONSOLIDATED_FEATURES)
    return ds, invalid, {"lines": n_lines, "valid_lines": n_valid}


def consolidate_records(
    records: Iterable[Mapping[str, Any]],
    images_dir: str | Path,
    *,
    source: str = "<records>",
    cache_dir: str | Path | None = None,
) -> tuple[DatasetDict, list[dict[str, Any]]]:
    """Consolidates annotation records (dicts in the JSONL format of this module) into the canonical `DatasetDict`.

    Args:
        records (`Iterable[Mapping]`): one record per (image, annotator); numbered from 1 as "lines" in the report.
        images_dir (`str | Path`): the folder that the records' `image` paths are relative to.
        source (`str`, *optional*, defaults to `"<records>"`): a name for logs.
        cache_dir (`str | Path`, *optional*): where to write the Arrow files; by default the data set is held in
            memory (fine for the synthetic set; pass a folder for large ones).

    Returns:
        `(dataset, invalid)`: the `DatasetDict` (all of `SPLITS`, columns `CONSOLIDATED_FEATURES`) and the invalid
        lines and images, `[{"line", "uid", "reason"}]` (`line` is None for an image-level problem).
    """
    ds, invalid, _ = _consolidate(enumerate(records, start=1), images_dir, source=source, cache_dir=cache_dir)
    return ds, invalid


@dataclass
class _JSONError:
    message: str


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, _JSONError(str(err))


def consolidate(
    annotations_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Consolidates a JSONL annotation file; saves the `DatasetDict` and `consolidation_report.json` to `out_dir`.

    Returns:
        The report: `{"lines", "valid_lines", "images", "splits", "invalid": [{"line", "uid", "reason"}]}`.
    """
    annotations_path = Path(annotations_path)
    if not annotations_path.is_file():
        raise ValueError(f"`annotations_path` {str(annotations_path)!r} is not a file; pass the JSONL annotation file")
    out = prepare_output_dir(out_dir, overwrite=overwrite)
    with scratch_dir(out) as tmp:
        ds, invalid, stats = _consolidate(
            _read_jsonl(annotations_path), images_dir, source=annotations_path.name, cache_dir=tmp
        )
        save_rich_feedback(ds, out)
        splits = {split: len(ds[split]) for split in SPLITS}
        del ds
    report = {
        "lines": stats["lines"],
        "valid_lines": stats["valid_lines"],
        "images": sum(splits.values()),
        "splits": splits,
        "invalid": invalid,
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "consolidate: %d lines, %d valid, %d invalid reports; %d images (%s) -> %s",
        report["lines"],
        report["valid_lines"],
        len(invalid),
        report["images"],
        ", ".join(f"{k}: {v}" for k, v in splits.items()),
        out,
    )
    return report


def _run(args: argparse.Namespace) -> int:
    consolidate(args.annotations, args.images, args.out, overwrite=args.overwrite)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `consolidate` to the `rahf data` command line."""
    parser = subparsers.add_parser(
        "consolidate",
        help="raw per-annotator annotations (JSONL) -> canonical data set",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--annotations", required=True, metavar="FILE.jsonl", help="one line per (image, annotator)")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder the 'image' paths are relative to")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (absent or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set saved at --out before")
    parser.set_defaults(func=_run)
