"""`rahf demo --quick`, run from the wheel installed outside the repository: the whole report, every section."""

import json

import pytest

from rahf import RichFeedbackPredictor

NAMES = ["rahf_multi_head", "rahf_augmented_prompt", "rahf_untrained", "resnet50", "center_prior"]


@pytest.mark.slow
def test_quick_demo_writes_the_whole_report(installed_wheel, tmp_path):
    done = installed_wheel.run("demo", "--quick", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-5000:]
    report = tmp_path / "report.md"
    text = report.read_text()
    for heading in (
        "Table 1",
        "Table 2",
        "Table 3",
        "Table 4",
        "Does RAHF make a generator better",
        "Best-of-N",
        "Repair",
        "Guidance",
        "Reward fine-tuning against best-of-N",
        "Time",
    ):
        assert heading in text, heading
    for name in NAMES:
        metrics = json.loads((tmp_path / "eval" / name / "metrics.json").read_text())
        assert set(metrics) == {"scores", "implausibility_heatmap", "misalignment_heatmap", "keywords"}
    for name in ("rahf_multi_head", "rahf_augmented_prompt", "rahf_untrained"):
        predictor = RichFeedbackPredictor.from_pretrained(tmp_path / "models" / name)
        assert predictor.model.config.variant in ("multi_head", "augmented_prompt")
    assert json.loads((tmp_path / "eval" / "center_prior" / "metrics.json").read_text())["keywords"] is None
    # the sections carry numbers, not placeholders
    guidance = text[text.index("Guidance (Fig. 8)") : text.index("Against the targets")]
    assert "| 0 |" in guidance and "| 1 |" in guidance and "nan" not in guidance
    efficacy = json.loads((tmp_path / "efficacy" / "efficacy.json").read_text())
    for method in ("reward_backprop", "policy_gradient", "policy_gradient_dense"):
        assert abs(sum(efficacy[method]["buckets"].values()) - 1) < 1e-6, method
    assert "![the methods' buckets](efficacy/methods.png)" in text
    # every picture the report links to exists
    for line in text.splitlines():
        if line.startswith("![") and "](" in line:
            assert (tmp_path / line.split("](")[1].rstrip(")")).is_file(), line
