"""The synthetic world read back: every rendered prompt parses into what the renderer planned, and a scene's exact
labels are the objects and artifacts it painted."""

from __future__ import annotations

import numpy as np
import pytest

from rahf.data.synth import SynthConfig, render_example
from rahf.data.synth_scenes import (
    COLOUR_NAMES,
    SHAPE_NAMES,
    ObjectGroup,
    parse_scene_prompt,
    prompt_vocabulary,
    scene_labels,
)


@pytest.fixture(scope="module")
def scenes():
    config = SynthConfig(num_train=60, num_validation=1, num_test=1, seed=3)
    return [render_example("train", i, config) for i in range(60)]


def test_every_rendered_prompt_parses_into_its_plan(scenes):
    vocabulary = set(prompt_vocabulary())
    relations = set()
    for _, truth in scenes:
        request = parse_scene_prompt(truth["prompt"])
        assert [(g.count, g.colour, g.shape) for g in request.groups] == [
            (g["count"], g["colour"], g["shape"]) for g in truth["groups"]
        ]
        assert request.relation == truth["relation"] and request.background == truth["background"]
        assert set(truth["prompt"].split()) <= vocabulary
        relations.add(request.relation)
    assert None in relations and len(relations) > 2  # single groups and several relations were covered


def test_parse_reads_plurals_and_articles_and_refuses_other_grammar():
    request = parse_scene_prompt("two red stars above an orange hexagon on a wooden table")
    assert request.groups == [ObjectGroup(2, "red", "star"), ObjectGroup(1, "orange", "hexagon")]
    assert request.relation == "above" and request.background == "wood"
    assert parse_scene_prompt("three blue circles left of a green cross").relation == "left of"
    for bad in ("a cat on a sofa", "two red stars beside a blue hexagon", "red stars on grass"):
        with pytest.raises(ValueError, match="prompt"):
            parse_scene_prompt(bad)


def test_scene_labels_are_the_painted_objects_and_the_planted_artifacts(scenes):
    with_artifacts = 0
    for image, truth in scenes:
        labels = scene_labels(truth, image.shape[0])
        painted = [o for o in truth["objects"] if o["painted"]]
        colours = {COLOUR_NAMES[c - 1] for c in np.unique(labels["colour"]) if c}
        shapes = {SHAPE_NAMES[s - 1] for s in np.unique(labels["shape"]) if s}
        assert colours <= {o["colour"] for o in painted} and shapes <= {o["shape"] for o in painted}
        assert ((labels["colour"] > 0) == (labels["shape"] > 0)).all()
        for obj in painted:  # each painted object's centre carries its own labels (unless another covers it)
            x, y = (int(round(v)) for v in obj["center"])
            if labels["colour"][y, x]:
                assert COLOUR_NAMES[labels["colour"][y, x] - 1] in {o["colour"] for o in painted}
        union = np.zeros_like(labels["artifact"])
        for a in truth["artifacts"]:
            union |= a["mask_array"]
        assert np.array_equal(labels["artifact"], union)
        with_artifacts += bool(truth["artifacts"])
    assert with_artifacts > 10
