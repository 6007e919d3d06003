import json

import cv2
import numpy as np
import pytest
from rich_feedback_fixture import SCORE_NAMES, gt_of, tiny_dataset_dict, tiny_split

from rahf.baselines import CenterPriorRater
from rahf.evaluation import PAPER_METRICS, evaluate, main, write_comparison_report
from rahf.predictor import RichFeedback, RichFeedbackPredictor
from rahf.testing import tiny_rahf_model, tiny_rahf_processor

HEATMAP_KEYS = {"mse_all", "mse_gt0", "cc", "kld", "sim", "nss", "auc_judd", "n_all", "n_gt0", "n_gt_pos"}
TABLE_TITLES = ("Table 1.", "Table 2.", "Table 3.", "Table 4.")


class OracleRater:
    """Returns the ground truth of each prompt's record, heatmaps at the image's size."""

    def __init__(self, split, keywords=True, scores=SCORE_NAMES):
        self.gt = gt_of(split)
        self.keywords = keywords
        self.score_names = list(scores)
        self.calls = 0

    @property
    def capabilities(self):
        return {"scores": self.score_names, "heatmaps": ["implausibility", "misalignment"], "keywords": self.keywords}

    def __call__(self, images, prompts, outputs=None):
        self.calls += 1
        out = []
        for image, prompt in zip(images, prompts):
            gt = self.gt[prompt]
            heatmaps = {}
            for name in ("implausibility", "misalignment"):
                heat = gt[name]
                if heat.shape != (image.height, image.width):
                    heat = cv2.resize(heat, (image.width, image.height), interpolation=cv2.INTER_LINEAR)
                heatmaps[name] = heat
            fb = RichFeedback(prompt=prompt, scores={s: gt["scores"][s] for s in self.score_names}, heatmaps=heatmaps)
            if self.keywords:
                fb.misaligned_word_indices = list(gt["keywords"])
            out.append(fb)
        return out


def check_schema(metrics):
    assert set(metrics) == {"scores", "implausibility_heatmap", "misalignment_heatmap", "keywords"}
    assert set(metrics["scores"]) == set(SCORE_NAMES)
    for value in metrics["scores"].values():
        assert value is None or set(value) == {"plcc", "srcc"}
    for key in ("implausibility_heatmap", "misalignment_heatmap"):
        assert metrics[key] is None or set(metrics[key]) == HEATMAP_KEYS
    assert metrics["keywords"] is None or set(metrics["keywords"]) == {"precision", "recall", "f1"}


def test_perfect_oracle_gets_perfect_metrics_and_all_files(tmp_path):
    split = tiny_split(8)
    rater = OracleRater(split)
    metrics = evaluate(rater, split, tmp_path, name="oracle", batch_size=3, show_progress=False)
    assert rater.calls == 3  # batched: 3 + 3 + 2
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    check_schema(on_disk)
    for s in SCORE_NAMES:
        assert metrics["scores"][s]["plcc"] == pytest.approx(1.0)
        assert metrics["scores"][s]["srcc"] == pytest.approx(1.0)
    for key, n_gt0 in (("implausibility_heatmap", 3), ("misalignment_heatmap", 2)):
        m = metrics[key]
        assert (m["n_all"], m["n_gt0"], m["n_gt_pos"]) == (8, n_gt0, 8 - n_gt0)
        assert m["mse_all"] == 0.0 and m["mse_gt0"] == 0.0
        assert m["cc"] == pytest.approx(1.0) and m["sim"] == pytest.approx(1.0)
        assert m["kld"] == pytest.approx(0.0, abs=1e-9)
        assert m["auc_judd"] > 0.99 and m["nss"] > 1.0
    assert metrics["keywords"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    for name in (
        "examples_implausibility.png",
        "examples_misalignment.png",
        "scores_scatter.png",
        "report.md",
        "predictions.jsonl",
        "eval_info.json",
    ):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    for title in TABLE_TITLES:
        assert title in report
    for png in ("examples_implausibility.png", "examples_misalignment.png", "scores_scatter.png"):
        assert f"]({png})" in report
    assert "| oracle | 1.000 | 1.000 |" in report  # Table 1 row
    assert "| oracle | 100.0 | 100.0 | 100.0 |" in report  # Table 4 row, in percent as in the paper
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["uid"] == "uid-0"


def test_rater_without_keyword_output_gives_null_keywords(tmp_path):
    split = tiny_split(6)
    metrics = evaluate(OracleRater(split, keywords=False), split, tmp_path, show_progress=False, figures=False)
    check_schema(metrics)
    assert metrics["keywords"] is None
    assert json.loads((tmp_path / "metrics.json").read_text())["keywords"] is None
    assert "Not produced by any model here (`model`)" in (tmp_path / "report.md").read_text()


def test_plain_callable_is_judged_by_what_it_returns(tmp_path):
    split = tiny_split(6)
    oracle = OracleRater(split, keywords=False, scores=["alignment"])

    def plain(images, prompts):  # no `capabilities`: what it returns is what it produces
        return oracle(images, prompts)

    metrics = evaluate(plain, split, tmp_path, show_progress=False, figures=False)
    assert metrics["scores"]["alignment"]["plcc"] == pytest.approx(1.0)
    assert metrics["scores"]["plausibility"] is None and metrics["keywords"] is None

    def partial(images, prompts):
        out = oracle(images, prompts)
        out[0].scores = {}
        return out

    with pytest.raises(ValueError, match="for every sample or for none"):
        evaluate(partial, split, tmp_path / "partial", show_progress=False, figures=False)


def test_center_prior_has_null_scores_and_finite_heatmap_metrics(tmp_path):
    split = tiny_split(8)
    metrics = evaluate(CenterPriorRater(), split, tmp_path, name="center_prior", show_progress=False)
    check_schema(metrics)
    assert all(v is None for v in metrics["scores"].values())
    assert metrics["keywords"] is None
    for key in ("implausibility_heatmap", "misalignment_heatmap"):
        values = [v for v in metrics[key].values()]
        assert all(v is not None and np.isfinite(v) for v in values), metrics[key]
        assert 0.0 < metrics[key]["auc_judd"] < 1.0 and metrics[key]["cc"] < 1.0
    assert not (tmp_path / "scores_scatter.png").exists()
    assert (tmp_path / "examples_implausibility.png").is_file()
    report = (tmp_path / "report.md").read_text()
    assert all(t in report for t in TABLE_TITLES) and "Not produced by any model here (`center_prior`)" in report


def test_predicted_heatmaps_are_resized_to_the_ground_truth_size(tmp_path):
    split = tiny_split(6, image_size=(40, 56), map_size=(16, 16))  # maps coarser than the images, another aspect
    metrics = evaluate(OracleRater(split), split, tmp_path, show_progress=False, figures=False)
    for key in ("implausibility_heatmap", "misalignment_heatmap"):
        assert metrics[key]["mse_all"] < 2e-3 and metrics[key]["cc"] > 0.95


def test_rahf_predictor_is_evaluated_on_every_table(tmp_path):
    split = tiny_split(4)
    predictor = RichFeedbackPredictor(tiny_rahf_model(), tiny_rahf_processor(), max_new_tokens=8)
    metrics = evaluate(
        predictor, split, tmp_path, name="rahf_untrained", batch_size=4, show_progress=False, num_figure_examples=2
    )
    check_schema(metrics)
    assert all(metrics["scores"][s] is not None for s in SCORE_NAMES)
    assert metrics["implausibility_heatmap"]["n_all"] == 4 and metrics["keywords"] is not None
    assert np.isfinite(metrics["misalignment_heatmap"]["mse_all"])


def test_comparison_report_has_a_row_per_model_and_labels_the_papers_rows(tmp_path):
    split = tiny_split(6)
    evaluate(OracleRater(split), split, tmp_path / "oracle", name="oracle", show_progress=False, figures=False)
    prior = evaluate(CenterPriorRater(), split, tmp_path / "prior", show_progress=False, figures=False)
    out = write_comparison_report(
        {"oracle": tmp_path / "oracle", "center_prior": prior},
        tmp_path / "cmp.md",
        include_paper=True,
        title="side by side",
    )
    text = out.read_text()
    assert all(t in text for t in TABLE_TITLES)
    table2 = text.split("Table 2.")[1].split("Table 3.")[0]
    assert "| oracle |" in table2 and "| center_prior |" in table2
    assert "| ResNet-50 | 0.00996 | 0.00093 | 0.506 |" in table2  # the paper's row
    assert "not measured here" in table2 and "RichHF-18K" in table2
    table1 = text.split("Table 1.")[1].split("Table 2.")[0]
    assert "| center_prior |" not in table1.split("For reference")[0]
    assert "PickScore (off-the-shelf)" in table1
    assert set(PAPER_METRICS) >= {"ResNet-50", "RAHF multi-head", "RAHF augmented prompt", "CLIP gradient"}


def test_cli_evaluates_a_baseline_name_and_a_saved_model(tmp_path):
    data = tiny_dataset_dict(n_train=4, n_validation=2, n_test=5)
    data.save_to_disk(str(tmp_path / "data"))
    assert (
        main(
            [
                "--model",
                "center_prior",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "prior"),
                "--with_paper_results",
                "--num_figure_examples",
                "2",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "prior" / "metrics.json").read_text())
    check_schema(metrics)
    assert metrics["implausibility_heatmap"]["n_all"] == 5
    report = (tmp_path / "prior" / "report.md").read_text()
    assert "not measured here" in report and "# Evaluation: center_prior" in report

    model, processor = tiny_rahf_model(), tiny_rahf_processor()
    model.save_pretrained(tmp_path / "run" / "final")
    processor.save_pretrained(tmp_path / "run" / "final")
    assert (
        main(
            [
                "--model",
                str(tmp_path / "run"),
                "--data",
                str(tmp_path / "data"),
                "--split",
                "validation",
                "--out",
                str(tmp_path / "rahf"),
                "--no_figures",
                "--max_examples",
                "2",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "rahf" / "metrics.json").read_text())
    assert metrics["keywords"] is not None and metrics["scores"]["overall"] is not None
    assert "# Evaluation: run" in (tmp_path / "rahf" / "report.md").read_text()
    with pytest.raises(ValueError, match="splits are"):
        main(["--model", "center_prior", "--data", str(tmp_path / "data"), "--split", "dev", "--out", str(tmp_path)])


class FloorRater(OracleRater):
    """The ground truth with a floor added to every heatmap pixel (as trained models predict), same keywords."""

    def __call__(self, images, prompts, outputs=None):
        out = super().__call__(images, prompts, outputs)
        for fb in out:
            fb.heatmaps = {k: (0.2 + 0.6 * v).astype(np.float32) for k, v in fb.heatmaps.items()}
        return out


def test_both_protocols_on_the_same_predictions_and_each_beside_its_published_rows(tmp_path):
    from rahf import metrics as M

    split = tiny_split(8)
    rater = FloorRater(split)
    paper = evaluate(
        rater, split, tmp_path / "p", name="floor", show_progress=False, figures=False, include_paper=True
    )
    reimpl = evaluate(
        rater, split, tmp_path / "r", name="floor", show_progress=False, figures=False, protocol="reimpl"
    )
    check_schema(paper)
    check_schema(reimpl)
    both = json.loads((tmp_path / "p" / "metrics_by_protocol.json").read_text())
    assert both == json.loads((tmp_path / "r" / "metrics_by_protocol.json").read_text())
    assert both["paper"] == json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert both["reimpl"] == json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert json.loads((tmp_path / "r" / "eval_info.json").read_text())["protocol"] == "reimpl"

    # Each protocol's numbers are its own definitions applied to the same predictions.
    gts = gt_of(split)
    preds = rater([im.convert("RGB") for im in split["image"]], list(split["prompt"]))
    for h in ("implausibility", "misalignment"):
        g = [gts[p][h] for p in split["prompt"]]
        pr = [fb.heatmaps[h] for fb in preds]
        for protocol, got in (("paper", paper), ("reimpl", reimpl)):
            want = M.heatmap_metrics(pr, g, protocol=protocol)
            for key in ("mse_all", "cc", "kld", "sim", "nss", "auc_judd", "n_gt0"):
                assert got[f"{h}_heatmap"][key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (h, protocol, key)
        assert paper[f"{h}_heatmap"]["sim"] > reimpl[f"{h}_heatmap"]["sim"] + 0.05  # the floor costs SIM only there
    kw_pred = [fb.misaligned_word_indices for fb in preds]
    kw_gt = [gts[p]["keywords"] for p in split["prompt"]]
    assert paper["keywords"]["f1"] == pytest.approx(M.keyword_prf(kw_pred, kw_gt)[2])
    assert reimpl["keywords"]["f1"] == pytest.approx(M.keyword_prf(kw_pred, kw_gt, protocol="reimpl")[2])
    assert paper["scores"] == reimpl["scores"]  # PLCC / SRCC have one definition

    report = (tmp_path / "p" / "report.md").read_text()
    first, second = report.split("## Under the re-implementation's protocol")
    assert "## Under the paper's protocol" in first
    assert "| RAHF multi-head | 0.01216 | 0.00141 | 0.425 |" in first and "995 test samples" in first
    assert "955" in first  # the release's test count beside the paper's
    assert "| re-implementation multi-head | 0.00724 | 0.00078 | 0.525 |" in second
    assert "RAHF multi-head" not in second and "re-implementation multi-head" not in first
    assert "| floor |" in first and "| floor |" in second
    with pytest.raises(ValueError, match="`protocol` must be one of"):
        evaluate(rater, split, tmp_path / "x", show_progress=False, figures=False, protocol="mit")


def test_cli_protocol_flag(tmp_path):
    data = tiny_dataset_dict(n_train=4, n_validation=2, n_test=5)
    data.save_to_disk(str(tmp_path / "data"))
    argv = ["--model", "center_prior", "--data", str(tmp_path / "data"), "--no_figures", "--with_paper_results"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--protocol", "reimpl"]) == 0
    both = json.loads((tmp_path / "r" / "metrics_by_protocol.json").read_text())
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == both["reimpl"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.index("## Under the re-implementation's protocol") < report.index("## Under the paper's protocol")
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "x"), "--protocol", "mit"])
