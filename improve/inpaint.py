"""`rahf inpaint`: repair one image with RAHF + an inpainting pipeline and write the result, its candidates and scores.

    rahf inpaint --model RAHF_DIR --inpainter PIPE_DIR_OR_ID --image IMG --prompt TEXT --out DIR
    python -m rahf.improve.inpaint --model ... (the same flags)

Writes `best.png`, `candidates.png` (input and candidates with their scores), `heatmap.png` (the heat as greyscale),
`overlay.png`, `mask.png` and `result.json` (every score, `repaired`, the mask's area and the settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rahf.pipelines.auto import AutoRAHFInpaintPipeline, rahf_inpaint_class_named
from rahf.pipelines.loading import dtype_kwarg

from rahf.precision import torch_dtype
from rahf.pretrained_paths import resolve_pretrained_path
from rahf.reward import parse_reward

logger = logging.getLogger(__name__)

__all__ = [
    "build_parser",
    "load_rahf_inpaint_pipeline",
    "main",
    "parse_rescore_with",
    "write_inpaint_result",
]


def parse_rescore_with(value: str) -> str | dict[str, float]:
    """`"plausibility"` -> itself; `"plausibility=1,aesthetics=0.5"` -> `{"plausibility": 1.0, "aesthetics": 0.5}`."""
    try:
        return parse_reward(value)
    except ValueError as err:
        raise ValueError(f"`--rescore_with`: {err}") from None


def load_rahf_inpaint_pipeline(
    model: str | None,
    inpainter: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> Any:
    """A RAHF repair pipeline from a RAHF folder and a generator pipeline (folder or hub id) of any supported family:
    Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX (text-to-image or inpainting checkpoints, FLUX.1 Fill) or aMUSEd.

    `inpainter` may also be a saved RAHF repair pipeline, whose own reward model is used unless `model` is given. With
    `cpu_offload`, the generator's models wait on the CPU and move to `device` one at a time
    (`enable_model_cpu_offload`); the reward model stays on `device`.
    """
    from diffusers import DiffusionPipeline

    from rahf import RAHFModel, RAHFProcessor

    on_cpu = str(device).split(":")[0] == "cpu"
    if cpu_offload and on_cpu:
        raise ValueError(
            "`--cpu_offload` moves the generator's models to an accelerator one at a time; it needs `--device` cuda "
            "(or another accelerator), got cpu"
        )
    if dtype in (torch.float16, torch.bfloat16) and on_cpu:
        raise ValueError(
            f"`--dtype` {dtype} on a CPU would run in emulated half precision, 10-100x slower than float32; drop "
            "--dtype (or pass fp32) on a CPU"
        )
    inpainter = resolve_pretrained_path(inpainter, "--inpainter", what="an inpainting pipeline folder")
    kwargs: dict[str, Any] = {} if dtype is None else dtype_kwarg(dtype)
    reward: dict[str, Any] = {}
    if model is not None:
        model = resolve_pretrained_path(model, "--model", what="a RAHF model folder", allow_hub=False)
        if not (Path(model) / "config.json").is_file():
            raise ValueError(
                f"`--model` {model!r} is not a RAHF folder (no config.json); pass the folder written by "
                "`model.save_pretrained` + `processor.save_pretrained` (e.g. `rahf init-model`)"
            )
        reward_model = RAHFModel.from_pretrained(model, dtype=dtype) if dtype else RAHFModel.from_pretrained(model)
        reward = {"reward_model": reward_model, "reward_processor": RAHFProcessor.from_pretrained(model)}
    try:
        class_name = DiffusionPipeline.load_config(inpainter).get("_class_name")
    except (OSError, ValueError) as err:
        raise ValueError(f"`--inpainter` {inpainter!r} is not a diffusers pipeline ({err})") from err
    rahf_class = rahf_inpaint_class_named(class_name)
    if rahf_class is not None:
        pipe = rahf_class.from_pretrained(inpainter, **reward, **kwargs)
    else:
        if model is None:
            raise ValueError(f"`--model` is required: {inpainter!r} is a {class_name}, which has no reward model")
        # The class the checkpoint was saved with (text-to-image or inpainting), then the family's RAHF class on its
        # components: a text-to-image checkpoint inpaints through its family's latent-blending path.
        try:
            pipe = AutoRAHFInpaintPipeline.from_pipe(DiffusionPipeline.from_pretrained(inpainter, **kwargs), **reward)
        except ValueError as err:
            raise ValueError(f"`--inpainter` {inpainter!r}: {err}") from err
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def _heatmap_arg(value: str) -> str | np.ndarray:
    """A heatmap name, or a greyscale PNG (0-255) to use as the heatmap."""
    path = Path(value)
    if path.suffix and path.is_file():
        return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return value


def write_inpaint_result(
    out: Any, image: Image.Image, out_dir: str | Path, prompt: str, heatmap_name: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """Writes the files of `rahf inpaint` for one `RAHFInpaintPipelineOutput` (PIL output); returns result.json."""
    from rahf.pipelines.masks import mask_to_pil

    from rahf.viz import heatmap_to_image, image_grid, overlay_heatmaps

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out.images[0].save(out_dir / "best.png")
    heatmap_to_image(out.heatmap).save(out_dir / "heatmap.png")
    overlay_heatmaps(image, {heatmap_name: out.heatmap}).save(out_dir / "overlay.png")
    mask_to_pil(out.mask).save(out_dir / "mask.png")
    best = int(np.argmax(out.candidate_scores)) if out.repaired else None
    captions = [f"input {out.original_score:.3f}"] + [
        f"{'*' if k == best else '#'}{k + 1} {s:.3f}" for k, s in enumerate(out.candidate_scores)
    ]
    image_grid([image, *out.candidates], cols=min(5, 1 + len(out.candidates)), captions=captions).save(
        out_dir / "candidates.png"
    )
    result = {
        "prompt": prompt,
        "repaired": bool(out.repaired),
        "original_score": float(out.original_score),
        "candidate_scores": [float(s) for s in out.candidate_scores],
        "best_candidate": best,
        "best_score": float(out.candidate_scores[best]) if best is not None else float(out.original_score),
        "scores": {k: [float(v) for v in vs] for k, vs in (out.scores or {}).items()},
        "scores_index": "0 is the input, k >= 1 candidate k",
        "mask_area_fraction": float(np.mean(out.mask)),
        "mask_pixels": int(np.sum(out.mask)),
        "heatmap_max": float(np.max(out.heatmap)),
        "image_size": list(image.size),
        "settings": settings,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahf inpaint",
        description="Repair what RAHF flags: heatmap -> mask -> K inpainted candidates -> rescore -> best.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="RAHF folder (model + processor); optional when --inpainter is a saved RAHF inpainting pipeline",
    )
    parser.add_argument(
        "--inpainter",
        required=True,
        help="a text-to-image or inpainting pipeline of Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX (Fill too) or "
        "aMUSEd: a folder or a hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0), or a saved RAHF repair pipeline",
    )
    parser.add_argument("--image", required=True, help="the image to repair")
    parser.add_argument("--prompt", required=True, help="its prompt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--heatmap",
        default="implausibility",
        help="implausibility | misalignment | a greyscale PNG at the image's size (default: %(default)s)",
    )
    parser.add_argument(
        "--threshold", type=float, default=None, help="heat in [0, 1] above which to repair (default 40/255)"
    )
    parser.add_argument(
        "--threshold_quantile",
        type=float,
        default=None,
        help="instead of --threshold: repair the heat above this quantile of the map",
    )
    parser.add_argument(
        "--dilation", type=float, default=None, help="mask growth, a fraction of the shorter side (default 0.03)"
    )
    parser.add_argument(
        "--feather",
        type=float,
        default=None,
        help="seam width inside the mask, a fraction of the shorter side (default 0.01)",
    )
    parser.add_argument(
        "--min_area",
        type=float,
        default=None,
        help="drop flagged specks smaller than this fraction of the image (default 0.001)",
    )
    parser.add_argument("--num_candidates", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the inpainting pipeline's own")
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 prompt length for SD3 and FLUX (default: the pipeline's own, 256 or 512)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rescore_with",
        default="plausibility",
        help="a score name, or weights such as 'plausibility=1,aesthetics=0.5' (default: %(default)s)",
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="load the pipeline in this dtype (default: as saved, float32 for most checkpoints)",
    )
    parser.add_argument(
        "--cpu_offload",
        action="store_true",
        help="keep the generator's models on the CPU, each moved to --device while it runs (enable_model_cpu_offload); "
        "the reward model stays on --device",
    )
    parser.add_argument(
        "--vae_slicing", action="store_true", help="decode the candidates one at a time (less memory at large K)"
    )
    parser.add_argument(
        "--vae_tiling", action="store_true", help="encode and decode in tiles (less memory at large sizes)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`rahf inpaint ...` (argv without the subcommand). User mistakes raise ValueError naming the flag."""
    from rahf.pipelines.masks import override_mask_config
    from rahf.pipelines.rahf_inpaint import DEFAULT_MASK_CONFIG

    from rahf import load_image

    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    image = load_image(args.image)
    heatmap = _heatmap_arg(args.heatmap)
    rescore_with = parse_rescore_with(args.rescore_with)
    if args.threshold is not None and args.threshold_quantile is not None:
        raise ValueError(
            f"pass either `--threshold` ({args.threshold}) or `--threshold_quantile` "
            f"({args.threshold_quantile}), not both"
        )
    overrides = {k: getattr(args, k) for k in ("threshold_quantile", "min_area") if getattr(args, k) is not None}
    mask_config = override_mask_config(DEFAULT_MASK_CONFIG, **overrides)

    pipe = load_rahf_inpaint_pipeline(
        args.model,
        args.inpainter,
        device=device,
        dtype=torch_dtype(args.dtype) if args.dtype else None,
        cpu_offload=args.cpu_offload,
    )
    for flag, method in (("vae_slicing", "enable_vae_slicing"), ("vae_tiling", "enable_vae_tiling")):
        if getattr(args, flag):
            if not hasattr(pipe, method):
                raise ValueError(
                    f"`--{flag}`: {type(pipe).__name__} has no VAE to slice or tile (aMUSEd's is a VQ model)"
                )
            getattr(pipe, method)()
    call: dict[str, Any] = {
        "heatmap": heatmap,
        "threshold": args.threshold,
        "dilation": args.dilation,
        "feather": args.feather,
        "mask_config": mask_config,
        "num_candidates": args.num_candidates,
        "rescore_with": rescore_with,
        "strength": args.strength,
        "generator": torch.Generator(device="cpu").manual_seed(args.seed),
    }
    for name in ("num_inference_steps", "guidance_scale", "max_sequence_length"):
        if getattr(args, name) is not None:
            call[name] = getattr(args, name)
    out = pipe(args.prompt, image, **call)

    resolved = pipe._resolve_mask_config(mask_config, args.threshold, args.dilation, args.feather)
    settings = {
        "model": args.model,
        "inpainter": args.inpainter,
        "pipeline": type(pipe).__name__,
        "image": str(args.image),
        "heatmap": args.heatmap,
        "mask": dict(dataclasses.asdict(resolved), resolved_threshold=resolved.resolved_threshold),
        "num_candidates": args.num_candidates,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "strength": args.strength,
        "max_sequence_length": args.max_sequence_length,
        "seed": args.seed,
        "rescore_with": rescore_with,
        "device": device,
        "dtype": args.dtype,
        "cpu_offload": args.cpu_offload,
    }
    heatmap_name = args.heatmap if isinstance(heatmap, str) else "heatmap"
    result = write_inpaint_result(out, image, args.out, args.prompt, heatmap_name, settings)
    logger.info(
        "%s: %s (input %.3f, best candidate %s), mask %.1f%% of the image -> %s",
        args.image,
        "repaired" if result["repaired"] else "kept the input",
        result["original_score"],
        f"{max(result['candidate_scores']):.3f}" if result["candidate_scores"] else "none",
        100 * result["mask_area_fraction"],
        args.out,
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
