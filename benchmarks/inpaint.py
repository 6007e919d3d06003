"""Where the time of RAHF inpainting goes, and its overhead over plain inpainting with the same K, side by side.

    python benchmarks/inpaint.py [--size tiny|base] [--image_size 32] [--num_candidates 4] [--num_inference_steps 4]
                                 [--inpainter PIPE_DIR] [--device cpu] [--repeats 5]

Times one `RAHFInpaintPipeline` call split into its steps (heatmap, mask, generation, compositing, rescoring) and, in the
same run and interleaved with it, the plain inpainting call it wraps (same components, image, mask, K, steps and seed).
Prints the median of `--repeats` runs of each and the ratios RAHF / plain and RAHF steps / generation.

`--size` picks the RAHF config: `tiny` (rahf.testing) or `base` (configs/model/base.json: ViT-L/16-384 + T5-base, random
weights, no hub). The inpainter is the tiny random Stable Diffusion inpainting pipeline unless `--inpainter` names a
real one (a folder, or a hub id when online). The heatmap is predicted (and timed), but the mask comes from a planted
square (12% of the image before a 3% dilation), since random-weight heatmaps can be flat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rahf.pipelines.auto import from_inpaint_pipe  # noqa: E402

from rahf import RAHFConfig, RAHFModel, RAHFProcessor  # noqa: E402
from rahf.tokenization import build_offline_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle above a blue square on a wooden table"
STAGES = ("heatmap", "mask", "generation", "composite", "rescore")


def build_reward(size: str) -> tuple[RAHFModel, RAHFProcessor]:
    if size == "tiny":
        from rahf.testing import tiny_rahf_model, tiny_rahf_processor

        return tiny_rahf_model(), tiny_rahf_processor()
    config = RAHFConfig.from_json_file(ROOT / "configs" / "model" / f"{size}.json")
    config = RAHFConfig.from_dict(
        {**config.to_dict(), "vision_model_name_or_path": None, "text_model_name_or_path": None}
    )  # random towers: no hub needed
    torch.manual_seed(0)
    return RAHFModel(config).eval(), RAHFProcessor.from_config(config, tokenizer=build_offline_tokenizer(1024))


def build_inpainter(path: str | None) -> Any:
    if path is None:
        from rahf.testing import tiny_sd_inpaint_pipeline

        return tiny_sd_inpaint_pipeline(seed=0)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path)


class _TimedCall:
    """Stands in for the internal inpainting pipeline and times its call (the generation step)."""

    def __init__(self, pipe: Any, timer: _StageTimer):
        self.pipe, self.timer = pipe, timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.timer.stage("generation"):
            return self.pipe(*args, **kwargs)


class _StageTimer:
    """Wraps the pipeline's step methods on the instance (the class is untouched) and sums their wall time."""

    def __init__(self, pipe: Any, device: str):
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        for stage, method in (
            ("heatmap", "_predict_heatmap"),
            ("mask", "_build_mask"),
            ("composite", "_composite"),
            ("rescore", "_rescore"),
        ):
            setattr(pipe, method, self._wrap(stage, getattr(pipe, method)))
        make_inner = pipe.inpaint_pipeline
        pipe.inpaint_pipeline = lambda: _TimedCall(make_inner(), self)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def stage(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                timer._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer._sync()
                timer.times[name] += time.perf_counter() - self.t0

        return _Ctx()

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"], help="the RAHF config")
    parser.add_argument("--image_size", type=int, default=None, help="square input side (default 32 tiny, 512 base)")
    parser.add_argument("--num_candidates", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=4)
    parser.add_argument("--inpainter", default=None, help="a Stable Diffusion inpainting / aMUSEd pipeline folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    side = args.image_size or (32 if args.size == "tiny" else 512)

    reward_model, reward_processor = build_reward(args.size)
    pipe = from_inpaint_pipe(build_inpainter(args.inpainter), reward_model, reward_processor).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (side, side, 3), dtype=np.uint8))
    call = dict(
        mask_config={"threshold": 0.5, "dilation": 0.03},
        num_candidates=args.num_candidates,
        num_inference_steps=args.num_inference_steps,
    )

    # Random-weight RAHF heatmaps can be flat (the base config's often are), which would leave the mask empty and
    # skip generation. The heatmap step still runs the real prediction (its cost is what is timed); its output is then
    # replaced by a planted square (12% of the image before dilation), so every run repaints the same realistic area.
    planted = np.zeros((side, side), dtype=np.float32)
    lo, hi = int(side * 0.34), int(side * 0.66)
    planted[lo:hi, lo:hi] = 0.9
    predict = pipe._predict_heatmap

    def predict_then_plant(image, prompt, heatmap, weights):
        _, scores = predict(image, prompt, heatmap, weights)
        return planted, scores

    pipe._predict_heatmap = predict_then_plant
    warm = pipe(PROMPT, image, generator=torch.Generator().manual_seed(0), **call)  # warm-up; gives the mask

    # The plain baseline: the same internal pipeline, image, mask, K, steps and seed, without the RAHF steps.
    gen_size = pipe._generation_size(image.size, pipe.generation_multiple, None, None)
    gen_image, gen_mask = pipe._generation_inputs(image, warm.mask, gen_size)
    mask_image = Image.fromarray(gen_mask.astype(np.uint8) * 255)
    plain = pipe.inpaint_pipeline()
    plain_kwargs = dict(
        prompt=PROMPT,
        image=gen_image,
        mask_image=mask_image,
        num_images_per_prompt=args.num_candidates,
        num_inference_steps=args.num_inference_steps,
        output_type="pil",
    )
    if "unet" in pipe.components:
        plain_kwargs.update(height=gen_size[1], width=gen_size[0])
    plain(**plain_kwargs, generator=torch.Generator().manual_seed(0))  # warm-up

    timer = _StageTimer(pipe, args.device)
    rahf_totals, plain_totals, stage_runs = [], [], defaultdict(list)
    for r in range(args.repeats):
        timer._sync()
        t0 = time.perf_counter()
        plain(**plain_kwargs, generator=torch.Generator().manual_seed(r))
        timer._sync()
        plain_totals.append(time.perf_counter() - t0)

        timer.times.clear()
        t0 = time.perf_counter()
        out = pipe(PROMPT, image, generator=torch.Generator().manual_seed(r), **call)
        timer._sync()
        rahf_totals.append(time.perf_counter() - t0)
        for stage in STAGES:
            stage_runs[stage].append(timer.times[stage])

    rahf_total, plain_total = statistics.median(rahf_totals), statistics.median(plain_totals)
    stages = {stage: statistics.median(stage_runs[stage]) for stage in STAGES}
    rahf_steps = stages["heatmap"] + stages["mask"] + stages["composite"] + stages["rescore"]
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} rahf={args.size} "
        f"image={side}x{side} generation={gen_size[0]}x{gen_size[1]} K={args.num_candidates} "
        f"steps={args.num_inference_steps} mask={100 * out.mask.mean():.1f}% repeats={args.repeats} (medians)"
    )
    print(f"{'stage':12} {'seconds':>9} {'share':>7}")
    for stage in STAGES:
        print(f"{stage:12} {stages[stage]:9.4f} {100 * stages[stage] / rahf_total:6.1f}%")
    other = rahf_total - sum(stages.values())
    print(f"{'(other)':12} {other:9.4f} {100 * other / rahf_total:6.1f}%")
    print(f"{'RAHF total':12} {rahf_total:9.4f}")
    print(f"{'plain total':12} {plain_total:9.4f}  (StableDiffusion/aMUSEd inpainting, same K, steps and mask)")
    print(f"ratio RAHF / plain inpainting: {rahf_total / plain_total:.2f}x")
    if stages["generation"] > 0:
        print(
            f"RAHF steps (heatmap + mask + composite + rescore) / generation: {rahf_steps / stages['generation']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "size": args.size,
                    "image_size": side,
                    "num_candidates": args.num_candidates,
                    "num_inference_steps": args.num_inference_steps,
                    "device": args.device,
                    "stages": stages,
                    "rahf_total": rahf_total,
                    "plain_total": plain_total,
                    "ratio": rahf_total / plain_total,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
