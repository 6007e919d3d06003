"""Cost of RAHF guidance per generator family (SD 1.5, SDXL, SD3.5, FLUX.1): seconds per denoising step, guided over
unguided, measured side by side in one run.

    python benchmarks/guidance_families.py                      # every family, 1/8-width components, 256 px, CPU
    python benchmarks/guidance_families.py --families sdxl flux --steps 6 --repeats 3
    python benchmarks/guidance_families.py --width_divisor 1 --height 1024 --device cuda --dtype bf16   # real shapes

Components are random and built from code. With `--width_divisor 8` every width of the real architectures (channels,
hidden sizes, heads' dimensions, the RAHF ViT-L/16 + T5-base reward) is divided by 8 and the image side by 4
(1024 px -> 256 px; RAHF's 384 px input -> 96 px), so convolution and matmul FLOPs shrink alike for the denoiser,
the VAE and the reward and their proportions stay those of the real models; the transformers' depths are kept
except FLUX's (19 + 38 blocks -> 5 + 10, which makes its denoiser relatively cheaper: the guidance ratio is then an
upper bound). Text tokens: SD3 77 CLIP + `--t5_tokens` T5, FLUX `--t5_tokens` T5.

A step is timed from the denoiser's first call to the last step's end (text encoding and the final decode are not
steps); configurations take turns in every round and the best of `--repeats` rounds is kept.
Printed per family: seconds per step of the unguided pipeline (scale 0, the plain diffusers loop), guided every
second step and guided every step, both decoding x0 at `--decode_scale` (0.375: 1024 px -> 384 px) for the reward,
and their ratios to the unguided step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a red circle above a blue square"
FAMILIES = ("sd", "sdxl", "sd3", "flux")


def _clip(hidden: int, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rahf._testing_diffusers import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=max(1, hidden // 64),
        num_hidden_layers=layers,
        max_position_embeddings=77,
        **({} if projection is None else {"projection_dim": projection}),
    )
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    return model.eval(), tokenizer


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    from rahf._testing_diffusers import tiny_t5_tokenizer

    # Runs once per call (not per step): a narrow 2-layer stand-in with the real output width.
    config = T5Config(vocab_size=512, d_model=d_model, d_kv=64, d_ff=2 * d_model, num_layers=2, num_heads=2)
    return T5EncoderModel(config).eval(), tiny_t5_tokenizer()


def _vae(d: int, latent_channels: int, flow: bool):
    from diffusers import AutoencoderKL

    w = [max(8, c // d) for c in (128, 256, 512, 512)]
    kwargs = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609} if flow else {}
    return AutoencoderKL(
        block_out_channels=w,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=math.gcd(32, w[0]),
        scaling_factor=1.5035 if flow else 0.18215,
        **kwargs,
    ).eval()


def build_generator(family: str, d: int):
    """A pipeline of `family` with every width of the real architecture divided by `d` (random weights)."""
    import diffusers

    torch.manual_seed(0)
    if family in ("sd", "sdxl"):
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        )
        if family == "sd":  # SD 1.5: (320, 640, 1280, 1280), 8 heads, CLIP-L 768
            text_encoder, tokenizer = _clip(768 // d, 12)
            unet = UNet2DConditionModel(
                block_out_channels=[c // d for c in (320, 640, 1280, 1280)],
                cross_attention_dim=768 // d,
                attention_head_dim=8,
                norm_num_groups=math.gcd(32, 320 // d),
            )
            return diffusers.StableDiffusionPipeline(
                vae=_vae(d, 4, flow=False),
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet.eval(),
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        # SDXL: (320, 640, 1280), transformer depths (1, 2, 10), heads (5, 10, 20), CLIP-L 768 + bigG 1280
        text_encoder, tokenizer = _clip(768 // d, 12)
        text_encoder_2, tokenizer_2 = _clip(1280 // d, 32, projection=1280 // d)
        time_dim = 256 // d
        unet = UNet2DConditionModel(
            block_out_channels=[c // d for c in (320, 640, 1280)],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=(768 + 1280) // d,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + 1280 // d,
            norm_num_groups=math.gcd(32, 320 // d),
        )
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(d, 4, flow=False),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet.eval(),
            scheduler=scheduler,
            add_watermarker=False,
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sd3":  # SD3.5 medium-like: 24 joint blocks of 24 heads x 64, patch 2, 16 latent channels
        from diffusers import SD3Transformer2DModel

        text_encoder, tokenizer = _clip(768 // d, 12, projection=768 // d)
        text_encoder_2, tokenizer_2 = _clip(1280 // d, 32, projection=1280 // d)
        text_encoder_3, tokenizer_3 = _t5(4096 // d)
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64 // d,
            num_attention_heads=24,
            joint_attention_dim=4096 // d,
            caption_projection_dim=1536 // d,
            pooled_projection_dim=(768 + 1280) // d,
            pos_embed_max_size=192,
        )
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer.eval(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(d, 16, flow=True),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
    from diffusers import FluxTransformer2DModel

    # FLUX.1: 24 heads x 128, (16, 56, 56) rotary axes, 16 latent channels packed 2x2; depth 19 + 38 -> 5 + 10
    text_encoder, tokenizer = _clip(768 // d, 12)
    text_encoder_2, tokenizer_2 = _t5(4096 // d)
    head_dim = 128 // d
    axes = [2, (head_dim - 2) // 2 // 2 * 2, 0]
    axes[2] = head_dim - axes[0] - axes[1]
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=5,
        num_single_layers=10,
        attention_head_dim=head_dim,
        num_attention_heads=24,
        joint_attention_dim=4096 // d,
        pooled_projection_dim=768 // d,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )
    return diffusers.FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(d, 16, flow=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def build_reward(d: int, image_size: int):
    """configs/model/base.json's RAHF (ViT-L/16 + T5-base) with widths divided by `d`, at `image_size` px."""
    from rahf.modeling_rahf import RAHFModel
    from rahf.testing import tiny_rahf_config, tiny_rahf_processor

    vision = {
        "image_size": image_size,
        "patch_size": 16,
        "num_channels": 3,
        "hidden_size": 1024 // d,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096 // d,
    }
    text = {
        "model_type": "t5",
        "vocab_size": 512,
        "d_model": 768 // d,
        "d_kv": 64 // d,
        "d_ff": 3072 // d,
        "num_layers": 12,
        "num_decoder_layers": 12,
        "num_heads": 12,
        "dropout_rate": 0.0,
    }
    overrides = {
        "vision_config": {"model_type": "vit", **vision},
        "text_config": text,
        "heatmap_size": image_size,
        "heatmap_head_channels": 256 // d,
        "score_head_channels": 256 // d,
        "score_head_num_convs": 6,
        "score_head_hidden_size": 512 // d,
    }
    torch.manual_seed(0)
    model = RAHFModel(tiny_rahf_config(**overrides)).eval()
    return model, tiny_rahf_processor(**overrides)


def _param_count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def time_family(family: str, args) -> dict:
    from rahf.pipelines import AutoRAHFGuidedPipeline

    generator = build_generator(family, args.width_divisor)
    model, processor = build_reward(args.width_divisor, args.reward_size)
    pipe = AutoRAHFGuidedPipeline.from_pipe(generator, reward_model=model, reward_processor=processor)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = pipe.to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    marks: dict[str, float] = {}

    def first_call(module, inputs):
        marks.setdefault("start", time.perf_counter())

    def step_end(p, i, t, tensors):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        marks["end"] = time.perf_counter()
        return {}

    denoiser.register_forward_pre_hook(first_call)
    extra = {"max_sequence_length": args.t5_tokens} if family in ("sd3", "flux") else {}
    if family == "flux":
        extra["guidance_scale"] = 0.0  # schnell-like: no CFG, one transformer call per step
    configs = [
        ("unguided", {"reward_guidance_scale": 0.0}),
        ("guide_every=2", {"reward_guidance_scale": 0.5, "guide_every": 2}),
        ("guide_every=1", {"reward_guidance_scale": 0.5, "guide_every": 1}),
    ]

    def call(kwargs) -> float:
        marks.clear()
        pipe(
            PROMPT,
            num_inference_steps=args.steps,
            height=args.height,
            width=args.height,
            generator=torch.manual_seed(0),
            output_type="latent",
            guidance_decode_scale=args.decode_scale,
            callback_on_step_end=step_end,
            **extra,
            **kwargs,
        )
        return (marks["end"] - marks["start"]) / args.steps

    for _, kwargs in configs:  # warm-up
        call(kwargs)
    best = [float("inf")] * len(configs)
    for _ in range(args.repeats):
        for k, (_, kwargs) in enumerate(configs):
            best[k] = min(best[k], call(kwargs))
    return {
        "family": family,
        "params_M": {
            "denoiser": round(_param_count(denoiser), 1),
            "vae": round(_param_count(pipe.vae), 1),
            "reward": round(_param_count(model), 1),
        },
        "seconds_per_step": dict(zip([c[0] for c in configs], best)),
        "ratio_every_2": best[1] / best[0],
        "ratio_every_1": best[2] / best[0],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--width_divisor", type=int, default=8, help="divide every width of the real models by this")
    parser.add_argument("--height", type=int, default=256, help="image side in pixels (real: 1024; SD 1.5: 512)")
    parser.add_argument("--reward_size", type=int, default=96, help="RAHF's input side (real: 384)")
    parser.add_argument("--decode_scale", type=float, default=0.375, help="x0 is decoded at this fraction of --height")
    parser.add_argument("--t5_tokens", type=int, default=16, help="T5 prompt tokens of SD3 / FLUX")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} load={load:.1f} "
        f"size={args.height}px decode={args.decode_scale} reward_input={args.reward_size}px steps={args.steps} "
        f"widths=1/{args.width_divisor} dtype={args.dtype}"
    )
    print(
        f"{'family':7} {'denoiser/vae/reward M':>22} {'unguided s/step':>16} {'every 2':>9} {'ratio':>7} "
        f"{'every 1':>9} {'ratio':>7}"
    )
    results = []
    for family in args.families:
        r = time_family(family, args)
        results.append(r)
        s, p = r["seconds_per_step"], r["params_M"]
        sizes = f"{p['denoiser']}/{p['vae']}/{p['reward']}"
        print(
            f"{family:7} {sizes:>22} {s['unguided']:16.4f} {s['guide_every=2']:9.4f} {r['ratio_every_2']:6.2f}x "
            f"{s['guide_every=1']:9.4f} {r['ratio_every_1']:6.2f}x",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
