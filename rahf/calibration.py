"""Choosing how keywords are decoded, on a held-out split: greedy (the paper's) or writing the ` 0` marker wherever
its probability reaches a threshold, whichever gives the best keyword F1. `rahf train --calibrate_keyword_threshold`
runs it on the validation split after training and saves the choice in the model's config (`keyword_threshold`).

Examples:

```python
>>> from rahf.calibration import calibrate_keyword_threshold, keyword_scores_at_thresholds
>>> choice = calibrate_keyword_threshold(model, processor, data["validation"])
>>> choice["threshold"], choice["f1"], choice["f1_greedy"]
>>> keyword_scores_at_thresholds(model, processor, data["test"], [None, 0.3])  # P / R / F1 at each decoding
```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .configuration_rahf import KEYWORDS_TASK
from .evaluation import misaligned_indices
from .metrics import keyword_prf
from .predictor import RichFeedbackPredictor

if TYPE_CHECKING:
    from accelerate import PartialState

logger = logging.getLogger(__name__)

__all__ = ["KEYWORD_THRESHOLDS", "calibrate_keyword_threshold", "keyword_scores_at_thresholds"]


KEYWORD_THRESHOLDS = (0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)


@torch.no_grad()
def _keyword_predictions(
    model, processor, split, thresholds: Sequence[float | None], batch_size: int
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(ground-truth misaligned word indices per record, per threshold the predicted ones) on `split`. The model's own
    `keyword_threshold` and train/eval mode are left as they were."""
    config = model.config
    was_training, saved = model.training, config.keyword_threshold
    config.keyword_threshold = None  # the predictor's threshold decides, and None there means greedy
    predictor = RichFeedbackPredictor(model, processor, batch_size=batch_size)
    images = [image.convert("RGB") for image in split["image"]]
    prompts = list(split["prompt"])
    gt = [misaligned_indices(labels) for labels in split["word_labels"]]
    predictions = []
    try:
        for threshold in thresholds:
            predictor.keyword_threshold = threshold
            feedback = predictor(images, prompts, outputs=[KEYWORDS_TASK]) if images else []
            predictions.append([list(f.misaligned_word_indices) for f in feedback])
    finally:
        config.keyword_threshold = saved
        model.train(was_training)
    return gt, predictions


def _keyword_table(gt, predictions, thresholds) -> list[dict[str, Any]]:
    table = []
    for threshold, predicted in zip(thresholds, predictions):
        precision, recall, f1 = keyword_prf(predicted, gt)
        table.append({"threshold": threshold, "precision": precision, "recall": recall, "f1": f1})
    return table


def keyword_scores_at_thresholds(
    model, processor, split, thresholds: Sequence[float | None] = (None,), batch_size: int = 64
) -> list[dict[str, Any]]:
    """Keyword precision / recall / F1 on `split` for each decoding in `thresholds` (None: greedy) ->
    `[{"threshold", "precision", "recall", "f1"}, ...]`. The model's own `keyword_threshold` and train/eval mode are
    left as they were."""
    gt, predictions = _keyword_predictions(model, processor, split, thresholds, batch_size)
    return _keyword_table(gt, predictions, thresholds)


def calibrate_keyword_threshold(
    model,
    processor,
    split,
    thresholds: Sequence[float] = KEYWORD_THRESHOLDS,
    batch_size: int = 64,
    state: PartialState | None = None,
) -> dict[str, Any] | None:
    """Picks the keyword decoding of best F1 on a held-out split and sets it as `model.config.keyword_threshold`.

    Greedy decoding (`None`, the paper's) and each marker threshold in `thresholds` decode the split's keywords;
    the best F1 wins, greedy on ties. Returns `{"threshold", "f1", "f1_greedy", "num_records", "table"}`, or `None`
    for a model that writes no keywords. Run it on a validation split, never on the split you report.

    With a `state` of several processes, call it on every process: each decodes its contiguous shard of the split,
    the predictions are gathered, and every process sets the same threshold.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "rahf" or KEYWORDS_TASK not in config.task_names:
        return None
    decodings = (None, *thresholds)
    num_processes = state.num_processes if state is not None else 1
    if num_processes > 1:
        from accelerate.utils import gather_object

        shard = split.shard(num_shards=num_processes, index=state.process_index, contiguous=True)
        gt, predictions = _keyword_predictions(model, processor, shard, decodings, batch_size)
        # One object per process (lists of different lengths), gathered in process order: the split's order.
        shards = gather_object([(gt, predictions)])
        gt = [g for shard_gt, _ in shards for g in shard_gt]
        predictions = [[p for _, shard_pred in shards for p in shard_pred[k]] for k in range(len(decodings))]
    else:
        gt, predictions = _keyword_predictions(model, processor, split, decodings, batch_size)
    table = _keyword_table(gt, predictions, decodings)
    best = max(table, key=lambda row: row["f1"])  # first maximum: greedy wins ties, then higher thresholds
    config.keyword_threshold = best["threshold"]
    logger.info(
        "keyword decoding on %d validation records: greedy F1 %.3f; %s F1 %.3f -> config.keyword_threshold = %s",
        len(gt),
        table[0]["f1"],
        "best threshold" if best["threshold"] else "greedy is best,",
        best["f1"],
        best["threshold"],
    )
    return {
        "threshold": best["threshold"],
        "f1": best["f1"],
        "f1_greedy": table[0]["f1"],
        "num_records": len(gt),
        "table": table,
    }
