"""Consolidation of per-annotator annotations: disks, averaging, majority vote, scores, and invalid-line reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rahf.data.cli import main as data_main
from rahf.data.consolidate import CONSOLIDATED_FEATURES, consolidate, consolidate_records, disk_radius
from rahf.data.schema import SCORE_NAMES, SPLITS, load_rich_feedback, validate_dataset

WIDTH, HEIGHT = 48, 60  # radius = 60 / 20 = 3 pixels


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _line(uid: str = "img0", annotator: str = "a", **overrides) -> dict:
    line = {
        "uid": uid,
        "image": f"{uid}.png",
        "prompt": "a red cat on a mat",
        "split": "train",
        "annotator": annotator,
        "points": [],
        "misaligned_word_indices": [],
        "scores": {"plausibility": 3, "alignment": 3, "aesthetics": 3, "overall": 3},
    }
    line.update(overrides)
    return line


def _distances(x: float, y: float) -> np.ndarray:
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.sqrt((cols - x) ** 2 + (rows - y) ** 2)


def test_one_point_gives_a_disk_of_radius_height_over_20(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ["img0.png"])
    point = {"x": 20.0, "y": 31.5, "kind": "implausibility"}
    ds, invalid = consolidate_records([_line(points=[point])], images)
    assert invalid == []
    row = ds["train"][0]
    heat = np.asarray(row["implausibility_map"])
    assert heat.shape == (HEIGHT, WIDTH) and row["implausibility_map"].mode == "L"
    assert disk_radius(HEIGHT) == 3.0
    inside = _distances(20.0, 31.5) <= 3.0
    np.testing.assert_array_equal(heat == 255, inside)
    np.testing.assert_array_equal(heat == 0, ~inside)
    assert inside.sum() > 20  # a real disk: about pi * 3^2 pixels
    # The other heatmap has no point: empty.
    assert np.asarray(row["misalignment_map"]).max() == 0


def test_three_annotators_average_maps_scores_and_vote_on_words(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ["img0.png"])
    p1 = {"x": 10, "y": 10, "kind": "implausibility"}
    p2 = {"x": 35, "y": 45, "kind": "implausibility"}
    m1 = {"x": 24, "y": 30, "kind": "misalignment"}
    lines = [
        _line(
            annotator="a",
            points=[p1, m1],
            misaligned_word_indices=[1, 2],
            scores={"plausibility": 1, "alignment": 2, "aesthetics": 5, "overall": 4},
        ),
        _line(
            annotator="b",
            points=[p1, p2],
            misaligned_word_indices=[2],
            scores={"plausibility": 2, "alignment": 2, "aesthetics": 4, "overall": 4},
        ),
        _line(
            annotator="c",
            points=[],
            misaligned_word_indices=[2, 4, 1],
            scores={"plausibility": 3, "alignment": 5, "aesthetics": 3, "overall": 4.5},
        ),
    ]
    ds, invalid = consolidate_records(lines, images)
    assert invalid == []
    row = ds["train"][0]
    heat = np.asarray(row["implausibility_map"]).astype(int)
    near_p1, near_p2 = _distances(10, 10) <= 3, _distances(35, 45) <= 3
    assert (heat[near_p1] == round(2 / 3 * 255)).all()  # two of three annotators: 170
    assert (heat[near_p2] == round(1 / 3 * 255)).all()  # one of three (c marked nothing): 85
    assert (heat[~(near_p1 | near_p2)] == 0).all()
    mis = np.asarray(row["misalignment_map"]).astype(int)
    assert (mis[_distances(24, 30) <= 3] == 85).all() and mis.sum() == 85 * (_distances(24, 30) <= 3).sum()
    # Words "a red cat on a mat": index 1 marked by a and c (2/3), 2 by all, 4 by c only.
    assert row["prompt_words"] == ["a", "red", "cat", "on", "a", "mat"]
    assert row["word_labels"] == [1, 0, 0, 1, 1, 1]
    expected = {"plausibility": 2.0, "alignment": 3.0, "aesthetics": 4.0, "overall": 12.5 / 3}
    for name in SCORE_NAMES:
        assert row[name] == pytest.approx((expected[name] - 1) / 4, abs=1e-6)
    assert [a["annotator"] for a in row["annotator_scores"]] == ["a", "b", "c"]
    assert row["annotator_scores"][2]["overall"] == 4.5
    assert ds["train"].features == CONSOLIDATED_FEATURES


def test_majority_is_strict(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ["img0.png"])
    # Four annotators: 2 of 4 is no majority, 3 of 4 is.
    marks = [[0, 1], [0, 1], [1], []]
    lines = [_line(annotator=str(i), misaligned_word_indices=m) for i, m in enumerate(marks)]
    ds, _ = consolidate_records(lines, images)
    assert ds["train"][0]["word_labels"] == [1, 0, 1, 1, 1, 1]


def test_invalid_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ["img0.png", "img1.png", "sub/img2.png"])
    good = [json.dumps(_line(annotator="a")), json.dumps(_line(annotator="b"))]
    bad = {
        3: "{not json",
        4: json.dumps({k: v for k, v in _line(annotator="c").items() if k != "scores"}),
        5: json.dumps(_line(annotator="d", split="dev")),
        6: json.dumps(_line(annotator="e", points=[{"x": WIDTH, "y": 5, "kind": "implausibility"}])),
        7: json.dumps(_line(annotator="f", misaligned_word_indices=[6])),
        8: json.dumps(_line(annotator="g", scores={"plausibility": 6, "alignment": 3, "aesthetics": 3, "overall": 3})),
        9: json.dumps(_line(uid="nope", annotator="a")),  # no such image: its only line, so the image is reported too
        10: json.dumps(_line(annotator="h", prompt="another prompt")),
        11: json.dumps(_line(annotator="a")),  # a second line from annotator a
        12: json.dumps(_line(uid="img1", annotator="a", image="../img1.png")),
        13: json.dumps(_line(annotator="i", points=[{"x": 1, "y": 2, "kind": "blur"}])),
        14: "[1, 2]",
    }
    # Line 1 good, line 2 blank (skipped, still counted), line 3 good, then the bad lines 4..15 in order.
    lines = [good[0], "", good[1], *(bad[n] for n in sorted(bad))]
    (tmp_path / "ann.jsonl").write_text("\n".join(lines) + "\n")
    # A valid uid in another folder and split, to check the output as a whole.
    with open(tmp_path / "ann.jsonl", "a") as f:
        f.write(json.dumps(_line(uid="img2", annotator="z", image="sub/img2.png", split="test")) + "\n")
    report = consolidate(tmp_path / "ann.jsonl", images, tmp_path / "out")
    by_line = {entry["line"]: entry["reason"] for entry in report["invalid"] if entry["line"] is not None}
    expected_fragments = {
        4: "not valid JSON",
        5: "missing key(s) ['scores']",
        6: "'split' must be one of",
        7: "outside the 48x60 image",
        8: "out of range: the prompt has 6 words",
        9: "scores['plausibility'] must be a number in [1, 5]",
        10: "image not found",
        11: "'prompt' 'another prompt' differs",
        12: "annotator 'a' already annotated uid 'img0' on line 1",
        13: "unsafe image path '../img1.png'",
        14: "'kind' must be one of",
        15: "not a JSON object",
    }
    assert set(by_line) == set(expected_fragments)
    for line_no, fragment in expected_fragments.items():
        assert fragment in by_line[line_no], (line_no, by_line[line_no])
    image_level = [entry for entry in report["invalid"] if entry["line"] is None]
    assert [(e["uid"], "no valid annotator line" in e["reason"]) for e in image_level] == [
        ("nope", True),
        ("img1", True),
    ]
    assert report["lines"] == 15 and report["valid_lines"] == 3
    assert report["splits"] == {"train": 1, "validation": 0, "test": 1}
    saved = json.loads((tmp_path / "out" / "consolidation_report.json").read_text())
    assert saved == report
    ds = load_rich_feedback(tmp_path / "out")
    assert ds["train"]["uid"] == ["img0"] and ds["test"]["uid"] == ["img2"]
    assert len(ds["train"][0]["annotator_scores"]) == 2
    validate_dataset(ds)


def test_cli_consolidate_and_image_bytes_kept(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ["img0.png"])
    (tmp_path / "ann.jsonl").write_text(json.dumps(_line(split="validation")) + "\n")
    argv = ["consolidate", "--annotations", str(tmp_path / "ann.jsonl"), "--images", str(images)]
    assert data_main([*argv, "--out", str(tmp_path / "out")]) == 0
    ds = load_rich_feedback(tmp_path / "out")
    assert set(ds) == set(SPLITS) and len(ds["validation"]) == 1
    np.testing.assert_array_equal(
        np.asarray(ds["validation"][0]["image"]), np.asarray(Image.open(images / "img0.png"))
    )
    # The output folder now holds a data set: refused unless --overwrite.
    assert data_main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert data_main([*argv, "--out", str(tmp_path / "out"), "--overwrite"]) == 0


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels: a decompression bomb, refused from its header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_no_line_can_abort_the_run_each_is_reported(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ["img0.png", "sub/img1.png"])
    _images(tmp_path / "elsewhere", ["secret.png"])
    (images / "outside.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    (images / "inside.png").symlink_to(images / "sub" / "img1.png")
    (images / "bomb.png").write_bytes(_png_declaring(10_000, 10_000))  # 100 M pixels > the 40 M cap

    def raw_line(token: str, field: str, **overrides) -> bytes:
        marker = "@@TOKEN@@"
        return json.dumps(_line(**{**overrides, field: marker})).replace(f'"{marker}"', token).encode()

    many_points = [{"x": 1, "y": 1, "kind": "implausibility"}] * 1001
    lines = {
        1: json.dumps(_line(annotator="ok")).encode(),
        2: json.dumps(_line(annotator="b")).replace('"plausibility": 3', '"plausibility": 1e400').encode(),
        3: raw_line("9" * 5001, "annotator"),
        4: json.dumps(_line(annotator="d"))[:-1].encode() + b', "note": "caf\xe9"}',  # Latin-1, not UTF-8
        5: b"[" * 100_000 + b"]" * 100_000,
        6: raw_line("NaN", "annotator"),
        7: raw_line('"' + "x" * 1_000_001 + '"', "prompt", annotator="g"),  # beyond the default line cap
        8: json.dumps(_line(uid="out", annotator="h", image="outside.png")).encode(),
        9: json.dumps(_line(uid="in", annotator="i", image="inside.png")).encode(),
        10: json.dumps(_line(uid="empty", annotator="j", prompt="")).encode(),
        11: json.dumps(_line(uid="blank", annotator="k", prompt="   \t ")).encode(),
        12: json.dumps(_line(uid="nowords", annotator="l", prompt=", . ; ?!")).encode(),
        13: json.dumps(_line(uid="bomb", annotator="m", image="bomb.png")).encode(),
        14: raw_line('"\\ud800 cat"', "prompt", annotator="n"),
        15: json.dumps(_line(annotator="o", points=many_points)).encode(),
        16: raw_line("-Infinity", "annotator"),
        17: json.dumps(_line(annotator="q", points=[{"x": 10**400, "y": 1, "kind": "implausibility"}])).encode(),
        18: json.dumps(_line(uid="loop", annotator="r", image="loop.png")).encode(),
        19: json.dumps(_line(uid="long", annotator="s", image="x" * 300 + ".png")).encode(),
    }
    (images / "loop.png").symlink_to(images / "loop.png")
    (tmp_path / "ann.jsonl").write_bytes(b"\n".join(lines[n] for n in sorted(lines)) + b"\n")

    report = consolidate(tmp_path / "ann.jsonl", images, tmp_path / "out")
    by_line = {entry["line"]: entry["reason"] for entry in report["invalid"] if entry["line"] is not None}
    expected = {
        2: "number refused: the number 1e400 is beyond the range of a double",
        3: "number refused: an integer literal too long to convert",
        4: "not valid UTF-8: byte 0xe9",
        5: "JSON nested too deeply",
        6: "number refused: the literal NaN is not JSON",
        7: "more than the 1,000,000 accepted (max_line_chars)",
        8: "the image path 'outside.png' resolves outside --images",
        10: "'prompt' '' has no words",
        11: "'prompt' '   \\t ' has no words",
        12: "'prompt' ', . ; ?!' has no words",
        13: "10000 x 10000 = 100,000,000 pixels, more than the cap of 40,000,000",
        14: "is not valid Unicode (a lone surrogate)",
        15: "'points' holds 1,001 points, more than the 1000 accepted",
        16: "number refused: the literal -Infinity is not JSON",
        17: "'x' and 'y' must be finite numbers",
        18: "unusable image path 'loop.png'",
        19: "unusable image path",
    }
    assert set(by_line) == set(expected), by_line
    for line_no, fragment in expected.items():
        assert fragment in by_line[line_no], (line_no, by_line[line_no])
    # Lines 1 (img0) and 9 (a link that stays inside --images) are kept.
    assert report["lines"] == 19 and report["valid_lines"] == 2
    ds = load_rich_feedback(tmp_path / "out")
    assert sorted(ds["train"]["uid"]) == ["img0", "in"]
    inside = ds["train"][ds["train"]["uid"].index("in")]["image"]
    np.testing.assert_array_equal(np.asarray(inside), np.asarray(Image.open(images / "sub" / "img1.png")))
    saved = json.loads((tmp_path / "out" / "consolidation_report.json").read_text())
    assert saved == report


def test_cli_line_cap_and_pixel_cap_are_settable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images(tmp_path / "images", ["img0.png", "img1.png"])
    long_prompt = "a red cat on a mat " + "very " * 100  # a line of ~750 characters; the other has ~250
    lines = [json.dumps(_line(prompt=long_prompt)), json.dumps(_line(uid="img1"))]
    (tmp_path / "ann.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["consolidate", "--annotations", str(tmp_path / "ann.jsonl"), "--images", str(images)]
    assert data_main([*argv, "--out", str(tmp_path / "out"), "--max_line_chars", "400"]) == 0
    report = json.loads((tmp_path / "out" / "consolidation_report.json").read_text())
    assert [(e["line"], "more than the 400 accepted" in e["reason"]) for e in report["invalid"]] == [(1, True)]
    assert report["valid_lines"] == 1
    # The pixel cap of rahf.image_io (48 x 60 = 2,880 pixels here) is the one consolidation applies.
    monkeypatch.setenv("RAHF_MAX_IMAGE_PIXELS", "2000")
    assert data_main([*argv, "--out", str(tmp_path / "out2")]) == 0
    report = json.loads((tmp_path / "out2" / "consolidation_report.json").read_text())
    reasons = [e["reason"] for e in report["invalid"] if e["line"] is not None]
    assert len(reasons) == 2 and all("48 x 60 = 2,880 pixels, more than the cap of 2,000" in r for r in reasons)
    assert report["images"] == 0
    assert data_main([*argv, "--out", str(tmp_path / "out3"), "--max_line_chars", "0"]) == 2  # a usage mistake
