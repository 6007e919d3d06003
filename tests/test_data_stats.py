"""`rahf data stats`: stats.json values and the Fig. 2 / Fig. 4 PNGs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from PIL import Image

from rahf.data.consolidate import CONSOLIDATED_FEATURES
from rahf.data.schema import SCORE_NAMES
from rahf.data.stats import FIG2_NAME, FIG4_NAME, compute_stats, write_stats
from rahf.data.synth import SynthConfig, generate_synthetic


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "synth"
    generate_synthetic(out, SynthConfig(num_train=12, num_validation=4, num_test=4, image_size=64))
    return out


def _check_png(path) -> None:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 400 and img.height >= 200
        pixels = np.asarray(img.convert("L"))
        assert pixels.std() > 5  # something is drawn


def test_write_stats_on_a_synthetic_set(synth_dir, tmp_path):
    stats = write_stats(synth_dir, tmp_path / "stats")
    on_disk = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert stats["figures"] == {"fig2": FIG2_NAME, "fig4": FIG4_NAME}
    _check_png(tmp_path / "stats" / FIG2_NAME)
    _check_png(tmp_path / "stats" / FIG4_NAME)

    assert list(stats["splits"]) == ["train", "validation", "test"]
    for split, n in (("train", 12), ("validation", 4), ("test", 4)):
        entry = stats["splits"][split]
        assert entry["count"] == n
        for name in SCORE_NAMES:
            s = entry["scores"][name]
            assert 0 <= s["min"] <= s["quantiles"]["q25"] <= s["quantiles"]["q50"] <= s["quantiles"]["q75"] <= s["max"]
            assert s["min"] <= s["mean"] <= s["max"] and s["std"] >= 0
            assert s["mean_likert"] == pytest.approx(s["mean"] * 4 + 1)
            assert sum(s["histogram"]["counts"]) == n
        for heat in entry["heatmaps"].values():
            assert (
                0 <= heat["nonempty_share"] <= 1 and 0 <= heat["mean_coverage"] <= heat["mean_coverage_nonempty"] <= 1
            )
        assert 0 <= entry["words"]["misaligned_share"] <= entry["words"]["images_with_misaligned_share"] <= 1
        agreement = entry["annotator_agreement"]
        assert agreement["source"] == "column 'annotator_scores'" and agreement["mean_annotators"] == 3
        for name in SCORE_NAMES:
            diff = agreement["max_diff"][name]
            assert sum(diff["counts"].values()) == n
            assert 0 <= diff["share_perfect"] <= diff["share_le_0.25"] <= 1


def _map(pixels: list[list[int]]) -> Image.Image:
    return Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L")


def _known_set() -> DatasetDict:
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    empty = _map([[0] * 4] * 4)
    quarter = _map([[255, 255, 0, 0], [255, 255, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    full = _map([[128] * 4] * 4)

    def scores(p, a, s, o):
        return [
            {"annotator": f"a{k}", "plausibility": p[k], "alignment": a[k], "aesthetics": s[k], "overall": o[k]}
            for k in range(3)
        ]

    rows = {
        "uid": ["u0", "u1", "u2"],
        "image": [rgb, rgb, rgb],
        "prompt": ["a red cat", "a red cat", "a red cat"],
        "plausibility": [0.0, 0.5, 1.0],
        "alignment": [1.0, 1.0, 1.0],
        "aesthetics": [0.25, 0.25, 0.25],
        "overall": [0.5, 0.5, 0.5],
        "implausibility_map": [quarter, empty, full],
        "misalignment_map": [empty, empty, empty],
        "prompt_words": [["a", "red", "cat"]] * 3,
        "word_labels": [[1, 0, 1], [1, 1, 1], [0, 0, 1]],
        "annotator_scores": [
            scores([1, 1, 1], [5, 5, 5], [2, 2, 2], [3, 3, 3]),  # max diff 0
            scores([2, 3, 4], [5, 5, 5], [2, 2, 2], [3, 3, 3]),  # 2 Likert points = 0.5
            scores([5, 4, 5], [5, 5, 5], [1, 2, 5], [3, 3, 3]),  # 0.25; aesthetics 4 points = 1.0
        ],
    }
    return DatasetDict({"train": Dataset.from_dict(rows, features=CONSOLIDATED_FEATURES)})


def test_compute_stats_known_values():
    entry = compute_stats(_known_set())["splits"]["train"]
    plaus = entry["scores"]["plausibility"]
    assert plaus["mean"] == pytest.approx(0.5) and plaus["std"] == pytest.approx(np.std([0, 0.5, 1]))
    assert plaus["quantiles"]["q50"] == pytest.approx(0.5)
    counts = plaus["histogram"]["counts"]
    assert counts[0] == counts[6] == counts[12] == 1 and sum(counts) == 3  # bins of width 1/12, centred on k/12
    assert entry["scores"]["aesthetics"]["mean_likert"] == pytest.approx(2.0)

    imp = entry["heatmaps"]["implausibility"]
    assert imp["nonempty_share"] == pytest.approx(2 / 3)
    assert imp["mean_coverage"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert imp["mean_coverage_nonempty"] == pytest.approx((0.25 + 1) / 2)
    assert imp["mean_heat"] == pytest.approx((0.25 + 0 + 128 / 255) / 3)
    assert entry["heatmaps"]["misalignment"]["nonempty_share"] == 0

    assert entry["words"] == {
        "total": 9,
        "misaligned": 3,
        "misaligned_share": pytest.approx(1 / 3),
        "images_with_misaligned_share": pytest.approx(2 / 3),
    }

    diff = entry["annotator_agreement"]["max_diff"]
    assert diff["plausibility"]["counts"] == {"0.00": 1, "0.25": 1, "0.50": 1, "0.75": 0, "1.00": 0}
    assert diff["plausibility"]["share_perfect"] == pytest.approx(1 / 3)
    assert diff["plausibility"]["share_le_0.25"] == pytest.approx(2 / 3)
    assert diff["plausibility"]["mean"] == pytest.approx(0.25)
    assert diff["alignment"]["counts"]["0.00"] == 3
    assert diff["aesthetics"]["counts"] == {"0.00": 2, "0.25": 0, "0.50": 0, "0.75": 0, "1.00": 1}


def test_raw_annotations_fallback_and_no_annotator_scores(synth_dir, tmp_path):
    with_column = compute_stats(DatasetDict.load_from_disk(str(synth_dir)))

    # The same set without the per-annotator column, beside its raw annotations: Fig. 4 from the JSONL.
    stripped = tmp_path / "stripped"
    DatasetDict.load_from_disk(str(synth_dir)).remove_columns("annotator_scores").save_to_disk(str(stripped))
    (stripped / "raw").mkdir()
    shutil.copy(synth_dir / "raw" / "annotations.jsonl", stripped / "raw" / "annotations.jsonl")
    stats = write_stats(stripped, tmp_path / "out_raw")
    for split, entry in stats["splits"].items():
        agreement = entry["annotator_agreement"]
        assert agreement["source"].endswith("annotations.jsonl")
        assert agreement["max_diff"] == with_column["splits"][split]["annotator_agreement"]["max_diff"]
    _check_png(tmp_path / "out_raw" / FIG4_NAME)

    # Neither: no Fig. 4, and stats.json says so.
    (stripped / "raw" / "annotations.jsonl").unlink()
    stats = write_stats(stripped, tmp_path / "out_none")
    assert all(entry["annotator_agreement"] is None for entry in stats["splits"].values())
    assert "fig4" not in stats["figures"] and not (tmp_path / "out_none" / FIG4_NAME).exists()
    _check_png(tmp_path / "out_none" / FIG2_NAME)


def test_stats_rejects_a_folder_without_a_data_set(tmp_path):
    with pytest.raises(ValueError, match="DatasetDict"):
        write_stats(tmp_path, tmp_path / "out")


def test_cli_stats(synth_dir, tmp_path):
    from rahf.data.cli import main

    assert main(["stats", str(synth_dir), "--out", str(tmp_path / "cli")]) == 0
    stats = json.loads((tmp_path / "cli" / "stats.json").read_text())
    assert stats["splits"]["train"]["count"] == 12
    assert main(["stats", str(tmp_path / "missing"), "--out", str(tmp_path / "cli2")]) == 2  # a one-line error
