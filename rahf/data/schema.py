"""The canonical rich-feedback data set (docs/reference.md, section 1): its `datasets.Features`, validation, and the loader.

Every source (RichHF-18K, raw annotations, the synthetic set) becomes a `DatasetDict` with splits among `SPLITS`
and the columns of `FEATURES`; extra columns (e.g. per-annotator scores) are allowed and kept.

Examples:
    >>> from rahf.data.schema import load_rich_feedback
    >>> ds = load_rich_feedback("data/richhf18k")  # raises ValueError naming the column and record if invalid
    >>> ds["train"][0]["implausibility_map"].mode
    'L'
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image, List, Value
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from ..constants import HEATMAP_NAMES, SCORE_NAMES
from ..image_io import max_image_pixels, open_image
from ..keywords import is_blank_prompt, split_prompt_words

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURES",
    "HEATMAP_COLUMNS",
    "HEATMAP_NAMES",
    "encoded_image",
    "max_encoded_image_bytes",
    "SCORE_NAMES",
    "SPLITS",
    "load_rich_feedback",
    "prepare_output_dir",
    "save_rich_feedback",
    "scratch_dir",
    "write_splits",
    "validate_dataset",
    "validate_example",
]

HEATMAP_COLUMNS: tuple[str, ...] = tuple(f"{name}_map" for name in HEATMAP_NAMES)
SPLITS: tuple[str, ...] = ("train", "validation", "test")

FEATURES = Features(
    {
        "uid": Value("string"),
        "image": Image(mode="RGB"),
        "prompt": Value("string"),
        **{name: Value("float32") for name in SCORE_NAMES},
        **{column: Image(mode="L") for column in HEATMAP_COLUMNS},
        "prompt_words": List(Value("string")),
        "word_labels": List(Value("int32")),
    }
)

_IMAGE_COLUMNS = ("image", *HEATMAP_COLUMNS)
_STRING_COLUMNS = ("uid", "prompt")


def _where(split: str, index: int, uid: Any = None) -> str:
    return f"split {split!r}, record {index}" + (f" (uid {uid!r})" if isinstance(uid, str) else "")


def _check_image_value(value: Any) -> bool:
    """True for a decoded PIL image or an undecoded {"bytes", "path"} value with data."""
    if value is None:
        return False
    if isinstance(value, Mapping):
        return value.get("bytes") is not None or bool(value.get("path"))
    return hasattr(value, "mode") and hasattr(value, "size")


def validate_example(example: Mapping[str, Any], index: int, split: str) -> None:
    """Checks one record of the canonical schema; raises `ValueError` naming the column, split and record index.

    Images may be decoded (PIL) or undecoded ({"bytes", "path"}). Extra columns are not checked.
    """
    uid = example.get("uid")
    where = _where(split, index, uid)
    missing = [column for column in FEATURES if column not in example]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; the canonical columns are {list(FEATURES)}")
    for column in _STRING_COLUMNS:
        if not isinstance(example[column], str):
            raise ValueError(f"{where}: column {column!r} must be a string, got {example[column]!r}")
    if not uid:
        raise ValueError(f"{where}: column 'uid' must be a non-empty string")
    if is_blank_prompt(example["prompt"]):
        # A prompt with no word gives the keyword head nothing to label: training would fail later, far from here.
        raise ValueError(
            f"{where}: column 'prompt' must hold at least one word (as split_prompt_words splits it), got "
            f"{example['prompt'][:80]!r}; drop the record or give it its prompt"
        )
    for column in _IMAGE_COLUMNS:
        value = example[column]
        if not _check_image_value(value):
            raise ValueError(f"{where}: column {column!r} must hold an image, got {type(value).__name__}")
        if column != "image" and hasattr(value, "mode") and value.mode != "L":
            raise ValueError(f"{where}: column {column!r} must be a single-channel mode 'L' image, got {value.mode!r}")
    for column in SCORE_NAMES:
        value = example[column]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(
                f"{where}: column {column!r} must be a float in [0, 1], got {value!r}; "
                "map 1-5 Likert means with (s - 1) / 4"
            )
    words, labels = example["prompt_words"], example["word_labels"]
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
        raise ValueError(f"{where}: column 'prompt_words' must be a list of strings, got {words!r}")
    if not isinstance(labels, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        raise ValueError(f"{where}: column 'word_labels' must be a list of ints, got {labels!r}")
    if len(words) != len(labels):
        raise ValueError(
            f"{where}: columns 'prompt_words' and 'word_labels' must have the same length, "
            f"got {len(words)} words and {len(labels)} labels"
        )
    bad = [v for v in labels if v not in (0, 1)]
    if bad:
        raise ValueError(f"{where}: column 'word_labels' must hold only 0 (misaligned) or 1 (aligned), got {bad[:5]}")
    expected = split_prompt_words(example["prompt"])
    if list(words) != expected:
        raise ValueError(
            f"{where}: column 'prompt_words' must be split_prompt_words(prompt) = {expected}, got {list(words)}"
        )


def _check_features(features: Features, split: str) -> None:
    missing = [column for column in FEATURES if column not in features]
    if missing:
        raise ValueError(
            f"split {split!r}: missing column(s) {missing}; the canonical columns are {list(FEATURES)} "
            "(see rahf.data.schema.FEATURES)"
        )
    for column in _IMAGE_COLUMNS:
        if not isinstance(features[column], Image):
            raise ValueError(f"split {split!r}: column {column!r} must be a datasets.Image, got {features[column]}")
    for column in _STRING_COLUMNS:
        if features[column] != Value("string") and features[column] != Value("large_string"):
            raise ValueError(f"split {split!r}: column {column!r} must be Value('string'), got {features[column]}")
    for column in SCORE_NAMES:
        feature = features[column]
        if not isinstance(feature, Value) or not feature.dtype.startswith("float"):
            raise ValueError(f"split {split!r}: column {column!r} must be Value('float32'), got {feature}")


def validate_dataset(ds: DatasetDict) -> None:
    """Checks every split, column and record of a canonical `DatasetDict`; raises `ValueError` on the first problem.

    Records are read without decoding the images (only their presence is checked), in batches, with a progress bar.
    """
    if not isinstance(ds, DatasetDict):
        raise ValueError(f"`ds` must be a datasets.DatasetDict with splits among {SPLITS}, got {type(ds).__name__}")
    if not ds:
        raise ValueError(f"`ds` has no splits; expected some of {SPLITS}")
    unknown = [name for name in ds if name not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; the accepted split names are {list(SPLITS)}")
    for split, dataset in ds.items():
        _check_features(dataset.features, split)
        # Image presence is checked on the stored bytes: decoding every image would dominate the cost.
        undecoded = dataset.select_columns(list(FEATURES))
        for column in _IMAGE_COLUMNS:
            undecoded = undecoded.cast_column(column, Image(decode=False))
        index = 0
        batches = undecoded.iter(batch_size=512)
        for batch in tqdm(batches, total=math.ceil(len(dataset) / 512), desc=f"validating {split}", leave=False):
            size = len(batch["uid"])
            for row in range(size):
                validate_example({column: batch[column][row] for column in FEATURES}, index, split)
                index += 1
    logger.info("validated %s", ", ".join(f"{split}: {len(d)} records" for split, d in ds.items()))


def load_rich_feedback(path: str | Path) -> DatasetDict:
    """Loads a canonical data set saved with `DatasetDict.save_to_disk` and validates it."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"`path` {str(path)!r} is not a folder; pass the folder written by `rahf data synth`, "
            "`rahf data convert-richhf` or `rahf data consolidate` (DatasetDict.save_to_disk)"
        )
    if not (path / "dataset_dict.json").is_file():
        hint = (
            " It holds a single Dataset: save a DatasetDict with splits " + ", ".join(SPLITS) + " instead."
            if (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
            else " Create one with `rahf data synth`, `rahf data convert-richhf` or `rahf data consolidate`."
        )
        raise ValueError(f"`path` {str(path)!r} is not a saved datasets.DatasetDict (no dataset_dict.json).{hint}")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError) as err:
        raise ValueError(f"`path` {str(path)!r} could not be loaded as a DatasetDict: {err}") from err
    if not isinstance(ds, DatasetDict):
        raise ValueError(f"`path` {str(path)!r} holds a {type(ds).__name__}, expected a DatasetDict")
    validate_dataset(ds)
    return ds


def save_rich_feedback(ds: DatasetDict, path: str | Path) -> None:
    """`ds.save_to_disk(path)`, working around `datasets` writing zero shards for an empty split (which
    `load_from_disk` then cannot read)."""
    ds.save_to_disk(str(path), num_shards={split: 1 if len(d) == 0 else None for split, d in ds.items()})


def write_splits(
    examples: Iterable[tuple[str, Mapping[str, Any]]],
    folder: str | Path,
    *,
    features: Features = FEATURES,
    in_memory: bool = False,
    writer_batch_size: int = 64,
) -> DatasetDict:
    """Streams (split, example) pairs into one Arrow file per split under `folder`; returns them as a `DatasetDict`.

    Memory holds one batch of `writer_batch_size` examples per split. Every split of `SPLITS` is present (empty when
    no example went to it). Images may be PIL images or {"bytes", "path"} dicts. With `in_memory=True` the tables are
    read into memory, so `folder` may be deleted afterwards; otherwise the data set memory-maps the files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {
        split: ArrowWriter(features=features, path=str(folder / f"{split}.arrow"), writer_batch_size=writer_batch_size)
        for split in SPLITS
    }
    try:
        for split, example in examples:
            if split not in writers:
                raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
            writers[split].write(features.encode_example(dict(example)))
        for writer in writers.values():
            writer.finalize()
    finally:
        for writer in writers.values():
            writer.close()
    return DatasetDict(
        {
            split: Dataset.from_file(
                str(folder / f"{split}.arrow"), info=DatasetInfo(features=features), in_memory=in_memory
            )
            for split in SPLITS
        }
    )


def check_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Raises unless `out_dir` can receive a saved data set (absent or empty, or a previous one when `overwrite`);
    changes nothing, so that a long job can check its output folder before it starts."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`out_dir` {str(out_dir)!r} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"`out_dir` {str(out_dir)!r} is not empty; choose a new folder or pass overwrite=True (--overwrite) "
                "to replace a data set written there before"
            )
        if not (out_dir / "dataset_dict.json").is_file():
            raise ValueError(
                f"`out_dir` {str(out_dir)!r} is not empty and does not hold a saved DatasetDict; refusing to delete "
                "it with overwrite=True: choose a new folder"
            )
    return out_dir


def prepare_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Checks that `out_dir` can receive a saved data set: absent or empty, or a previous one when `overwrite`."""
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def scratch_dir(out_dir: str | Path) -> tempfile.TemporaryDirectory:
    """A temporary folder beside `out_dir` (same file system) for the Arrow files written before `save_to_disk`."""
    parent = Path(out_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".rahf-tmp-", dir=parent)


def max_encoded_image_bytes(max_pixels: int | None = None) -> int:
    """The largest image file worth reading for an image of at most `max_pixels` pixels (default
    `max_image_pixels()`): 8 bytes a pixel (16-bit RGBA stored raw, the worst case of PNG) plus 16 MiB of metadata.
    A larger file is refused unread: whatever its header says, its size alone would be the allocation."""
    return 9 * max_image_pixels(max_pixels) + (16 << 20)


def _kept_format(data: bytes) -> bool:
    """True for PNG, JPEG or WebP bytes: the formats stored as they are."""
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def encoded_image(data: bytes, mode: str, *, max_pixels: int | None = None) -> dict[str, Any]:
    """The value to store for an encoded image in a `datasets.Image` column of the given `mode`.

    Decodes `data` fully through `rahf.image_io.open_image` (so a broken file raises `ValueError` here, not in
    training, and one whose header declares more than `max_pixels` pixels, default `max_image_pixels()`, raises
    `ImageTooLargeError` before any pixel is decoded) and keeps the original bytes when they already are a PNG, JPEG
    or WebP of `mode`; otherwise re-encodes as PNG in `mode`.
    """
    data = bytes(data)
    img = open_image(data, max_pixels=max_pixels)
    if img.mode == mode and _kept_format(data):
        return {"bytes": data, "path": None}
    out = io.BytesIO()
    img.convert(mode).save(out, format="PNG")
    return {"bytes": out.getvalue(), "path": None}
