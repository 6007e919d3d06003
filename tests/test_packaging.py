"""The distribution: one import package (`rahf`, with `rahf.pipelines`, `rahf.improve` and the presets of
`rahf.configs` inside it), and the command line working from a wheel installed outside the repository, unaffected by a
user's own `pipelines/` or `improve/` folder in the working directory."""

from __future__ import annotations

import json
import zipfile

import pytest


def test_the_wheel_installs_exactly_one_top_level_package(installed_wheel):
    with zipfile.ZipFile(installed_wheel.wheel) as wheel:
        names = wheel.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert wheel.read(top_level).decode().split() == ["rahf"]
    roots = {name.split("/")[0] for name in names}
    assert {r for r in roots if not r.endswith(".dist-info")} == {"rahf"}
    for preset in (
        "rahf/configs/model/tiny.json",
        "rahf/configs/train/synth_tiny.yaml",
        "rahf/configs/improve/best_of_n.yaml",
        "rahf/configs/accelerate/multi_gpu.yaml",
        "rahf/assets/example.png",
        "rahf/pipelines/rahf_inpaint.py",
        "rahf/improve/demo.py",
    ):
        assert preset in names, preset


@pytest.mark.slow
def test_the_cli_runs_from_the_wheel_outside_the_checkout(installed_wheel, tmp_path):
    # A user's own folders named like our subpackages must not shadow them.
    for name in ("pipelines", "improve"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('a user folder was imported')\n")
    code = (
        "import rahf, rahf.pipelines, rahf.improve, rahf.configs, rahf.pipelines.masks, rahf.improve.best_of_n\n"
        "print(rahf.__file__); print(rahf.pipelines.__file__); print(rahf.improve.best_of_n.__file__)\n"
        "print(rahf.configs.preset_path('configs/model/tiny.json'))"
    )
    out = installed_wheel.run("-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(line.startswith(str(installed_wheel.site)) for line in out.stdout.split()), out.stdout

    assert installed_wheel.run("demo", "--help", cwd=tmp_path).returncode == 0
    # configs/model/tiny.json does not exist in this folder: the shipped preset is used
    made = installed_wheel.run("init-model", "--config", "configs/model/tiny.json", "--out", "model", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    image = installed_wheel.site / "rahf" / "assets" / "example.png"
    rated = installed_wheel.run(
        "predict",
        "--model",
        "model",
        "--image",
        str(image),
        "--prompt",
        "a red circle above a blue square",
        "--out",
        "feedback",
        cwd=tmp_path,
    )
    assert rated.returncode == 0, rated.stderr[-3000:]
    feedback = json.loads((tmp_path / "feedback" / "example" / "feedback.json").read_text())
    assert set(feedback["scores"]) == {"plausibility", "alignment", "aesthetics", "overall"}
    assert (tmp_path / "feedback" / "example" / "overlay.png").is_file()
