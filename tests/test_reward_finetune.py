"""Reward backpropagation (DRaFT-K / ReFL): the reward rises, the LoRA loads with `load_lora_weights`, a resumed run
ends bit-identical, non-finite reward gradients are zeroed and counted, two processes keep identical LoRA weights,
and bad flags name the field."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from improve_utils import launch_two_processes, read_jsonl, save_tiny_rahf, save_tiny_sd, write_prompts
from rahf.improve._reward_job import sanitize_reward_grad
from rahf.improve.efficacy import weights_path
from rahf.improve.finetune import LORA_WEIGHT_NAME
from rahf.improve.reward_finetune import parse_reward_finetune_args, train_reward_backprop
from safetensors.torch import load_file

from rahf.reward import register_reward
from rahf.training_utils import list_checkpoints

SCENE = "three red triangles on a colourful gradient"  # a prompt of the synthetic grammar, which the judge reads


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rb_assets")
    return {"sd": save_tiny_sd(root / "sd"), "rahf": save_tiny_rahf(root / "rahf"),
            "prompts": write_prompts(root / "prompts.txt"), "one": write_prompts(root / "one.txt", [SCENE])}  # fmt: skip


def _argv(assets, out, *extra, prompts="prompts") -> list[str]:
    return [str(a) for a in (
        "--pretrained_model_name_or_path", assets["sd"], "--reward_model", assets["rahf"], "--prompts_file",
        assets[prompts], "--reward", "aesthetics", "--num_inference_steps", 2, "--guidance_scale", 1.0,
        "--train_batch_size", 2, "--learning_rate", "5e-2", "--output_dir", out, "--seed", 3, "--debug_check_sync",
        *extra)]  # fmt: skip


def _run(*argv):
    return train_reward_backprop(parse_reward_finetune_args([str(a) for a in argv]))


def test_bad_flags_name_the_field(assets, tmp_path):
    for flags, field in ((["--backprop_steps", "0"], "backprop_steps"), (["--backprop_steps", "3"], "backprop_steps"),
                         (["--reward_grad_clip", "-1"], "reward_grad_clip"), (["--guidance_scale", "0.5"], "guidance_scale"),
                         (["--learning_rate", "nan"], "learning_rate"), (["--monitor_threshold", "2"], "monitor_threshold")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            parse_reward_finetune_args(_argv(assets, tmp_path, *flags))
    with pytest.raises(ValueError, match="prompts_file"):
        _run(*_argv(assets, tmp_path, "--prompts_file", tmp_path / "missing.txt"))


def test_yaml_config_and_flags():
    args = parse_reward_finetune_args(["--config", "configs/improve/reward_finetune.yaml", "--backprop_steps", "3"])
    assert (args.backprop_steps, args.reference_weight, args.gradient_checkpointing) == (3, 0.1, True)
    assert args.learning_rate == 1e-4 and args.checkpointing_steps == 100


def test_reward_gradient_is_cleaned_and_clipped_per_image():
    grad = torch.tensor([[3.0, 4.0, float("nan")], [0.3, 0.4, float("inf")]]).view(2, 3, 1, 1)
    clean, nonfinite = sanitize_reward_grad(grad, clip=1.0)
    assert nonfinite == 2 and torch.isfinite(clean).all()
    assert torch.allclose(clean.flatten(1).norm(dim=1), torch.tensor([1.0, 0.5]))  # the first clipped, the second not


@register_reward("finetune_test_brightness")
def _brightness_reward(reward_model=None, reward_processor=None):
    # a reward a tiny random generator can certainly learn, so that a wrong sign or a lost gradient shows
    return lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {})


def test_reward_rises_and_the_lora_loads(assets, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    summary = _run(*_argv(assets, out, "--max_train_steps", 3, "--checkpointing_steps", 0, "--reference_weight", 0.1,
                          "--backprop_steps", 2,
                          "--gradient_checkpointing", "--vae_gradient_checkpointing", "--validation_prompts",
                          SCENE, "--num_validation_images", 3, "--reward", "finetune_test_brightness", "--judge",
                          weights_path("judge_synth"),
                          "--learning_rate", "1e-2", prompts="one"))  # fmt: skip
    # The validation images (fixed seeds, the training prompt) are brighter after three steps.
    assert summary["validation"]["val/reward"] > summary["validation_start"]["val/reward"]
    assert summary["forward_passes"] == 3 * 2 * (2 + 2) and summary["nonfinite_reward_grads"] == 0
    assert all(np.isfinite(h["train/reward"]) and h["train/penalty"] >= 0 for h in summary["history"])
    rows = read_jsonl(out / "logs" / "validation_log.jsonl")
    assert {"reward", "plausibility", "alignment", "aesthetics", "overall", "implausibility_area"} <= set(rows[0])
    # the reward-hacking monitor: the judge's scores and the heatmap's area, logged beside the reward
    assert {"judge_plausibility", "judge_alignment", "judge_overall"} <= set(rows[0])
    assert {"monitor/judge_overall", "monitor/implausibility_area", "val/reward"} <= set(summary["validation"])
    assert {r["step"] for r in rows} == {0, 3} and (out / rows[-1]["file_name"]).is_file()

    pipe = DiffusionPipeline.from_pretrained(str(assets["sd"]))
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "guidance_scale": 1.0}
    before = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(out))
    after = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(after - before).max() > 1e-4


def test_resume_ends_bit_identical(assets, tmp_path):
    full = tmp_path / "full"
    _run(*_argv(assets, full, "--max_train_steps", 3, "--checkpointing_steps", 2, "--guidance_scale", 2.0))
    assert [p.name for p in list_checkpoints(full)] == ["checkpoint-2"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")  # killed right after its step-2 checkpoint
    summary = _run(*_argv(assets, resumed, "--max_train_steps", 3, "--checkpointing_steps", 2, "--guidance_scale",
                          2.0, "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    first, again = read_jsonl(full / "debug_sync" / "rank0.jsonl"), read_jsonl(resumed / "debug_sync" / "rank0.jsonl")
    assert again[0]["event"] == "resumed" and again[0]["sha256"] == first[1]["sha256"]
    assert again[1]["sha256"] == first[2]["sha256"] and again[1]["prompts"] == first[2]["prompts"]
    a, b = load_file(str(full / LORA_WEIGHT_NAME)), load_file(str(resumed / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.mean(dim=(1, 2, 3))

    @staticmethod
    def backward(ctx, grad):
        return torch.full((grad.shape[0], 3, 32, 32), float("nan"))


@register_reward("test_nan_gradient")
def _nan_gradient_reward(reward_model=None, reward_processor=None):
    return lambda images, prompts, metadata: (_NaNGrad.apply(images), {})


def test_a_nan_reward_gradient_is_zeroed_never_trained_on(assets, tmp_path):
    summary = _run(*_argv(assets, tmp_path, "--max_train_steps", 1, "--checkpointing_steps", 0, "--reward",
                          "test_nan_gradient"))  # fmt: skip
    assert summary["nonfinite_reward_grads"] == 2 * 3 * 32 * 32
    state = load_file(str(tmp_path / LORA_WEIGHT_NAME))
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.distributed
def test_two_processes_keep_identical_lora(assets, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes("rahf.improve.reward_finetune",
                         _argv(assets, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--train_batch_size", 1),
                         cwd=tmp_path)  # fmt: skip
    rank0, rank1 = read_jsonl(out / "debug_sync" / "rank0.jsonl"), read_jsonl(out / "debug_sync" / "rank1.jsonl")
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2]
    for a, b in zip(rank0, rank1):
        assert a["num_processes"] == 2 and a["sha256"] == b["sha256"], f"ranks disagree after step {a['step']}"
        assert a["prompts"] != b["prompts"]  # equal LoRA from averaged gradients, not from equal data
    assert rank0[0]["sha256"] != rank0[1]["sha256"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoint-2").iterdir()}
