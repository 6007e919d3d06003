"""The synthetic rich-feedback set: planted flaws become the right heatmaps, words and scores; it is deterministic."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from rahf.data.schema import SCORE_NAMES, load_rich_feedback, validate_dataset
from rahf.data.synth import (
    COLOURS,
    COUNT_WORDS,
    MISALIGNMENT_KINDS,
    RELATIONS,
    SHAPES,
    SynthConfig,
    decode_rle,
    encode_rle,
    generate_synthetic,
    load_ground_truth,
    render_example,
)

SIZE = 64
SMALL = dict(num_train=40, num_validation=4, num_test=4, image_size=SIZE, artifact_rate=0.6, misalignment_rate=0.6)


def _examples(dd) -> dict[str, dict]:
    return {ex["uid"]: ex for split in dd for ex in dd[split]}


def _map(ex: dict, column: str) -> np.ndarray:
    return np.asarray(ex[column], dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "noisy"
    dd = generate_synthetic(out, SynthConfig(**SMALL, seed=0))
    return out, dd, load_ground_truth(out)


@pytest.fixture(scope="module")
def perfect(tmp_path_factory):
    # Same seed, perfect annotators: the same scenes (annotators have their own random stream), exact labels.
    out = tmp_path_factory.mktemp("synth") / "perfect"
    dd = generate_synthetic(out, SynthConfig(**SMALL, seed=0, annotator_noise=0.0))
    return out, dd, load_ground_truth(out)


def test_set_is_canonical_and_complete(noisy):
    out, dd, truth = noisy
    validate_dataset(dd)
    loaded = load_rich_feedback(out)
    assert {k: len(v) for k, v in loaded.items()} == {"train": 40, "validation": 4, "test": 4}
    ex = loaded["train"][0]
    assert ex["image"].mode == "RGB" and ex["image"].size == (SIZE, SIZE)
    for column in ("implausibility_map", "misalignment_map"):
        assert ex[column].mode == "L" and ex[column].size == (SIZE, SIZE)
    assert len(ex["annotator_scores"]) == 3

    lines = (out / "raw" / "annotations.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 48
    per_uid: dict[str, set] = {}
    for line in lines:
        record = json.loads(line)
        per_uid.setdefault(record["uid"], set()).add(record["annotator"])
        assert (out / "raw" / "images" / record["image"]).is_file()
        assert all(1 <= v <= 5 and float(v).is_integer() for v in record["scores"].values())  # the Likert grid
    assert set(per_uid) == set(truth) == set(_examples(dd))
    assert all(len(annotators) == 3 for annotators in per_uid.values())
    assert json.loads((out / "consolidation_report.json").read_text())["invalid"] == []


def test_word_swap_groups_cover_the_words_that_scenes_get_wrong(noisy):
    from rahf.data.training import load_word_swap_groups

    out, _, truth = noisy
    groups = load_word_swap_groups(out / "word_swap_groups.json")
    group_of = {w: g for g, words in groups.items() for w in words}
    kinds = {"colour": {"colour"}, "shape": {"shape", "shapes"}, "count": {"count"}}
    checked = 0
    for record in truth.values():
        for m in record["misalignments"]:
            if m["kind"] in kinds:
                assert all(group_of.get(record["prompt_words"][i]) in kinds[m["kind"]] for i in m["word_indices"])
                checked += 1
    assert checked > 5


def test_perfect_annotators_reproduce_the_planted_truth(perfect):
    _, dd, truth = perfect
    examples = _examples(dd)
    n_artifacts = n_misalignments = 0
    for uid, ex in examples.items():
        gt = truth[uid]
        for column, key, flaws in (
            ("implausibility_map", "artifact_mask", gt["artifacts"]),
            ("misalignment_map", "misalignment_mask", gt["misalignments"]),
        ):
            heat = _map(ex, column)
            if gt[key] is None:
                assert heat.max() == 0, f"{uid}: {column} has heat but nothing was planted"
                continue
            # Every planted flaw is marked by all three annotators...
            for flaw in flaws:
                mask = decode_rle(flaw["mask"])
                assert heat[mask].max() == 1.0, f"{uid}: {flaw['kind']} at {flaw['box']} not marked"
                assert (heat[mask] > 0).mean() > 0.1
            # ...and no heat lies farther from the flaws than a disk's radius.
            r = math.ceil(SIZE / 20) + 1
            near = cv2.dilate(decode_rle(gt[key]).astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8))
            assert heat[near == 0].max() == 0, f"{uid}: {column} has heat away from the planted flaws"
        n_artifacts += len(gt["artifacts"])
        n_misalignments += len(gt["misalignments"])
        zeros = [i for i, label in enumerate(ex["word_labels"]) if label == 0]
        assert zeros == gt["misaligned_word_indices"], (uid, ex["prompt"], gt["misalignments"])
        for name in SCORE_NAMES:
            expected = (np.clip(np.round(gt["true_scores"][name]), 1, 5) - 1) / 4
            assert ex[name] == pytest.approx(expected, abs=1e-6), (uid, name)
    assert n_artifacts >= 10 and n_misalignments >= 10  # the checks above saw both kinds of flaw


def test_noisy_annotators_cover_the_planted_flaws(noisy):
    _, dd, truth = noisy
    covered, inside, outside = [], [], []
    marked, spurious, n_words = [], 0, 0
    for uid, ex in _examples(dd).items():
        gt = truth[uid]
        for column, key, flaws in (
            ("implausibility_map", "artifact_mask", gt["artifacts"]),
            ("misalignment_map", "misalignment_mask", gt["misalignments"]),
        ):
            heat = _map(ex, column)
            if gt[key] is None:
                assert heat.max() == 0, f"{uid}: simulated annotators never mark a flaw that is not there"
                continue
            union = decode_rle(gt[key])
            inside.append(heat[union].mean())
            outside.append(heat[~union].mean())
            covered += [heat[decode_rle(f["mask"])].max() > 0 for f in flaws]
        labels = ex["word_labels"]
        marked += [labels[i] == 0 for i in gt["misaligned_word_indices"]]
        spurious += sum(1 for i, v in enumerate(labels) if v == 0 and i not in gt["misaligned_word_indices"])
        n_words += len(labels)
    assert len(covered) >= 20
    assert np.mean(covered) >= 0.9  # a flaw stays unmarked only when all three annotators miss it
    assert np.mean(inside) > 10 * np.mean(outside)
    assert np.mean(marked) >= 0.85  # majority vote of three
    assert spurious / n_words < 0.02


def test_misaligned_words_name_the_altered_attribute():
    # Render only (no annotators), every image misaligned, no artifacts to disturb the colours.
    config = SynthConfig(image_size=SIZE, artifact_rate=0.0, misalignment_rate=1.0, seed=3)
    kinds = set()
    for index in range(60):
        image, gt = render_example("train", index, config)
        words, groups = gt["prompt_words"], gt["groups"]
        painted = [o for o in gt["objects"] if o["painted"]]

        # Every painted object is drawn in the colour the ground truth says (read back from the pixels).
        for obj in painted:
            x, y = (int(round(v)) for v in obj["center"])
            pixel = image[y, x].astype(np.float32) / 255.0
            nearest = min(COLOURS, key=lambda c: np.linalg.norm(np.asarray(COLOURS[c]) - pixel))
            assert nearest == obj["colour"], (index, gt["prompt"], obj)

        assert gt["misalignments"], "misalignment_rate=1 must plant a misalignment"
        flagged = set()
        for m in gt["misalignments"]:
            kinds.add(m["kind"])
            flagged.update(m["word_indices"])
            if m["kind"] == "relation":
                (idx,) = m["word_indices"]
                assert words[idx] == RELATIONS[gt["relation"]][0][0]
                assert gt["rendered_relation"] == RELATIONS[gt["relation"]][1]
                continue
            g = m["group"]
            group, roles = groups[g], groups[g]["word_indices"]
            mine = [o for o in painted if o["group"] == g]
            if m["kind"] == "colour":
                assert m["word_indices"] == [roles["colour"]] and words[roles["colour"]] == group["colour"]
                assert any(o["colour"] == m["rendered"] != group["colour"] for o in mine)
            elif m["kind"] == "shape":
                assert m["word_indices"] == [roles["noun"]]
                assert words[roles["noun"]] in (group["shape"], SHAPES[group["shape"]])
                assert any(o["shape"] == m["rendered"] != group["shape"] for o in mine)
            elif m["kind"] == "count":
                assert m["word_indices"] == [roles["count"]] and words[roles["count"]] == COUNT_WORDS[group["count"]]
                assert len(mine) == m["rendered"] != group["count"]
            elif m["kind"] == "missing":
                assert m["word_indices"] == [roles["colour"], roles["noun"]] and not mine
            # The flaw's region is where the object is, or would have been.
            assert m["mask_array"].any()
        assert sorted(flagged) == gt["misaligned_word_indices"]

        # Attributes that no misalignment touched are drawn as the prompt says.
        for g, group in enumerate(groups):
            touched = {m["kind"] for m in gt["misalignments"] if m["group"] == g}
            mine = [o for o in painted if o["group"] == g]
            if "colour" not in touched and "missing" not in touched:
                assert all(o["colour"] == group["colour"] for o in mine)
            if "shape" not in touched and "missing" not in touched:
                assert all(o["shape"] == group["shape"] for o in mine)
            if not touched & {"count", "missing"}:
                assert len(mine) == group["count"]
    assert kinds == {"colour", "shape", "count", "missing", "relation"}


def test_scores_drop_with_flaws(noisy):
    _, dd, truth = noisy
    examples = _examples(dd)
    with_artifacts = [ex["plausibility"] for uid, ex in examples.items() if truth[uid]["artifacts"]]
    without_artifacts = [ex["plausibility"] for uid, ex in examples.items() if not truth[uid]["artifacts"]]
    assert np.mean(with_artifacts) < np.mean(without_artifacts) - 0.15
    misaligned = [ex["alignment"] for uid, ex in examples.items() if truth[uid]["misalignments"]]
    aligned = [ex["alignment"] for uid, ex in examples.items() if not truth[uid]["misalignments"]]
    assert np.mean(misaligned) < np.mean(aligned) - 0.15
    # More artifacts, lower plausibility (latent scores, before annotator noise).
    n = np.array([len(t["artifacts"]) for t in truth.values()])
    plausibility = np.array([t["true_scores"]["plausibility"] for t in truth.values()])
    assert np.corrcoef(n, plausibility)[0, 1] < -0.7


def test_scenes_do_not_depend_on_annotators(noisy, perfect):
    for split, index in (("train", 0), ("train", 17), ("test", 3)):
        uid = f"synth-{split}-{index:05d}"
        a = (noisy[0] / "raw" / "images" / f"{uid}.png").read_bytes()
        b = (perfect[0] / "raw" / "images" / f"{uid}.png").read_bytes()
        assert a == b


def _snapshot(out) -> dict[str, bytes]:
    raw = out / "raw"
    files = {p.name: p.read_bytes() for p in sorted((raw / "images").iterdir())}
    files.update({name: (raw / name).read_bytes() for name in ("annotations.jsonl", "ground_truth.jsonl")})
    return files


def test_deterministic_for_a_seed(tmp_path):
    config = dict(num_train=6, num_validation=2, num_test=2, image_size=SIZE)
    generate_synthetic(tmp_path / "a", SynthConfig(**config, seed=5))
    generate_synthetic(tmp_path / "b", SynthConfig(**config, seed=5))
    generate_synthetic(tmp_path / "c", SynthConfig(**config, seed=6))
    a, b, c = (_snapshot(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations.jsonl"] != c["annotations.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) >= 8


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (64, 64)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(0)
    for mask in (np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.3):
        rle = encode_rle(mask)
        assert sum(rle["counts"]) == mask.size and rle["size"] == list(shape)
        np.testing.assert_array_equal(decode_rle(rle), mask)
    # COCO convention: column-major runs, starting with zeros.
    assert encode_rle(np.array([[1, 0], [1, 1]], bool))["counts"] == [0, 2, 1, 1]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"image_size": 16}, "image_size"),
        ({"artifact_rate": 1.5}, "artifact_rate"),
        ({"misalignment_rate": -0.1}, "misalignment_rate"),
        ({"num_train": -1}, "num_train"),
        ({"num_train": 0, "num_validation": 0, "num_test": 0}, "num_train"),
        ({"num_annotators": 4, "annotator_pool_size": 3}, "annotator_pool_size"),
        ({"annotator_noise": -1.0}, "annotator_noise"),
        ({"artifact_radius": (0.2, 0.1)}, "artifact_radius"),
        ({"artifact_min_change": 1.0}, "artifact_min_change"),
        ({"misalignment_kind_weights": {"colour": 1.0}}, "misalignment_kind_weights"),
        ({"misalignment_kind_weights": dict.fromkeys(MISALIGNMENT_KINDS, 0.0)}, "misalignment_kind_weights"),
    ],
)
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SynthConfig(**kwargs)


def test_misalignment_kind_weights_and_artifact_size_are_obeyed():
    # Only colour misalignments when only colour has weight; artifacts no smaller than asked.
    config = SynthConfig(
        image_size=SIZE,
        seed=5,
        misalignment_rate=1.0,
        artifact_rate=1.0,
        artifact_radius=(0.2, 0.25),
        misalignment_kind_weights={**dict.fromkeys(MISALIGNMENT_KINDS, 0.0), "colour": 1.0},
    )
    kinds, radii = set(), []
    for i in range(12):
        _, truth = render_example("train", i, config)
        kinds.update(m["kind"] for m in truth["misalignments"])
        radii.extend(a["radius"] for a in truth["artifacts"])
    assert kinds == {"colour"}
    assert radii and min(radii) >= 0.2 * SIZE - 1e-6 and max(radii) <= 0.25 * SIZE + 1e-6


def test_out_dir_rules(tmp_path):
    config = SynthConfig(num_train=2, num_validation=1, num_test=1, image_size=SIZE)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_synthetic(foreign, config)
    with pytest.raises(ValueError, match="notes.txt"):
        generate_synthetic(foreign, config, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "synth"
    generate_synthetic(out, config)
    with pytest.raises(ValueError, match="overwrite"):
        generate_synthetic(out, config)
    dd = generate_synthetic(
        out, SynthConfig(num_train=3, num_validation=1, num_test=1, image_size=SIZE), overwrite=True
    )
    assert len(dd["train"]) == 3 and len(list((out / "raw" / "images").iterdir())) == 5


def test_cli_synth(tmp_path):
    from rahf.data.cli import main

    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--num_train", "3", "--num_validation", "1", "--num_test", "1"]
    assert main([*argv, "--seed", "3", "--image_size", "48", "--artifact_rate", "1", "--misalignment_rate", "0"]) == 0
    dd = load_rich_feedback(out)
    assert {k: len(v) for k, v in dd.items()} == {"train": 3, "validation": 1, "test": 1}
    assert dd["train"][0]["image"].size == (48, 48)
    config = json.loads((out / "raw" / "synth_config.json").read_text())
    assert config["seed"] == 3 and config["artifact_rate"] == 1.0
    truth = load_ground_truth(out)
    assert not any(t["misalignments"] for t in truth.values())
    assert sum(bool(t["artifacts"]) for t in truth.values()) >= 4  # an artifact that stays invisible is dropped
    with Image.open(out / "raw" / "images" / "synth-train-00000.png") as img:
        assert img.size == (48, 48)
