"""LoRA fine-tuning of the SDXL UNet and the SD3 and FLUX transformers: the job trains (finite loss, the LoRA moves),
the LoRA loads back through the family's `load_lora_weights` and reproduces the fine-tuned outputs, resuming equals
the uninterrupted run, gradient checkpointing changes nothing but memory, bf16 runs, and bad input is refused."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from improve_utils import make_image_folder, read_jsonl, save_tiny_rahf
from PIL import Image
from rahf.improve import finetune
from rahf.improve.denoising_losses import (
    LORA_TARGET_MODULES,
    denoising_loss,
    encode_batch,
    training_noise_scheduler,
)
from rahf.improve.finetune import (
    LORA_WEIGHT_NAME,
    ImageCaptionDataset,
    _collate,
    load_lora_into_pipeline,
    lora_checksum,
    parse_finetune_args,
    restore_lora,
    train_lora,
)
from safetensors.torch import load_file

from rahf._testing_diffusers import TINY_FAMILY_BUILDERS, tiny_flux_fill_pipeline, tiny_sdxl_inpaint_pipeline

FAMILIES = ("sdxl", "sd3", "flux")
PIPELINE_CLASSES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
VALIDATION_PROMPT = "a red cat"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_families")
    paths = {}
    for family in FAMILIES:
        paths[family] = root / family
        TINY_FAMILY_BUILDERS[family][0](seed=0).save_pretrained(paths[family])
    return {**paths, "data": make_image_folder(root / "kept", count=4), "root": root}


def _argv(assets, family, out, *extra) -> list[str]:
    return [
        str(a)
        for a in (
            "--pretrained_model_name_or_path",
            assets[family],
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
            "--max_sequence_length",
            32,  # the tiny T5's window (SDXL ignores it)
            "--output_dir",
            out,
            "--seed",
            1,
            "--random_flip",
            "--debug_check_sync",
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            2,
            *extra,
        )
    ]


def _run(argv):
    summary = train_lora(parse_finetune_args(argv))
    _reset_accelerate()
    return summary


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, assets):
    """3 steps (4 images, batch 2), a checkpoint at step 2, validation images before and after training."""
    family = request.param
    out = assets["root"] / f"run-{family}"
    extra = ["--validation_prompts", VALIDATION_PROMPT, "--validation_num_inference_steps", 2]
    if family == "flux":
        extra += ["--gradient_checkpointing"]  # the job path with it on; equality is tested below
    if family == "sd3":
        extra += ["--reward_model", save_tiny_rahf(assets["root"] / "rahf")]  # validation images scored by RAHF
    summary = _run(_argv(assets, family, out, *extra))
    return {"family": family, "out": out, "summary": summary}


def _generate(pipe, seed: int) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    kwargs = {} if isinstance(pipe, _cls("sdxl")) else {"max_sequence_length": 32}
    image = pipe(
        VALIDATION_PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def _cls(family: str):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[family])


# --------------------------------------------------------------------------------------------------------------------


def test_job_trains_with_a_finite_loss_and_moves_the_lora(trained):
    family, out, summary = trained["family"], trained["out"], trained["summary"]
    assert (summary["kind"], summary["global_step"]) == (family, 3)
    losses = [r["loss"] for r in read_jsonl(out / "logs" / "train_log.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    steps = read_jsonl(out / "debug_sync" / "rank0.jsonl")
    assert len({r["sha256"] for r in steps}) == 3  # every step changed the LoRA
    state = load_file(str(out / LORA_WEIGHT_NAME))
    if family == "sdxl":  # the UNet LoRA in diffusers naming, as StableDiffusionXLPipeline.save_lora_weights writes
        assert state and all(k.startswith("unet.") and (".lora.up." in k or ".lora.down." in k) for k in state)
    else:  # the transformer LoRA in peft naming, as StableDiffusion3Pipeline / FluxPipeline.save_lora_weights write
        assert state and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    # LoRA sits on every module the family's diffusers script targets (FLUX: the feed-forwards too).
    denoiser = TINY_FAMILY_BUILDERS[family][0](seed=0).components["unet" if family == "sdxl" else "transformer"]
    targets = {
        f"{'unet' if family == 'sdxl' else 'transformer'}.{name}"
        for name, _ in denoiser.named_modules()
        if any(name.endswith("." + m) for m in LORA_TARGET_MODULES[family])
    }
    assert {k.split(".lora")[0] for k in state} == targets
    assert any(t.endswith("ff.net.2") for t in targets) == (family == "flux")
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora.up." in k or ".lora_B." in k)  # B left zero
    if family == "sd3":
        scored = [r for r in read_jsonl(out / "logs" / "train_log.jsonl") if "val/reward" in r]
        assert [r["step"] for r in scored] == [0, 3] and all(0 <= r["val/reward"] <= 1 for r in scored)


def test_lora_loads_back_with_load_lora_weights_and_reproduces_the_trained_outputs(trained, assets):
    from diffusers import DiffusionPipeline

    family, out = trained["family"], trained["out"]
    pipe = DiffusionPipeline.from_pretrained(str(assets[family]))
    assert isinstance(pipe, _cls(family))
    validation = read_jsonl(out / "logs" / "validation_log.jsonl")
    first, last = validation[0], validation[-1]
    assert (first["step"], last["step"]) == (0, 3) and first["seed"] == last["seed"]
    before = _generate(pipe, first["seed"])
    # The job's step-0 validation image is the plain pipeline's output for that seed ...
    assert np.abs(before - np.asarray(Image.open(out / first["file_name"]), dtype=np.int16)).max() <= 1
    load_lora_into_pipeline(pipe, out)  # the family's own load_lora_weights
    after = _generate(pipe, last["seed"])
    # ... and the reloaded LoRA gives what the fine-tuned pipeline gave at the end of training.
    assert np.abs(after - np.asarray(Image.open(out / last["file_name"]), dtype=np.int16)).max() <= 1
    assert np.abs(after - before).max() > 2
    pipe.unload_lora_weights()
    assert np.array_equal(_generate(pipe, first["seed"]), before)


@pytest.mark.parametrize("family", ["sd3"])
def test_resume_from_checkpoint_equals_the_uninterrupted_run(family, assets, tmp_path):
    full = tmp_path / "full"
    _run(_argv(assets, family, full))
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")  # killed right after its step-2 checkpoint
    summary = _run(_argv(assets, family, out, "--resume_from_checkpoint", "latest"))
    assert summary["global_step"] == 3 and summary["resumed_from"].endswith("checkpoint-2")
    first, again = read_jsonl(full / "debug_sync" / "rank0.jsonl"), read_jsonl(out / "debug_sync" / "rank0.jsonl")
    assert again[0]["event"] == "resumed" and again[0]["sha256"] == first[1]["sha256"]
    assert again[1]["sha256"] == first[2]["sha256"]  # step 3 replayed exactly: same data, noise and timesteps
    final, resumed = load_file(str(full / LORA_WEIGHT_NAME)), load_file(str(out / LORA_WEIGHT_NAME))
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


def _batch(pipe, assets) -> dict:
    from datasets import load_dataset

    rows = load_dataset("imagefolder", data_dir=str(assets["data"]), split="train")
    data = ImageCaptionDataset(rows, pipe.tokenizer, 32, False, True, True, "image", "prompt", None, seed=0)
    return _collate([data[0], data[1]])


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, assets, monkeypatch):
    from peft import LoraConfig

    pipe = TINY_FAMILY_BUILDERS[family][0](seed=0)
    if family == "flux":  # a guidance-distilled transformer (FLUX.1 dev), so the guidance input is exercised too
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        pipe.register_modules(
            transformer=FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": True})
        )
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    denoiser.requires_grad_(False)
    torch.manual_seed(0)
    denoiser.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES[family])
    )
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    args = parse_finetune_args(
        ["--resolution", "32", "--max_sequence_length", "32", "--weighting_scheme", "logit_normal"]
    )
    encoded = encode_batch(_batch(pipe, assets), pipe, family, args, torch.float32, torch.device("cpu"))
    if family == "sdxl":  # size and crop conditioning: (original h, w, crop top, left, target h, w) per image
        assert encoded["time_ids"].tolist()[0][:2] == [40, 48] and encoded["time_ids"].tolist()[0][4:] == [32, 32]
    scheduler = training_noise_scheduler(pipe, family)
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        torch.manual_seed(1)
        loss = denoising_loss(encoded, denoiser, family, scheduler, args).mean()
        params = [p for p in denoiser.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
        results.append((loss.detach(), grads))
        assert bool(calls) == checkpointing  # the blocks really were recomputed, and only with it on
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.isfinite(loss_off) and torch.allclose(loss_on, loss_off, rtol=1e-5, atol=1e-7)
    names = [n for n, p in denoiser.named_parameters() if p.requires_grad]
    dead = sorted(n for n, g in zip(names, grads_off) if g.abs().sum() == 0)
    # Every LoRA tensor gets a gradient, except (SD3) the last block's context query: it is context_pre_only, its
    # text outputs are dropped.
    assert dead == ([] if family != "sd3" else [n for n in names if "transformer_blocks.0.attn.add_q_proj" in n]), dead
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_on, grads_off))


def test_bf16_mixed_precision_trains_the_flux_lora(assets, tmp_path, monkeypatch):
    # bf16 on a CPU is refused by the job (emulated, slow); the test lets it through to run the bf16 path itself.
    monkeypatch.setattr(finetune, "resolve_mixed_precision", lambda value: value)
    out = tmp_path / "bf16"
    summary = _run(_argv(assets, "flux", out, "--mixed_precision", "bf16", "--max_train_steps", 2, "--offload"))
    assert summary["global_step"] == 2
    losses = [r["loss"] for r in read_jsonl(out / "logs" / "train_log.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert len({r["sha256"] for r in read_jsonl(out / "debug_sync" / "rank0.jsonl")}) == 2
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / LORA_WEIGHT_NAME)).values())


def test_bad_input_is_refused_naming_the_argument(assets, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    inpaint = tmp_path / "sdxl-inpaint"
    tiny_sdxl_inpaint_pipeline(seed=0, unet_in_channels=9).save_pretrained(inpaint)
    argv = _argv(assets, "sdxl", tmp_path / "x")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(inpaint)
    with pytest.raises(ValueError, match=r"`pretrained_model_name_or_path`.*9 input channels"):
        _run(argv)
    with pytest.raises(ValueError, match=r"`pipe` is a FluxFillPipeline.*input channels"):
        train_lora(parse_finetune_args(_argv(assets, "flux", tmp_path / "y")), pipe=tiny_flux_fill_pipeline())
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"`pipe` is a DDPMPipeline.*supported: .*SDXL, SD3"):
        train_lora(parse_finetune_args(_argv(assets, "flux", tmp_path / "z")), pipe=ddpm)
    with pytest.raises(ValueError, match="resolution"):
        _run(_argv(assets, "flux", tmp_path / "w", "--resolution", 30))
    with pytest.raises(ValueError, match="prediction_type"):
        _run(_argv(assets, "sd3", tmp_path / "v", "--prediction_type", "epsilon"))
    with pytest.raises(ValueError, match="weighting_scheme"):
        finetune.LoRAFineTuneArguments(weighting_scheme="uniform")  # (the flag's choices stop it on the command line)


def test_restore_lora_round_trips_each_family(tmp_path):
    from peft import LoraConfig

    for family in FAMILIES:
        pipe = TINY_FAMILY_BUILDERS[family][0](seed=0)
        base = pipe.unet if family == "sdxl" else pipe.transformer
        modules = []
        for seed in (0, 1):
            denoiser = copy.deepcopy(base)
            torch.manual_seed(seed)
            config = LoraConfig(
                r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES[family]
            )
            denoiser.add_adapter(config)
            modules.append(denoiser)
        finetune.save_lora(modules[0], family, tmp_path / family)
        assert lora_checksum(modules[0]) != lora_checksum(modules[1])
        restore_lora(modules[1], family, tmp_path / family)
        assert lora_checksum(modules[0]) == lora_checksum(modules[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_configs_parse(family):
    args = parse_finetune_args(["--config", f"configs/improve/finetune_lora_{family}.yaml", "--max_train_steps", "3"])
    assert args.max_train_steps == 3 and args.gradient_checkpointing and args.train_data_dir
    assert args.weighting_scheme == {"sdxl": None, "sd3": "logit_normal", "flux": "none"}[family]
