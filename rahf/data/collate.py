"""`RAHFCollator`: a list of training items (`RichFeedbackTorchDataset`) -> one batch of `RAHFModel` inputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..keywords import split_prompt_words
from ..processing_rahf import check_prompts
from .schema import HEATMAP_NAMES, SCORE_NAMES

logger = logging.getLogger(__name__)

__all__ = ["RAHFCollator"]


class RAHFCollator:
    r"""
    Turns training items into model inputs: `pixel_values`, `input_ids`, `attention_mask`, `image_index`, `task_ids`
    (augmented-prompt variant: one row per image and task), `labels` (the ` 0`-marked keyword targets), and the
    stacked `heatmap_labels` (B, H, S, S) and `score_labels` (B, num_scores). `uid` (a list of str) rides along for
    bookkeeping; pop it before calling the model.

    Args:
        processor ([`RAHFProcessor`]): resizes and normalises images, tokenizes prompts and keyword targets.
        score_names (`Sequence[str]`, *optional*): the model's scores, in its output order (`config.score_names`);
            picked from the items' `scores`, which follow `rahf.data.schema.SCORE_NAMES`. Defaults to all of them.
        heatmap_names (`Sequence[str]`, *optional*): the model's heatmaps (`config.heatmap_names`), picked from the
            items' `heatmaps` (in `rahf.data.schema.HEATMAP_NAMES` order). Defaults to all of them.
        tasks_per_image (`int`, *optional*): augmented-prompt variant only: keep this many of each image's task rows,
            drawn without replacement from the item's `sample_seed` (so a resumed run draws the same ones). Every row
            costs a pass of the fusion encoder, so fewer rows per image make a step that much cheaper; the loss
            averages over the rows kept. `None` keeps every task (the paper's setting).

    Examples:

    ```python
    >>> from rahf.data.collate import RAHFCollator
    >>> collator = RAHFCollator(processor, model.config.score_names, model.config.heatmap_names)
    >>> batch = collator([train_dataset[0], train_dataset[1]])
    >>> batch.pop("uid")
    >>> loss = model(**batch).loss
    ```
    """

    def __init__(
        self,
        processor,
        score_names: Sequence[str] | None = None,
        heatmap_names: Sequence[str] | None = None,
        tasks_per_image: int | None = None,
    ):
        if tasks_per_image is not None and (not isinstance(tasks_per_image, int) or tasks_per_image < 1):
            raise ValueError(f"`tasks_per_image` must be None (all tasks) or an int >= 1, got {tasks_per_image!r}")
        self.processor = processor
        self.tasks_per_image = tasks_per_image
        self.score_index = self._indices("score_names", score_names, SCORE_NAMES)
        self.heatmap_index = self._indices("heatmap_names", heatmap_names, HEATMAP_NAMES)

    @staticmethod
    def _indices(arg: str, names: Sequence[str] | None, available: Sequence[str]) -> list[int]:
        if names is None:
            return list(range(len(available)))
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"`{arg}` has {unknown}, which the canonical data set does not provide; it provides {list(available)}"
            )
        return [list(available).index(n) for n in names]

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("`items` is empty: a batch needs at least one training item")
        prompts = [item["prompt"] for item in items]
        # Training refuses what inference refuses: a record with no prompt words, named by its uid.
        check_prompts(prompts, uids=[item.get("uid") for item in items])
        word_labels = []
        for item in items:
            labels = [int(x) for x in item["word_labels"]]
            words = split_prompt_words(item["prompt"])
            if len(words) != len(labels):
                raise ValueError(
                    f"record {item.get('uid')!r}: its prompt splits into {len(words)} words but it has {len(labels)} "
                    "word labels; rebuild the data set with rahf.data (labels follow rahf.split_prompt_words)"
                )
            word_labels.append(labels)
        batch = dict(
            self.processor(images=[item["image"] for item in items], text=prompts, keyword_labels=word_labels)
        )
        batch["heatmap_labels"] = torch.stack([item["heatmaps"][self.heatmap_index] for item in items])  # (B, H, S, S)
        batch["score_labels"] = torch.stack([item["scores"][self.score_index] for item in items])  # (B, num_scores)
        batch["uid"] = [item.get("uid") for item in items]
        if self.tasks_per_image is not None and "task_ids" in batch:
            batch = self._sample_tasks(batch, items)
        return batch

    def _sample_tasks(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        image_index = batch["image_index"]
        keep = torch.zeros(len(image_index), dtype=torch.bool)
        for i, item in enumerate(items):
            if "sample_seed" not in item:
                raise ValueError(
                    "`tasks_per_image` needs each item's `sample_seed` (RichFeedbackTorchDataset provides it)"
                )
            rows = torch.nonzero(image_index == i).flatten()
            if self.tasks_per_image >= len(rows):
                keep[rows] = True
                continue
            chosen = np.random.default_rng(item["sample_seed"]).choice(len(rows), self.tasks_per_image, replace=False)
            keep[rows[torch.from_numpy(np.sort(chosen))]] = True
        for key in ("input_ids", "attention_mask", "image_index", "task_ids"):
            batch[key] = batch[key][keep]
        return batch
