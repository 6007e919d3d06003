"""The repair section of `rahf demo`: run RAHF inpainting on images with planted artifacts and measure it.

Reports how often repair raised plausibility, and how well the predicted mask finds the planted artifacts (IoU with
their true masks, for the raw thresholded heatmap and for the final dilated mask), with a picture grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rahf.pipelines.auto import from_inpaint_pipe
from rahf.pipelines.masks import heatmap_to_mask

logger = logging.getLogger(__name__)

__all__ = ["mask_iou", "repair_report"]


def mask_iou(predicted: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty (nothing to find, nothing found)."""
    predicted, true = np.asarray(predicted, dtype=bool), np.asarray(true, dtype=bool)
    union = np.logical_or(predicted, true).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(predicted, true).sum() / union)


def _mask_panel(predicted: np.ndarray, true: np.ndarray) -> Image.Image:
    """The predicted mask in white, the true mask's pixels tinted red (pink where both)."""
    panel = np.zeros((*predicted.shape, 3), dtype=np.uint8)
    panel[predicted] = (255, 255, 255)
    panel[true & ~predicted] = (220, 30, 30)
    panel[true & predicted] = (255, 150, 150)
    return Image.fromarray(panel)


def repair_report(
    predictor_model_dir: str,
    inpaint_pipe: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    true_masks: Sequence[np.ndarray],
    out_dir: str | Path,
    **settings: Any,
) -> dict[str, Any]:
    """Repairs each image with RAHF + `inpaint_pipe` and compares the predicted masks with the planted artifacts.

    Args:
        predictor_model_dir: a RAHF folder (model + processor, as `save_pretrained` writes them).
        inpaint_pipe: a Stable Diffusion inpainting or aMUSEd pipeline (e.g. `rahf.testing.tiny_sd_inpaint_pipeline()`),
            or a RAHF inpainting pipeline (its reward model is replaced by the one in `predictor_model_dir`).
        images, prompts: the images with planted artifacts and their prompts.
        true_masks: per image, a bool (H, W) mask of the planted artifacts at the image's size.
        out_dir: where `repair_report.json` and `repair_grid.png` go.
        **settings: arguments of the pipeline's `__call__` (`threshold`, `dilation`, `num_candidates`,
            `num_inference_steps`, `heatmap`, `rescore_with`, ...), plus `seed` (default 0; image i uses seed + i).

    Returns:
        The report: `share_repaired`, `share_plausibility_raised`, `mean_plausibility_before` / `_after`,
        `mean_iou_raw_threshold` (thresholded heatmap, no speck removal or dilation, vs the true masks),
        `mean_iou_mask` (the final, dilated mask vs the true masks), `mean_mask_area_fraction`, per-image rows and the
        settings. Also written to `out_dir/repair_report.json`, with the grid (input | heatmap overlay | mask vs truth |
        result) in `out_dir/repair_grid.png`.
    """
    from rahf import RAHFModel, RAHFProcessor, RichFeedbackPredictor
    from rahf.viz import image_grid, overlay_heatmaps

    images, prompts, true_masks = list(images), list(prompts), list(true_masks)
    if not images:
        raise ValueError("`images` is empty: pass at least one image with planted artifacts")
    if not (len(images) == len(prompts) == len(true_masks)):
        raise ValueError(
            f"got {len(images)} images, {len(prompts)} prompts and {len(true_masks)} true masks: pass one "
            "prompt and one true mask per image"
        )
    for i, (image, true) in enumerate(zip(images, true_masks)):
        true = np.asarray(true)
        if true.shape != (image.height, image.width):
            raise ValueError(
                f"`true_masks[{i}]` has shape {true.shape} but image {i} is {image.width}x{image.height}: "
                f"pass a ({image.height}, {image.width}) bool mask"
            )
    settings = dict(settings)
    seed = int(settings.pop("seed", 0))
    for forbidden in ("prompt", "image", "generator", "return_dict", "output_type"):
        if forbidden in settings:
            raise ValueError(f"`{forbidden}` is set per image by repair_report; remove it from the settings")

    reward_model = RAHFModel.from_pretrained(predictor_model_dir)
    reward_processor = RAHFProcessor.from_pretrained(predictor_model_dir)
    pipe = from_inpaint_pipe(inpaint_pipe, reward_model, reward_processor)
    pipe.set_progress_bar_config(disable=True)
    config = pipe._resolve_mask_config(
        settings.get("mask_config"), settings.get("threshold"), settings.get("dilation"), settings.get("feather")
    )
    raw_config = dataclasses.replace(config, min_area=0.0, dilation=0.0)
    heatmap_name = settings.get("heatmap", "implausibility")

    rows, chosen_images, outputs = [], [], []
    for i, (image, prompt, true) in enumerate(zip(images, prompts, true_masks)):
        true = np.asarray(true, dtype=bool)
        out = pipe(prompt, image, generator=torch.Generator().manual_seed(seed + i), **settings)
        raw = heatmap_to_mask(out.heatmap, raw_config)
        chosen_images.append(out.images[0])
        outputs.append(out)
        rows.append(
            {
                "index": i,
                "prompt": prompt,
                "repaired": bool(out.repaired),
                "original_score": float(out.original_score),
                "candidate_scores": [float(s) for s in out.candidate_scores],
                "iou_raw_threshold": mask_iou(raw, true),
                "iou_mask": mask_iou(out.mask, true),
                "mask_area_fraction": float(out.mask.mean()),
                "true_area_fraction": float(true.mean()),
            }
        )

    # Plausibility before and after (whatever score ranked the candidates), in one batched RAHF call over the inputs
    # and the repaired results; an image that was kept has the same plausibility after as before.
    repaired = [i for i, row in enumerate(rows) if row["repaired"]]
    predictor = RichFeedbackPredictor(pipe.reward_model, pipe.reward_processor, batch_size=len(images) + len(repaired))
    feedback = predictor(
        [*images, *(chosen_images[i] for i in repaired)],
        [*prompts, *(prompts[i] for i in repaired)],
        outputs=["plausibility"],
    )
    for i, row in enumerate(rows):
        row["plausibility_before"] = row["plausibility_after"] = float(feedback[i].scores["plausibility"])
    for k, i in enumerate(repaired):
        rows[i]["plausibility_after"] = float(feedback[len(images) + k].scores["plausibility"])

    def mean(key: str) -> float:
        return float(np.mean([row[key] for row in rows]))

    report = {
        "num_images": len(rows),
        "share_repaired": mean("repaired"),
        "share_plausibility_raised": float(
            np.mean([r["plausibility_after"] > r["plausibility_before"] for r in rows])
        ),
        "mean_plausibility_before": mean("plausibility_before"),
        "mean_plausibility_after": mean("plausibility_after"),
        "mean_iou_raw_threshold": mean("iou_raw_threshold"),
        "mean_iou_mask": mean("iou_mask"),
        "mean_mask_area_fraction": mean("mask_area_fraction"),
        "mean_true_area_fraction": mean("true_area_fraction"),
        "pipeline": type(pipe).__name__,
        "mask": dict(dataclasses.asdict(config), resolved_threshold=config.resolved_threshold),
        "settings": {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, dict, type(None)))},
        "seed": seed,
        "images": rows,
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells, captions = [], []
    name = heatmap_name if isinstance(heatmap_name, str) else "heatmap"
    for image, true, out, row in zip(images, true_masks, outputs, rows):
        cells += [
            image,
            overlay_heatmaps(image, {name: out.heatmap}, legend=False),
            _mask_panel(out.mask, np.asarray(true, dtype=bool)),
            out.images[0],
        ]
        captions += [
            f"p={row['plausibility_before']:.2f}",
            f"IoU raw {row['iou_raw_threshold']:.2f}",
            f"IoU {row['iou_mask']:.2f}",
            f"{'fixed' if row['repaired'] else 'kept'} {row['plausibility_after']:.2f}",
        ]
    image_grid(cells, cols=4, captions=captions).save(out_dir / "repair_grid.png")
    (out_dir / "repair_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "repair: %d/%d images repaired, plausibility %.3f -> %.3f, mask IoU %.3f (raw threshold %.3f) -> %s",
        sum(r["repaired"] for r in rows),
        len(rows),
        report["mean_plausibility_before"],
        report["mean_plausibility_after"],
        report["mean_iou_mask"],
        report["mean_iou_raw_threshold"],
        out_dir,
    )
    return report
