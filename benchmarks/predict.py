"""Inference throughput of RichFeedbackPredictor, multi-head vs augmented prompt, measured side by side.

    python benchmarks/predict.py [--sizes tiny base] [--device cpu]

Prints images/s for each variant and size, the ratio augmented / multi-head, and the floor that FLOPs allow
(augmented does one vision pass and 7 fusion passes per image, multi-head one of each). Keyword generation is
capped at the same number of new tokens for both variants so that the models' random weights do not decide it.
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
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from rahf import RAHFConfig, RAHFModel, RAHFProcessor, RichFeedbackPredictor  # noqa: E402
from rahf.tokenization import build_offline_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle above a blue square on a wooden table, highly detailed photo"


def build(size: str, variant: str, device: str, dtype: torch.dtype = torch.float32) -> RichFeedbackPredictor:
    config = RAHFConfig.from_json_file(ROOT / "configs" / "model" / f"{size}.json")
    config = RAHFConfig.from_dict(
        {**config.to_dict(), "variant": variant, "vision_model_name_or_path": None, "text_model_name_or_path": None}
    )  # random towers: no hub needed
    torch.manual_seed(0)
    model = RAHFModel(config).to(dtype)
    processor = RAHFProcessor.from_config(config, tokenizer=build_offline_tokenizer(1024))
    return RichFeedbackPredictor(model, processor, device=device, batch_size=8, max_new_tokens=16)


def flops_per_image(predictor: RichFeedbackPredictor, images: list, prompts: list) -> tuple[float, float]:
    """(total, vision-tower) FLOPs per image of one predictor call, counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        predictor(images, prompts)
    vision_counter = FlopCounterMode(display=False)
    with vision_counter, torch.no_grad():
        pixel_values = predictor.processor.preprocess_images(images).to(predictor.device)
        predictor.model.get_image_features(pixel_values)
    return counter.get_total_flops() / len(images), vision_counter.get_total_flops() / len(images)


def time_call(predictor, images, prompts, repeats: int) -> float:
    predictor(images, prompts)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor(images, prompts)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(
        f"device={args.device} ({name}) dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(f"{'size':5} {'batch':>5} {'multi img/s':>12} {'augm img/s':>11} {'ratio m/a':>10} {'FLOP floor':>11}")
    for size in args.sizes:
        on_gpu = args.device.startswith("cuda")
        batch, repeats = (16, 5) if size == "tiny" else ((8, 5) if on_gpu else (1, 2))
        images = [Image.new("RGB", (512, 512), (i * 10 % 255, 80, 160)) for i in range(batch)]
        prompts = [PROMPT] * batch
        row = {"size": size, "batch": batch}
        for variant in ("multi_head", "augmented_prompt"):
            predictor = build(size, variant, args.device, dtype)
            row[variant] = time_call(predictor, images, prompts, repeats)
            row[f"{variant}_gflops"], row[f"{variant}_vision_gflops"] = (
                x / 1e9 for x in flops_per_image(predictor, images[:1], prompts[:1])
            )
            del predictor
        # Slow-down of augmented vs multi-head: measured (time) and the least FLOPs allow.
        row["slowdown"] = row["multi_head"] / row["augmented_prompt"]
        row["flop_floor"] = row["augmented_prompt_gflops"] / row["multi_head_gflops"]
        results.append(row)
        print(
            f"{size:5} {batch:5d} {row['multi_head']:12.2f} {row['augmented_prompt']:11.2f} "
            f"{row['slowdown']:9.2f}x {row['flop_floor']:10.2f}x"
        )
    print("ratio m/a: multi-head images/s over augmented images/s (how much slower augmented is);")
    print("FLOP floor: augmented FLOPs / multi-head FLOPs per image (vision once + 7 fusion passes vs 1).")
    for row in results:
        print(
            f"{row['size']}: GFLOPs/image multi={row['multi_head_gflops']:.2f} "
            f"(vision {row['multi_head_vision_gflops']:.2f}) augmented={row['augmented_prompt_gflops']:.2f} "
            f"(vision {row['augmented_prompt_vision_gflops']:.2f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
