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
    code = main(["predict", "--model", str(model_dir), "--image", str(a), str(b), "--prompt", "a green field",
                 "--prompt", "a blue square", "--out", str(out)])
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
    assert main(["predict", "--model", str(model_dir), "--image", str(bad), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "bad.png" in capsys.readouterr().err
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    args = ["predict", "--model", str(model_dir), "--image", str(good), str(good).replace("good", "good2"), "--prompt",
            "a", "--prompt", "b", "--prompt", "c", "--out", str(tmp_path)]
    Image.new("RGB", (8, 8)).save(tmp_path / "good2.png")
    assert main(args) == 2
    assert "one prompt for all images" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "rahf", "--help"], capture_output=True, text=True, check=True)
    for command in ("init-model", "predict", "data", "demo"):
        assert command in out.stdout
