"""The measuring world's judge: its requirement checks and plausibility formula, its objects on exact labels, and a
short training run that writes a loadable judge with its held-out report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from rahf.improve.judge import (
    JudgeTrainingArguments,
    SceneObject,
    SynthJudge,
    _augment,
    check_scene,
    judged_plausibility,
    objects_from_labels,
    train_judge,
)

from rahf.data.synth import SynthConfig, render_example
from rahf.data.synth_scenes import ObjectGroup, SceneRequest, parse_scene_prompt, scene_labels


def _obj(colour, shape, x, y):
    return SceneObject(colour, shape, (float(x), float(y)), 50)


def test_requirements_follow_the_prompt():
    request = SceneRequest([ObjectGroup(2, "red", "star"), ObjectGroup(1, "blue", "hexagon")], "above", "wood")
    good = [_obj("red", "star", 10, 10), _obj("red", "star", 40, 12), _obj("blue", "hexagon", 30, 50)]
    assert check_scene(request, good, "wood") == {
        "g0:present": True, "g0:count": True, "g1:present": True, "g1:count": True, "relation": True,
        "background": True,
    }  # fmt: skip
    one_star = check_scene(request, good[1:], "grass")
    assert one_star["g0:present"] and not one_star["g0:count"] and not one_star["background"]
    flipped = [_obj("red", "star", 10, 50), _obj("red", "star", 40, 52), _obj("blue", "hexagon", 30, 10)]
    assert not check_scene(request, flipped, "wood")["relation"]
    wrong_colour = [_obj("green", "star", 10, 10), _obj("green", "star", 40, 12), _obj("blue", "hexagon", 30, 50)]
    result = check_scene(request, wrong_colour, "wood")
    assert not result["g0:present"] and not result["relation"]
    next_to = SceneRequest([ObjectGroup(1, "red", "star"), ObjectGroup(1, "blue", "hexagon")], "next to", None)
    assert check_scene(next_to, [_obj("red", "star", 5, 5), _obj("blue", "hexagon", 50, 50)], None)["relation"]


def test_plausibility_is_the_renderers_formula_on_the_artifacts_found():
    assert judged_plausibility([], 64 * 64) == pytest.approx(0.9)
    one = judged_plausibility([410], 64 * 64)  # 10 % of the image
    assert one == pytest.approx((4.6 - 1.0 - 0.6 - 1) / 4, abs=1e-3)
    assert judged_plausibility([400] * 6, 64 * 64) == 0.0  # clipped at the scale's floor
    assert judged_plausibility([100], 64 * 64) > judged_plausibility([100, 100], 64 * 64)


def test_objects_from_exact_labels_meet_every_requirement_of_aligned_scenes():
    config = SynthConfig(num_train=80, num_validation=1, num_test=1, seed=11, misalignment_rate=0.0)
    checked = 0
    for i in range(80):
        image, truth = render_example("train", i, config)
        labels = scene_labels(truth, 64)
        objects = objects_from_labels(labels["colour"], labels["shape"], min_area=8)
        result = check_scene(parse_scene_prompt(truth["prompt"]), objects, truth["background"])
        if truth["artifacts"]:
            continue  # an artifact may cut an object in two or melt it away
        checked += 1
        assert all(result.values()), (truth["prompt"], result, objects)
    assert checked > 20


def test_augmentation_keeps_shapes_and_range_and_changes_pixels():
    import torch

    pixels = torch.rand(6, 3, 64, 64)
    generator = torch.Generator().manual_seed(0)
    out = _augment(pixels, generator)
    assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, pixels)


@pytest.mark.slow
def test_a_short_training_run_writes_a_loadable_judge_and_its_report(tmp_path):
    args = JudgeTrainingArguments(output_dir=str(tmp_path), num_train=64, num_test=16, max_train_steps=4, shape_steps=3,
                                  train_batch_size=8, seed=5)  # fmt: skip
    report = train_judge(args)
    assert {"artifact_pixel_iou", "object_set_accuracy", "requirement_agreement", "plausibility_plcc_vs_truth"} <= set(
        report
    )
    assert json.loads((tmp_path / "final" / "judge_report.json").read_text())["num_scenes"] == 16
    assert (tmp_path / "final" / "model.safetensors").is_file()
    judge = SynthJudge.from_pretrained(tmp_path / "final")
    [verdict] = judge([Image.new("RGB", (64, 64), (120, 120, 120))], ["a red circle on a grey background"])
    assert set(verdict.scores) == {"plausibility", "alignment", "overall"}
    assert all(0.0 <= v <= 1.0 for v in verdict.scores.values())
    assert verdict.artifact_mask.shape == (64, 64) and verdict.artifact_mask.dtype == np.bool_
    with pytest.raises(ValueError, match="one prompt per image"):
        judge([Image.new("RGB", (64, 64))] * 2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="judge"):
        SynthJudge.from_pretrained(tmp_path / "missing")
