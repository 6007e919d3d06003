import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RichFeedbackPredictor
from rahf.testing import tiny_rahf_config, tiny_rahf_model, tiny_rahf_processor

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


# ---------------------------------------------------------------------------------------------------------------------
# Keyword decoding at a marker threshold


def test_marker_threshold_processor_writes_the_marker_exactly_above_the_threshold():
    from rahf.modeling_rahf import KeywordMarkerThresholdLogitsProcessor

    marker = 3
    probs = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.1, 0.5, 0.1, 0.3], [0.05, 0.05, 0.1, 0.8]])
    scores = probs.log()
    previous = torch.tensor([[7], [7], [marker]])  # the third row has just written a marker
    low = KeywordMarkerThresholdLogitsProcessor(marker, 0.25)(previous, scores.clone())
    assert low.argmax(-1).tolist() == [marker, marker, 2]  # p = 0.3 >= 0.25; never two markers in a row
    high = KeywordMarkerThresholdLogitsProcessor(marker, 0.5)(previous, scores.clone())
    assert high.argmax(-1).tolist() == [1, 1, 2]  # p = 0.3 < 0.5: the likeliest other token
    # the other tokens keep their order when the marker is ruled out
    assert torch.equal(high[0, :3], scores[0, :3])
    with pytest.raises(ValueError, match="threshold"):
        KeywordMarkerThresholdLogitsProcessor(marker, 1.0)


def test_generate_keywords_at_a_threshold_writes_the_marker_exactly_when_likely_enough():
    model = tiny_rahf_model("multi_head")
    processor = tiny_rahf_processor("multi_head")
    marker = processor.marker_token_id
    assert processor.tokenizer.convert_ids_to_tokens([marker]) == ["\u01200"]  # the byte-level BPE's " 0"
    images = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 30, 200))]
    enc = processor.encode_prompts(["a red circle on a table", "two blue squares"], tasks=["keywords"])
    kwargs = dict(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        pixel_values=processor.preprocess_images(images),
        max_new_tokens=12,
    )
    # An output layer of zeros makes every token equally likely (1 / V): a threshold just under that writes the
    # marker first and then after every other token; one just over it never writes it.
    torch.nn.init.zeros_(model.text_model.lm_head.weight)
    vocab = model.text_model.lm_head.weight.shape[0]
    always = model.generate_keywords(**kwargs, keyword_threshold=0.9 / vocab, marker_token_id=marker)
    assert (always[:, 1::2] == marker).all() and not (always[:, 2::2] == marker).any()
    never = model.generate_keywords(**kwargs, keyword_threshold=1.1 / vocab, marker_token_id=marker)
    assert not (never == marker).any()
    # without a threshold, greedy search takes the first of the equally likely tokens, never the marker
    assert not (model.generate_keywords(**kwargs) == marker).any()
    with pytest.raises(ValueError, match="marker_token_id"):
        model.generate_keywords(**kwargs, keyword_threshold=0.3)


def test_predictor_decodes_at_its_threshold_else_the_models(monkeypatch):
    model = tiny_rahf_model("multi_head")
    processor = tiny_rahf_processor("multi_head")
    seen = []
    original = model.generate_keywords

    def spy(*args, **kwargs):
        seen.append((kwargs.get("keyword_threshold"), kwargs.get("marker_token_id")))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate_keywords", spy)
    image, prompt = Image.new("RGB", (32, 32)), "a red circle"
    RichFeedbackPredictor(model, processor)([image], [prompt], outputs="keywords")
    RichFeedbackPredictor(model, processor, keyword_threshold=0.3)([image], [prompt], outputs="keywords")
    model.config.keyword_threshold = 0.4
    RichFeedbackPredictor(model, processor)([image], [prompt], outputs="keywords")
    marker = processor.marker_token_id
    assert seen == [(None, None), (0.3, marker), (0.4, marker)]


def test_keyword_threshold_config_round_trip_and_bad_values(tmp_path):
    from rahf import RAHFModel

    model = tiny_rahf_model("multi_head", keyword_threshold=0.3)
    model.save_pretrained(tmp_path)
    assert RAHFModel.from_pretrained(tmp_path).config.keyword_threshold == 0.3
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="keyword_threshold"):
            tiny_rahf_config(keyword_threshold=bad)
