"""RichHF-18K conversion: official-format TFRecords + Pick-a-Pic (parquet or images folder) -> canonical set."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rahf.data.cli import main as data_main
from rahf.data.richhf import convert_richhf, split_from_filename, uid_from_filename
from rahf.data.schema import SCORE_NAMES, SPLITS, load_rich_feedback
from rahf.data.tfrecord import encode_example, frame_record, masked_crc32c, scan_tfrecords, write_tfrecords

PROMPTS = {
    "u0": "a red cat, on a mat",
    "u1": "two dogs playing",
    "u2": "a blue: car? yes",
    "u3": "sunset over the sea",
    "u4": "a tiny robot",
    "u5": "green apple",
}
# Written out by hand: the release splits on ,.?!":; and spaces.
WORDS = {
    "u0": ["a", "red", "cat", "on", "a", "mat"],
    "u1": ["two", "dogs", "playing"],
    "u2": ["a", "blue", "car", "yes"],
    "u3": ["sunset", "over", "the", "sea"],
    "u4": ["a", "tiny", "robot"],
    "u5": ["green", "apple"],
}


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _image(uid: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(uid.encode()))
    return rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _map(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)


def _record(uid: str, scores: tuple[float, float, float, float], seed: int, labels: str | None = None) -> dict:
    n_words = len(WORDS.get(uid, "abc"))
    if labels is None:
        labels = " ".join(str((seed + i) % 2) for i in range(n_words))
    return {
        "filename": f"{uid}.jpg".encode(),
        "artifact_score": [scores[0]],
        "misalignment_score": [scores[1]],
        "aesthetics_score": [scores[2]],
        "overall_score": [scores[3]],
        "artifact_map": [_png(_map(seed))],
        "misalignment_map": [_png(_map(seed + 100))],
        "prompt_misalignment_label": [labels.encode()],
    }


def _write_pickapic_parquet(folder: Path, uids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Pick-a-Pic rows are pairs of images of one caption; ours sit in either column, beside decoys, over two shards
    # of 2-row row groups, with an extra column that must not get in the way.
    rows = [(uid, f"decoy{i}") if i % 2 == 0 else (f"decoy{i}", uid) for i, uid in enumerate(uids)]
    for shard, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2 :])):
        captions = [PROMPTS.get(a, PROMPTS.get(b)) for a, b in chunk]
        table = pa.table(
            {
                "caption": captions,
                "image_0_uid": [a for a, _ in chunk],
                "image_1_uid": [b for _, b in chunk],
                "jpg_0": [_png(_image(a)) for a, _ in chunk],
                "jpg_1": [_png(_image(b)) for _, b in chunk],
                "label_0": [0.5] * len(chunk),
            }
        )
        pq.write_table(table, folder / f"train-{shard:05d}-of-00002.parquet", row_group_size=2)


def _write_images_folder(folder: Path, uids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for uid in uids:
        (folder / f"{uid}.png").write_bytes(_png(_image(uid)))
    with open(folder / "prompts.jsonl", "w") as f:
        for uid in uids:
            f.write(json.dumps({"uid": uid, "prompt": PROMPTS[uid]}) + "\n")
        f.write("not json\n")


LIKERT = {
    "u0": (1.0, 5.0, 3.0, 2.5),
    "u1": (4.0, 2.0, 1.5, 3.0),
    "u2": (2.0, 2.0, 2.0, 2.0),
    "u3": (5.0, 4.0, 3.25, 1.0),
    "u4": (3.0, 3.0, 3.0, 3.0),
    "u5": (1.0, 1.0, 1.0, 1.0),
}


def _check_converted(ds, records: dict[str, dict], split: str, uids: list[str], scale: str) -> None:
    rows = ds[split]
    assert rows["uid"] == uids
    for row in rows:
        uid = row["uid"]
        record = records[uid]
        assert row["prompt"] == PROMPTS[uid]
        np.testing.assert_array_equal(np.asarray(row["image"]), _image(uid))
        assert row["image"].mode == "RGB"
        for feature, column in (("artifact_map", "implausibility_map"), ("misalignment_map", "misalignment_map")):
            assert row[column].mode == "L"
            expected_map = np.asarray(Image.open(io.BytesIO(record[feature][0])))
            np.testing.assert_array_equal(np.asarray(row[column]), expected_map)
        raw = [record[f][0] for f in ("artifact_score", "misalignment_score", "aesthetics_score", "overall_score")]
        expected = [(s - 1) / 4 if scale == "likert" else s for s in raw]
        np.testing.assert_allclose([row[name] for name in SCORE_NAMES], expected, rtol=0, atol=1e-6)
        assert row["prompt_words"] == WORDS[uid]
        assert row["word_labels"] == [int(t) for t in record["prompt_misalignment_label"][0].decode().split()]


@pytest.fixture()
def release(tmp_path: Path) -> dict:
    """Three official-format files with one of each problem, and the records that should convert."""
    records = {uid: _record(uid, LIKERT[uid], seed=i) for i, uid in enumerate(PROMPTS)}
    tf = tmp_path / "tfrecords"
    tf.mkdir()
    train = [
        records["u0"],
        records["u1"],
        records["u2"],  # its data CRC gets corrupted below
        _record("missing", (3.0, 3.0, 3.0, 3.0), seed=9),  # no such Pick-a-Pic image
        {**_record("u3", LIKERT["u3"], seed=3), "prompt_misalignment_label": [b"1 1"]},  # 4 words, 2 labels
        {**records["u4"], "filename": [b"../../etc/u4.jpg"]},  # unsafe
    ]
    write_tfrecords(tf / "train.tfrecord", train)
    offsets = [offset for offset, _ in scan_tfrecords(tf / "train.tfrecord")]
    raw = bytearray((tf / "train.tfrecord").read_bytes())
    raw[offsets[2] + 40] ^= 0xFF
    (tf / "train.tfrecord").write_bytes(bytes(raw))
    write_tfrecords(tf / "dev.tfrecord", [records["u3"]])
    write_tfrecords(tf / "test.tfrecord", [records["u5"], records["u4"]])
    return {"dir": tmp_path, "tf": tf, "records": records}


def test_convert_parquet_source_checks_every_value_and_reports_every_skip(release: dict) -> None:
    root, tf, records = release["dir"], release["tf"], release["records"]
    _write_pickapic_parquet(root / "pickapic", list(PROMPTS))
    out = root / "out"
    report = convert_richhf([tf / "train.tfrecord", tf / "dev.tfrecord", tf / "test.tfrecord"], root / "pickapic", out)
    assert report["read"] == 9 and report["converted"] == 5
    assert report["read"] == report["converted"] + len(report["skipped"])
    assert report["score_scale"]["scale"] == "likert"
    reasons = {(s["split"], s["index"]): s for s in report["skipped"]}
    assert set(reasons) == {("train", 2), ("train", 3), ("train", 4), ("train", 5)}
    assert reasons[("train", 2)]["reason"] == "bad data CRC" and reasons[("train", 2)]["uid"] is None
    assert reasons[("train", 3)]["reason"].startswith("missing image") and reasons[("train", 3)]["uid"] == "missing"
    assert reasons[("train", 4)]["reason"] == "word/label count mismatch: 4 prompt words but 2 labels"
    assert reasons[("train", 5)]["reason"].startswith("unsafe file name") and "'..'" in reasons[("train", 5)]["reason"]
    assert json.loads((out / "conversion_report.json").read_text()) == report

    ds = load_rich_feedback(out)
    assert set(ds) == set(SPLITS)
    _check_converted(ds, records, "train", ["u0", "u1"], "likert")
    _check_converted(ds, records, "validation", ["u3"], "likert")
    _check_converted(ds, records, "test", ["u5", "u4"], "likert")  # TFRecord order, not parquet order


def test_convert_images_folder_source_and_unit_scale(tmp_path: Path) -> None:
    unit = {uid: tuple((s - 1) / 4 for s in LIKERT[uid]) for uid in PROMPTS}
    records = {uid: _record(uid, unit[uid], seed=i) for i, uid in enumerate(PROMPTS)}
    write_tfrecords(tmp_path / "richhf_train.tfrecord", [records[u] for u in ("u0", "u1", "u2")])
    write_tfrecords(tmp_path / "richhf_test.tfrecord", [records["u3"], records["u5"]])
    _write_images_folder(tmp_path / "images", ["u0", "u1", "u2", "u3"])  # no u5
    out = tmp_path / "out"
    status = data_main(
        [
            "convert-richhf",
            "--tfrecords",
            str(tmp_path / "richhf_train.tfrecord"),
            str(tmp_path / "richhf_test.tfrecord"),
            "--pickapic",
            str(tmp_path / "images"),
            "--out",
            str(out),
        ]
    )
    assert status == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["score_scale"]["scale"] == "unit"
    assert (report["read"], report["converted"]) == (5, 4)
    assert [(s["split"], s["index"], s["uid"]) for s in report["skipped"]] == [("test", 1, "u5")]
    assert report["skipped"][0]["reason"].startswith("missing image")
    ds = load_rich_feedback(out)
    _check_converted(ds, records, "train", ["u0", "u1", "u2"], "unit")
    _check_converted(ds, records, "test", ["u3"], "unit")
    assert len(ds["validation"]) == 0


def test_scale_detection_refuses_mixed_ranges_and_forced_scale_reports_outliers(tmp_path: Path) -> None:
    records = [_record("u0", (0.5, 0.5, 0.5, 0.5), seed=0), _record("u1", (4.0, 3.0, 2.0, 1.0), seed=1)]
    write_tfrecords(tmp_path / "train.tfrecord", records)
    _write_images_folder(tmp_path / "images", ["u0", "u1"])
    # 0.5 and 4.0: neither [0, 1] nor [1, 5].
    with pytest.raises(ValueError, match="score scale.*artifact_score: \\[0.5, 4\\].*score_scale"):
        convert_richhf([tmp_path / "train.tfrecord"], tmp_path / "images", tmp_path / "out")
    report = convert_richhf(
        [tmp_path / "train.tfrecord"], tmp_path / "images", tmp_path / "out2", score_scale="likert"
    )
    assert report["converted"] == 1
    assert report["skipped"][0]["uid"] == "u0" and report["skipped"][0]["reason"].startswith("score out of range")


def test_bad_length_crc_stops_only_that_file_and_is_reported(tmp_path: Path) -> None:
    records = [_record(uid, LIKERT[uid], seed=i) for i, uid in enumerate(PROMPTS)]
    write_tfrecords(tmp_path / "train.tfrecord", records[:3])
    write_tfrecords(tmp_path / "test.tfrecord", records[3:])
    offsets = [offset for offset, _ in scan_tfrecords(tmp_path / "train.tfrecord")]
    raw = bytearray((tmp_path / "train.tfrecord").read_bytes())
    raw[offsets[1] + 8 : offsets[1] + 12] = struct.pack("<I", 12345)
    (tmp_path / "train.tfrecord").write_bytes(bytes(raw))
    # An undecodable map in the test file.
    write_tfrecords(tmp_path / "test.tfrecord", [*records[3:5], {**records[5], "artifact_map": [b"not an image"]}])
    _write_images_folder(tmp_path / "images", list(PROMPTS))
    report = convert_richhf(
        [tmp_path / "train.tfrecord", tmp_path / "test.tfrecord"], tmp_path / "images", tmp_path / "out"
    )
    assert report["read"] == 2 + 3 and report["converted"] == 1 + 2
    skipped = {(s["split"], s["index"]): s["reason"] for s in report["skipped"]}
    assert skipped[("train", 1)] == "bad length CRC; the rest of the file is unreadable"
    assert skipped[("test", 2)].startswith("undecodable map: artifact_map")


def test_split_names_and_unsafe_file_names() -> None:
    assert split_from_filename("data/train.tfrecord") == "train"
    assert split_from_filename("dev.tfrecord") == "validation"
    assert split_from_filename("richhf_test.tfrecord.gz") == "test"
    with pytest.raises(ValueError, match="'trainer.tfrecord'.*dev.*test.*train"):
        split_from_filename("trainer.tfrecord")
    with pytest.raises(ValueError, match="several splits"):
        split_from_filename("train_test.tfrecord")
    assert uid_from_filename("abc-123.jpg") == ("abc-123", None)
    assert uid_from_filename("images/abc.png") == ("abc", None)
    for bad in ("../abc.jpg", "/etc/passwd", "a\x00b.jpg", "C:\\x.jpg", "a\\..\\b.jpg", "sp ace.jpg", ".."):
        uid, why = uid_from_filename(bad)
        assert uid is None and why, bad


def test_bad_arguments_fail_before_reading(tmp_path: Path) -> None:
    write_tfrecords(tmp_path / "misc.tfrecord", [_record("u0", LIKERT["u0"], seed=0)])
    with pytest.raises(ValueError, match="cannot tell the split"):
        convert_richhf([tmp_path / "misc.tfrecord"], tmp_path, tmp_path / "out")
    write_tfrecords(tmp_path / "train.tfrecord", [_record("u0", LIKERT["u0"], seed=0)])
    with pytest.raises(ValueError, match="is not a folder"):
        convert_richhf([tmp_path / "train.tfrecord"], tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither parquet shards nor a prompts.jsonl"):
        convert_richhf([tmp_path / "train.tfrecord"], tmp_path / "empty", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    _write_images_folder(tmp_path / "images", ["u0"])
    with pytest.raises(ValueError, match="not empty"):
        convert_richhf([tmp_path / "train.tfrecord"], tmp_path / "images", tmp_path / "busy")
    argv = ["convert-richhf", "--tfrecords", str(tmp_path / "misc.tfrecord"), "--pickapic", "x", "--out", "y"]
    assert data_main(argv) == 2  # a user mistake: one logged line, exit status 2


def _png_declaring(width: int, height: int) -> bytes:
    """A single-channel PNG whose header declares width x height pixels, with almost no data: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_hostile_records_and_files_are_skipped_records_never_a_crash(tmp_path: Path) -> None:
    records = {uid: _record(uid, LIKERT[uid], seed=i) for i, uid in enumerate(PROMPTS)}
    # train, gzip-compressed: two good records, then a header declaring 2**36 bytes with its length CRC right.
    huge = struct.pack("<Q", 2**36)
    tail = huge + struct.pack("<I", masked_crc32c(huge)) + b"only a few bytes"
    train = b"".join(frame_record(encode_example(records[uid])) for uid in ("u0", "u1")) + tail
    (tmp_path / "train.tfrecord.gz").write_bytes(gzip.compress(train))
    test = [
        {**records["u2"], "artifact_map": [_png_declaring(10_000, 10_000)]},  # 100 M pixels > the 40 M cap
        {**records["u3"], "artifact_score": [float("inf")]},
        records["u4"],  # its prompt has no words
        records["u5"],  # its image is a link out of the folder
    ]
    write_tfrecords(tmp_path / "test.tfrecord", test)
    folder = tmp_path / "images"
    _write_images_folder(folder, ["u0", "u1", "u2", "u3"])
    (folder / "u4.png").write_bytes(_png(_image("u4")))
    (tmp_path / "secret.png").write_bytes(_png(_image("u5")))
    (folder / "u5.png").symlink_to(tmp_path / "secret.png")
    with open(folder / "prompts.jsonl", "ab") as f:
        f.write(b'{"uid": "u4", "prompt": " , . "}\n{"uid": "u5", "prompt": "green apple"}\n')
        f.write(b"[" * 100_000 + b"\n" + b"9" * 5001 + b'\n{"uid": "\xff"}\n')  # bad lines: warnings only

    report = convert_richhf([tmp_path / "train.tfrecord.gz", tmp_path / "test.tfrecord"], folder, tmp_path / "out")
    assert (report["read"], report["converted"]) == (3 + 4, 2)
    assert report["score_scale"]["scale"] == "likert"  # the infinite score did not poison the detection
    skipped = {(s["split"], s["index"]): s["reason"] for s in report["skipped"]}
    assert skipped[("train", 2)] == (
        "record too large: its declared length of 68,719,476,736 bytes is more than the maximum record size of "
        "1,073,741,824 bytes (max_record_bytes); a damaged length field, or raise max_record_bytes if the record is "
        "genuine; the rest of the file is unreadable"
    )
    assert skipped[("test", 0)].startswith("undecodable map: artifact_map: ImageTooLargeError")
    assert "10000 x 10000 = 100,000,000 pixels" in skipped[("test", 0)]
    assert skipped[("test", 1)] == "bad score: artifact_score is inf"
    assert skipped[("test", 2)].startswith("empty prompt: the Pick-a-Pic prompt ' , . ' has no words")
    assert skipped[("test", 3)] == "unsafe image: 'u5.png' resolves outside the --pickapic folder"
    ds = load_rich_feedback(tmp_path / "out")
    assert ds["train"]["uid"] == ["u0", "u1"] and len(ds["test"]) == 0


ODD_PROMPTS = {
    "w0": "a red\ncat, on a mat",  # newline: 5 words in the release, 6 if split on any whitespace
    "w1": "two dogs\tplaying fetch",  # tab
    "w2": "a\u00a0tiny robot",  # non-breaking space
    "w3": "sunset\u3000over the sea",  # full-width space
}
ODD_WORDS = {
    "w0": ["a", "red\ncat", "on", "a", "mat"],
    "w1": ["two", "dogs\tplaying", "fetch"],
    "w2": ["a\u00a0tiny", "robot"],
    "w3": ["sunset\u3000over", "the", "sea"],
}


def test_records_with_unusual_whitespace_are_converted_not_skipped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(globals(), "PROMPTS", {**PROMPTS, **ODD_PROMPTS})
    monkeypatch.setitem(globals(), "WORDS", {**WORDS, **ODD_WORDS})
    records = {uid: _record(uid, (0.5, 0.5, 0.5, 0.5), seed=i) for i, uid in enumerate(ODD_PROMPTS)}
    write_tfrecords(tmp_path / "train.tfrecord", [records["w0"], records["w1"]])
    write_tfrecords(tmp_path / "test.tfrecord", [records["w2"], records["w3"]])
    _write_pickapic_parquet(tmp_path / "pickapic", list(ODD_PROMPTS))
    report = convert_richhf(tmp_path, tmp_path / "pickapic", tmp_path / "out")  # the folder, not the files
    assert (report["read"], report["converted"], report["skipped"]) == (4, 4, [])
    ds = load_rich_feedback(tmp_path / "out")
    _check_converted(ds, records, "train", ["w0", "w1"], "unit")
    _check_converted(ds, records, "test", ["w2", "w3"], "unit")


def test_report_counts_skips_per_reason_and_split(release: dict) -> None:
    root, tf = release["dir"], release["tf"]
    _write_pickapic_parquet(root / "pickapic", list(PROMPTS))
    report = convert_richhf([tf], root / "pickapic", root / "out")  # a folder: train, dev, test by file name
    assert report["read_by_split"] == {"train": 6, "validation": 1, "test": 2}
    assert report["splits"] == {"train": 2, "validation": 1, "test": 2}
    assert report["skip_reasons_by_split"] == {
        "train": {"bad data CRC": 1, "missing image": 1, "word/label count mismatch": 1, "unsafe file name": 1},
        "validation": {},
        "test": {},
    }
    assert sum(report["skip_reasons"].values()) == len(report["skipped"]) == 4


def test_tfrecords_folder_order_and_errors(tmp_path: Path) -> None:
    from rahf.data.richhf import expand_tfrecord_paths

    folder = tmp_path / "richhf-18k"
    folder.mkdir()
    for name in ("test.tfrecord", "dev.tfrecord", "train.tfrecord"):
        write_tfrecords(folder / name, [_record("u0", LIKERT["u0"], seed=0)])
    (folder / "README.md").write_text("not a record file")
    assert [p.name for p in expand_tfrecord_paths([folder])] == ["train.tfrecord", "dev.tfrecord", "test.tfrecord"]
    assert len(expand_tfrecord_paths([folder, folder / "dev.tfrecord"])) == 3  # the same file once
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no TFRecord files"):
        expand_tfrecord_paths([tmp_path / "empty"])
    with pytest.raises(ValueError, match="does not exist"):
        expand_tfrecord_paths([tmp_path / "nowhere"])
    (folder / "misc.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the split.*misc.tfrecord"):
        expand_tfrecord_paths([folder])


def test_git_lfs_pointer_file_gets_an_error_that_says_how_to_fetch_it(tmp_path: Path) -> None:
    pointer = (
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 9412345\n"
    )
    folder = tmp_path / "richhf-18k"
    folder.mkdir()
    (folder / "dev.tfrecord").write_text(pointer)
    write_tfrecords(folder / "train.tfrecord", [_record("u0", LIKERT["u0"], seed=0)])
    _write_images_folder(tmp_path / "images", ["u0"])
    with pytest.raises(ValueError, match=r"dev.tfrecord' is a Git LFS pointer file .*9,412,345 bytes.*git lfs pull"):
        convert_richhf([folder], tmp_path / "images", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    argv = ["convert-richhf", "--tfrecords", str(folder), "--pickapic", str(tmp_path / "images"), "--out", "o"]
    assert data_main(argv) == 2
