import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ProcessorMixin

from rahf import RAHFProcessor, load_image, split_prompt_words
from rahf.image_io import ImageTooLargeError
from rahf.processing_rahf import RAHFImageProcessor
from rahf.testing import tiny_rahf_processor


def _images_of_every_mode():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    i16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "L": rgb.convert("L"),
        "P": rgb.convert("P"),
        "I;16": i16,
        "CMYK": rgb.convert("CMYK"),
        "LA": rgb.convert("LA"),
        "1": rgb.convert("1"),
    }


@pytest.mark.parametrize("mode", list(_images_of_every_mode()))
def test_images_of_any_size_and_mode(mode):
    image = _images_of_every_mode()[mode]
    assert image.mode == mode
    processor = tiny_rahf_processor()
    pixels = processor.preprocess_images([image, Image.new("RGB", (300, 17))])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    assert load_image(image).mode == "RGB"


def test_sixteen_bit_images_keep_their_contrast():
    i16 = _images_of_every_mode()["I;16"]
    arr = np.asarray(load_image(i16))
    assert arr.min() == 0 and arr.max() == 255


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(load_image(clear)).min() == 255


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        tiny_rahf_processor().preprocess_images([bad])


def test_empty_prompt_is_an_error():
    processor = tiny_rahf_processor()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        processor(images=[Image.new("RGB", (8, 8))] * 2, text=["a cat", " , "])


def test_image_prompt_count_mismatch():
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        tiny_rahf_processor()(images=[Image.new("RGB", (8, 8))] * 2, text=["a cat"])


def test_augmented_prompts_are_image_major_with_task_strings():
    processor = tiny_rahf_processor("augmented_prompt")
    enc = processor(text=["a cat", "a dog"])
    assert enc["input_ids"].shape[0] == 14
    assert enc["image_index"].tolist() == [0] * 7 + [1] * 7
    assert enc["task_ids"].tolist() == list(range(7)) * 2
    first = processor.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True)
    assert first == "implausibility heatmap: a cat"
    assert processor.task_prompt("a cat", "keywords") == "misaligned keywords: a cat"
    with pytest.raises(ValueError, match="unknown tasks"):
        processor(text=["a cat"], tasks=["beauty"])


def test_keyword_targets_round_trip_through_the_tokenizer():
    processor = tiny_rahf_processor()
    prompts = ["a red circle above 0 blue squares", "Two cats, one dog!"]
    labels = [[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0]]
    ids = processor.encode_keyword_targets(prompts, labels)
    assert (ids == -100).any()  # padded
    generated = ids.clone()
    generated[generated == -100] = processor.tokenizer.pad_token_id
    decoded = processor.decode_keywords(generated, prompts)
    assert decoded == [[1, 4], [0, 3]]


def test_long_prompts_are_truncated_with_a_warning_and_labels_stay_consistent(caplog):
    processor = tiny_rahf_processor()  # max_text_length = 32 tokens
    words = [f"word{i}" for i in range(60)]
    prompt = " ".join(words)
    labels = [0 if i % 3 == 0 else 1 for i in range(60)]
    kept = processor.kept_word_count(prompt)
    assert 0 < kept < 60
    with caplog.at_level(logging.WARNING):
        enc = processor(text=[prompt], keyword_labels=[labels])
    assert "truncated" in caplog.text
    assert enc["input_ids"].shape[1] == 32
    # the processor's single-pass truncation equals the tokenizer's own
    ref = processor.tokenizer([prompt], truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    # the target covers exactly the words the model reads, with their own labels
    target = processor.tokenizer.decode(enc["labels"][0][enc["labels"][0] != -100], skip_special_tokens=True)
    assert split_prompt_words(target.replace(" 0", "")) == words[:kept]
    assert processor.decode_keywords([target], [prompt]) == [[i for i in range(kept) if labels[i] == 0]]
    # and every kept word's last character is inside what the encoder reads
    read = processor.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True)
    assert read.startswith(" ".join(words[:kept]))


def test_label_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 words but 2 word labels"):
        tiny_rahf_processor().encode_keyword_targets(["a red cat"], [[1, 0]])


def test_save_and_load(tmp_path):
    processor = tiny_rahf_processor("augmented_prompt")
    assert isinstance(processor, ProcessorMixin) and isinstance(processor.image_processor, RAHFImageProcessor)
    processor.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    again = RAHFProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == processor.to_dict()
    assert (again.image_size, again.image_mean, again.image_std) == (32, [0.5] * 3, [0.5] * 3)
    enc_a, enc_b = processor(text=["a red 0 cat"]), again(text=["a red 0 cat"])
    assert torch.equal(enc_a["input_ids"], enc_b["input_ids"])


def test_loading_a_folder_without_a_processor_says_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match="save_pretrained"):
        RAHFProcessor.from_pretrained(tmp_path)


def test_the_image_processor_keeps_the_pixel_cap_and_refuses_call_time_settings():
    image_processor = tiny_rahf_processor().image_processor
    with pytest.raises(ImageTooLargeError, match="40 x 30 = 1,200 pixels, more than the cap of 100"):
        image_processor(Image.new("RGB", (40, 30)), max_image_pixels=100)
    assert image_processor(Image.new("RGB", (40, 30)), max_image_pixels=1200)["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"no call-time settings \['size'\]"):
        image_processor(Image.new("RGB", (8, 8)), size=16)
    with pytest.raises(ValueError, match="`images` is empty"):
        image_processor([])
