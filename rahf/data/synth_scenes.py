"""The synthetic world's prompts and scenes, read back: the vocabulary its prompts use, a parser from a prompt to what
it asks for (object groups, their relation, the background), and the exact per-pixel labels of a rendered scene
(each object's colour and shape, the planted artifacts) that the renderer knows.

Used by the measuring world: the tiny generator's tokenizer (`prompt_vocabulary`) and the judge, which is trained on
`scene_labels` of its own independently drawn scenes and checks generated images against `parse_scene_prompt`.

Examples:

```python
>>> from rahf.data.synth_scenes import parse_scene_prompt
>>> parse_scene_prompt("two red stars above a blue hexagon on a wooden table")
SceneRequest(groups=[ObjectGroup(count=2, colour='red', shape='star'), ObjectGroup(count=1, colour='blue',
shape='hexagon')], relation='above', background='wood')
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .synth import BACKGROUNDS, COLOURS, COUNT_WORDS, RELATIONS, SHAPES, _shape_alpha

__all__ = [
    "BACKGROUND_KEYS",
    "COLOUR_NAMES",
    "SHAPE_NAMES",
    "ObjectGroup",
    "SceneRequest",
    "parse_scene_prompt",
    "prompt_vocabulary",
    "scene_labels",
]

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
BACKGROUND_KEYS: tuple[str, ...] = tuple(BACKGROUNDS)
_PLURALS = {plural: singular for singular, plural in SHAPES.items()}
_COUNTS = {"a": 1, "an": 1, **{word: n for n, word in COUNT_WORDS.items()}}
# Phrase -> background key; the longest phrases are tried first ("in front of a photo of a cat" before "cat").
_PHRASES = sorted(
    ((phrase, key) for key, (_, phrases) in BACKGROUNDS.items() for phrase in phrases), key=lambda p: -len(p[0])
)


def prompt_vocabulary() -> list[str]:
    """Every word a synthetic prompt can contain, sorted."""
    words = set(COLOURS) | set(SHAPES) | set(SHAPES.values()) | set(_COUNTS)
    for relation_words, _ in RELATIONS.values():
        words.update(relation_words)
    for _, phrases in BACKGROUNDS.values():
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)


@dataclass(frozen=True)
class ObjectGroup:
    """`count` objects of one colour and shape, as a prompt asks for them."""

    count: int
    colour: str
    shape: str


@dataclass
class SceneRequest:
    """What a synthetic prompt asks for: 1 or 2 object groups, the relation of the first to the second
    (`"above"`, `"below"`, `"left of"`, `"right of"`, `"next to"`, or None), and the background key."""

    groups: list[ObjectGroup] = field(default_factory=list)
    relation: str | None = None
    background: str | None = None


def parse_scene_prompt(prompt: str) -> SceneRequest:
    """Reads a prompt of the synthetic grammar: `[count] colour shape [relation [count] colour shape] setting`.

    Raises:
        ValueError: the prompt is not of that grammar (naming the word where it stops).
    """
    text = " ".join(str(prompt).lower().split())
    background = None
    for phrase, key in _PHRASES:
        if text.endswith(" " + phrase) or text == phrase:
            background, text = key, text[: len(text) - len(phrase)].strip()
            break
    words = text.split()
    request = SceneRequest(background=background)
    i = 0

    def group() -> ObjectGroup:
        nonlocal i
        if i + 3 > len(words):
            raise ValueError(f"prompt {prompt!r}: expected `count colour shape` at word {i + 1}, got {words[i:]}")
        count_word, colour, noun = words[i : i + 3]
        if count_word not in _COUNTS or colour not in COLOURS or not (noun in SHAPES or noun in _PLURALS):
            raise ValueError(f"prompt {prompt!r}: {' '.join(words[i : i + 3])!r} is not `count colour shape`")
        i += 3
        return ObjectGroup(_COUNTS[count_word], colour, _PLURALS.get(noun, noun))

    request.groups.append(group())
    if i < len(words):
        for relation, (relation_words, _) in RELATIONS.items():
            if tuple(words[i : i + len(relation_words)]) == relation_words:
                request.relation = relation
                i += len(relation_words)
                break
        else:
            raise ValueError(f"prompt {prompt!r}: {words[i]!r} is not a relation ({list(RELATIONS)})")
        request.groups.append(group())
    if i != len(words):
        raise ValueError(f"prompt {prompt!r}: unexpected words {words[i:]} before the setting")
    return request


def scene_labels(truth: dict[str, Any], size: int) -> dict[str, np.ndarray]:
    """The exact per-pixel labels of a scene that `rahf.data.synth.render_example` rendered (its `truth`, with numpy
    masks): `colour` and `shape` (int64 (H, W): 0 background, else 1 + the index in `COLOUR_NAMES` / `SHAPE_NAMES`,
    of the object painted last over each pixel) and `artifact` (bool (H, W), the planted artifacts)."""
    colour = np.zeros((size, size), dtype=np.int64)
    shape = np.zeros((size, size), dtype=np.int64)
    for obj in truth["objects"]:
        if not obj["painted"]:
            continue
        (cx, cy), radius = obj["center"], obj["radius"]
        inside = _shape_alpha(obj["shape"], cx, cy, radius, size) > 0.5
        colour[inside] = 1 + COLOUR_NAMES.index(obj["colour"])
        shape[inside] = 1 + SHAPE_NAMES.index(obj["shape"])
    artifact = np.zeros((size, size), dtype=bool)
    for a in truth["artifacts"]:
        artifact |= np.asarray(a["mask_array"], dtype=bool)
    return {"colour": colour, "shape": shape, "artifact": artifact}
