"""The best-of-N section of `rahf demo`: generate N per prompt, keep the best by RAHF, fine-tune a LoRA on the kept set,
and compare the generator before and after on held-out prompts (same seeds), with a sample grid.

Examples:

```python
>>> from rahf.improve.demo import best_of_n_report
>>> report = best_of_n_report("tiny-sd", "models/rahf", ["a red cat", "a blue car"], ["a green bird"], "out/bon")
>>> report["heldout"]["before"]["reward"], report["heldout"]["after"]["reward"], report["grid"]
```
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .best_of_n import (
    BestOfNArguments,
    _generate,
    _score_table,
    build_reward_fn,
    derive_seed,
    load_text_to_image_pipeline,
    run_best_of_n,
)
from .finetune import LoRAFineTuneArguments, load_lora_into_pipeline, train_lora

logger = logging.getLogger(__name__)

__all__ = ["best_of_n_report", "default_resolution"]

# Held-out images are seeded apart from the best-of-N run's (prompt indices could coincide).
HELDOUT_SEED_OFFSET = 1_000_003


def default_resolution(pipe) -> int:
    """The pipeline's default output size (the denoiser's sample size times the autoencoder's scale factor)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0]
    if not sample_size:
        raise ValueError(f"cannot tell the default resolution of a {type(pipe).__name__}; pass `resolution`")
    return int(sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def _evaluate(pipe, reward_fn, prompts: Sequence[str], seeds: list[list[int]], gen_args: BestOfNArguments):
    """Images for every held-out prompt (one per seed) and their rewards / RAHF scores."""
    images, rewards, tables = [], [], []
    for prompt, prompt_seeds in zip(prompts, seeds):
        batch = _generate(pipe, prompt, prompt_seeds, gen_args, pipe.device)
        values, info = reward_fn(batch, [prompt] * len(batch), None)
        images.append(batch)
        rewards.append([float(v) for v in torch.as_tensor(values).float().reshape(-1)])
        tables.append(_score_table(info, len(batch)))
    flat = [r for row in rewards for r in row]
    summary: dict[str, Any] = {"reward": float(np.mean(flat)), "rewards": rewards}
    for name in tables[0]:
        summary[name] = float(np.mean([v for table in tables for v in table[name]]))
    return images, summary


def best_of_n_report(
    sd_pipe_dir: str | Path,
    reward_model_dir: str | Path,
    train_prompts: Sequence[str],
    heldout_prompts: Sequence[str],
    out_dir: str | Path,
    n: int = 4,
    threshold: float | None = None,
    finetune_steps: int = 20,
    reward: str = "overall",
    num_inference_steps: int = 2,
    heldout_images_per_prompt: int = 2,
    learning_rate: float = 1e-3,
    rank: int = 4,
    train_batch_size: int = 2,
    reward_weighted: bool = False,
    resolution: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Best-of-N on `train_prompts`, a few LoRA steps on the kept images, then the mean reward on `heldout_prompts`
    before and after (the same seeds), and a before/after grid.

    Writes under `out_dir`: `best_of_n/` (kept set, all_scores.jsonl, ...), `lora/` (the fine-tuning run and its
    `pytorch_lora_weights.safetensors`), `before_after.png` (top row before, bottom row after, one column per held-out
    prompt, first seed) and `best_of_n_report.json` (what this returns).

    Returns:
        `dict` with `best_of_n` (the run's summary), `finetune` (the training summary), `heldout` (`before` / `after`:
        mean `reward` and mean RAHF scores over the held-out images; `gain` = after - before), `grid` (the PNG path).
    """
    from rahf.viz import image_grid

    if not train_prompts or not heldout_prompts:
        raise ValueError("`train_prompts` and `heldout_prompts` must both be non-empty lists of prompts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = out_dir / "train_prompts.txt"
    prompts_file.write_text("".join(p.replace("\n", " ") + "\n" for p in train_prompts))
    if resolution is None:
        resolution = default_resolution(load_text_to_image_pipeline(str(sd_pipe_dir)))

    # 1. Best-of-N on the training prompts.
    bon_args = BestOfNArguments(
        pretrained_model_name_or_path=str(sd_pipe_dir), reward_model=str(reward_model_dir),
        prompts_file=str(prompts_file), output_dir=str(out_dir / "best_of_n"), num_images_per_prompt=n,
        reward=reward, threshold=threshold, num_inference_steps=num_inference_steps, resolution=resolution, seed=seed,
        batch_size=n,
    )
    bon_summary = run_best_of_n(bon_args)
    if not bon_summary.get("num_kept"):
        raise ValueError(f"best-of-{n} kept no image (threshold {threshold}); lower `threshold` for the demo")

    # 2. A few LoRA steps on what was kept.
    ft_summary = train_lora(LoRAFineTuneArguments(
        pretrained_model_name_or_path=str(sd_pipe_dir), train_data_dir=str(out_dir / "best_of_n" / "kept"),
        resolution=resolution, train_batch_size=train_batch_size, max_train_steps=finetune_steps,
        learning_rate=learning_rate, rank=rank, output_dir=str(out_dir / "lora"), checkpointing_steps=0,
        reward_weighted=reward_weighted, seed=seed, mixed_precision="no",
    ))

    # 3. Held-out prompts, the same seeds before and after.
    reward_fn = build_reward_fn(reward, str(reward_model_dir))
    seeds = [[derive_seed(seed + HELDOUT_SEED_OFFSET, p, i) for i in range(heldout_images_per_prompt)]
             for p in range(len(heldout_prompts))]
    gen_args = BestOfNArguments(num_inference_steps=num_inference_steps, resolution=resolution,
                                batch_size=heldout_images_per_prompt)
    pipe = load_text_to_image_pipeline(str(sd_pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    before_images, before = _evaluate(pipe, reward_fn, heldout_prompts, seeds, gen_args)
    load_lora_into_pipeline(pipe, out_dir / "lora")
    after_images, after = _evaluate(pipe, reward_fn, heldout_prompts, seeds, gen_args)

    # 4. The grid: first seed of each held-out prompt, before (top) and after (bottom).
    cells = [imgs[0] for imgs in before_images] + [imgs[0] for imgs in after_images]
    scale = max(1, -(-128 // max(cells[0].size)))  # tiny generators: upscale (nearest) so the captions fit
    cells = [c.resize((c.width * scale, c.height * scale), Image.Resampling.NEAREST) for c in cells]
    captions = [f"before {r[0]:.3f}" for r in before["rewards"]] + [f"after {r[0]:.3f}" for r in after["rewards"]]
    grid_path = out_dir / "before_after.png"
    image_grid(cells, cols=len(heldout_prompts), captions=captions).save(grid_path)

    gain = {k: after[k] - before[k] for k in before if isinstance(before[k], float)}
    report = {
        "best_of_n": {k: v for k, v in bon_summary.items() if k != "generated_by_this_process"},
        "finetune": ft_summary,
        "heldout": {"prompts": list(heldout_prompts), "seeds": seeds, "before": before, "after": after, "gain": gain},
        "grid": str(grid_path),
    }
    (out_dir / "best_of_n_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("best-of-%d: kept %d of %d prompts; held-out mean %s %.4f -> %.4f after %d LoRA steps", n,
                bon_summary["num_kept"], bon_summary["num_prompts"], reward, before["reward"], after["reward"],
                ft_summary["global_step"])
    return report
