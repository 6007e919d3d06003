"""Label Studio interchange: the labelling config for rich feedback, and its JSON export -> the raw annotation JSONL.

    rahf data label-studio-config [--out config.xml]
    rahf data from-label-studio EXPORT.json --out annotations.jsonl [--images DIR] [--split train]

The config (`LABEL_CONFIG`) names its controls as the converter reads them:
- `KeyPointLabels` named `points` on the `Image` named `image` (`$image`), labels `implausibility` and
  `misalignment`: Label Studio stores a point as percentages of the image (`value.x`, `value.y` in 0-100) with the
  image's `original_width` / `original_height`; they are turned into pixels;
- `Labels` named `words` (label `misaligned`) over the `Text` named `prompt` (`$prompt`), word granularity: a marked
  span is a character range `[value.start, value.end)` of the prompt, and every prompt word (as
  `rahf.keywords.split_prompt_words` splits it) that overlaps it is misaligned;
- `Rating` controls named `plausibility`, `alignment`, `aesthetics` and `overall` (1-5 stars).

A task's `data` holds `image` and `prompt`, and may hold `uid` and `split` (else `ls-<task id>` and `--split`). The
image path written is the `d` parameter of a local-files URL (`/data/local-files/?d=PATH`), else the URL's file
name (uploads: `/data/upload/<project>/<file>`), relative to the `--images` folder that `rahf data consolidate`
reads. The annotator is the export's `completed_by` (a user id, or its email when the export holds the user).

Annotations that cannot become a line are left out and counted with their reason: cancelled ones, ones missing a
rating, points on a rotated image, points whose image size is unknown (no `original_width` and no `--images`).
When a user annotated a task twice, the later annotation (by `updated_at`) is kept: one line per (image, annotator).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomically
from ..keywords import prompt_word_spans
from .schema import HEATMAP_NAMES, SCORE_NAMES

logger = logging.getLogger(__name__)

__all__ = ["LABEL_CONFIG", "from_label_studio", "label_studio_task_to_records", "register", "write_jsonl_atomically"]

POINTS_CONTROL = "points"
WORDS_CONTROL = "words"
WORDS_LABEL = "misaligned"
COLOURS = {"implausibility": "#e0261b", "misalignment": "#1f5fe0"}  # red and blue, as in the paper's Fig. 1

LABEL_CONFIG = f"""<View>
  <!-- rahf rich feedback: points on the image, misaligned prompt words, four 1-5 ratings -->
  <Header value="Click the image where it is implausible (1) or misaligned with the prompt (2)"/>
  <KeyPointLabels name="{POINTS_CONTROL}" toName="image" strokeWidth="2">
{chr(10).join(f'    <Label value="{n}" background="{COLOURS[n]}" hotkey="{i + 1}"/>' for i, n in enumerate(HEATMAP_NAMES))}
  </KeyPointLabels>
  <Image name="image" value="$image" zoom="true"/>
  <Header value="Mark the prompt words the image does not show"/>
  <Labels name="{WORDS_CONTROL}" toName="prompt">
    <Label value="{WORDS_LABEL}" background="#f0a020" hotkey="3"/>
  </Labels>
  <Text name="prompt" value="$prompt" granularity="word"/>
{chr(10).join(f'  <Header value="{n}"/>{chr(10)}  <Rating name="{n}" toName="image" maxRating="5" required="true"/>' for n in SCORE_NAMES)}
</View>
"""


def image_path_of(url: str) -> str:
    """A task's `data.image` -> the path written in the JSONL (relative to `--images`)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.path.rstrip("/").endswith("/data/local-files"):
        d = urllib.parse.parse_qs(parsed.query).get("d")
        if d:
            return d[0].lstrip("/")
    return urllib.parse.unquote(Path(parsed.path).name)


def _annotator_of(completed_by: Any) -> str | None:
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    if completed_by is None or isinstance(completed_by, bool):
        return None
    return str(completed_by)


def _image_size(result: dict, image: str, sizes) -> tuple[int, int] | None:
    """The size Label Studio recorded, else the header's, read by consolidate's own checks (inside --images, under
    the pixel cap) when `sizes` (an `ImageSizes` of --images) is given."""
    width, height = result.get("original_width"), result.get("original_height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
        return int(width), int(height)
    found = sizes.get(image) if sizes is not None else None
    return None if found is None or isinstance(found, str) else found


def _pixel(percent: float, size: int) -> float:
    """A percentage of the image (0-100) -> a pixel coordinate in [0, size): 100% is the last pixel's far edge."""
    return min(max(percent, 0.0) / 100.0 * size, math.nextafter(size, 0))


def label_studio_task_to_records(
    task: dict, split: str = "train", images_dir: str | Path | None = None
) -> tuple[list[dict], list[str]]:
    """One exported task -> (raw annotation records, one per usable annotation; reasons for the others)."""
    from .consolidate import ImageSizes

    sizes = ImageSizes(Path(images_dir)) if images_dir is not None else None
    data = task.get("data") or {}
    prompt, url = data.get("prompt"), data.get("image")
    task_id = task.get("id")
    if not isinstance(prompt, str) or not isinstance(url, str):
        return [], [f"task {task_id}: data must hold 'image' and 'prompt' strings"] * max(
            1, len(task.get("annotations") or [])
        )
    image = image_path_of(url)
    uid = str(data.get("uid") or f"ls-{task_id}")
    spans = prompt_word_spans(prompt)
    latest: dict[str, tuple[str, dict]] = {}
    skipped = []
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict):
            skipped.append(f"task {task_id}: an annotation that is not an object")
            continue
        where = f"task {task_id} annotation {annotation.get('id')}"
        if annotation.get("was_cancelled"):
            skipped.append(f"{where}: cancelled")
            continue
        annotator = _annotator_of(annotation.get("completed_by"))
        if annotator is None:
            skipped.append(f"{where}: no completed_by (annotator)")
            continue
        points, words, scores, reason = [], set(), {}, None
        try:
            for result in annotation.get("result") or []:
                name, value = result.get("from_name"), result.get("value") or {}
                if name == POINTS_CONTROL and result.get("type") == "keypointlabels":
                    if result.get("image_rotation", 0) not in (0, None):
                        reason = "points on a rotated image (image_rotation != 0) are not supported"
                        break
                    size = _image_size(result, image, sizes)
                    if size is None:
                        reason = (
                            "a point without original_width/original_height (pass --images to read the image size)"
                        )
                        break
                    for kind in value.get("keypointlabels") or []:
                        if kind in HEATMAP_NAMES:
                            points.append(
                                {"x": _pixel(value["x"], size[0]), "y": _pixel(value["y"], size[1]), "kind": kind}
                            )
                elif name == WORDS_CONTROL and result.get("type") == "labels":
                    if WORDS_LABEL in (value.get("labels") or []):
                        start, end = value.get("start"), value.get("end")
                        words.update(i for i, (s, e) in enumerate(spans) if s < end and e > start)
                elif name in SCORE_NAMES and result.get("type") == "rating":
                    scores[name] = value.get("rating")
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as err:  # not as Label Studio writes it
            reason = f"a malformed result ({type(err).__name__}: {err})"
        missing = [n for n in SCORE_NAMES if n not in scores]
        if reason is None and missing:
            reason = f"no rating for {missing}"
        if reason is not None:
            skipped.append(f"{where}: {reason}")
            continue
        record = {
            "uid": uid,
            "image": image,
            "prompt": prompt,
            "split": str(data.get("split") or split),
            "annotator": annotator,
            "points": points,
            "misaligned_word_indices": sorted(words),
            "scores": {n: scores[n] for n in SCORE_NAMES},
        }
        stamp = str(annotation.get("updated_at") or annotation.get("created_at") or "")
        if annotator in latest:
            skipped.append(f"{where}: {annotator!r} annotated this task again; the later annotation is kept")
            if stamp < latest[annotator][0]:
                continue
        latest[annotator] = (stamp, record)
    return [record for _, record in latest.values()], skipped


def write_jsonl_atomically(records: list[dict], out: str | Path) -> None:
    """Writes `records` as JSONL to `out` atomically (a temporary file beside it, flushed, renamed over it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, _jsonl(records))


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def from_label_studio(
    export: str | Path, out: str | Path, split: str = "train", images_dir: str | Path | None = None
) -> dict[str, Any]:
    """Converts a Label Studio JSON export (a list of tasks) into the raw annotation JSONL at `out`.

    Returns:
        `{"tasks", "lines", "skipped": [reason, ...], "invalid": [...]}`; `invalid` (with `images_dir`) lists the lines
        that `rahf data consolidate` would refuse, as `check_annotation_lines` finds them.
    """
    export = Path(export)
    if not export.is_file():
        raise ValueError(f"EXPORT {str(export)!r} is not a file; pass the JSON file Label Studio exported")
    try:
        tasks = json.loads(export.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"EXPORT {str(export)!r} is not JSON ({err}); export the project as JSON") from None
    if isinstance(tasks, dict):  # one task, as the per-task files of a target storage hold them
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ValueError(f"EXPORT {str(export)!r} must be a JSON list of tasks (Label Studio's JSON export)")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ValueError(f"--images {str(images_dir)!r} is not a folder")
    records, skipped = [], []
    for task in tasks:
        task_records, task_skipped = label_studio_task_to_records(task, split, images_dir)
        records += task_records
        skipped += task_skipped
    write_jsonl_atomically(records, out)
    report: dict[str, Any] = {"tasks": len(tasks), "lines": len(records), "skipped": skipped, "invalid": []}
    if images_dir is not None:
        from .consolidate import check_annotation_lines

        report["invalid"] = check_annotation_lines(_jsonl(records).encode(), images_dir)
    return report


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `label-studio-config` and `from-label-studio` to the `rahf data` subcommands."""
    p = subparsers.add_parser(
        "label-studio-config", help="the Label Studio labelling config for rich feedback (points, words, ratings)"
    )
    p.add_argument("--out", default=None, help="write it here (default: print it)")
    p.set_defaults(func=_config_main)
    p = subparsers.add_parser(
        "from-label-studio", help="a Label Studio JSON export -> the raw annotation JSONL that consolidate reads"
    )
    p.add_argument("export", metavar="EXPORT.json", help="Label Studio's JSON export (a list of tasks)")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"], help="for tasks without one")
    p.add_argument("--images", default=None, help="the image folder: checks the lines as consolidate would")
    p.set_defaults(func=_convert_main)


def _config_main(args: argparse.Namespace) -> int:
    if args.out:
        Path(args.out).write_text(LABEL_CONFIG, encoding="utf-8")
        logger.info("wrote the Label Studio config to %s", args.out)
    else:
        print(LABEL_CONFIG, end="")
    return 0


def _convert_main(args: argparse.Namespace) -> int:
    report = from_label_studio(args.export, args.out, split=args.split, images_dir=args.images)
    logger.info("%d task(s) -> %d line(s) in %s", report["tasks"], report["lines"], args.out)
    for reason, count in Counter(r.split(": ", 1)[1] for r in report["skipped"]).most_common():
        logger.warning("left out %d annotation(s): %s", count, reason)
    for entry in report["invalid"]:
        logger.warning(
            "line %d (%s) would be refused by consolidate: %s", entry["line"], entry["uid"], entry["reason"]
        )
    return 0
