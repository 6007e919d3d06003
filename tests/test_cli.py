import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rahf.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_init_model_then_predict(tmp_path):
    model_dir = tmp_path / "model"
    assert main(["init-model", "--config", str(ROOT / "configs/model/tiny.json"), "--out", str(model_dir)]) == 0
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.new("RGB", (70, 40), (10, 200, 10)).save(a)
    Image.new("RGB", (33, 33), (0, 0, 200)).save(b)
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--model",
            str(model_dir),
            "--image",
            str(a),
            str(b),
            "--prompt",
            "a green field",
            "--prompt",
            "a blue square",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for path, size, prompt in ((a, (70, 40), "a green field"), (b, (33, 33), "a blue square")):
        folder = out / path.stem
        feedback = json.loads((folder / "feedback.json").read_text())
        assert feedback["prompt"] == prompt
        assert set(feedback["scores"]) == {"plausibility", "alignment", "aesthetics", "overall"}
        assert set(feedback) == {"prompt", "scores", "misaligned_words", "misaligned_word_indices"}
        for name in ("implausibility", "misalignment"):
            heat = Image.open(folder / f"{name}.png")
            assert heat.mode == "L" and heat.size == size
        overlay = Image.open(folder / "overlay.png")
        assert overlay.size[0] == size[0] and overlay.size[1] > size[1]  # the legend strip below
        assert np.asarray(overlay).std() > 0


def test_predict_reports_a_bad_image_and_prompt_count(tmp_path, capsys):
    model_dir = tmp_path / "model"
    main(["init-model", "--config", str(ROOT / "configs/model/tiny.json"), "--out", str(model_dir)])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x00not a png")
    assert (
        main(["predict", "--model", str(model_dir), "--image", str(bad), "--prompt", "x", "--out", str(tmp_path)]) == 2
    )
    assert "bad.png" in capsys.readouterr().err
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    args = [
        "predict",
        "--model",
        str(model_dir),
        "--image",
        str(good),
        str(good).replace("good", "good2"),
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--prompt",
        "c",
        "--out",
        str(tmp_path),
    ]
    Image.new("RGB", (8, 8)).save(tmp_path / "good2.png")
    assert main(args) == 2
    assert "one prompt for all images" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "rahf", "--help"], capture_output=True, text=True, check=True)
    for command in ("init-model", "predict", "data", "demo"):
        assert command in out.stdout


def test_init_model_from_locally_saved_towers(tmp_path):
    """The real-weights path (base.json names hub ids) is the same code: here with tiny towers saved locally."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

    from rahf import RichFeedbackPredictor
    from rahf.testing import tiny_rahf_config, tiny_tokenizer

    torch.manual_seed(3)
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    )
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.9, 0.8, 0.7]})
    )
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    )
    t5.save_pretrained(tmp_path / "t5")
    tiny_tokenizer().save_pretrained(tmp_path / "t5")
    config = tiny_rahf_config(
        vision_model_name_or_path=str(tmp_path / "vit"), text_model_name_or_path=str(tmp_path / "t5")
    )
    config.to_json_file(tmp_path / "preset.json")
    assert main(["init-model", "--config", str(tmp_path / "preset.json"), "--out", str(tmp_path / "model")]) == 0
    predictor = RichFeedbackPredictor.from_pretrained(tmp_path / "model")
    assert predictor.processor.image_mean == [0.1, 0.2, 0.3] and predictor.processor.image_std == [0.9, 0.8, 0.7]
    torch.testing.assert_close(predictor.model.text_model.shared.weight, t5.shared.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        predictor.model.vision_model.embeddings.cls_token, vit.embeddings.cls_token, rtol=0, atol=0
    )
    [feedback] = predictor([Image.new("RGB", (20, 20))], ["a cat"])
    assert set(feedback.scores) == {"plausibility", "alignment", "aesthetics", "overall"}


def test_verbose_reaches_rahf_data_and_mistakes_exit_2(tmp_path):
    import pytest

    missing = str(tmp_path / "missing")
    assert main(["data", "stats", missing, "--out", str(tmp_path / "o")]) == 2  # one line, like every command
    with pytest.raises(ValueError, match="missing"):  # -v: the traceback, from `rahf -v data` as from `rahf data -v`
        main(["-v", "data", "stats", missing, "--out", str(tmp_path / "o")])
