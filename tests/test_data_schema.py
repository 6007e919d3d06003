"""The canonical schema's checks on untrusted content: prompts with no word, and images decoded under the pixel cap."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rahf.data.schema import (
    SCORE_NAMES,
    encoded_image,
    load_rich_feedback,
    save_rich_feedback,
    validate_example,
    write_splits,
)
from rahf.image_io import ImageTooLargeError


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _example(uid: str, prompt: str, words: list[str]) -> dict:
    image = {"bytes": _png(np.zeros((8, 8, 3), dtype=np.uint8)), "path": None}
    heat = {"bytes": _png(np.zeros((8, 8), dtype=np.uint8)), "path": None}
    return {
        "uid": uid,
        "image": image,
        "prompt": prompt,
        **{name: 0.5 for name in SCORE_NAMES},
        "implausibility_map": heat,
        "misalignment_map": heat,
        "prompt_words": words,
        "word_labels": [1] * len(words),
    }


@pytest.mark.parametrize("prompt", ["", "   ", ", . ; ?!"])
def test_a_prompt_with_no_word_is_rejected_naming_the_uid_and_column(prompt: str) -> None:
    with pytest.raises(ValueError, match=r"record 3 \(uid 'u-empty'\): column 'prompt' must hold at least one word"):
        validate_example(_example("u-empty", prompt, []), 3, "train")
    validate_example(_example("u-ok", "a cat", ["a", "cat"]), 0, "train")


def test_load_rich_feedback_rejects_a_saved_record_with_an_empty_prompt(tmp_path: Path) -> None:
    examples = [("train", _example("u0", "a cat", ["a", "cat"])), ("train", _example("u1", "", []))]
    ds = write_splits(examples, tmp_path / "arrow", in_memory=True)
    save_rich_feedback(ds, tmp_path / "saved")
    with pytest.raises(ValueError, match=r"split 'train', record 1 \(uid 'u1'\): column 'prompt'"):
        load_rich_feedback(tmp_path / "saved")


def test_encoded_image_decodes_under_the_pixel_cap_and_keeps_png_bytes() -> None:
    rgb = _png(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3))
    assert encoded_image(rgb, "RGB") == {"bytes": rgb, "path": None}  # already a PNG of that mode: kept
    as_l = encoded_image(rgb, "L")["bytes"]
    assert Image.open(io.BytesIO(as_l)).mode == "L"
    with pytest.raises(ImageTooLargeError, match="6 x 8 = 48 pixels, more than the cap of 40"):
        encoded_image(rgb, "RGB", max_pixels=40)
    with pytest.raises(ValueError, match="could not read <image bytes> as an image"):
        encoded_image(rgb[:40], "RGB")
