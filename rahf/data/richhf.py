"""Official RichHF-18K release (TFRecord labels) + Pick-a-Pic images and prompts -> the canonical data set.

`rahf data convert-richhf --tfrecords train.tfrecord dev.tfrecord test.tfrecord --pickapic SRC --out DIR`

- The TFRecords are read without TensorFlow (`rahf.data.tfrecord`), checking the framing CRCs. The split comes from
  the file name: a name containing the word `train`, `dev` (or `validation`, `val`) or `test`. A folder stands for
  the TFRecord files in it; a Git LFS pointer file in place of a TFRecord is refused with the fix.
- Scores: `artifact_score` -> `plausibility`, `misalignment_score` -> `alignment`, `aesthetics_score` ->
  `aesthetics`, `overall_score` -> `overall`. Their scale is detected from all the values of the run: all in [0, 1]
  -> kept; all in [1, 5] -> (s - 1) / 4; anything else is an error unless `score_scale` forces one.
- `artifact_map` / `misalignment_map` (encoded single-channel images) -> `implausibility_map` / `misalignment_map`.
- `prompt_misalignment_label` holds one 0/1 label per prompt word, the prompt split by `split_prompt_words`.
- `filename`'s basename without extension is the Pick-a-Pic uid. SRC is either a folder of Pick-a-Pic parquet shards
  (columns `caption`, `image_0_uid`, `image_1_uid`, `jpg_0`, `jpg_1`) or a folder of `{uid}.{png,jpg,jpeg,webp}`
  images with a `prompts.jsonl` of `{"uid": ..., "prompt": ...}` lines.

Memory stays bounded: a first pass over the TFRecords keeps only (offset, uid, scores) per record; the Pick-a-Pic
index keeps (caption, shard, row group, row) for the needed uids only; the second pass reads the image columns one
parquet row group at a time, rereads each TFRecord record by its offset, and streams examples to Arrow files, which
are put back in TFRecord order before `save_to_disk`.

`DIR/conversion_report.json` = `{"read": n, "converted": n, "skipped": [{"split", "file", "index", "uid", "reason"}],
...}`: every record that was not converted is listed with its reason, so `read == converted + len(skipped)`.

Nothing in a record stops the run or decides an allocation on its own: a declared record length above
`max_record_bytes` (default 1 GiB) or a damaged gzip stream is a fatal corruption of that file (its remaining records
are lost, the other files are read); a record of more than `tfrecord.DEFAULT_MAX_VALUES` values, a non-finite score,
a prompt with no words and an image or map whose header declares more pixels than `rahf.image_io`'s cap
(`RAHF_MAX_IMAGE_PIXELS`) are skipped records (maps and images are decoded through `rahf.image_io.open_image`). In an
images folder, a link that resolves outside the folder is refused, and so is a file larger than an image under the
pixel cap can need; `prompts.jsonl` is read by `rahf.data.jsonl`, so a bad line is a logged warning.

Examples:
    >>> from rahf.data.richhf import convert_richhf
    >>> report = convert_richhf(["richhf/train.tfrecord"], "pickapic_v1/data", "data/richhf18k")
    >>> report["read"] - report["converted"] == len(report["skipped"])
    True
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..keywords import is_blank_prompt, split_prompt_words
from .jsonl import JSONLineError, read_jsonl
from .schema import (
    FEATURES,
    SPLITS,
    encoded_image,
    max_encoded_image_bytes,
    prepare_output_dir,
    save_rich_feedback,
    scratch_dir,
    write_splits,
)
from .tfrecord import (
    DEFAULT_MAX_RECORD_BYTES,
    TFRecordCorruption,
    TFRecordCorruptionError,
    decode_example,
    read_tfrecord_at,
    scan_tfrecords,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MAP_FEATURES",
    "SCORE_FEATURES",
    "SPLIT_ALIASES",
    "convert_richhf",
    "expand_tfrecord_paths",
    "lfs_pointer_info",
    "register",
    "split_from_filename",
    "uid_from_filename",
]

SCORE_FEATURES: dict[str, str] = {
    "artifact_score": "plausibility",
    "misalignment_score": "alignment",
    "aesthetics_score": "aesthetics",
    "overall_score": "overall",
}
MAP_FEATURES: dict[str, str] = {"artifact_map": "implausibility_map", "misalignment_map": "misalignment_map"}
LABEL_FEATURE = "prompt_misalignment_label"
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "dev": "validation",
    "validation": "validation",
    "val": "validation",
    "test": "test",
}
SCORE_SCALES = ("auto", "unit", "likert")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PICKAPIC_COLUMNS = ("caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1")
REPORT_NAME = "conversion_report.json"

_SAFE_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_RECORD_SUFFIXES = (".gz", ".tfrecord", ".tfrecords", ".tfr", ".records", ".record")


def split_from_filename(path: str | Path) -> str:
    """The canonical split of a TFRecord file from its name: train / dev / test -> train / validation / test."""
    name = Path(path).name.lower()
    stem = name
    for suffix in _RECORD_SUFFIXES:  # "train.tfrecord.gz" -> "train"
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    found = {SPLIT_ALIASES[token] for token in re.split(r"[^a-z0-9]+", stem) if token in SPLIT_ALIASES}
    if len(found) != 1:
        accepted = ", ".join(sorted(SPLIT_ALIASES))
        what = f"it names several splits {sorted(found)}" if found else "it names no split"
        raise ValueError(
            f"cannot tell the split of TFRecord file {str(path)!r}: {what}. The name must contain exactly one of the "
            f"words {accepted} (e.g. train.tfrecord, dev.tfrecord, test.tfrecord); rename the file"
        )
    return found.pop()


def uid_from_filename(filename: str) -> tuple[str | None, str | None]:
    """(uid, None) for a safe Pick-a-Pic file name, (None, why) otherwise. The uid is the basename without extension.

    Names with NUL bytes, absolute paths, `..` components or a basename outside `[A-Za-z0-9._-]` are unsafe.
    """
    if "\x00" in filename:
        return None, "contains a NUL byte"
    if filename.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", filename):
        return None, "is an absolute path"
    parts = re.split(r"[\\/]", filename)
    if any(part == ".." for part in parts):
        return None, "contains a '..' path component"
    base = parts[-1]
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    if not _SAFE_UID.fullmatch(stem):
        return None, f"its basename {base!r} is not a plain uid (letters, digits, '.', '_', '-')"
    return stem, None


@dataclass
class _Record:
    """What the first pass keeps of one TFRecord record."""

    order: int
    split: str
    file: str
    index: int
    offset: int = -1
    uid: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


def _scan_item(item: bytes | TFRecordCorruption, record: _Record) -> None:
    """Fills `record.uid` and `record.scores` from one item of `scan_tfrecords`, or `record.reason` with the skip
    reason. Never raises on the item's content."""
    if isinstance(item, TFRecordCorruption):
        record.reason = item.reason + ("; the rest of the file is unreadable" if item.fatal else "")
        return
    try:
        example = decode_example(item)
    except ValueError as err:
        record.reason = f"malformed tf.train.Example: {err}"
        return
    record.uid, record.reason = _uid_of(example)
    if record.reason:
        return
    problems = []
    for feature, name in SCORE_FEATURES.items():
        values = example.get(feature)
        if not values or len(values) != 1 or not isinstance(values[0], float):
            problems.append(f"missing feature: {feature} must hold one float, got {_short(values)}")
        elif math.isnan(values[0]):
            problems.append(f"bad score: {feature} is NaN")
        elif math.isinf(values[0]):
            # Kept out of the min/max: one infinite score would make the scale undetectable for the whole run.
            problems.append(f"bad score: {feature} is {values[0]}")
        else:
            record.scores[name] = values[0]
    if problems:
        record.reason = "; ".join(problems)


def _short(value: Any) -> str:
    """A feature's value (or one of its items) quoted in a reason, cut before it is formatted: a damaged record may
    hold millions of values, or a value of a gigabyte."""
    if isinstance(value, list):
        items = ", ".join(_short(item) for item in value[:4])
        return f"[{items}, ... ({len(value):,} values)]" if len(value) > 4 else f"[{items}]"
    if isinstance(value, (bytes, str)) and len(value) > 80:
        return f"{value[:80]!r}... ({len(value):,} long)"
    return repr(value)


def _scan(
    paths: Sequence[Path], max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> tuple[list[_Record], dict[str, dict[str, float]]]:
    """First pass: framing, protobuf, file name and scores of every record; min/max of each score."""
    records: list[_Record] = []
    lo = {name: math.inf for name in SCORE_FEATURES.values()}
    hi = {name: -math.inf for name in SCORE_FEATURES.values()}
    for path in paths:
        split = split_from_filename(path)
        items = scan_tfrecords(path, max_record_bytes=max_record_bytes)
        progress = tqdm(items, desc=f"scanning {path.name}", unit=" records", leave=False)
        for index, (offset, item) in enumerate(progress):
            record = _Record(order=len(records), split=split, file=path.name, index=index, offset=offset)
            records.append(record)
            _scan_item(item, record)
            if record.reason:
                continue
            for name, value in record.scores.items():
                lo[name] = min(lo[name], value)
                hi[name] = max(hi[name], value)
    return records, {"min": lo, "max": hi}


def _uid_of(example: dict[str, list]) -> tuple[str | None, str | None]:
    values = example.get("filename")
    if not values or len(values) != 1 or not isinstance(values[0], bytes):
        return None, f"missing feature: filename must hold one bytes value, got {_short(values)}"
    try:
        filename = values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None, f"unsafe file name: {_short(values[0])} is not valid UTF-8"
    uid, why = uid_from_filename(filename)
    if why:
        return None, f"unsafe file name: {_short(filename)} {why}"
    return uid, None


def _detect_scale(ranges: dict[str, dict[str, float]], score_scale: str) -> str:
    if score_scale not in SCORE_SCALES:
        raise ValueError(f"`score_scale` must be one of {SCORE_SCALES}, got {score_scale!r}")
    if score_scale != "auto":
        return score_scale
    lo = [v for v in ranges["min"].values() if v != math.inf]
    hi = [v for v in ranges["max"].values() if v != -math.inf]
    if not lo:
        return "unit"  # nothing to convert
    if min(lo) >= 0.0 and max(hi) <= 1.0:
        return "unit"
    if min(lo) >= 1.0 and max(hi) <= 5.0:
        return "likert"
    detail = ", ".join(
        f"{feature}: [{ranges['min'][name]:g}, {ranges['max'][name]:g}]" for feature, name in SCORE_FEATURES.items()
    )
    raise ValueError(
        f"cannot detect the score scale: the scores span neither [0, 1] nor [1, 5] ({detail}). Pass "
        "score_scale='unit' or 'likert' (--score_scale) to force one; records outside it are then reported as skipped"
    )


def _normalise(value: float, scale: str) -> float:
    return (value - 1.0) / 4.0 if scale == "likert" else value


# ---------------------------------------------------------------------------------------------------------------------
# Pick-a-Pic sources
# ---------------------------------------------------------------------------------------------------------------------


class _FolderSource:
    """`{uid}.{png,jpg,jpeg,webp}` images and `prompts.jsonl` in one folder."""

    kind = "images folder"

    def __init__(self, root: Path, needed: set[str]) -> None:
        self.paths: dict[str, Path] = {}
        self.refused: dict[str, str] = {}  # uid -> why its image file cannot be used
        real_root = root.resolve()
        for path in sorted(root.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.stem not in needed:
                continue
            try:
                real = path.resolve()
                if not real.is_relative_to(real_root):
                    # A link out of the folder would make the data set carry any file of the machine.
                    self.refused[path.stem] = f"unsafe image: {path.name!r} resolves outside the --pickapic folder"
                    continue
                if not real.is_file():
                    continue
            except (OSError, RuntimeError) as err:  # a symlink loop, a name too long: that image only
                self.refused[path.stem] = f"unusable image: {path.name!r}: {type(err).__name__}: {err}"
                continue
            if path.stem in self.paths:
                logger.warning("several images for uid %s in %s; using %s", path.stem, root, self.paths[path.stem])
                continue
            self.paths[path.stem] = real
            self.refused.pop(path.stem, None)
        self.prompts: dict[str, str] = {}
        for line_no, row in read_jsonl(root / "prompts.jsonl"):
            if isinstance(row, JSONLineError) or not isinstance(row, dict) or "uid" not in row or "prompt" not in row:
                why = row.message if isinstance(row, JSONLineError) else "no 'uid' and 'prompt' keys"
                logger.warning(
                    '%s line %d: not a {"uid", "prompt"} JSON object (%s)', root / "prompts.jsonl", line_no, why
                )
                continue
            uid, prompt = row["uid"], row["prompt"]
            if isinstance(uid, str) and isinstance(prompt, str) and uid in needed:
                self.prompts.setdefault(uid, prompt)

    def prompt(self, uid: str) -> str | None:
        return self.prompts.get(uid)

    def has_image(self, uid: str) -> bool:
        return uid in self.paths

    def missing_image(self, uid: str) -> str:
        """Why `uid` has no image (when `has_image` is False)."""
        return self.refused.get(uid) or f"missing image: uid {uid!r} not found in the Pick-a-Pic {self.kind}"

    def fetch(self, records: list[_Record]) -> Iterator[tuple[_Record, bytes | str]]:
        """Yields each record with its image's bytes, or why they cannot be read."""
        limit = max_encoded_image_bytes()
        for record in records:
            assert record.uid is not None
            path = self.paths[record.uid]
            try:
                with open(path, "rb") as f:
                    data = f.read(limit + 1)  # a bound, as a file's size is no promise
            except OSError as err:
                yield record, f"missing image: cannot read {str(path)!r}: {err}"
                continue
            if len(data) > limit:
                yield (
                    record,
                    (
                        f"undecodable image: {str(path)!r} is larger than the {limit:,} bytes an image under the pixel "
                        "cap can need (RAHF_MAX_IMAGE_PIXELS)"
                    ),
                )
                continue
            yield record, data


class _ParquetSource:
    """Pick-a-Pic parquet shards: an index uid -> (caption, shard, row group, row, column) for the needed uids."""

    kind = "parquet shards"

    def __init__(self, shards: list[Path], needed: set[str]) -> None:
        import pyarrow.parquet as pq

        self.shards = shards
        self.index: dict[str, tuple[str | None, int, int, int, int]] = {}
        for shard_id, shard in enumerate(tqdm(shards, desc="indexing Pick-a-Pic", unit=" shards", leave=False)):
            pf = pq.ParquetFile(shard)
            missing = [c for c in PICKAPIC_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(
                    f"Pick-a-Pic shard {str(shard)!r} lacks the column(s) {missing}; --pickapic must point at "
                    f"Pick-a-Pic v1 parquet shards with columns {list(PICKAPIC_COLUMNS)}"
                )
            for group in range(pf.num_row_groups):
                table = pf.read_row_group(group, columns=["caption", "image_0_uid", "image_1_uid"])
                captions = table.column("caption").to_pylist()
                for column in (0, 1):
                    for row, uid in enumerate(table.column(f"image_{column}_uid").to_pylist()):
                        if uid in needed and uid not in self.index:
                            self.index[uid] = (captions[row], shard_id, group, row, column)
            if len(self.index) == len(needed):
                break  # every image found: the remaining shards need not be read

    def prompt(self, uid: str) -> str | None:
        entry = self.index.get(uid)
        return entry[0] if entry else None

    def has_image(self, uid: str) -> bool:
        return uid in self.index

    def missing_image(self, uid: str) -> str:
        """Why `uid` has no image (when `has_image` is False)."""
        return f"missing image: uid {uid!r} not found in the Pick-a-Pic {self.kind}"

    def fetch(self, records: list[_Record]) -> Iterator[tuple[_Record, bytes | str]]:
        """Yields the records grouped by row group, so each row group's image columns are read once."""
        import pyarrow.parquet as pq

        groups: dict[tuple[int, int], list[_Record]] = defaultdict(list)
        for record in records:
            assert record.uid is not None
            _, shard_id, group, _, _ = self.index[record.uid]
            groups[(shard_id, group)].append(record)
        for (shard_id, group), members in sorted(groups.items()):
            columns = sorted({f"jpg_{self.index[r.uid][4]}" for r in members if r.uid is not None})
            table = pq.ParquetFile(self.shards[shard_id]).read_row_group(group, columns=columns)
            for record in members:
                assert record.uid is not None
                _, _, _, row, column = self.index[record.uid]
                value = table.column(f"jpg_{column}")[row].as_py()
                if isinstance(value, dict):  # a datasets.Image column: {"bytes", "path"}
                    value = value.get("bytes")
                if isinstance(value, (bytes, bytearray)):
                    yield record, bytes(value)
                else:
                    yield record, f"missing image: no image bytes for uid {record.uid!r} in the Pick-a-Pic source"
            del table


def _find_source(src: Path) -> tuple[str, list[Path]]:
    """("parquet", shards) or ("folder", []) for a Pick-a-Pic source; raises `ValueError` naming the fix otherwise."""
    if src.is_file() and src.suffix == ".parquet":
        return "parquet", [src]
    if not src.is_dir():
        raise ValueError(
            f"`pickapic` {str(src)!r} is not a folder; pass a folder of Pick-a-Pic parquet shards or a folder of "
            "{uid}.{png,jpg,webp} images with a prompts.jsonl"
        )
    if (src / "prompts.jsonl").is_file():
        return "folder", []
    shards = sorted(src.rglob("*.parquet"))
    if shards:
        return "parquet", shards
    raise ValueError(
        f"`pickapic` {str(src)!r} holds neither parquet shards nor a prompts.jsonl; pass a folder of Pick-a-Pic "
        "parquet shards (columns caption, image_0_uid, image_1_uid, jpg_0, jpg_1) or a folder of "
        '{uid}.{png,jpg,webp} images with a prompts.jsonl of {"uid", "prompt"} lines'
    )


def _open_source(src: Path, needed: set[str]) -> _FolderSource | _ParquetSource:
    kind, shards = _find_source(src)
    return _ParquetSource(shards, needed) if kind == "parquet" else _FolderSource(src, needed)


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


def _build_example(record: _Record, data: bytes, prompt: str, image: bytes, scale: str) -> dict[str, Any]:
    """The canonical example of one record; raises `ValueError` with the skip reason."""
    example = decode_example(data)
    problems = []
    scores = {}
    for name, value in record.scores.items():
        mapped = _normalise(value, scale)
        if not 0.0 <= mapped <= 1.0:
            problems.append(f"score out of range: {name} = {value:g} is outside the {scale} scale")
        scores[name] = mapped
    words = split_prompt_words(prompt)
    if is_blank_prompt(prompt):
        problems.append(f"empty prompt: the Pick-a-Pic prompt {prompt[:80]!r} has no words")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        problems.append(f"bad prompt: {prompt[:80]!r} is not valid Unicode (a lone surrogate): it cannot be stored")
    raw_labels = example.get(LABEL_FEATURE)
    labels: list[int] = []
    if not raw_labels or len(raw_labels) != 1 or not isinstance(raw_labels[0], bytes):
        problems.append(f"missing feature: {LABEL_FEATURE} must hold one bytes value, got {raw_labels!r}")
    else:
        tokens = raw_labels[0].decode("utf-8", errors="replace").split()
        if any(token not in ("0", "1") for token in tokens):
            problems.append(f"bad labels: {LABEL_FEATURE} must be space-separated 0/1, got {raw_labels[0][:80]!r}")
        elif len(tokens) != len(words):
            problems.append(f"word/label count mismatch: {len(words)} prompt words but {len(tokens)} labels")
        else:
            labels = [int(token) for token in tokens]
    maps = {}
    for feature, column in MAP_FEATURES.items():
        values = example.get(feature)
        if not values or len(values) != 1 or not isinstance(values[0], bytes):
            problems.append(f"missing feature: {feature} must hold one encoded image, got {_short(values)}")
            continue
        try:
            maps[column] = encoded_image(values[0], "L")
        except Exception as err:  # PIL raises many types on broken files: never crash on one
            problems.append(f"undecodable map: {feature}: {type(err).__name__}: {err}")
    try:
        image_value = encoded_image(image, "RGB")
    except Exception as err:  # PIL raises many types on broken files: never crash on one
        problems.append(f"undecodable image: {type(err).__name__}: {err}")
    if problems:
        raise ValueError("; ".join(problems))
    assert record.uid is not None
    return {
        "uid": record.uid,
        "image": image_value,
        "prompt": prompt,
        **scores,
        **maps,
        "prompt_words": words,
        "word_labels": labels,
        "_order": record.order,
    }


LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
_SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}


def lfs_pointer_info(path: str | Path) -> dict[str, str] | None:
    """The `oid` and `size` lines of a Git LFS pointer file, or None when `path` is not one.

    A clone of the release made without `git lfs` holds these ~130-byte text files in place of the TFRecords.
    """
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head.startswith(LFS_POINTER_PREFIX):
        return None
    info = {}
    for line in head.decode("utf-8", errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key in ("oid", "size"):
            info[key] = value.strip()
    return info


def _check_not_lfs_pointer(path: Path) -> None:
    info = lfs_pointer_info(path)
    if info is None:
        return
    size = info.get("size", "?")
    size_text = f"{int(size):,} bytes" if size.isdigit() else size
    raise ValueError(
        f"`tfrecords` file {str(path)!r} is a Git LFS pointer file ({path.stat().st_size} bytes, standing for "
        f"{size_text}, {info.get('oid', 'no oid')}), not the TFRecord itself: the repository was cloned without git-lfs. "
        "Install git-lfs, then run `git lfs install && git lfs pull` inside the clone (or download the file itself "
        "from the repository's web page) and pass the real file"
    )


def _is_record_name(name: str) -> bool:
    name = name.lower().removesuffix(".gz")
    return name.endswith(_RECORD_SUFFIXES[1:])


def expand_tfrecord_paths(tfrecords: Sequence[str | Path]) -> list[Path]:
    """The TFRecord files named by `tfrecords`: files as given; a folder stands for the files in it (not below) whose
    name has a TFRecord suffix (`.tfrecord`, `.tfrecords`, `.tfr`, `.record(s)`, optionally `.gz`), in the order
    train, dev, test. Raises `ValueError` naming the fix for a missing path, an empty folder, a name that tells no
    split or a Git LFS pointer file."""
    if isinstance(tfrecords, (str, Path)):
        tfrecords = [tfrecords]
    paths: list[Path] = []
    for given in map(Path, tfrecords):
        if given.is_dir():
            found = [p for p in sorted(given.iterdir()) if p.is_file() and _is_record_name(p.name)]
            if not found:
                raise ValueError(
                    f"`tfrecords` folder {str(given)!r} holds no TFRecord files (*.tfrecord, *.tfrecords, *.tfr, "
                    "*.record, optionally .gz); pass the folder of the release's train/dev/test files, or the files"
                )
            paths.extend(sorted(found, key=lambda p: (_SPLIT_ORDER[split_from_filename(p)], p.name)))
        elif given.is_file():
            paths.append(given)
        else:
            raise ValueError(f"`tfrecords` path {str(given)!r} does not exist; pass TFRecord files or their folder")
    if not paths:
        raise ValueError("`tfrecords` is empty; pass the RichHF-18K TFRecord files (train, dev, test) or their folder")
    seen: set[Path] = set()
    unique = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    for path in unique:
        split_from_filename(path)  # fail on a bad name before reading anything
        _check_not_lfs_pointer(path)
    return unique


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def convert_richhf(
    tfrecords: Sequence[str | Path],
    pickapic: str | Path,
    out_dir: str | Path,
    *,
    score_scale: str = "auto",
    overwrite: bool = False,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> dict[str, Any]:
    """Converts official RichHF-18K TFRecords + Pick-a-Pic into the canonical `DatasetDict` saved at `out_dir`.

    Args:
        tfrecords (`Sequence[str | Path]`): the TFRecord files, or folders of them; each file name tells its split
            (train / dev / test).
        pickapic (`str | Path`): a folder of Pick-a-Pic parquet shards, or of `{uid}.{ext}` images + `prompts.jsonl`.
        out_dir (`str | Path`): where the `DatasetDict` and `conversion_report.json` go (absent or empty).
        score_scale (`str`, *optional*, defaults to `"auto"`): `"auto"` detects [0, 1] or 1-5 from the values;
            `"unit"` or `"likert"` forces one.
        overwrite (`bool`, *optional*, defaults to `False`): replace a data set already saved at `out_dir`.
        max_record_bytes (`int`, *optional*, defaults to 1 GiB): a record declaring a larger length is a fatal
            corruption of its file.

    Returns:
        The report written to `out_dir/conversion_report.json`.
    """
    paths = expand_tfrecord_paths(tfrecords)
    if score_scale not in SCORE_SCALES:
        raise ValueError(f"`score_scale` must be one of {SCORE_SCALES}, got {score_scale!r}")
    if isinstance(max_record_bytes, bool) or not isinstance(max_record_bytes, int) or max_record_bytes < 0:
        raise ValueError(f"`max_record_bytes` must be a non-negative byte count, got {max_record_bytes!r}")
    gzipped = [p.name for p in paths if _is_gzip(p)]
    if gzipped:
        logger.warning(
            "%s: gzip-compressed; records are reread by offset, slow in gzip: decompress them first", gzipped
        )
    src = Path(pickapic)
    _find_source(src)
    out = prepare_output_dir(out_dir, overwrite=overwrite)  # a busy output folder fails before the long part
    return _convert_scanned(paths, *_scan(paths, max_record_bytes), src, out, score_scale, max_record_bytes)


def _convert_scanned(
    paths: list[Path], records: list, ranges: dict, src: Path, out: Path, score_scale: str, max_record_bytes: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`convert_richhf` after its checks and its scan of the TFRecords; `extra` joins the report."""
    scale = _detect_scale(ranges, score_scale)
    logger.info("read %d TFRecord records from %d file(s); score scale: %s", len(records), len(paths), scale)

    needed = {r.uid for r in records if r.reason is None and r.uid is not None}
    source = _open_source(src, needed)
    for record in records:
        if record.reason is not None:
            continue
        assert record.uid is not None
        if not source.has_image(record.uid):
            record.reason = source.missing_image(record.uid)
        elif source.prompt(record.uid) is None:
            record.reason = f"missing prompt: uid {record.uid!r} has no prompt in the Pick-a-Pic {source.kind}"
    todo = [r for r in records if r.reason is None]
    path_of = {p.name: p for p in paths}

    def examples() -> Iterator[tuple[str, dict[str, Any]]]:
        for record, image in tqdm(source.fetch(todo), total=len(todo), desc="converting", unit=" records"):
            assert record.uid is not None
            if isinstance(image, str):
                record.reason = image
                continue
            try:
                data = read_tfrecord_at(path_of[record.file], record.offset, max_record_bytes=max_record_bytes)
                prompt = source.prompt(record.uid)
                assert prompt is not None
                yield record.split, _build_example(record, data, prompt, image, scale)
            except TFRecordCorruptionError as err:
                record.reason = f"{err.corruption.reason} (on rereading: the file changed during conversion)"
            except ValueError as err:
                record.reason = str(err)

    features = datasets.Features({**FEATURES, "_order": datasets.Value("int64")})
    with scratch_dir(out) as tmp:
        built = write_splits(examples(), tmp, features=features)
        # Rows were written in fetch order (parquet row groups); put them back in TFRecord order.
        ds = datasets.DatasetDict(
            {
                split: built[split].select(np.argsort(built[split]["_order"], kind="stable")).remove_columns("_order")
                for split in SPLITS
            }
        )
        save_rich_feedback(ds, out)
        del ds, built

    skipped = [
        {"split": r.split, "file": r.file, "index": r.index, "uid": r.uid, "reason": r.reason}
        for r in records
        if r.reason is not None
    ]
    read, per_split = Counter(), Counter()
    by_split: dict[str, Counter] = {split: Counter() for split in SPLITS}
    for r in records:
        read[r.split] += 1
        if r.reason is None:
            per_split[r.split] += 1
        else:
            by_split[r.split][_reason_kind(r.reason)] += 1
    reasons = sum(by_split.values(), Counter())
    report = {
        "read": len(records),
        "converted": len(records) - len(skipped),
        "skipped": skipped,
        "splits": {split: per_split.get(split, 0) for split in SPLITS},
        "read_by_split": {split: read[split] for split in SPLITS},
        "skip_reasons": dict(reasons),
        "skip_reasons_by_split": {split: dict(by_split[split].most_common()) for split in SPLITS},
        "score_scale": {
            "scale": scale,
            "requested": score_scale,
            "min": {k: (v if v != math.inf else None) for k, v in ranges["min"].items()},
            "max": {k: (v if v != -math.inf else None) for k, v in ranges["max"].items()},
        },
        "pickapic_source": source.kind,
        **(extra or {}),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    summary = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
    logger.info(
        "convert-richhf: read %d records, converted %d, skipped %d%s -> %s",
        report["read"],
        report["converted"],
        len(skipped),
        f" ({summary})" if summary else "",
        out,
    )
    return report


def _reason_kind(reason: str) -> str:
    """The kind of a skip reason, its text before the first `:` or `;` (`"missing image"`, `"bad data CRC"`)."""
    return reason.split(":")[0].split(";")[0]


def _run(args: argparse.Namespace) -> int:
    convert_richhf(args.tfrecords, args.pickapic, args.out, score_scale=args.score_scale, overwrite=args.overwrite)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `convert-richhf` to the `rahf data` command line."""
    parser = subparsers.add_parser(
        "convert-richhf",
        help="official RichHF-18K TFRecords + Pick-a-Pic images -> canonical data set",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--tfrecords",
        nargs="+",
        required=True,
        metavar="PATH",
        help="train/dev/test TFRecord files, or the folder holding them (e.g. a clone of the release)",
    )
    parser.add_argument(
        "--pickapic",
        required=True,
        metavar="SRC",
        help="folder of Pick-a-Pic parquet shards, or of {uid}.{png,jpg,webp} images with prompts.jsonl",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (absent or empty)")
    parser.add_argument(
        "--score_scale", choices=SCORE_SCALES, default="auto", help="score scale of the TFRecords (default: detect)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a data set saved at --out before")
    parser.set_defaults(func=_run)
