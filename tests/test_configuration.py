from pathlib import Path

import pytest

from rahf import RAHFConfig
from rahf.testing import tiny_rahf_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="variant.*multi_head.*augmented_prompt.*'three_heads'"):
        tiny_rahf_config(variant="three_heads")


def test_unknown_vision_tower_is_a_clear_error():
    with pytest.raises(ValueError, match="vision_config.model_type"):
        RAHFConfig(vision_config={"model_type": "bert"})


@pytest.mark.parametrize("tower", ["vit", "siglip_vision_model", "clip_vision_model"])
def test_round_trip(tmp_path, tower):
    config = tiny_rahf_config("augmented_prompt", vision_model_type=tower)
    config.save_pretrained(tmp_path)
    again = RAHFConfig.from_pretrained(tmp_path)
    assert again.vision_config.model_type == tower
    assert again.to_dict() == config.to_dict()
    assert again.task_names == [
        "implausibility",
        "misalignment",
        "plausibility",
        "alignment",
        "aesthetics",
        "overall",
        "keywords",
    ]


@pytest.mark.parametrize("name", ["tiny.json", "base.json"])
def test_presets_load(name):
    config = RAHFConfig.from_json_file(CONFIGS / name)
    assert config.variant == "multi_head"
    assert config.heatmap_size % config.patch_grid == 0
    if name == "base.json":  # ViT-L/16 at 384 + t5-base, the public re-implementation's choice
        assert (config.image_size, config.patch_grid, config.vision_config.hidden_size) == (384, 24, 1024)
        assert config.text_config.d_model == 768 and config.text_config.num_layers == 12
        assert config.text_config.decoder_start_token_id == 0
