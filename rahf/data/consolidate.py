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

No line can stop the run: each of these is one more reported line (`rahf.data.jsonl` reads the file):
- a line of more than `max_line_chars` characters (default 1,000,000; `--max_line_chars`), bytes that are not UTF-8,
  `NaN`/`Infinity` literals, numbers beyond a double (`1e400`) or integers of more than 4,300 digits, JSON nested
  too deeply to parse, text that is not valid Unicode (a lone surrogate escape such as `"\\ud800"`);
- a prompt with no word (empty, blank or only separators, as `split_prompt_words` sees it);
- more than `MAX_POINTS_PER_LINE` (1,000) points on one line;
- an image path that resolves outside `--images` (a symbolic link pointing out of it; links that stay inside are
  followed), and an image whose header declares more pixels than `rahf.image_io`'s cap (`RAHF_MAX_IMAGE_PIXELS`,
  default 40,000,000) or whose file is larger than such an image can need; images are decoded through
  `rahf.image_io.open_image`, which checks the cap before decoding.

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
import reprlib
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict, Features, List, Value
from PIL import Image
from tqdm.auto import tqdm

from ..image_io import MAX_IMAGE_PIXELS_ENV, max_image_pixels
from ..keywords import is_blank_prompt, split_prompt_words
from .jsonl import DEFAULT_MAX_LINE_CHARS, JSONLineError, iter_jsonl, read_jsonl
from .schema import (
    FEATURES,
    HEATMAP_NAMES,
    SCORE_NAMES,
    SPLITS,
    encoded_image,
    max_encoded_image_bytes,
    prepare_output_dir,
    save_rich_feedback,
    scratch_dir,
    write_splits,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ANNOTATOR_SCORES_FEATURE",
    "CONSOLIDATED_FEATURES",
    "MAX_POINTS_PER_LINE",
    "REQUIRED_KEYS",
    "check_annotation_lines",
    "consolidate",
    "consolidate_records",
    "disk_radius",
    "register",
]

REQUIRED_KEYS = ("uid", "image", "prompt", "split", "annotator", "points", "misaligned_word_indices", "scores")
ANNOTATOR_SCORES_FEATURE = List({"annotator": Value("string"), **{name: Value("float32") for name in SCORE_NAMES}})
CONSOLIDATED_FEATURES = Features({**FEATURES, "annotator_scores": ANNOTATOR_SCORES_FEATURE})
REPORT_NAME = "consolidation_report.json"
# Annotators click a handful of points; each costs O(radius^2) pixels of heatmap, so the count is bounded.
MAX_POINTS_PER_LINE = 1000

# Values quoted in reasons are cut short: a line may be up to a million characters.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 3


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
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a double: not a coordinate or score of ours
        return False


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _is_text(value: str) -> bool:
    """True when `value` can be written as UTF-8 (no lone surrogate from a `\\ud800`-style escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_safe_relative(path: str) -> bool:
    if "\x00" in path or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return False
    return ".." not in path.replace("\\", "/").split("/")


class ImageSizes:
    """Image sizes from their headers, read once per file, for images that may be used: inside the root (after
    symbolic links), under the pixel cap of `rahf.image_io`, not larger on disk than such an image needs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = root.resolve()
        self.max_pixels = max_image_pixels()
        self.cache: dict[str, tuple[int, int, Path] | str] = {}

    def get(self, relative: str) -> tuple[int, int] | str:
        """(width, height), or the reason the image cannot be used."""
        if relative not in self.cache:
            try:
                self.cache[relative] = self._probe(relative)
            except (OSError, RuntimeError, ValueError) as err:  # a name too long, a symlink loop, ...: never crash
                self.cache[relative] = f"unusable image path {_short(relative)}: {type(err).__name__}: {err}"
        found = self.cache[relative]
        return found if isinstance(found, str) else found[:2]

    def path(self, relative: str) -> Path:
        """The real path of an image that `get` accepted: the one checked, whatever the link points to later."""
        found = self.cache[relative]
        assert not isinstance(found, str)
        return found[2]

    def read(self, relative: str) -> bytes:
        """The bytes of an image that `get` accepted; raises `ValueError` if it has grown beyond the file cap."""
        limit = max_encoded_image_bytes(self.max_pixels)
        with open(self.path(relative), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"the file grew beyond {limit:,} bytes since it was checked")
        return data

    def _probe(self, relative: str) -> tuple[int, int, Path] | str:
        path = self.root / relative
        real = path.resolve()
        if not real.is_relative_to(self.real_root):
            # A symbolic link out of --images would let an annotation file read any file of the machine.
            return f"the image path {relative!r} resolves outside --images (to {str(real)!r}): refused"
        if not real.is_file():
            return f"image not found: {str(path)!r}"
        limit = max_encoded_image_bytes(self.max_pixels)
        size = real.stat().st_size
        hint = f"raise the cap with {MAX_IMAGE_PIXELS_ENV}=N if the image is genuine"
        if size > limit:
            return (
                f"image {str(path)!r} is a {size:,}-byte file, more than the {limit:,} bytes an image under the pixel "
                f"cap of {self.max_pixels:,} can need; {hint}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(real) as img:  # the header only: no pixel is decoded here
                    width, height = img.size
        except Image.DecompressionBombError as err:
            return f"image {str(path)!r} is too large: {err}; the cap is {self.max_pixels:,} pixels ({hint})"
        except Exception as err:  # PIL raises many types on broken files: never crash on one
            return f"unreadable image {str(path)!r}: {err}"
        if width * height > self.max_pixels:
            return (
                f"image {str(path)!r} is {width} x {height} = {width * height:,} pixels, more than the cap of "
                f"{self.max_pixels:,}; {hint}"
            )
        return width, height, real


def _check_line(record: Any, sizes: ImageSizes) -> tuple[_Annotation | None, dict[str, Any] | None, str | None]:
    """(annotation, its image's identity, None) for a valid line, else (None, partial identity, reason).

    `record` is a line's JSON value, or the `JSONLineError` of a line that has none.
    """
    if isinstance(record, JSONLineError):
        return None, None, record.message
    if not isinstance(record, Mapping):
        return None, None, f"not a JSON object (got {type(record).__name__})"
    uid = record.get("uid")
    ident = {"uid": uid if isinstance(uid, str) and uid else None}
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        return None, ident, f"missing key(s) {missing}; every line needs {list(REQUIRED_KEYS)}"
    if ident["uid"] is None:
        return None, ident, f"'uid' must be a non-empty string, got {_short(uid)}"
    if not _is_text(uid):
        ident["uid"] = None  # it could not be written to the data set, nor matched reliably
        return None, ident, f"'uid' {_short(uid)} is not valid Unicode (a lone surrogate): it cannot be stored"
    image, prompt, split, annotator = record["image"], record["prompt"], record["split"], record["annotator"]
    if not isinstance(image, str) or not image:
        return None, ident, f"'image' must be a non-empty string path relative to --images, got {_short(image)}"
    if not _is_text(image) or not _is_safe_relative(image):
        return None, ident, f"unsafe image path {_short(image)}: it must be relative to --images, without '..'"
    if not isinstance(prompt, str):
        return None, ident, f"'prompt' must be a string, got {_short(prompt)}"
    if not _is_text(prompt):
        return None, ident, f"'prompt' {_short(prompt)} is not valid Unicode (a lone surrogate): it cannot be stored"
    if is_blank_prompt(prompt):
        # Caught here, with its line and uid, rather than as a failed training step naming a batch index.
        reason = f"'prompt' {_short(prompt)} has no words (split_prompt_words splits on plain spaces and ,.?!\":;)"
        return None, ident, reason
    if split not in SPLITS:
        return None, ident, f"'split' must be one of {list(SPLITS)}, got {_short(split)}"
    if isinstance(annotator, bool) or not isinstance(annotator, (str, int)) or annotator == "":
        return None, ident, f"'annotator' must be a non-empty string or an integer, got {_short(annotator)}"
    if isinstance(annotator, str) and not _is_text(annotator):
        return None, ident, f"'annotator' {_short(annotator)} is not valid Unicode (a lone surrogate)"
    ident.update(image=image, prompt=prompt, split=split)

    size = sizes.get(image)
    if isinstance(size, str):
        return None, ident, size
    width, height = size

    points = record["points"]
    if not isinstance(points, list):
        return None, ident, f"'points' must be a list of {{'x', 'y', 'kind'}} objects, got {_short(points)}"
    if len(points) > MAX_POINTS_PER_LINE:
        return None, ident, f"'points' holds {len(points):,} points, more than the {MAX_POINTS_PER_LINE} accepted"
    parsed_points = []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping) or not all(k in point for k in ("x", "y", "kind")):
            return None, ident, f"points[{i}] must be an object with 'x', 'y' and 'kind', got {_short(point)}"
        x, y, kind = point["x"], point["y"], point["kind"]
        if not _is_number(x) or not _is_number(y):
            return None, ident, f"points[{i}]: 'x' and 'y' must be finite numbers, got x={_short(x)}, y={_short(y)}"
        if kind not in HEATMAP_NAMES:
            return None, ident, f"points[{i}]: 'kind' must be one of {list(HEATMAP_NAMES)}, got {_short(kind)}"
        if not (0 <= x < width and 0 <= y < height):
            where = f"({_short(x)}, {_short(y)}) is outside the {width}x{height} image {_short(image)}"
            return None, ident, f"points[{i}] = {where}"
        parsed_points.append((float(x), float(y), kind))

    indices = record["misaligned_word_indices"]
    n_words = len(split_prompt_words(prompt))
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        return None, ident, f"'misaligned_word_indices' must be a list of integers, got {_short(indices)}"
    bad = [i for i in indices if not 0 <= i < n_words]
    if bad:
        return None, ident, f"'misaligned_word_indices' {_short(bad)} out of range: the prompt has {n_words} words"

    scores = record["scores"]
    if not isinstance(scores, Mapping):
        return None, ident, f"'scores' must be an object with keys {list(SCORE_NAMES)}, got {_short(scores)}"
    missing_scores = [name for name in SCORE_NAMES if name not in scores]
    if missing_scores:
        return None, ident, f"'scores' lacks {missing_scores}; it needs {list(SCORE_NAMES)} on the 1-5 scale"
    for name in SCORE_NAMES:
        value = scores[name]
        if not _is_number(value) or not 1 <= value <= 5:
            return None, ident, f"scores[{name!r}] must be a number in [1, 5], got {_short(value)}"
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
                f"{key!r} {_short(ident[key])} differs from {_short(getattr(entry, key))} given for uid "
                f"{_short(entry.uid)} on line {entry.first_line}"
            )
    previous = next((a for a in entry.annotations if a.annotator == annotation.annotator), None)
    if previous is not None:
        return (
            f"annotator {_short(annotation.annotator)} already annotated uid {_short(entry.uid)} on line "
            f"{previous.line}"
        )
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


def _build(entry: _Image, sizes: ImageSizes) -> dict[str, Any]:
    """The canonical example of one image; raises `ValueError`/`OSError` when the image cannot be decoded."""
    image_value = encoded_image(sizes.read(entry.image), "RGB", max_pixels=sizes.max_pixels)
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
    sizes = ImageSizes(images_dir)
    entries: dict[str, _Image] = {}
    invalid: list[dict[str, Any]] = []
    invalid_lines_of: dict[str, list[int]] = {}
    n_lines = 0
    n_valid = 0
    for line_no, record in tqdm(lines, desc=f"reading {source}", unit=" lines", leave=False):
        n_lines += 1
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
                    "reason": (
                        f"no valid annotator line for uid {_short(uid)} (invalid lines: {_short(line_numbers)}); "
                        "left out"
                    ),
                }
            )

    def examples() -> Iterator[tuple[str, dict[str, Any]]]:
        for split in SPLITS:
            for entry in (e for e in entries.values() if e.split == split):
                try:
                    example = _build(entry, sizes)
                except Exception as err:  # PIL raises many types on broken files: never crash on one
                    reason = f"image {_short(entry.image)} cannot be decoded: {err}"
                    invalid.append({"line": None, "uid": entry.uid, "reason": reason})
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


def check_annotation_lines(
    data: bytes, images_dir: str | Path, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS
) -> list[dict[str, Any]]:
    """What `consolidate` reports for each line of `data` (JSONL bytes) judged on its own, through the same reader
    and checks: `[{"line", "uid", "reason"}]` for the invalid lines. Lines are not compared with each other (a
    repeated annotator or a prompt that differs from an earlier line of its uid is not found here).

    Never raises on the content of `data`; raises `ValueError` when `images_dir` is not a folder.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ValueError(f"`images_dir` {str(images_dir)!r} is not a folder; pass the folder the 'image' paths are in")
    sizes = ImageSizes(images_dir)
    invalid = []
    for line_no, record in iter_jsonl(io.BytesIO(data), max_line_chars=max_line_chars):
        _, ident, reason = _check_line(record, sizes)
        if reason is not None:
            invalid.append({"line": line_no, "uid": ident.get("uid") if ident else None, "reason": reason})
    return invalid


def consolidate(
    annotations_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_line_chars: int = DEFAULT_MAX_LINE_CHARS,
) -> dict[str, Any]:
    """Consolidates a JSONL annotation file; saves the `DatasetDict` and `consolidation_report.json` to `out_dir`.

    Every line that cannot be used is reported, never raised: `max_line_chars` bounds the length of a line read
    (longer ones are reported unread). `ValueError` is raised only for the arguments (a missing file or folder, a
    busy `out_dir`).

    Returns:
        The report: `{"lines", "valid_lines", "images", "splits", "invalid": [{"line", "uid", "reason"}]}`.
    """
    annotations_path = Path(annotations_path)
    if not annotations_path.is_file():
        raise ValueError(f"`annotations_path` {str(annotations_path)!r} is not a file; pass the JSONL annotation file")
    if isinstance(max_line_chars, bool) or not isinstance(max_line_chars, int) or max_line_chars < 1:
        raise ValueError(f"`max_line_chars` must be a positive character count, got {max_line_chars!r}")
    out = prepare_output_dir(out_dir, overwrite=overwrite)
    with scratch_dir(out) as tmp:
        lines = read_jsonl(annotations_path, max_line_chars=max_line_chars)
        ds, invalid, stats = _consolidate(lines, images_dir, source=annotations_path.name, cache_dir=tmp)
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
    consolidate(args.annotations, args.images, args.out, overwrite=args.overwrite, max_line_chars=args.max_line_chars)
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
    parser.add_argument(
        "--max_line_chars",
        type=int,
        default=DEFAULT_MAX_LINE_CHARS,
        metavar="N",
        help=f"longest line read; longer ones are reported (default: {DEFAULT_MAX_LINE_CHARS:,})",
    )
    parser.set_defaults(func=_run)
