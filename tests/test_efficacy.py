"""`rahf efficacy`: its buckets, held-out prompts and controls, and a whole run on tiny models (every experiment,
every output, pixels outside repair masks unchanged)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from rahf.improve.efficacy import (
    BUCKETS,
    EfficacyArguments,
    _moved,
    _side_by_side,
    bucket_of,
    draw_prompts,
    run_efficacy,
)
from rahf.improve.judge import JudgeVerdict, SynthJudge


def test_buckets_cover_every_difference_in_order():
    assert [bucket_of(d) for d in (0.5, 0.15, 0.05, 0.0, -0.02, -0.05, -0.3)] == [
        "much_better", "much_better", "better", "same", "same", "worse", "much_worse",
    ]  # fmt: skip


def _verdict(overall):
    return JudgeVerdict({"plausibility": overall, "alignment": overall, "overall": overall}, {}, [], "wood",
                        np.zeros((4, 4), bool))  # fmt: skip


def test_side_by_side_averages_over_a_prompts_seeds():
    prompts = ["a", "a", "b", "b"]
    original = [_verdict(v) for v in (0.5, 0.5, 0.5, 0.5)]
    tuned = [_verdict(v) for v in (0.9, 0.5, 0.4, 0.5)]  # a: +0.2 mean, b: -0.05 mean
    result = _side_by_side(original, tuned, prompts)
    assert result["buckets"]["much_better"] == 0.5 and result["buckets"]["worse"] == 0.5
    assert sum(result["buckets"].values()) == pytest.approx(1.0) and result["num_prompts"] == 2


def test_held_out_prompts_depend_on_the_seed_and_avoid_what_they_must():
    a, next_a = draw_prompts(0, 30, set())
    assert len(set(a)) == 30 and draw_prompts(0, 30, set())[0] == a
    assert draw_prompts(1, 30, set())[0] != a
    excluded, _ = draw_prompts(0, 30, set(a[:10]))
    assert not set(excluded) & set(a[:10])
    later, _ = draw_prompts(0, 20, set(a), start=next_a)
    assert not set(later) & set(a)


def test_every_fine_tuning_method_gets_best_of_ns_budget(tmp_path):
    from rahf.improve.efficacy import _method_arguments, best_of_n_budget

    args = EfficacyArguments(num_selection_prompts=40, num_images_per_prompt=8, num_inference_steps=10,
                             finetune_steps=50, finetune_batch_size=16)  # fmt: skip
    budget = best_of_n_budget(args)
    assert budget == {
        "generator_forward_passes": 4000,
        "sampling_forward_passes": 3200,
        "training_forward_passes": 800,
    }
    for method, per_step in (("reward_backprop", 8 * 10), ("policy_gradient", 4 * 4 * (10 + 5)),
                             ("policy_gradient_dense", 4 * 4 * (10 + 5))):  # fmt: skip
        job, allowed = _method_arguments(method, tmp_path, tmp_path, tmp_path / "p.txt", tmp_path, args)
        assert allowed == 4000 and job.max_train_steps == 4000 // per_step
        assert (getattr(job, "advantage", None) == "dense") == (method == "policy_gradient_dense")
    with pytest.raises(ValueError, match="experiments"):
        EfficacyArguments(experiments=["best_of_n", "dpo"])


def test_the_random_control_mask_keeps_the_area():
    mask = np.zeros((64, 64), bool)
    mask[10:25, 30:40] = True
    moved = _moved(mask, np.random.default_rng(0))
    assert moved.sum() == mask.sum() and not np.array_equal(moved, mask)


class _FlawedJudge:
    """The tiny judge, but every image has a central artifact: so that repair has something to do."""

    def __init__(self, judge: SynthJudge):
        self.judge = judge

    def __call__(self, images, prompts):
        verdicts = self.judge(images, prompts)
        for verdict in verdicts:
            verdict.artifact_mask = np.zeros((64, 64), bool)
            verdict.artifact_mask[20:40, 20:40] = True
            verdict.artifact_areas = [400]
        return verdicts


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from rahf.improve.judge import JudgeTrainingArguments, train_judge
    from rahf.improve.train_generator import main as train_generator_main
    from train_utils import make_tiny_dataset

    from rahf.init_model import init_model

    root = tmp_path_factory.mktemp("efficacy")
    data = make_tiny_dataset(root / "data", image_size=64)
    assert train_generator_main([
        "--data_dir", str(data), "--output_dir", str(root / "generator"), "--vae_channels", "8", "16", "16",
        "--unet_channels", "16", "32", "--text_hidden_size", "32", "--text_layers", "1", "--vae_steps", "1",
        "--unet_steps", "1", "--vae_batch_size", "4", "--train_batch_size", "4", "--checkpointing_steps", "0",
        "--validation_steps", "0", "--num_validation_prompts", "1", "--validation_inference_steps", "1",
    ]) == 0  # fmt: skip
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_judge(JudgeTrainingArguments(output_dir=str(root / "judge"), num_train=32, num_test=8, max_train_steps=2,
                                       train_batch_size=8, channels=[16, 16, 32, 32], shape_steps=2))  # fmt: skip
    init_model("configs/model/tiny.json", str(root / "rahf"))
    return root


@pytest.mark.slow
def test_a_whole_run_on_tiny_models_writes_every_result(tiny_world, tmp_path):
    args = EfficacyArguments(
        out=str(tmp_path), seed=3, num_prompts=3, seeds_per_prompt=2, generator=str(tiny_world / "generator" / "final"),
        judge=str(tiny_world / "judge" / "final"), reward_model=str(tiny_world / "rahf"), num_inference_steps=2,
        num_selection_prompts=4, num_images_per_prompt=2, finetune_steps=2, finetune_batch_size=2, repair_images=2,
        repair_candidates=2, guidance_prompts=2, reward_guidance_scales=[1.0], pg_batch_size=1, pg_group_size=2,
        experiments=["best_of_n", "repair", "guidance", "policy_gradient_dense"],
    )  # fmt: skip
    judge = _FlawedJudge(SynthJudge.from_pretrained(tiny_world / "judge" / "final"))
    result = run_efficacy(args, judge=judge)
    saved = json.loads((tmp_path / "efficacy.json").read_text())
    assert saved["best_of_n"]["buckets"] == result["best_of_n"]["buckets"]
    for arm in (saved["best_of_n"], saved["best_of_n"]["control"]):
        assert set(arm["buckets"]) == set(BUCKETS) and sum(arm["buckets"].values()) == pytest.approx(1.0)
    assert set(saved["best_of_n"]["judged_means"]) == {"original", "finetuned", "control"}
    assert saved["best_of_n"]["num_kept"] >= 1 and saved["best_of_n"]["budget"]["sampling_forward_passes"] == 8 * 2
    assert saved["best_of_n"]["budget"]["generator_forward_passes"] == 8 * 2 + 2 * 2  # + the LoRA's training passes
    dense = saved["policy_gradient_dense"]
    assert set(dense["buckets"]) == set(BUCKETS) and sum(dense["buckets"].values()) == pytest.approx(1.0)
    assert set(dense["judged_means"]) == {"original", "finetuned"}
    assert dense["judged_means"]["original"] == saved["best_of_n"]["judged_means"]["original"]  # the same images
    assert 0 < dense["budget"]["generator_forward_passes"] <= 20 and dense["nonfinite_reward_grads"] == 0
    assert set(dense["heldout_reward"]) == {"original", "finetuned"}
    repair = saved["repair"]
    assert repair["num_images"] == 2 and repair["pixels_changed_outside_mask"] == 0
    assert {"better", "same", "worse", "control", "mask_iou"} <= set(repair)
    for target in ("plausibility", "aesthetics"):
        rows = saved["guidance"][target]
        assert [r["scale"] for r in rows] == [0.0, 1.0] and all("judged" in r and "reward" in r for r in rows)
    held_out = (tmp_path / "heldout_prompts.txt").read_text().split("\n")
    selection = (tmp_path / "best_of_n" / "selection_prompts.txt").read_text().split("\n")
    assert not (set(held_out) - {""}) & set(selection)
    for picture in ("table5.png", "best_of_n/before_after.png", "repair/repair.png", "guidance/guidance.png"):
        assert (tmp_path / picture).is_file(), picture
    assert "Table 5" in (tmp_path / "report.md").read_text()


def _fake_result(seed: int, better: float, worse: float, finetuned_alignment: float, repair_better: float) -> dict:
    same = 1.0 - better - worse
    buckets = {"much_better": better / 2, "better": better / 2, "same": same, "worse": worse, "much_worse": 0.0}
    control = {"much_better": 0.0, "better": 0.2, "same": 0.6, "worse": 0.2, "much_worse": 0.0}
    original = {"plausibility": 0.5, "alignment": 0.6, "overall": 0.55}
    guided = {"plausibility": 0.6, "alignment": 0.59, "overall": 0.6}
    return {
        "seed": seed,
        "args": {"guidance_targets": ["plausibility", "aesthetics"]},
        "best_of_n": {"buckets": buckets, "control": {"buckets": control},
                      "judged_means": {"original": original, "control": original,
                                       "finetuned": {**original, "alignment": finetuned_alignment}}},
        "repair": {"num_images": 10, "better": repair_better, "same": 0.9 - repair_better, "worse": 0.1 + (repair_better < 0.6),
                   "control": {"better": 0.3, "same": 0.4, "worse": 0.3}},
        "guidance": {
            t: [{"scale": 0.0, "judged_change": {k: 0.0 for k in original}, "reward_change": 0.0},
                {"scale": 1.0, "judged_change": {k: (guided[k] - original[k]) / original[k] for k in original},
                 "reward_change": 0.5}]
            for t in ("plausibility", "aesthetics")
        },
    }  # fmt: skip


def test_targets_read_the_figures_and_a_miss_is_a_miss():
    from rahf.improve.efficacy import check_targets

    good = check_targets(_fake_result(0, better=0.6, worse=0.1, finetuned_alignment=0.6, repair_better=0.7))
    assert all(good["best_of_n"]["met"].values()) and all(good["repair"]["met"].values())
    assert good["guidance"]["plausibility"]["met"] is True  # +20 % plausibility, alignment -1.7 %
    assert good["guidance"]["aesthetics"]["met"] is None  # the judge has no aesthetics score
    bad = check_targets(_fake_result(0, better=0.5, worse=0.2, finetuned_alignment=0.5, repair_better=0.55))
    assert bad["best_of_n"]["met"] == {"better": False, "worse": False, "no_judged_mean_drop": False,
                                       "above_control": True}  # fmt: skip
    assert bad["repair"]["met"]["raised"] is False and bad["repair"]["met"]["lowered"] is False


def test_summary_gives_every_seed_mean_and_spread(tmp_path):
    from rahf.improve.efficacy import main

    for seed, better in ((0, 0.6), (1, 0.5)):
        (tmp_path / f"s{seed}").mkdir()
        result = _fake_result(seed, better=better, worse=0.1, finetuned_alignment=0.6, repair_better=0.7)
        (tmp_path / f"s{seed}" / "efficacy.json").write_text(json.dumps(result))
    assert main(["--out", str(tmp_path / "all"), "--summarize", str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    better = summary["figures"]["best_of_n.better"]
    assert better["values"] == pytest.approx([0.6, 0.5]) and better["spread"] == pytest.approx(0.1)
    assert summary["met_by_every_seed"]["best_of_n.better"] is False
    assert summary["met_by_every_seed"]["repair.raised"] is True
