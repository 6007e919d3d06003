import numpy as np
import pytest
from PIL import Image

from rahf import RichFeedbackPredictor
from rahf.testing import tiny_rahf_model, tiny_rahf_processor

IMAGES = [Image.new("RGB", (50, 30), (200, 0, 0)), Image.new("L", (24, 24), 90), Image.new("RGB", (64, 64))]
PROMPTS = ["a red circle", "a grey square on a table", "a black night"]


def counted_predictor(variant, batch_size=8):
    model = tiny_rahf_model(variant)
    calls = []
    model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    return RichFeedbackPredictor(model, tiny_rahf_processor(variant), batch_size=batch_size), calls


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_vision_tower_runs_once_per_image_whatever_is_asked(variant):
    predictor, calls = counted_predictor(variant)
    feedback = predictor(IMAGES, PROMPTS)  # all seven outputs
    assert len(calls) == 1 and calls[0] == 3  # one batched call, three images
    assert len(feedback) == 3
    predictor2, calls2 = counted_predictor(variant, batch_size=2)
    predictor2(IMAGES, PROMPTS, outputs=["heatmaps", "keywords"])
    assert calls2 == [2, 1]


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_outputs_at_the_input_size_and_in_range(variant):
    predictor, _ = counted_predictor(variant)
    feedback = predictor(IMAGES, PROMPTS)
    for fb, image, prompt in zip(feedback, IMAGES, PROMPTS):
        assert fb.prompt == prompt
        assert set(fb.scores) == {"plausibility", "alignment", "aesthetics", "overall"}
        assert all(0.0 <= v <= 1.0 for v in fb.scores.values())
        assert set(fb.heatmaps) == {"implausibility", "misalignment"}
        for heat in fb.heatmaps.values():
            assert heat.shape == (image.height, image.width) and heat.dtype == np.float32
            assert heat.min() >= 0 and heat.max() <= 1
        assert all(0 <= i < len(prompt.split()) for i in fb.misaligned_word_indices)
        assert fb.to_dict()["misaligned_words"] == fb.misaligned_words


def test_augmented_variant_agrees_with_running_each_task_alone():
    predictor, _ = counted_predictor("augmented_prompt")
    together = predictor(IMAGES[:2], PROMPTS[:2], outputs=["scores", "heatmaps"])
    alone = predictor(IMAGES[:2], PROMPTS[:2], outputs=["aesthetics"])
    for a, b in zip(together, alone):
        assert list(b.scores) == ["aesthetics"] and not b.heatmaps
        assert abs(a.scores["aesthetics"] - b.scores["aesthetics"]) < 1e-5


def test_one_prompt_for_all_images_and_bad_requests():
    predictor, _ = counted_predictor("multi_head")
    assert [fb.prompt for fb in predictor(IMAGES, "a cat")] == ["a cat"] * 3
    with pytest.raises(ValueError, match="3 images and 2 prompts"):
        predictor(IMAGES, PROMPTS[:2])
    with pytest.raises(ValueError, match="unknown output 'beauty'"):
        predictor(IMAGES, PROMPTS, outputs=["beauty"])


def test_from_pretrained(tmp_path):
    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    predictor = RichFeedbackPredictor.from_pretrained(tmp_path)
    a = predictor(IMAGES, PROMPTS)
    b = RichFeedbackPredictor(model, processor)(IMAGES, PROMPTS)
    for x, y in zip(a, b):
        assert x.scores == y.scores
        np.testing.assert_array_equal(x.heatmaps["implausibility"], y.heatmaps["implausibility"])
