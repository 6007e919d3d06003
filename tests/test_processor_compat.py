"""`RAHFProcessor` as a transformers `ProcessorMixin`: the same outputs as before, the transformers layout on disk,
`AutoProcessor` loading, folders of the older layout, and diffusers pipelines carrying it with no registry patch.

The reference outputs in tests/fixtures/processor_old_layout_outputs.npz and the folder
tests/fixtures/processor_old_layout/ (`rahf_processor_config.json` + the tokenizer's files) were written by the
`RAHFProcessor` that preceded the `ProcessorMixin` (commit 0117e94), from `tiny_rahf_processor(variant,
image_mean=MEAN, image_std=STD)` and the inputs built below.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from rahf.processing_rahf import (
    LEGACY_PROCESSOR_CONFIG_NAME,
    PROCESSOR_CONFIG_NAME,
    RAHFImageProcessor,
    RAHFProcessor,
)
from rahf.testing import tiny_rahf_processor

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_LAYOUT = FIXTURES / "processor_old_layout"
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
PROMPTS = ["a red circle above 0 blue squares", "Two cats, one dog!"]
LABELS = [[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0]]
LONG = " ".join(f"word{i}" for i in range(60))
VARIANTS = ("augmented_prompt", "multi_head")


def images() -> dict[str, object]:
    """Odd sizes and modes, as the fixture was written with (the same seed and order of draws)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)))
    i16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    png = io.BytesIO()
    rgb.convert("P").save(png, format="PNG")
    return {
        "rgb_53x37": rgb,
        "rgba_53x37": rgba,
        "l": rgb.convert("L"),
        "p_bytes": png.getvalue(),
        "i16_40x30": i16,
        "cmyk": rgb.convert("CMYK"),
        "la": rgb.convert("LA"),
        "one_bit": rgb.convert("1"),
        "wide_300x17": Image.fromarray(rng.integers(0, 256, (17, 300, 3), dtype=np.uint8)),
        "tiny_1x1": Image.new("RGB", (1, 1), (200, 10, 30)),
        "float_array": rng.random((21, 19, 3)),
        "gray_array": rng.integers(0, 256, (33, 31), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "processor_old_layout_outputs.npz") as data:
        return {key: data[key] for key in data.files}


def assert_same_outputs(processor: RAHFProcessor, reference: dict[str, np.ndarray], variant: str) -> None:
    """Every output the old processor was recorded on, bit for bit."""
    for name, image in images().items():
        pixels = processor.preprocess_images([image])
        assert pixels.dtype == torch.float32
        assert np.array_equal(pixels.numpy(), reference[f"{variant}/pixel_values/{name}"]), name
    second = processor(text=PROMPTS, tasks=["plausibility", "keywords"]) if variant != "multi_head" else None
    encodings = {
        "enc": processor(text=PROMPTS, keyword_labels=LABELS),
        "enc2": second if second is not None else processor(text=[LONG]),
    }
    for group, enc in encodings.items():
        keys = sorted(k[len(f"{variant}/{group}/") :] for k in reference if k.startswith(f"{variant}/{group}/"))
        assert sorted(enc) == keys, group
        for key in keys:
            assert np.array_equal(enc[key].numpy(), reference[f"{variant}/{group}/{key}"]), (group, key)
    assert processor.marker_token_id == int(reference[f"{variant}/marker_token_id"])
    assert processor.kept_word_count(LONG) == int(reference[f"{variant}/kept_word_count"])
    long_labels = processor.encode_keyword_targets([LONG], [[i % 2 for i in range(60)]])
    assert np.array_equal(long_labels.numpy(), reference[f"{variant}/long_labels"])


# ---------------------------------------------------------------------------------------------------------------------
# The same outputs as the processor it replaces


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_equal_the_previous_implementation(reference, variant):
    processor = tiny_rahf_processor(variant, image_mean=MEAN, image_std=STD)
    assert isinstance(processor.image_processor, RAHFImageProcessor)
    assert processor.image_size == 32 and processor.image_mean == MEAN and processor.image_std == STD
    assert_same_outputs(processor, reference, variant)


def test_the_image_processor_alone_gives_the_same_pixels(reference):
    image_processor = RAHFImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD)
    batch = list(images().values())
    pixels = image_processor(batch)["pixel_values"]
    expected = np.concatenate([reference[f"multi_head/pixel_values/{name}"] for name in images()])
    assert pixels.shape == (len(batch), 3, 32, 32) and np.array_equal(pixels.numpy(), expected)
    as_numpy = image_processor(batch[0], return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, expected[:1])


# ---------------------------------------------------------------------------------------------------------------------
# Folders saved before the ProcessorMixin


def test_a_folder_in_the_old_layout_loads_with_the_same_settings_and_outputs(reference, tmp_path):
    assert sorted(p.name for p in OLD_LAYOUT.iterdir()) == [
        LEGACY_PROCESSOR_CONFIG_NAME,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    loaded = RAHFProcessor.from_pretrained(OLD_LAYOUT)
    built = tiny_rahf_processor("augmented_prompt", image_mean=MEAN, image_std=STD)
    assert loaded.to_dict() == built.to_dict()
    assert loaded.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert_same_outputs(loaded, reference, "augmented_prompt")
    # Saved again, it is in the new layout, which AutoProcessor reads.
    loaded.save_pretrained(tmp_path)
    assert (tmp_path / PROCESSOR_CONFIG_NAME).is_file() and not (tmp_path / LEGACY_PROCESSOR_CONFIG_NAME).exists()
    assert AutoProcessor.from_pretrained(tmp_path).to_dict() == built.to_dict()


def test_the_old_layout_keeps_its_checks(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(OLD_LAYOUT, folder)
    config = json.loads((folder / LEGACY_PROCESSOR_CONFIG_NAME).read_text())
    (folder / LEGACY_PROCESSOR_CONFIG_NAME).write_text(json.dumps({**config, "image_std": [0.2, 0, 0.3]}))
    with pytest.raises(ValueError, match=r"rahf_processor_config.json'.*`image_std` must hold 3 numbers > 0"):
        RAHFProcessor.from_pretrained(folder)
    (folder / LEGACY_PROCESSOR_CONFIG_NAME).write_text(json.dumps({**config, "image_szie": 32}))
    with pytest.raises(ValueError, match=r"rahf_processor_config.json' has unknown settings \['image_szie'\]"):
        RAHFProcessor.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------------
# The transformers layout and AutoProcessor


def test_save_pretrained_writes_the_transformers_layout(tmp_path):
    processor = tiny_rahf_processor("augmented_prompt", image_mean=MEAN, image_std=STD)
    processor.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        PROCESSOR_CONFIG_NAME,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    saved = json.loads((tmp_path / PROCESSOR_CONFIG_NAME).read_text())
    assert saved == {
        "processor_class": "RAHFProcessor",
        "image_processor": {
            "image_processor_type": "RAHFImageProcessor",
            "size": {"height": 32, "width": 32},
            "image_mean": MEAN,
            "image_std": STD,
            "resample": int(Image.Resampling.BICUBIC),
        },
        "variant": "augmented_prompt",
        "task_names": processor.task_names,
        "task_strings": processor.task_strings,
        "max_text_length": 32,
        "max_target_length": 48,
    }
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["processor_class"] == "RAHFProcessor"


@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_processor_and_auto_image_processor_load_a_saved_processor(reference, tmp_path, variant):
    processor = tiny_rahf_processor(variant, image_mean=MEAN, image_std=STD)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is RAHFProcessor and loaded.to_dict() == processor.to_dict()
    assert_same_outputs(loaded, reference, variant)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert (
        type(image_processor) is RAHFImageProcessor
        and image_processor.to_dict() == processor.image_processor.to_dict()
    )


def test_importing_rahf_registers_the_processor_for_auto_processor(tmp_path):
    tiny_rahf_processor().save_pretrained(tmp_path)
    code = (
        "import sys\n"
        "from transformers import AutoProcessor\n"
        "from rahf import RAHFProcessor\n"
        f"processor = AutoProcessor.from_pretrained({str(tmp_path)!r})\n"
        "assert type(processor) is RAHFProcessor, type(processor)\n"
        "print(processor.image_size)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "32"


def test_from_pretrained_takes_overrides_and_refuses_unknown_keywords(tmp_path):
    tiny_rahf_processor().save_pretrained(tmp_path / "sub")
    loaded = RAHFProcessor.from_pretrained(tmp_path, subfolder="sub", max_text_length=16, local_files_only=True)
    assert loaded.max_text_length == 16 and loaded(text=[LONG])["input_ids"].shape[1] == 16
    with pytest.raises(ValueError, match=r"unknown keyword arguments \['max_txt_length'\]"):
        RAHFProcessor.from_pretrained(tmp_path / "sub", max_txt_length=16)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"image_processor": {"image_std": [0, 0, 0]}}, r"`image_std` must hold 3 numbers > 0"),
        ({"image_processor": {"size": {"height": 32, "width": 16}}}, r"`size` must be one side or a square"),
        (
            {"image_processor": {"size": "32"}},
            r"`size` must be a positive int, got '32' .*write 32 in the `image_processor` entry",
        ),
        ({"image_processor": {"resample": 9}}, r"`resample` must be a PIL resampling filter"),
        ({"image_processor": {"do_resize": False}}, r"unknown image processor settings \['do_resize'\]"),
        ({"image_processor": {"image_processor_type": "ViTImageProcessor"}}, r"a ViTImageProcessor's settings"),
        ({"max_text_length": -5}, r"`max_text_length` must be an int >= 2, got -5 .*in processor_config.json"),
        ({"variant": "both"}, r"`variant` must be one of"),
        ({"image_szie": 32}, r"processor_config.json' has unknown settings \['image_szie'\]"),
        ({"processor_class": "CLIPProcessor"}, r"holds the settings of a CLIPProcessor, not of a RAHFProcessor"),
    ],
)
def test_a_bad_processor_config_names_the_field_and_the_file(tmp_path, edit, message):
    tiny_rahf_processor().save_pretrained(tmp_path)
    config_file = tmp_path / PROCESSOR_CONFIG_NAME
    config = json.loads(config_file.read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        RAHFProcessor.from_pretrained(tmp_path)
    assert PROCESSOR_CONFIG_NAME in str(err.value)


def test_an_unreadable_processor_config_is_a_clear_error(tmp_path):
    tiny_rahf_processor().save_pretrained(tmp_path)
    (tmp_path / PROCESSOR_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="processor_config.json' is not valid JSON"):
        RAHFProcessor.from_pretrained(tmp_path)
    (tmp_path / PROCESSOR_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object of processor settings, got a list"):
        RAHFProcessor.from_pretrained(tmp_path)


def test_construction_from_an_image_processor_or_flat_settings():
    processor = tiny_rahf_processor("augmented_prompt", image_mean=MEAN, image_std=STD)
    settings = {k: v for k, v in processor.to_dict().items() if k not in ("processor_class", "image_processor")}
    flat = RAHFProcessor(processor.tokenizer, image_size=32, image_mean=MEAN, image_std=STD, **settings)
    shared = RAHFProcessor(processor.tokenizer, processor.image_processor, **settings)
    assert flat.to_dict() == processor.to_dict() == shared.to_dict()
    assert shared.image_processor is processor.image_processor
    # A flat setting replaces the image processor's, on a copy.
    resized = RAHFProcessor(processor.tokenizer, processor.image_processor, image_size=16, **settings)
    assert resized.image_size == 16 and processor.image_size == 32 and resized.image_mean == MEAN
    with pytest.raises(ValueError, match="pass `image_processor` .* or `image_size`"):
        RAHFProcessor(processor.tokenizer, **settings)
    with pytest.raises(ValueError, match="must be a RAHFImageProcessor"):
        RAHFProcessor(processor.tokenizer, AutoImageProcessor, **settings)


# ---------------------------------------------------------------------------------------------------------------------
# Diffusers pipelines


def test_a_pipeline_round_trips_the_processor_without_a_registry_patch(tmp_path):
    from diffusers.pipelines import pipeline_loading_utils
    from rahf.pipelines.rahf_amused_inpaint import RAHFAmusedInpaintPipeline  # noqa: F401  (imports every pipeline)
    from rahf.pipelines.rahf_guided import RAHFGuidedStableDiffusionPipeline  # noqa: F401
    from rahf.pipelines.rahf_inpaint import RAHFInpaintPipeline

    from rahf._testing_diffusers import tiny_sd_inpaint_pipeline
    from rahf.testing import tiny_rahf_model

    assert not [k for k in pipeline_loading_utils.LOADABLE_CLASSES if k.startswith("rahf")]
    assert not [k for k in pipeline_loading_utils.ALL_IMPORTABLE_CLASSES if k.startswith("RAHF")]

    processor = tiny_rahf_processor("augmented_prompt", image_mean=MEAN, image_std=STD)
    pipe = RAHFInpaintPipeline.from_pipe(
        tiny_sd_inpaint_pipeline(), reward_model=tiny_rahf_model(seed=1), reward_processor=processor
    )
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["reward_processor"] == ["rahf.processing_rahf", "RAHFProcessor"]
    assert sorted(p.name for p in (tmp_path / "pipe" / "reward_processor").iterdir()) == [
        PROCESSOR_CONFIG_NAME,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # RAHFInpaintPipeline.from_pretrained is DiffusionPipeline.from_pretrained; the plain DiffusionPipeline cannot
    # name the class, which is not in diffusers.
    loaded = RAHFInpaintPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.reward_processor) is RAHFProcessor
    assert loaded.reward_processor.to_dict() == processor.to_dict()
    assert loaded.reward_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    image = next(iter(images().values()))
    assert torch.equal(loaded.reward_processor.preprocess_images([image]), processor.preprocess_images([image]))
    assert not [k for k in pipeline_loading_utils.LOADABLE_CLASSES if k.startswith("rahf")]

    # A pipeline saved with the processor in the older layout loads too.
    shutil.rmtree(tmp_path / "pipe" / "reward_processor")
    shutil.copytree(OLD_LAYOUT, tmp_path / "pipe" / "reward_processor")
    old = RAHFInpaintPipeline.from_pretrained(tmp_path / "pipe")
    assert old.reward_processor.to_dict() == processor.to_dict()
