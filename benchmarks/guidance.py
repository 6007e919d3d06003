"""Cost of RAHF classifier guidance: time per denoising step, guided over unguided, for each option, side by side.

    python benchmarks/guidance.py                                  # tiny random components, 64 px, CPU
    python benchmarks/guidance.py --height 128 --steps 8 --repeats 5
    python benchmarks/guidance.py --size sd15 --height 512 --steps 10 --device cuda   # random SD 1.5 + base RAHF
    python benchmarks/guidance.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --reward_model runs/rahf_base/final --height 512 --steps 20 --device cuda

Every configuration guides every step of the schedule (unless `guide_every` says otherwise) and is timed in the same
run as the unguided baseline (scale 0, which is the plain Stable Diffusion loop): the configs take turns, and the best
of `--repeats` rounds is kept.
Printed: seconds per step and the ratio to the unguided step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rahf.pipelines.rahf_guided import RAHFGuidedStableDiffusionPipeline  # noqa: E402

from rahf.precision import torch_dtype  # noqa: E402

PROMPT = "a red circle above a blue square"  # task string + prompt fit the tiny RAHF's 32 tokens

# (name, pipeline kwargs): the unguided baseline first.
CONFIGS = [
    ("unguided (scale 0)", {"reward_guidance_scale": 0.0}),
    ("guided, decode 1.0", {"reward_guidance_scale": 0.5}),
    ("guided, decode 0.5", {"reward_guidance_scale": 0.5, "guidance_decode_scale": 0.5}),
    ("guided, guide_every 2", {"reward_guidance_scale": 0.5, "guide_every": 2}),
    ("guided, recurrence 2", {"reward_guidance_scale": 0.5, "num_recurrence_steps": 2}),
    ("guided, window 0-0.5", {"reward_guidance_scale": 0.5, "guidance_end": 0.5}),
    ("guided, through UNet", {"reward_guidance_scale": 0.5, "backprop_through_unet": True}),
]


def _random_sd15():
    """A Stable Diffusion 1.5-shaped pipeline with random weights (the real architecture sizes, nothing downloaded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rahf._testing_diffusers import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _random_rahf_base(variant: str):
    """The configs/model/base.json RAHF (ViT-L/16-384 + T5-base) with random towers."""
    from rahf import RAHFConfig, RAHFModel, RAHFProcessor
    from rahf.tokenization import build_offline_tokenizer

    config = RAHFConfig.from_json_file(ROOT / "configs" / "model" / "base.json")
    config = RAHFConfig.from_dict(
        {**config.to_dict(), "variant": variant, "vision_model_name_or_path": None, "text_model_name_or_path": None}
    )
    torch.manual_seed(0)
    return RAHFModel(config).eval(), RAHFProcessor.from_config(config, tokenizer=build_offline_tokenizer(1024))


def build(args) -> RAHFGuidedStableDiffusionPipeline:
    from diffusers import DDIMScheduler, DiffusionPipeline

    from rahf import RAHFModel, RAHFProcessor
    from rahf.testing import tiny_rahf_model, tiny_rahf_processor, tiny_sd_pipeline

    dtype = torch_dtype(args.dtype)
    if args.pretrained_model_name_or_path:
        sd = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=dtype)
    else:
        sd = _random_sd15() if args.size == "sd15" else tiny_sd_pipeline(seed=0)
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    if args.reward_model:
        model, processor = (
            RAHFModel.from_pretrained(args.reward_model),
            RAHFProcessor.from_pretrained(args.reward_model),
        )
    elif args.size == "sd15":
        model, processor = _random_rahf_base(args.variant)
    else:
        model, processor = tiny_rahf_model(args.variant), tiny_rahf_processor(args.variant)
    pipe = RAHFGuidedStableDiffusionPipeline.from_pipe(sd, reward_model=model, reward_processor=processor)
    pipe = pipe.to(args.device, dtype) if dtype != torch.float32 else pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_configs(pipe, args, configs) -> list[float]:
    """Best seconds per step of each config; the configs take turns in every round so that drift hits them alike."""

    def call(kwargs):
        pipe(
            [PROMPT] * args.batch,
            num_inference_steps=args.steps,
            height=args.height,
            width=args.height,
            generator=torch.manual_seed(0),
            output_type="latent",
            **kwargs,
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _, kwargs in configs:  # warm-up
        call(kwargs)
    best = [float("inf")] * len(configs)
    for _ in range(args.repeats):
        for k, (_, kwargs) in enumerate(configs):
            t0 = time.perf_counter()
            call(kwargs)
            best[k] = min(best[k], time.perf_counter() - t0)
    return [b / args.steps for b in best]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="SD pipeline (default: tiny random)")
    parser.add_argument("--reward_model", default=None, help="RAHF model folder (default: tiny random)")
    parser.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "sd15"],
        help="random components: tiny, or SD 1.5-shaped UNet/VAE/CLIP with the base RAHF (GPU)",
    )
    parser.add_argument("--variant", default="multi_head", choices=["multi_head", "augmented_prompt"])
    parser.add_argument("--height", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only the configs whose name contains these")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build(args)
    configs = (
        CONFIGS if not args.only else [CONFIGS[0]] + [c for c in CONFIGS[1:] if any(o in c[0] for o in args.only)]
    )
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"size={args.height}px steps={args.steps} batch={args.batch} variant={args.variant} "
        f"dtype={args.dtype} components={args.pretrained_model_name_or_path or args.size}"
    )
    print(f"{'config':24} {'s/step':>9} {'x unguided':>11}")
    results = []
    times = time_configs(pipe, args, configs)
    for (name, kwargs), per_step in zip(configs, times):
        results.append({"config": name, "kwargs": kwargs, "seconds_per_step": per_step, "ratio": per_step / times[0]})
        print(f"{name:24} {per_step:9.4f} {per_step / times[0]:10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
