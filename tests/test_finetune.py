"""LoRA fine-tuning: the saved LoRA loads with `pipe.load_lora_weights` and changes the output, resuming restores it
exactly, 8-bit Adam, aMUSEd, and two processes that keep identical LoRA weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from improve_utils import (
    launch_two_processes,
    make_image_folder,
    read_jsonl,
    save_tiny_amused,
    save_tiny_rahf,
    save_tiny_sd,
)
from peft import LoraConfig
from rahf.improve.finetune import (
    LORA_WEIGHT_NAME,
    _load_rows,
    load_lora_into_pipeline,
    lora_checksum,
    parse_finetune_args,
    restore_lora,
    save_lora,
    train_lora,
)
from safetensors.torch import load_file

from rahf.testing import tiny_sd_pipeline
from rahf.training_utils import list_checkpoints


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Each run builds its own Accelerator; accelerate keeps process-wide singletons that tests must clear.
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_assets")
    return {
        "sd": save_tiny_sd(root / "sd"),
        "rahf": save_tiny_rahf(root / "rahf"),
        "data": make_image_folder(root / "kept"),
        "root": root,
    }


def _argv(assets, out, *extra) -> list[str]:
    return [
        str(a)
        for a in (
            "--pretrained_model_name_or_path",
            assets["sd"],
            "--train_data_dir",
            assets["data"],
            "--resolution",
            32,
            "--train_batch_size",
            2,
            "--learning_rate",
            "5e-2",
            "--rank",
            4,
            "--output_dir",
            out,
            "--seed",
            1,
            "--random_flip",
            "--debug_check_sync",
            *extra,
        )
    ]


def _run(*argv):
    return train_lora(parse_finetune_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def trained(assets):
    """4 steps (6 images, batch 2: 3 steps an epoch), checkpoints at 2 and 4, reward-weighted, validated."""
    out = assets["root"] / "run"
    summary = _run(
        *_argv(
            assets,
            out,
            "--max_train_steps",
            4,
            "--checkpointing_steps",
            2,
            "--reward_weighted",
            "--validation_prompts",
            "a red cat",
            "--validation_num_inference_steps",
            2,
            "--validation_steps",
            2,
            "--reward_model",
            assets["rahf"],
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            1,
        )
    )
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return {"out": out, "summary": summary}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _generate(pipe, seed=0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red cat",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


# --------------------------------------------------------------------------------------------------------------------


def test_yaml_config_and_flags():
    args = parse_finetune_args(
        ["--config", "configs/improve/finetune_lora.yaml", "--max_train_steps", "3", "--validation_prompts", "x", "y"]
    )
    assert (args.max_train_steps, args.learning_rate, args.validation_prompts) == (3, 1e-4, ["x", "y"])
    assert args.train_data_dir and args.checkpoints_total_limit == 3
    with pytest.raises(ValueError, match="rank"):
        parse_finetune_args(["--rank", "0"])


def test_reward_weights_come_from_the_recorded_rewards(assets, tmp_path):
    args = parse_finetune_args(_argv(assets, tmp_path, "--reward_weighted"))
    rows, weights = _load_rows(args)
    rewards = np.asarray(rows["reward"])
    assert np.allclose(weights, rewards / rewards.mean()) and np.ptp(weights) > 0
    assert _load_rows(parse_finetune_args(_argv(assets, tmp_path)))[1] is None
    with pytest.raises(ValueError, match="reward_column"):
        _load_rows(parse_finetune_args(_argv(assets, tmp_path, "--reward_weighted", "--reward_column", "nope")))


def test_training_writes_logs_checkpoints_and_validation(trained):
    out = trained["out"]
    assert trained["summary"]["global_step"] == 4
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    for name in (LORA_WEIGHT_NAME, "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "training_state.json"):
        assert (out / "checkpoint-2" / name).is_file(), name
    assert not list((out / "checkpoint-2").glob("model*.safetensors"))  # the frozen UNet is not copied
    log = read_jsonl(out / "logs" / "train_log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert [r["step"] for r in log if "val/reward" in r] == [0, 2, 4]
    validation = read_jsonl(out / "logs" / "validation_log.jsonl")
    assert [r["step"] for r in validation] == [0, 2, 4]
    for r in validation:
        assert {"reward", "plausibility", "alignment", "aesthetics", "overall"} <= r.keys()
        assert (out / r["file_name"]).is_file()
    # Validation used fixed seeds, so its images change only because the LoRA did.
    assert validation[0]["seed"] == validation[2]["seed"] and validation[0]["reward"] != validation[2]["reward"]


def test_saved_lora_loads_into_a_fresh_pipeline_and_changes_its_output(assets, trained):
    from diffusers import DiffusionPipeline

    state = load_file(str(trained["out"] / LORA_WEIGHT_NAME))
    assert state and all(k.startswith("unet.") and "lora" in k for k in state)
    assert any(k.endswith("lora.up.weight") and state[k].abs().sum() > 0 for k in state)  # B moved from its zeros

    pipe = DiffusionPipeline.from_pretrained(str(assets["sd"]))
    before = _generate(pipe)
    assert np.array_equal(before, _generate(pipe))  # same seed, same image: a difference below is the LoRA's
    pipe.load_lora_weights(str(trained["out"]))
    after = _generate(pipe)
    assert np.abs(after - before).max() > 1e-3
    pipe.unload_lora_weights()
    assert np.allclose(_generate(pipe), before, atol=1e-6)


def test_resume_restores_the_saved_lora_and_reaches_the_same_weights(assets, trained, tmp_path):
    full = trained["out"]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")  # a run killed right after its step-2 checkpoint
    summary = _run(
        *_argv(
            assets,
            out,
            "--max_train_steps",
            4,
            "--checkpointing_steps",
            2,
            "--reward_weighted",
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            1,
            "--resume_from_checkpoint",
            "latest",
        )
    )
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")

    saved = load_file(str(full / "checkpoint-2" / LORA_WEIGHT_NAME))
    restored = load_file(str(out / "debug_sync" / "resumed-step-2" / LORA_WEIGHT_NAME))
    assert _same_tensors(saved, restored)  # the LoRA after load_state is exactly the one saved
    first = read_jsonl(full / "debug_sync" / "rank0.jsonl")
    again = read_jsonl(out / "debug_sync" / "rank0.jsonl")
    assert again[0]["event"] == "resumed" and again[0]["sha256"] == first[1]["sha256"]
    assert [r["sha256"] for r in again[1:]] == [r["sha256"] for r in first[2:]]  # steps 3 and 4 replayed exactly
    assert _same_tensors(load_file(str(full / LORA_WEIGHT_NAME)), load_file(str(out / LORA_WEIGHT_NAME)))


def test_restore_refuses_a_lora_of_another_shape(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    save_lora(pipe.unet, "sd", tmp_path)
    other = tiny_sd_pipeline(seed=0)
    torch.manual_seed(1)  # another random LoRA A
    other.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    assert lora_checksum(other.unet) != lora_checksum(pipe.unet)
    restore_lora(other.unet, "sd", tmp_path)
    assert lora_checksum(other.unet) == lora_checksum(pipe.unet)
    narrow = tiny_sd_pipeline(seed=0)
    narrow.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    with pytest.raises(RuntimeError, match="does not match the adapter"):
        restore_lora(narrow.unet, "sd", tmp_path)


def test_8bit_adam_runs_and_checkpoints_are_pruned(assets, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "bnb"
    summary = _run(
        *_argv(
            assets,
            out,
            "--use_8bit_adam",
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            1,
            "--checkpoints_total_limit",
            1,
        )
    )
    assert (summary["global_step"], summary["optimizer"]) == (2, "AdamW8bit")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    steps = read_jsonl(out / "debug_sync" / "rank0.jsonl")
    assert len({r["sha256"] for r in steps}) == 2  # each 8-bit step moved the LoRA


def test_amused_transformer_lora_trains_and_loads(assets, tmp_path):
    from diffusers import DiffusionPipeline

    amused = save_tiny_amused(tmp_path / "amused")
    out = tmp_path / "amused_lora"
    summary = _run(
        "--pretrained_model_name_or_path",
        amused,
        "--train_data_dir",
        assets["data"],
        "--resolution",
        32,
        "--train_batch_size",
        3,
        "--max_train_steps",
        3,
        "--learning_rate",
        "1e-1",
        "--output_dir",
        out,
        "--checkpointing_steps",
        2,
        "--debug_check_sync",
    )
    assert summary["kind"] == "amused" and summary["global_step"] == 3
    state = load_file(str(out / LORA_WEIGHT_NAME))
    assert state and all(k.startswith("transformer.") and "lora" in k for k in state)

    pipe = DiffusionPipeline.from_pretrained(str(amused))
    before = _generate(pipe)
    assert np.array_equal(before, _generate(pipe))
    load_lora_into_pipeline(pipe, out)
    assert not np.array_equal(_generate(pipe), before)
    # The checkpoint's LoRA restores into a fresh adapter exactly.
    fresh = DiffusionPipeline.from_pretrained(str(amused)).transformer
    fresh.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    restore_lora(fresh, "amused", out / "checkpoint-2")
    assert lora_checksum(fresh) == read_jsonl(out / "debug_sync" / "rank0.jsonl")[1]["sha256"]


@pytest.mark.distributed
def test_two_processes_keep_identical_lora(assets, tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(
        "rahf.improve.finetune",
        _argv(assets, out, "--train_batch_size", 1, "--max_train_steps", 3, "--checkpointing_steps", 2),
        cwd=tmp_path,
    )
    rank0, rank1 = read_jsonl(out / "debug_sync" / "rank0.jsonl"), read_jsonl(out / "debug_sync" / "rank1.jsonl")
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2, 3]
    for a, b in zip(rank0, rank1):
        assert a["num_processes"] == b["num_processes"] == 2
        assert a["sha256"] == b["sha256"], f"ranks disagree after step {a['step']}"
        # Each rank saw its own image: equal LoRA comes from averaged gradients, not from equal data.
        assert len(a["indices"]) == len(b["indices"]) == 1 and a["indices"] != b["indices"]
    assert len({r["sha256"] for r in rank0}) == 3
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoint-2").iterdir()}
    # The final file holds the weights both ranks ended with.
    pipe = tiny_sd_pipeline(seed=0)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    restore_lora(pipe.unet, "sd", out)
    assert lora_checksum(pipe.unet) == rank0[-1]["sha256"]
