"""Seeded mutation fuzzing of the data readers: the one harness that `tests/test_fuzz_readers.py` runs briefly and
`benchmarks/fuzz_readers.py` runs long.

Targets, and the only outcomes allowed for each (anything else is a *crash*; an input that takes longer than
`time_limit_s` is a *hang*):

- `"tfrecord"`, `"tfrecord_gzip"`: a mutated TFRecord file (plain; or gzip, the mutation applied to the records or to
  the compressed bytes). `scan_tfrecords` yields bytes or `TFRecordCorruption` items (a fatal one last), with
  `strict=True` it raises only `TFRecordCorruptionError`, `read_tfrecord_at` returns bytes or raises
  `TFRecordCorruptionError`; every record read goes through the converter's first pass (`richhf._scan_item`:
  Example decoding, file name, scores), which never raises.
- `"example"`: mutated `tf.train.Example` bytes. `decode_example` returns a dict or raises `ValueError`; what it
  decodes goes through the converter's first pass and per-record build (`richhf._build_example`: labels, maps and
  image decoded through `rahf.image_io.open_image`), which returns or raises `ValueError` (its skip reason).
- `"jsonl"`: mutated annotation lines. `consolidate.check_annotation_lines` (the per-line reader and checks of
  `rahf data consolidate`) returns its reports and never raises; each report names a line of the input and is
  JSON-serialisable, as `consolidation_report.json` needs.

Mutations: bit flips, byte sets, inserts, deletes, truncation, splicing with another corpus input, duplicated
chunks, little-endian integers of interesting values; for TFRecords also a record's length field overwritten with
a large value (2^31 ... 2^64 - 1, most between 2^36 and 2^64 - 1) with its length CRC fixed up so that it passes,
and a record's data re-mutated and re-framed with valid CRCs (so that the mutation reaches the Example decoder); for
JSONL lines, a field's value replaced by a hostile token (`1e400`, `NaN`, 5,001-digit integers, JSON nested 100,000
deep, lone surrogates, invalid UTF-8, empty or word-less prompts, paths through symbolic links out of the images
folder, over-the-cap images, lines beyond the length cap, thousands of points).

Every input is a pure function of (target, seed, index): `replay(target, seed, index)` rebuilds it and runs it
with nothing caught, to see the traceback.

Examples:
    >>> from rahf.testing_fuzz import Fuzzer
    >>> with Fuzzer.in_temporary_folder() as fuzzer:
    ...     result = fuzzer.run("jsonl", inputs=1000, seed=0)
    >>> result.crashes, result.hangs
    (0, 0)
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import random
import signal
import struct
import tempfile
import threading
import time
import traceback
import types
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import consolidate as _consolidate
from .data import richhf as _richhf
from .data import tfrecord as _tfrecord

__all__ = ["TARGETS", "Finding", "FuzzResult", "Fuzzer", "replay"]

TARGETS: tuple[str, ...] = ("tfrecord", "tfrecord_gzip", "example", "jsonl")

# Lengths a damaged or hostile header may declare: most beyond any allocation (2^36 .. 2^64 - 1), a few below.
_BIG_LENGTHS = (2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**36, 2**40, 2**48, 2**56, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
_INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x0D, 0x22, 0x5C, 0x1F, 0x8B)
_BAD_UTF8 = (b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82", b"\x80")


class _Hang(BaseException):
    """Raised by the per-input alarm; a BaseException so that the code under test's `except Exception` lets it by."""


@dataclass
class Finding:
    """One input with a disallowed outcome: what to rerun and what happened."""

    target: str
    seed: int
    index: int
    kind: str  # "crash" or "hang"
    error: str
    traceback: str
    data: bytes
    options: dict[str, Any]

    def describe(self, max_bytes: int = 512) -> str:
        shown = self.data[:max_bytes].hex()
        more = f" ... ({len(self.data):,} bytes in all)" if len(self.data) > max_bytes else ""
        return (
            f"{self.kind} on target {self.target!r}, seed {self.seed}, input {self.index} (options {self.options}): "
            f'{self.error}\n  rerun: python -c "from rahf.testing_fuzz import replay; replay({self.target!r}, '
            f'{self.seed}, {self.index})"\n  input hex: {shown}{more}\n{self.traceback}'
        )


@dataclass
class FuzzResult:
    """Counts of one target's run."""

    target: str
    seed: int
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)


@dataclass
class _Case:
    data: bytes
    options: dict[str, Any]


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupts the block with `_Hang` after `seconds` (main thread only; elsewhere the caller times it)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _alarm(signum: int, frame: types.FrameType | None) -> None:
        raise _Hang(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------------------------
# Generic byte mutators
# ---------------------------------------------------------------------------------------------------------------------


def _flip_bits(rng: random.Random, data: bytearray, other: bytes) -> None:
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)


def _set_bytes(rng: random.Random, data: bytearray, other: bytes) -> None:
    for _ in range(rng.randint(1, 4)):
        if data:
            data[rng.randrange(len(data))] = (
                rng.choice(_INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
            )


def _insert(rng: random.Random, data: bytearray, other: bytes) -> None:
    chunk = rng.choice(
        [bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))), rng.choice(_BAD_UTF8), b"\x00" * 8]
    )
    pos = rng.randint(0, len(data))
    data[pos:pos] = chunk


def _delete(rng: random.Random, data: bytearray, other: bytes) -> None:
    if data:
        start = rng.randrange(len(data))
        del data[start : start + rng.randint(1, 32)]


def _truncate(rng: random.Random, data: bytearray, other: bytes) -> None:
    del data[rng.randint(0, len(data)) :]


def _splice(rng: random.Random, data: bytearray, other: bytes) -> None:
    cut = rng.randint(0, len(data))
    data[cut:] = other[rng.randint(0, len(other)) :]


def _duplicate(rng: random.Random, data: bytearray, other: bytes) -> None:
    if data:
        start = rng.randrange(len(data))
        chunk = data[start : start + rng.randint(1, 64)]
        pos = rng.randint(0, len(data))
        data[pos:pos] = chunk


def _overwrite_int(rng: random.Random, data: bytearray, other: bytes) -> None:
    width = rng.choice((1, 2, 4, 8))
    value = rng.choice((0, 1, 2 ** (width * 8) - 1, 2 ** (width * 8 - 1), rng.getrandbits(width * 8)))
    if len(data) >= width:
        pos = rng.randrange(len(data) - width + 1)
        data[pos : pos + width] = value.to_bytes(width, "little")


_BYTE_MUTATORS: tuple[Callable[[random.Random, bytearray, bytes], None], ...] = (
    _flip_bits,
    _set_bytes,
    _insert,
    _delete,
    _truncate,
    _splice,
    _duplicate,
    _overwrite_int,
)


def _mutate_bytes(rng: random.Random, data: bytes, other: bytes, rounds: int | None = None) -> bytes:
    out = bytearray(data)
    for _ in range(rounds if rounds is not None else rng.randint(1, 3)):
        rng.choice(_BYTE_MUTATORS)(rng, out, other)
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------------
# Structure-aware mutators
# ---------------------------------------------------------------------------------------------------------------------


def _frames(raw: bytes) -> list[tuple[int, int]]:
    """(header offset, data length) of each well-framed record of `raw`."""
    frames, pos = [], 0
    while pos + 12 <= len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        if pos + 16 + length > len(raw):
            break
        frames.append((pos, length))
        pos += 16 + length
    return frames


def _big_length(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(_BIG_LENGTHS)
    if roll < 0.85:
        return rng.randrange(2**36, 2**64)  # beyond memory, and beyond an index for the top ones
    if roll < 0.95:
        return rng.randrange(2**20, 2**31)  # plausible, but beyond what the stream holds
    return rng.randrange(0, 2**20)


def _overwrite_length(rng: random.Random, raw: bytes, options: dict[str, Any]) -> bytes:
    frames = _frames(raw)
    out = bytearray(raw)
    pos = rng.choice(frames)[0] if frames else 0
    if len(out) < pos + 12:
        out.extend(bytes(pos + 12 - len(out)))
    length = _big_length(rng)
    out[pos : pos + 8] = struct.pack("<Q", length)
    fixed = rng.random() < 0.9
    if fixed:  # the length CRC passes: the length itself must be distrusted
        out[pos + 8 : pos + 12] = struct.pack("<I", _tfrecord.masked_crc32c(bytes(out[pos : pos + 8])))
    options.update(declared_length=length, length_crc_fixed=fixed)
    return bytes(out)


def _remutate_record(rng: random.Random, raw: bytes, other: bytes, mutate_example: Callable[..., bytes]) -> bytes:
    """One record's data mutated as an Example and re-framed with valid CRCs, so that the decoder sees it."""
    frames = _frames(raw)
    if not frames:
        return raw + _tfrecord.frame_record(mutate_example(rng, other))
    pos, length = rng.choice(frames)
    data = raw[pos + 12 : pos + 12 + length]
    return raw[:pos] + _tfrecord.frame_record(mutate_example(rng, data)) + raw[pos + 16 + length :]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _mutate_example(rng: random.Random, data: bytes, other: bytes = b"") -> bytes:
    """Byte mutations plus protobuf ones: inflated varints, huge length prefixes, random fields."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):  # mostly one mutation: more inputs get past the decoder
        roll = rng.random()
        pos = rng.randint(0, len(out))
        if roll < 0.15:  # a varint of 10 bytes, or one that never ends
            out[pos:pos] = b"\xff" * rng.choice((9, 10, 11, 20)) + rng.choice((b"\x01", b"\x7f", b""))
        elif roll < 0.3:  # a length-delimited field claiming a huge size
            out[pos:pos] = _varint((rng.randint(1, 3) << 3) | 2) + _varint(rng.choice((2**31, 2**63, 2**64 - 1)))
        elif roll < 0.45:  # a field of a random number and wire type
            key = (rng.choice((1, 2, 3, 4, 2**29 - 1)) << 3) | rng.randrange(8)
            out[pos:pos] = _varint(key) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 9)))
        elif roll < 0.55:  # a packed list of many values
            payload = rng.choice((b"\x01" * 4096, b"\x00\x00\x80\x7f" * 1024, b"\xff" * 4095 + b"\x01"))
            out[pos:pos] = b"\x0a" + _varint(len(payload)) + payload
        else:
            out[:] = _mutate_bytes(rng, bytes(out), other or data, rounds=1)
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with one tiny IDAT: refused from its header alone."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


_PROMPT = "a red cat, on a mat"  # 6 words


def _example_features(uid: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "filename": f"{uid}.jpg".encode(),
        "artifact_score": [float(rng.random())],
        "misalignment_score": [float(rng.random())],
        "aesthetics_score": [float(rng.random())],
        "overall_score": [float(rng.random())],
        "artifact_map": [_png(rng.integers(0, 256, (4, 4), dtype=np.uint8))],
        "misalignment_map": [_png(rng.integers(0, 256, (4, 4), dtype=np.uint8))],
        "prompt_misalignment_label": [" ".join(str(int(b)) for b in rng.integers(0, 2, 6)).encode()],
    }


_IMAGE_NAMES = ("img0.png", "sub/img1.png", "inside.png")

# Raw JSON tokens put in place of a field's value. Callables build the large ones only when drawn.
_TOKENS: tuple[str | Callable[[], str], ...] = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e-400",
    "1e308",
    "0",
    "-0",
    "-1",
    "2.5",
    "3",
    "4.999",
    "true",
    "false",
    "null",
    "[]",
    "{}",
    '""',
    '"   "',
    '",.;?!"',
    '"\\u0000"',
    '"\\ud800"',
    '"\\udc80x"',
    '"\\ud83d\\ude00 cat"',
    '"../img0.png"',
    '"/etc/passwd"',
    '"outside.png"',
    '"inside.png"',
    '"loop.png"',
    '"big.png"',
    '"broken.png"',
    '"notimage.png"',
    '"sub"',
    '"sub/"',
    '"img0.png\\u0000"',
    '"C:\\\\img0.png"',
    '"\\\\\\\\server\\\\share"',
    '"implausibility"',
    '"misalignment"',
    '"blur"',
    '"validation"',
    lambda: "9" * 5001,
    lambda: "-" + "9" * 4301,
    lambda: "1" + "0" * 100,
    lambda: "1" + "0" * 400,
    lambda: "1" * 400 + ".5",
    lambda: "[" * 100_000 + "]" * 100_000,
    lambda: '{"a":' * 50_000 + "1" + "}" * 50_000,
    lambda: "[" * 600 + "]" * 600,
    lambda: '"' + "x" * 300 + '.png"',
    lambda: '"' + "a/" * 3000 + 'x.png"',
    lambda: '"' + "word " * 20_000 + '"',
    lambda: "[" + ",".join(['{"x": 1, "y": 1, "kind": "implausibility"}'] * 1001) + "]",
    lambda: "[" + ",".join(['{"x": 5.5, "y": 4, "kind": "misalignment"}'] * 999) + "]",
    lambda: "[" + ",".join(["1"] * 100_000) + "]",
    lambda: "[" + ",".join(["[]"] * 50_000) + "]",
)
_LONG_TOKEN = lambda: '"' + "a" * 1_000_100 + '"'  # noqa: E731  # beyond the line cap: drawn rarely, it is slow
_FIELDS = (
    "uid",
    "image",
    "prompt",
    "split",
    "annotator",
    "points",
    "points.0",
    "points.0.x",
    "points.0.y",
    "points.0.kind",
    "misaligned_word_indices",
    "misaligned_word_indices.0",
    "scores",
    "scores.plausibility",
    "scores.overall",
    "",
    "extra",
)


def _jsonl_records() -> list[dict[str, Any]]:
    records = []
    for i, image in enumerate(_IMAGE_NAMES):
        for annotator in ("a", 7):
            records.append(
                {
                    "uid": f"u{i}",
                    "image": image,
                    "prompt": _PROMPT,
                    "split": ("train", "validation", "test")[i],
                    "annotator": annotator,
                    "points": [
                        {"x": 1.5, "y": 2, "kind": "implausibility"},
                        {"x": 10, "y": 8, "kind": "misalignment"},
                    ],
                    "misaligned_word_indices": [1, 2],
                    "scores": {"plausibility": 4, "alignment": 2, "aesthetics": 3.5, "overall": 3},
                }
            )
    return records


def _substitute(rng: random.Random, record: dict[str, Any]) -> str:
    """`record` as one JSON line with one field's value replaced by a hostile raw token."""
    path = rng.choice(_FIELDS)
    token = _LONG_TOKEN if rng.random() < 0.002 else rng.choice(_TOKENS)
    raw = token() if callable(token) else token
    marker = "\u0001MARK\u0001"
    record = json.loads(json.dumps(record))
    if not path:
        return raw  # the whole line
    target: Any = record
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = marker
    else:
        target[last] = marker
    return json.dumps(record).replace(json.dumps(marker), raw)


# ---------------------------------------------------------------------------------------------------------------------
# The fuzzer
# ---------------------------------------------------------------------------------------------------------------------


def _reason_class(reason: str) -> str:
    """A corruption's reason without its numbers, to count outcomes by kind."""
    for prefix, name in (
        ("record too large", "over max_record_bytes"),
        ("truncated", "truncated"),
        ("damaged gzip", "damaged gzip"),
    ):
        if reason.startswith(prefix):
            return name
    return reason


class Fuzzer:
    """Builds the corpora and fixture files in `workdir`, then mutates and runs inputs.

    Args:
        workdir (`Path`): an empty folder for the fixture images and the input files.
        tfrecord_module (*optional*): the TFRecord reader to test (default `rahf.data.tfrecord`); another version of
            the module, e.g. an old one, can be passed to check that the fuzz finds its bugs.
        time_limit_s (`float`, *optional*, defaults to 5): an input running longer is a hang.
    """

    def __init__(self, workdir: str | Path, *, tfrecord_module: Any = None, time_limit_s: float = 5.0) -> None:
        self.workdir = Path(workdir)
        self.tfrecord = tfrecord_module or _tfrecord
        self.time_limit_s = time_limit_s
        self._files = 0
        self.images = self.workdir / "images"
        self._make_images()
        self.image_bytes = (self.images / "img0.png").read_bytes()
        examples = [_tfrecord.encode_example(_example_features(f"u{i}", i)) for i in range(3)]
        self.examples = [*examples, _tfrecord.encode_example({"filename": b"only.jpg"}), b""]
        self.tfrecord_files = [
            b"".join(_tfrecord.frame_record(e) for e in examples),
            _tfrecord.frame_record(examples[0]),
            _tfrecord.frame_record(b"") + _tfrecord.frame_record(examples[1]),
            b"",
        ]
        records = _jsonl_records()
        self.jsonl_records = records
        self.jsonl_lines = [json.dumps(r).encode() for r in records]

    @classmethod
    @contextlib.contextmanager
    def in_temporary_folder(cls, **kwargs: Any) -> Iterator[Fuzzer]:
        """A fuzzer whose files live in a temporary folder, deleted afterwards."""
        with tempfile.TemporaryDirectory(prefix="rahf-fuzz-") as tmp:
            yield cls(tmp, **kwargs)

    def _make_images(self) -> None:
        images, outside = self.images, self.workdir / "outside"
        (images / "sub").mkdir(parents=True, exist_ok=True)
        outside.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(images / "img0.png")
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(images / "sub" / "img1.png")
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(outside / "secret.png")
        (images / "big.png").write_bytes(_png_header_only(100_000, 100_000))
        (images / "broken.png").write_bytes((images / "img0.png").read_bytes()[:60])
        (images / "notimage.png").write_text("not an image\n")
        for name, target in (
            ("inside.png", "img0.png"),
            ("outside.png", "../outside/secret.png"),
            ("loop.png", "loop.png"),
        ):
            link = images / name
            if not link.is_symlink():
                os.symlink(target, link)

    # -- inputs --------------------------------------------------------------------------------------------------

    def case(self, target: str, seed: int, index: int) -> _Case:
        """The input number `index` of `target` for `seed`: the same on every machine and run."""
        if target not in TARGETS:
            raise ValueError(f"`target` must be one of {list(TARGETS)}, got {target!r}")
        rng = random.Random(f"{target}/{seed}/{index}")
        options: dict[str, Any] = {}
        if target in ("tfrecord", "tfrecord_gzip"):
            return self._tfrecord_case(rng, target == "tfrecord_gzip", options)
        if target == "example":
            base, other = rng.choice(self.examples), rng.choice(self.examples)
            return _Case(_mutate_example(rng, base, other), options)
        return self._jsonl_case(rng, options)

    def _plain_mutation(self, rng: random.Random, options: dict[str, Any]) -> bytes:
        raw, other = rng.choice(self.tfrecord_files), rng.choice(self.tfrecord_files)
        roll = rng.random()
        if roll < 0.35:
            options["mutation"] = "length"
            raw = _overwrite_length(rng, raw, options)
            if rng.random() < 0.3:
                raw = _mutate_bytes(rng, raw, other, rounds=1)
        elif roll < 0.6:
            options["mutation"] = "record"
            raw = _remutate_record(rng, raw, rng.choice(self.examples), _mutate_example)
        else:
            options["mutation"] = "bytes"
            raw = _mutate_bytes(rng, raw, other)
        return raw

    def _tfrecord_case(self, rng: random.Random, gzipped: bool, options: dict[str, Any]) -> _Case:
        options["verify_crc"] = rng.random() < 0.8
        options["strict"] = rng.random() < 0.25
        if not gzipped:
            return _Case(self._plain_mutation(rng, options), options)
        if rng.random() < 0.7:
            data = gzip.compress(self._plain_mutation(rng, options), mtime=0)
            if rng.random() < 0.1:  # a second member, or trailing garbage
                data += gzip.compress(rng.choice(self.tfrecord_files), mtime=0) if rng.random() < 0.5 else b"\x00junk"
        else:
            options["mutation"] = "compressed bytes"
            plain = gzip.compress(rng.choice(self.tfrecord_files), mtime=0)
            data = plain[:2] + _mutate_bytes(rng, plain[2:], plain[2:])  # keep the magic: the gzip path is the target
        return _Case(data, options)

    def _jsonl_case(self, rng: random.Random, options: dict[str, Any]) -> _Case:
        lines = []
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            if roll < 0.55:
                lines.append(_substitute(rng, rng.choice(self.jsonl_records)).encode("utf-8", "surrogatepass"))
            elif roll < 0.9:
                base, other = rng.choice(self.jsonl_lines), rng.choice(self.jsonl_lines)
                lines.append(_mutate_bytes(rng, base, other))
            else:
                lines.append(rng.choice(self.jsonl_lines))
        separator = rng.choice((b"\n", b"\n", b"\r\n", b"\r", b"\n\n"))
        data = separator.join(lines) + rng.choice((b"", separator))
        if rng.random() < 0.05:
            data = b"\xef\xbb\xbf" + data
        return _Case(data, options)

    # -- running ---------------------------------------------------------------------------------------------------

    def run_case(self, target: str, case: _Case) -> str:
        """Runs one input; returns its outcome's name, or raises for a disallowed one (an `AssertionError` for a
        broken invariant, the error itself for a crash)."""
        if target == "jsonl":
            reports = _consolidate.check_annotation_lines(case.data, self.images)
            n_lines = len(io.TextIOWrapper(io.BytesIO(case.data), "utf-8", "replace", newline=None).readlines())
            for entry in reports:
                assert isinstance(entry["reason"], str) and entry["reason"], entry
                assert 1 <= entry["line"] <= max(n_lines, 1), (entry, n_lines)
            json.dumps(reports)  # the report file must be writable
            return "reported" if reports else "valid"
        if target == "example":
            return self._run_example(case.data)
        return self._run_tfrecord(target, case)

    def _run_example(self, data: bytes) -> str:
        try:
            self.tfrecord.decode_example(data)
        except ValueError:
            return "ValueError"
        record = _richhf._Record(order=0, split="train", file="train.tfrecord", index=0)
        _richhf._scan_item(data, record)
        if record.reason:
            return "skipped"
        try:
            _richhf._build_example(record, data, _PROMPT, self.image_bytes, "unit")
        except ValueError:
            return "skipped"
        return "value"

    def _run_tfrecord(self, target: str, case: _Case) -> str:
        # A fresh name each time: truncating a file that has data waits for a flush on ext4 (~3 ms an input).
        self._files += 1
        name = f"{self._files}-train.tfrecord" + (".gz" if target == "tfrecord_gzip" else "")
        path = self.workdir / name
        path.write_bytes(case.data)
        try:
            return self._read_tfrecord(path, case)
        finally:
            path.unlink()

    def _read_tfrecord(self, path: Path, case: _Case) -> str:
        tf = self.tfrecord
        verify = case.options["verify_crc"]
        items = list(tf.scan_tfrecords(path, verify_crc=verify))
        outcome = "records"
        for i, (offset, item) in enumerate(items):
            assert isinstance(offset, int) and offset >= 0, offset
            if isinstance(item, tf.TFRecordCorruption):
                outcome = _reason_class(item.reason)
                assert not item.fatal or i == len(items) - 1, "a fatal corruption must end the file"
                continue
            assert isinstance(item, bytes), type(item)
            _richhf._scan_item(item, _richhf._Record(order=i, split="train", file=path.name, index=i))
        offsets = [offset for offset, _ in items[:3]] + [len(case.data) // 2]
        for offset in offsets:
            try:
                assert isinstance(tf.read_tfrecord_at(path, offset, verify_crc=verify), bytes)
            except tf.TFRecordCorruptionError:
                pass
        if case.options["strict"]:
            try:
                list(tf.read_tfrecords(path, verify_crc=verify, strict=True))
            except tf.TFRecordCorruptionError:
                pass
        return outcome

    def run(
        self,
        target: str,
        inputs: int,
        seed: int,
        *,
        start: int = 0,
        progress: Callable[[int], None] | None = None,
        max_findings: int = 20,
    ) -> FuzzResult:
        """Runs inputs `start` .. `start + inputs - 1` of `target` for `seed`; `progress(1)` is called after each."""
        result = FuzzResult(target=target, seed=seed)
        loggers = [logging.getLogger(name) for name in ("rahf.data", getattr(self.tfrecord, "__name__", "rahf.data"))]
        levels = [logger.level for logger in loggers]
        for logger in loggers:  # a corrupt record is logged as a warning: 100,000 of them would drown the output
            logger.setLevel(logging.ERROR)
        began = time.perf_counter()
        try:
            for index in range(start, start + inputs):
                case = self.case(target, seed, index)
                kind, error, trace = None, "", ""
                t0 = time.perf_counter()
                try:
                    with _time_limit(self.time_limit_s):
                        outcome = self.run_case(target, case)
                except _Hang as err:
                    kind, error = "hang", str(err)
                except BaseException as err:  # every other escape is the finding the fuzz is for
                    if isinstance(err, KeyboardInterrupt):
                        raise
                    kind, error, trace = "crash", f"{type(err).__name__}: {str(err)[:500]}", traceback.format_exc()
                if kind is None and time.perf_counter() - t0 > self.time_limit_s:
                    kind, error = "hang", f"took {time.perf_counter() - t0:.1f} s"
                result.inputs += 1
                if kind is None:
                    result.outcomes[outcome] += 1
                else:
                    result.crashes += kind == "crash"
                    result.hangs += kind == "hang"
                    result.outcomes[kind] += 1
                    if len(result.findings) < max_findings:
                        result.findings.append(
                            Finding(target, seed, index, kind, error, trace, case.data, case.options)
                        )
                if progress is not None:
                    progress(1)
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            result.seconds = time.perf_counter() - began
        return result


def replay(target: str, seed: int, index: int, *, tfrecord_module: Any = None) -> str:
    """Reruns one input with nothing caught (its traceback shows); returns its outcome when it is allowed."""
    with Fuzzer.in_temporary_folder(tfrecord_module=tfrecord_module) as fuzzer:
        return fuzzer.run_case(target, fuzzer.case(target, seed, index))
