"""Label Studio interchange: the config's controls, and an export in Label Studio's format -> JSONL -> consolidate."""

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from rahf.data.cli import main as data_main
from rahf.data.consolidate import consolidate
from rahf.data.label_studio import LABEL_CONFIG, from_label_studio, image_path_of
from rahf.data.schema import load_rich_feedback
from rahf.keywords import prompt_word_spans, split_prompt_words

EXPORT = Path(__file__).parent / "fixtures" / "label_studio_export.json"


def test_config_names_the_controls_the_converter_reads():
    root = ET.fromstring(LABEL_CONFIG)
    [points] = root.iter("KeyPointLabels")
    assert points.get("name") == "points" and points.get("toName") == "image"
    assert [label.get("value") for label in points] == ["implausibility", "misalignment"]
    [words] = root.iter("Labels")
    assert words.get("name") == "words" and [label.get("value") for label in words] == ["misaligned"]
    [text] = root.iter("Text")
    assert words.get("toName") == text.get("name") == "prompt" and text.get("value") == "$prompt"
    [image] = root.iter("Image")
    assert image.get("name") == "image" and image.get("value") == "$image"
    ratings = {r.get("name"): r.get("maxRating") for r in root.iter("Rating")}
    assert ratings == {"plausibility": "5", "alignment": "5", "aesthetics": "5", "overall": "5"}


def test_config_command(tmp_path, capsys):
    assert data_main(["label-studio-config"]) == 0
    assert capsys.readouterr().out == LABEL_CONFIG
    assert data_main(["label-studio-config", "--out", str(tmp_path / "c.xml")]) == 0
    assert (tmp_path / "c.xml").read_text() == LABEL_CONFIG


def test_word_spans_match_the_word_split():
    prompt = ' "a red, cat" on  a blue-ish sofa. '
    assert [prompt[s:e] for s, e in prompt_word_spans(prompt)] == split_prompt_words(prompt)


def test_image_paths():
    assert image_path_of("/data/local-files/?d=gen%2Fdog.png") == "gen/dog.png"
    assert image_path_of("/data/upload/3/8f2a1c3e-cat.png") == "8f2a1c3e-cat.png"
    assert image_path_of("https://example.com/a/b%20c.jpg?x=1") == "b c.jpg"


def test_export_to_jsonl(tmp_path):
    out = tmp_path / "annotations.jsonl"
    report = from_label_studio(EXPORT, out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["tasks"] == 2 and report["lines"] == 3 == len(lines)
    first, second, dog = lines
    assert first["uid"] == "ls-11" and first["image"] == "8f2a1c3e-cat.png" and first["split"] == "train"
    assert first["annotator"] == "1" and first["prompt"] == "a red cat, on a blue sofa"
    # percentages of a 200 x 100 image -> pixels; 100% is the last pixel, inside the image
    assert first["points"][0] == {"x": 50.0, "y": 50.0, "kind": "implausibility"}
    assert first["points"][1]["kind"] == "misalignment" and first["points"][1]["y"] == 10.0
    assert first["points"][1]["x"] < 200 and math.isclose(first["points"][1]["x"], 200)
    # "red" (chars 2-5) and "blue sofa" (16-25) -> words 1, 5 and 6
    assert first["misaligned_word_indices"] == [1, 5, 6]
    assert first["scores"] == {"plausibility": 2, "alignment": 3, "aesthetics": 4, "overall": 3}
    assert second["annotator"] == "2" and second["points"] == [] and second["misaligned_word_indices"] == []
    assert dog["uid"] == "dog-1" and dog["split"] == "test" and dog["image"] == "gen/dog.png"
    assert dog["annotator"] == "ann@example.com" and dog["points"] == [
        {"x": 32.0, "y": 12.0, "kind": "implausibility"}
    ]
    reasons = sorted(r.split(": ", 1)[1] for r in report["skipped"])
    assert reasons[0] == "cancelled" and len(reasons) == 3
    assert all("no rating for" in r for r in reasons[1:])


def test_export_consolidates(tmp_path):
    images = tmp_path / "images"
    (images / "gen").mkdir(parents=True)
    Image.new("RGB", (200, 100), "white").save(images / "8f2a1c3e-cat.png")
    Image.new("RGB", (64, 48), "grey").save(images / "gen" / "dog.png")
    out = tmp_path / "annotations.jsonl"
    assert data_main(["from-label-studio", str(EXPORT), "--out", str(out), "--images", str(images)]) == 0
    report = consolidate(out, images, tmp_path / "data")
    assert report["invalid"] == [] and report["valid_lines"] == 3
    ds = load_rich_feedback(tmp_path / "data")
    [cat] = ds["train"]
    # two annotators: scores averaged then mapped to [0, 1]; "red" marked by one of two is not a majority
    assert cat["plausibility"] == pytest.approx(((2 + 5) / 2 - 1) / 4)
    assert ds["test"][0]["overall"] == pytest.approx(0.0)


def test_bad_exports(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        from_label_studio(tmp_path / "missing.json", tmp_path / "o.jsonl")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        from_label_studio(tmp_path / "bad.json", tmp_path / "o.jsonl")
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list of tasks"):
        from_label_studio(tmp_path / "nums.json", tmp_path / "o.jsonl")
    task = json.loads(EXPORT.read_text())[0]
    for result in task["annotations"][0]["result"][:2]:
        del result["original_width"]
    (tmp_path / "nosize.json").write_text(json.dumps([task]))
    report = from_label_studio(tmp_path / "nosize.json", tmp_path / "o.jsonl")
    assert report["lines"] == 1 and any("--images" in r for r in report["skipped"])


def test_malformed_results_are_skipped_with_their_reason(tmp_path):
    task = json.loads(EXPORT.read_text())[0]
    del task["annotations"][0]["result"][0]["value"]["x"]  # a keypoint without x
    task["annotations"][1]["result"][0]["value"] = "five"  # a rating that is not an object
    task["annotations"].append("not an annotation")
    (tmp_path / "bad.json").write_text(json.dumps([task]))
    report = from_label_studio(tmp_path / "bad.json", tmp_path / "o.jsonl")
    assert report["lines"] == 0
    reasons = " | ".join(report["skipped"])
    assert "a malformed result (KeyError" in reasons and "not an object" in reasons
