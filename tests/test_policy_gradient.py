"""Policy gradient (DDPO / GRPO, scalar and heatmap-weighted advantages): the stochastic DDIM step and its
log-probability, group advantages, dense weights, learning, a bit-identical resume, two processes with identical LoRA
weights after every step, and bad flags that name the field."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDIMScheduler
from improve_utils import launch_two_processes, read_jsonl, save_tiny_rahf, save_tiny_sd, write_prompts
from rahf.improve._sampling import ddim_step, heatmaps_on_latent_grid
from rahf.improve.finetune import LORA_WEIGHT_NAME
from rahf.improve.policy_gradient import (
    dense_weights,
    forward_passes_per_image,
    group_advantages,
    parse_policy_gradient_args,
    train_policy_gradient,
)
from safetensors.torch import load_file


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg_assets")
    return {"sd": save_tiny_sd(root / "sd"), "rahf": save_tiny_rahf(root / "rahf"),
            "prompts": write_prompts(root / "prompts.txt"), "one": write_prompts(root / "one.txt", ["a red cat"])}  # fmt: skip


def _argv(assets, out, *extra, prompts="prompts") -> list[str]:
    return [str(a) for a in (
        "--pretrained_model_name_or_path", assets["sd"], "--reward_model", assets["rahf"], "--prompts_file",
        assets[prompts], "--reward", "aesthetics", "--num_inference_steps", 2, "--guidance_scale", 1.0,
        "--train_batch_size", 1, "--group_size", 2, "--learning_rate", "5e-2", "--output_dir", out, "--seed", 3,
        "--debug_check_sync", "--checkpointing_steps", 0, *extra)]  # fmt: skip


def _run(*argv):
    return train_policy_gradient(parse_policy_gradient_args([str(a) for a in argv]))


def _scheduler(steps=4):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_is_diffusers_step_and_its_log_prob_is_the_gaussians(prediction_type):
    scheduler = _scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps:
        mean, none = ddim_step(scheduler, out, t, x, eta=0.0)
        assert none is None
        assert torch.allclose(mean, scheduler.step(out, t, x, eta=0.0).prev_sample, atol=1e-5)
        prev, log_prob = ddim_step(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        expected = scheduler.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        assert torch.allclose(prev, expected, atol=1e-5)
        std = math.sqrt(scheduler._get_variance(int(t), int(t) - 1000 // 4))
        reference = torch.distributions.Normal(prev - std * noise, std).log_prob(prev)
        assert torch.allclose(log_prob, reference, atol=1e-4)
        _, again = ddim_step(scheduler, out, t, x, eta=1.0, prev_sample=prev)  # a recorded step, re-evaluated
        assert torch.allclose(again, log_prob)


def test_group_advantages_and_dense_weights():
    rewards = torch.tensor([0.1, 0.3, 0.5, 0.5, 0.2, 0.9])
    adv = group_advantages(rewards, group_size=2)
    assert torch.allclose(adv[:2], torch.tensor([-1, 1]) / math.sqrt(2)) and (adv[2:4] == 0).all()  # a tie: nothing
    assert group_advantages(torch.tensor([0.0, 100.0, 0.0, 0.0]), 2, clip=0.5).abs().max() == 0.5
    heat = torch.zeros(2, 4, 4)
    heat[:, :2] = 0.8  # the top half is flawed
    w = dense_weights(torch.tensor([-1.0, 1.0]), heat)
    assert torch.allclose(w.mean(dim=(1, 2)), torch.ones(2))  # the same total advantage as the scalar one
    assert w[0, :2].min() > w[0, 2:].max()  # a bad image: blame where the flaw is
    assert w[1, 2:].min() > w[1, :2].max()  # a good image: credit where it is clean
    assert torch.equal(dense_weights(torch.tensor([-1.0, 1.0]), heat, mix=0.0), torch.ones(2, 4, 4))
    grid = heatmaps_on_latent_grid(torch.rand(2, 64, 64), (16, 16))
    assert grid.shape == (2, 16, 16) and 0 <= grid.min() and grid.max() <= 1


def test_bad_flags_name_the_field(assets, tmp_path):
    for flags, field in ((["--group_size", "1"], "group_size"), (["--eta", "0"], "eta"),
                         (["--advantage", "sparse"], "advantage"), (["--clip_range", "0"], "clip_range"),
                         (["--train_timestep_fraction", "1.5"], "train_timestep_fraction"),
                         (["--dense_mix", "-1"], "dense_mix"), (["--num_minibatches", "9"], "num_minibatches")):  # fmt: skip
        with pytest.raises((ValueError, SystemExit)):
            try:
                parse_policy_gradient_args(_argv(assets, tmp_path, *flags))
            except ValueError as err:
                assert field in str(err)
                raise
    with pytest.raises(ValueError, match="heatmap"):
        _run(*_argv(assets, tmp_path, "--heatmap", "blur"))


def test_learning_raises_the_surrogate_on_the_samples(assets, tmp_path):
    # A second pass over the same samples sees the first pass's update: the advantage-weighted ratio must have risen
    # (above-average transitions made likelier, below-average ones less likely), in both advantage modes.
    for advantage in ("scalar", "dense"):
        summary = _run(*_argv(assets, tmp_path / advantage, "--max_train_steps", 1, "--group_size", 4, "--clip_range",
                              0.2, "--num_inference_steps", 4, "--num_minibatches", 1, "--ppo_epochs", 2,
                              "--learning_rate", "1e-2", "--advantage", advantage))  # fmt: skip
        (record,) = summary["history"]
        assert record["train/surrogate_gain"] > 0 and 0 < record["train/approx_kl"] < 1, record
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_yaml_config_and_flags():
    args = parse_policy_gradient_args(["--config", "configs/improve/policy_gradient.yaml", "--advantage", "dense"])
    assert (args.advantage, args.group_size, args.eta, args.heatmap) == ("dense", 8, 1.0, "implausibility")
    assert args.train_timesteps() == 10 and forward_passes_per_image(args) == 30


def test_dense_and_scalar_run_and_a_resume_ends_bit_identical(assets, tmp_path):
    flags = ("--max_train_steps", 2, "--advantage", "dense", "--guidance_scale", 2.0, "--clip_range", 0.2)
    full = tmp_path / "full"
    summary = _run(*_argv(assets, full, *flags, "--checkpointing_steps", 1))
    args = parse_policy_gradient_args(_argv(assets, full, *flags))
    assert summary["forward_passes"] == 2 * 2 * forward_passes_per_image(args)  # 2 steps x 2 images x (2 + 2)
    history = read_jsonl(full / "logs" / "train_log.jsonl")
    assert all(
        np.isfinite(r["train/reward"]) and 0 <= r["train/clip_fraction"] <= 1 for r in history if "train/reward" in r
    )
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    _run(*_argv(assets, resumed, *flags, "--resume_from_checkpoint", "latest"))
    a, b = load_file(str(full / LORA_WEIGHT_NAME)), load_file(str(resumed / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # The scalar advantage, on the same samples: another update (the dense weights moved the advantage around).
    _run(*_argv(assets, tmp_path / "scalar", *flags[:2], "--guidance_scale", 2.0, "--clip_range", 0.2))
    c = load_file(str(tmp_path / "scalar" / LORA_WEIGHT_NAME))
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.distributed
def test_two_processes_keep_identical_lora(assets, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes("rahf.improve.policy_gradient",
                         _argv(assets, out, "--max_train_steps", 2, "--advantage", "dense"), cwd=tmp_path)  # fmt: skip
    rank0, rank1 = read_jsonl(out / "debug_sync" / "rank0.jsonl"), read_jsonl(out / "debug_sync" / "rank1.jsonl")
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2]
    for a, b in zip(rank0, rank1):
        assert a["num_processes"] == 2 and a["sha256"] == b["sha256"], f"ranks disagree after step {a['step']}"
        assert a["prompts"] != b["prompts"]
    assert rank0[0]["sha256"] != rank0[1]["sha256"]
