"""`rahf evaluate`: the paper's Tables 1-4 for any rater (RAHF or a baseline) on a canonical split.

Writes `metrics.json` (the schema below, `null` where the model cannot produce an output; under `--protocol paper`,
the default, or `reimpl`), `metrics_by_protocol.json` (both), `report.md` with the four tables in the paper's layout
under each protocol, figures in the style of the paper's Figs. 5-7 (image | ground truth | prediction
overlays; ground-truth vs predicted scores), `predictions.jsonl` (per-sample scores and keywords) and
`eval_info.json` (what was evaluated, on what, how long it took).

```
{"scores": {"plausibility" | "alignment" | "aesthetics" | "overall": {"plcc", "srcc"} | null},
 "implausibility_heatmap": {"mse_all", "mse_gt0", "cc", "kld", "sim", "nss", "auc_judd", "n_all", "n_gt0",
                            "n_gt_pos"} | null,
 "misalignment_heatmap": {same keys} | null,
 "keywords": {"precision", "recall", "f1"} | null}
```

Examples:

```bash
rahf evaluate --model runs/tiny/final --data data/synth --split test --out eval/rahf
rahf evaluate --model center_prior --data data/synth --out eval/center_prior
rahf evaluate --model yuvalkirstain/PickScore_v1 --model_type pickscore \
    --processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K --data data/richhf18k --out eval/pickscore
```
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from . import metrics as M
from .baselines import load_rater, rater_capabilities, resize_map
from .constants import HEATMAP_NAMES, SCORE_NAMES

logger = logging.getLogger(__name__)

__all__ = [
    "HEATMAP_KEYS",
    "PAPER_METRICS",
    "PROTOCOL_TITLES",
    "REFERENCE_ROWS",
    "REIMPL_METRICS",
    "SCORE_NAMES",
    "evaluate",
    "main",
    "misaligned_indices",
    "render_tables",
    "write_comparison_report",
]

HEATMAP_KEYS: tuple[str, ...] = (
    "mse_all",
    "mse_gt0",
    "cc",
    "kld",
    "sim",
    "nss",
    "auc_judd",
    "n_all",
    "n_gt0",
    "n_gt_pos",
)
_MEAN_OVER = {
    "mse_all": "n_all",
    "mse_gt0": "n_gt0",
    "cc": "n_gt_pos",
    "kld": "n_gt_pos",
    "sim": "n_gt_pos",
    "nss": "n_gt_pos",
    "auc_judd": "n_gt_pos",
}
# The paper's tables put the scores in this order.
_TABLE1_ORDER = (
    ("plausibility", "Plausibility"),
    ("aesthetics", "Aesthetics"),
    ("alignment", "Text-image alignment"),
    ("overall", "Overall"),
)


def _scores(**rows: tuple[float, float] | None) -> dict:
    return {
        name: (None if rows.get(name) is None else {"plcc": rows[name][0], "srcc": rows[name][1]})
        for name in SCORE_NAMES
    }


def _heat(mse_all, mse_gt0, cc, kld, sim, nss, auc, n_gt0=None, n_all=None) -> dict:
    n_gt_pos = None if n_all is None or n_gt0 is None else n_all - n_gt0
    return {
        "mse_all": mse_all,
        "mse_gt0": mse_gt0,
        "cc": cc,
        "kld": kld,
        "sim": sim,
        "nss": nss,
        "auc_judd": auc,
        "n_all": n_all,
        "n_gt0": n_gt0,
        "n_gt_pos": n_gt_pos,
    }


def _paper(scores=None, implausibility=None, misalignment=None, keywords=None) -> dict:
    return {
        "scores": scores or _scores(),
        "implausibility_heatmap": implausibility,
        "misalignment_heatmap": misalignment,
        "keywords": None if keywords is None else dict(zip(("precision", "recall", "f1"), keywords)),
    }


# The paper's figures on the RichHF-18K test set (Liang et al., CVPR 2024, Tables 1-4; docs/reference.md, section 5), in the schema
# of metrics.json. Table 2/3 counts, from the paper's captions: 69 (implausibility) and 144 (misalignment) empty maps out of
# 995 test samples. The release's test file holds 955 records (its dev file 995): the count is the paper's, kept as stated.
PAPER_METRICS: dict[str, dict] = {
    "ResNet-50": _paper(
        scores=_scores(
            plausibility=(0.495, 0.487), aesthetics=(0.370, 0.363), alignment=(0.108, 0.119), overall=(0.337, 0.308)
        ),
        implausibility=_heat(0.00996, 0.00093, 0.506, 1.669, 0.338, 2.924, 0.909, 69, 995),
    ),
    "PickScore (off-the-shelf)": _paper(
        scores=_scores(
            plausibility=(0.0098, 0.0280), aesthetics=(0.131, 0.140), alignment=(0.346, 0.340), overall=(0.202, 0.226)
        ),
    ),
    "CLIP (off-the-shelf)": _paper(scores=_scores(alignment=(0.185, 0.130))),
    "CLIP (fine-tuned)": _paper(
        scores=_scores(
            plausibility=(0.390, 0.378), aesthetics=(0.357, 0.360), alignment=(0.398, 0.390), overall=(0.353, 0.352)
        ),
    ),
    "CLIP gradient": _paper(misalignment=_heat(0.00817, 0.00551, 0.015, 3.844, 0.041, 0.143, 0.643, 144, 995)),
    "RAHF multi-head": _paper(
        scores=_scores(
            plausibility=(0.666, 0.654), aesthetics=(0.605, 0.591), alignment=(0.487, 0.500), overall=(0.582, 0.561)
        ),
        implausibility=_heat(0.01216, 0.00141, 0.425, 1.971, 0.302, 2.330, 0.877, 69, 995),
        misalignment=_heat(0.00303, 0.00015, 0.206, 2.932, 0.093, 1.335, 0.838, 144, 995),
        keywords=(0.629, 0.330, 0.433),
    ),
    "RAHF augmented prompt": _paper(
        scores=_scores(
            plausibility=(0.693, 0.681), aesthetics=(0.600, 0.589), alignment=(0.474, 0.496), overall=(0.580, 0.562)
        ),
        implausibility=_heat(0.00920, 0.00095, 0.556, 1.652, 0.409, 3.085, 0.913, 69, 995),
        misalignment=_heat(0.00304, 0.00006, 0.212, 2.933, 0.106, 1.411, 0.841, 144, 995),
        keywords=(0.613, 0.341, 0.439),
    ),
}
PAPER_LABEL = (
    "the paper's figures on the RichHF-18K test set (Liang et al., CVPR 2024, Tables 1-4), not measured here; "
    "computed under the paper's protocol (MIT definitions) on the 995 test samples its Tables 2-3 state (the "
    "release's test file holds 955 records, its dev file 995)"
)
# The first author's re-implementation's published multi-head test figures (docs/reference.md, section 6), under its
# own protocol (`protocol="reimpl"`); it does not publish SRCC, nor its test count or empty-map counts.
REIMPL_METRICS: dict[str, dict] = {
    "re-implementation multi-head": _paper(
        scores={
            "plausibility": {"plcc": 0.739, "srcc": None},
            "aesthetics": {"plcc": 0.629, "srcc": None},
            "alignment": {"plcc": 0.565, "srcc": None},
            "overall": {"plcc": 0.642, "srcc": None},
        },
        implausibility=_heat(0.00724, 0.00078, 0.525, 1.649, 0.339, 2.029, 0.905),
        misalignment=_heat(0.00324, 0.00035, 0.232, 2.848, 0.104, 1.256, 0.797),
        keywords=(0.565, 0.452, 0.475),
    ),
}
REIMPL_LABEL = (
    "the first author's re-implementation's published multi-head test figures (RichHF-18K), not measured here; "
    "computed under its own protocol (`--protocol reimpl`); it states no test count (the release's test file holds "
    "955 records)"
)
# protocol -> (label, rows) of the published figures that protocol makes comparable.
REFERENCE_ROWS: dict[str, tuple[str, dict[str, dict]]] = {
    "paper": (PAPER_LABEL, PAPER_METRICS),
    "reimpl": (REIMPL_LABEL, REIMPL_METRICS),
}
PROTOCOL_TITLES = {
    "paper": "the paper's protocol (MIT saliency benchmark definitions, pooled keyword counts)",
    "reimpl": "the re-implementation's protocol (SIM without min-max, KLD eps 1e-8, heatmaps at 384 px, per-sample "
    "keyword averages)",
}


# ====================================================================================================================
# Accumulating the metrics over a split


class _HeatmapAccumulator:
    """Per-sample `heatmap_metrics`, combined into the set's means without holding every map in memory."""

    def __init__(self, protocol: str = "paper"):
        self.protocol = protocol
        self.sums = {k: 0.0 for k in _MEAN_OVER}
        self.counts = {"n_all": 0, "n_gt0": 0, "n_gt_pos": 0}

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        one = M.heatmap_metrics([pred], [gt], protocol=self.protocol)
        for key in self.counts:
            self.counts[key] += int(one[key])
        for key, over in _MEAN_OVER.items():
            if one[over]:
                self.sums[key] += float(one[key])

    def result(self) -> dict:
        out: dict[str, Any] = {}
        for key, over in _MEAN_OVER.items():
            out[key] = self.sums[key] / self.counts[over] if self.counts[over] else None
        out.update(self.counts)
        return {k: out[k] for k in HEATMAP_KEYS}


def _gt_map(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def misaligned_indices(word_labels: Sequence[int]) -> list[int]:
    """A record's `word_labels` (0 = misaligned, 1 = aligned) -> the indices of its misaligned words."""
    return [i for i, label in enumerate(word_labels) if int(label) == 0]


def _check_produced(name: str, kind: str, got: Sequence[bool], claimed: bool | None) -> bool:
    """Whether an output counts as produced: claimed by the rater, or (when it cannot say) returned for all."""
    if claimed is None:
        if any(got) and not all(got):
            raise ValueError(
                f"the rater returned the {kind} {name!r} for {sum(got)} of {len(got)} samples: a rater must return an "
                "output for every sample or for none"
            )
        return bool(got) and all(got)
    if claimed and not all(got):
        raise ValueError(
            f"the rater says it produces the {kind} {name!r} but returned it for {sum(got)} of {len(got)} samples"
        )
    return claimed


class _Example:
    """What the figures need of one sample, kept small (thumbnails)."""

    def __init__(
        self, index, image, prompt, words, gt_maps, pred_maps, gt_words, pred_words, gt_scores, pred_scores, cell: int
    ):
        scale = cell / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        self.index = index
        self.image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        self.prompt = prompt
        self.words = words
        self.gt_maps = {k: resize_map(v, size[1], size[0]) for k, v in gt_maps.items()}
        self.pred_maps = {
            k: resize_map(np.asarray(v, dtype=np.float32), size[1], size[0]) for k, v in pred_maps.items()
        }
        self.gt_words = gt_words
        self.pred_words = pred_words
        self.gt_scores = gt_scores
        self.pred_scores = pred_scores


def evaluate(
    rater,
    dataset_split,
    out_dir: str | Path,
    name: str = "model",
    batch_size: int = 8,
    max_examples: int | None = None,
    num_figure_examples: int = 6,
    figures: bool = True,
    show_progress: bool = True,
    info: Mapping[str, Any] | None = None,
    include_paper: bool = False,
    protocol: str = "paper",
) -> dict:
    """Rates every record of a canonical split and writes `metrics.json`, `report.md`, figures and predictions.

    Both protocols are computed on the same predictions: `metrics.json` holds `protocol`'s, `metrics_by_protocol.json`
    both (`{"paper": ..., "reimpl": ...}`), and `report.md` shows `protocol`'s tables first, then the other's.

    Args:
        rater: `rater(images, prompts) -> list[RichFeedback]` (a `RichFeedbackPredictor`, a baseline of
            `rahf.baselines`, or any callable with that interface). What it produces is read from its `capabilities`
            (baselines) or its model's config (RAHF); for other callables, from what it returns.
        dataset_split: a `datasets.Dataset` with the canonical columns (`rahf.data.schema.FEATURES`).
        out_dir: where the files go (created).
        name: the model's name in the report.
        batch_size: records per rater call.
        max_examples: evaluate only the first N records.
        num_figure_examples: rows of each example figure.
        figures: write the PNG figures.
        show_progress: a tqdm bar over the records.
        info: extra facts for `eval_info.json` and the report's header (e.g. the model and data paths).
        include_paper: add the published rows under each table of `report.md`, labelled as such: the paper's under
            its protocol, the re-implementation's under its own.
        protocol: `"paper"` (the MIT definitions, pooled keyword counts) or `"reimpl"` (the first author's
            re-implementation's: see `rahf.metrics`); which one `metrics.json` holds.

    Returns:
        The metrics (what `metrics.json` holds).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    needed = ["image", "prompt", "word_labels", *SCORE_NAMES, *(f"{h}_map" for h in HEATMAP_NAMES)]
    missing = [c for c in needed if c not in dataset_split.column_names]
    if missing:
        raise ValueError(f"`dataset_split` lacks the column(s) {missing}; pass a split of a canonical data set")
    n = len(dataset_split) if max_examples is None else min(int(max_examples), len(dataset_split))
    if n < 2:
        raise ValueError(
            f"evaluation needs at least 2 records (correlations), got {n}; check --split / --max_examples"
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    if protocol not in M.PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {M.PROTOCOLS}, got {protocol!r}")
    caps = rater_capabilities(rater)
    start_time = time.perf_counter()

    gt_scores = {s: [] for s in SCORE_NAMES}
    pred_scores: dict[str, list[float | None]] = {s: [] for s in SCORE_NAMES}
    heat = {(h, pr): _HeatmapAccumulator(pr) for h in HEATMAP_NAMES for pr in M.PROTOCOLS}
    heat_got = {h: [] for h in HEATMAP_NAMES}
    gt_keywords: list[list[int]] = []
    pred_keywords: list[list[int]] = []
    keywords_seen = False
    candidates: list[_Example] = []
    max_candidates = max(4 * num_figure_examples, 32) if figures else 0
    records = []

    bar = tqdm(total=n, desc=f"evaluating {name}", unit="img", disable=not show_progress)
    for start in range(0, n, batch_size):
        rows = dataset_split[start : min(start + batch_size, n)]
        images = [im.convert("RGB") for im in rows["image"]]
        prompts = list(rows["prompt"])
        feedbacks = rater(images, prompts)
        if len(feedbacks) != len(images):
            raise ValueError(f"the rater returned {len(feedbacks)} results for {len(images)} images")
        for i, fb in enumerate(feedbacks):
            index = start + i
            for s in SCORE_NAMES:
                gt_scores[s].append(float(rows[s][i]))
                value = fb.scores.get(s)
                pred_scores[s].append(None if value is None else float(value))
            gt_maps = {h: _gt_map(rows[f"{h}_map"][i]) for h in HEATMAP_NAMES}
            pred_maps = {}
            for h in HEATMAP_NAMES:
                pred = fb.heatmaps.get(h)
                heat_got[h].append(pred is not None)
                if pred is None:
                    continue
                pred = np.asarray(pred, dtype=np.float32)
                if pred.ndim != 2:
                    raise ValueError(f"record {index}: the {h!r} heatmap must be HxW, got shape {pred.shape}")
                pred_maps[h] = pred
                try:
                    heat[(h, "paper")].add(resize_map(pred, *gt_maps[h].shape), gt_maps[h])
                    heat[(h, "reimpl")].add(pred, gt_maps[h])  # both resampled to 384 x 384 there
                except ValueError as err:
                    raise ValueError(f"record {index} ({h} heatmap): {err}") from err
            gt_kw = misaligned_indices(rows["word_labels"][i])
            pred_kw = sorted(int(k) for k in (fb.misaligned_word_indices or []))
            keywords_seen = keywords_seen or bool(pred_kw)
            gt_keywords.append(gt_kw)
            pred_keywords.append(pred_kw)
            record = {
                "index": index,
                "uid": rows["uid"][i] if "uid" in rows else None,
                "prompt": prompts[i],
                "scores": {s: pred_scores[s][-1] for s in SCORE_NAMES if pred_scores[s][-1] is not None},
                "gt_scores": {s: gt_scores[s][-1] for s in SCORE_NAMES},
                "misaligned_word_indices": pred_kw,
                "gt_misaligned_word_indices": gt_kw,
            }
            records.append(record)
            if len(candidates) < max_candidates:
                words = list(rows["prompt_words"][i]) if "prompt_words" in rows else prompts[i].split()
                candidates.append(
                    _Example(
                        index,
                        images[i],
                        prompts[i],
                        words,
                        gt_maps,
                        pred_maps,
                        gt_kw,
                        pred_kw,
                        record["gt_scores"],
                        record["scores"],
                        cell=192,
                    )
                )
        bar.update(len(images))
    bar.close()

    # Scores (Table 1)
    score_metrics: dict[str, dict | None] = {}
    produced_scores = []
    for s in SCORE_NAMES:
        got = [v is not None for v in pred_scores[s]]
        if _check_produced(s, "score", got, None if caps is None else s in caps["scores"]):
            x = np.asarray(pred_scores[s], dtype=np.float64)
            y = np.asarray(gt_scores[s], dtype=np.float64)
            score_metrics[s] = {"plcc": M.plcc(x, y), "srcc": M.srcc(x, y)}
            produced_scores.append(s)
        else:
            score_metrics[s] = None
    # Heatmaps (Tables 2 and 3)
    produced_heatmaps = [
        h
        for h in HEATMAP_NAMES
        if _check_produced(h, "heatmap", heat_got[h], None if caps is None else h in caps["heatmaps"])
    ]
    # Keywords (Table 4). A rater that cannot say whether it writes keywords counts as writing them when it marked any.
    keywords_produced = caps["keywords"] if caps is not None else keywords_seen
    by_protocol = {}
    for pr in M.PROTOCOLS:
        keywords = None
        if keywords_produced:
            p, r, f1 = M.keyword_prf(pred_keywords, gt_keywords, protocol=pr)
            keywords = {"precision": p, "recall": r, "f1": f1}
        by_protocol[pr] = {
            "scores": score_metrics,
            **{
                f"{h}_heatmap": heat[(h, pr)].result() if h in produced_heatmaps else None
                for h in ("implausibility", "misalignment")
            },
            "keywords": keywords,
        }
    result = by_protocol[protocol]
    seconds = time.perf_counter() - start_time
    (out_dir / "metrics.json").write_text(json.dumps(_finite(result), indent=2) + "\n")
    (out_dir / "metrics_by_protocol.json").write_text(json.dumps(_finite(by_protocol), indent=2) + "\n")
    with (out_dir / "predictions.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    eval_info = {
        "name": name,
        "num_examples": n,
        "protocol": protocol,
        "seconds": round(seconds, 2),
        "capabilities": caps,
        **dict(info or {}),
    }
    (out_dir / "eval_info.json").write_text(json.dumps(eval_info, indent=2, default=str) + "\n")

    figure_files: list[tuple[str, str]] = []
    if figures:
        for h in produced_heatmaps:
            path = out_dir / f"examples_{h}.png"
            _examples_figure(candidates, h, name, num_figure_examples, keywords_produced, path)
            figure_files.append(
                (
                    f"{h.capitalize()} heatmaps: image | ground truth | prediction (cf. paper Fig. "
                    f"{5 if h == 'implausibility' else 6})",
                    path.name,
                )
            )
        if produced_scores:
            path = out_dir / "scores_scatter.png"
            _scatter_figure(gt_scores, pred_scores, produced_scores, score_metrics, name, path)
            figure_files.append(("Ground-truth vs predicted scores (cf. paper Fig. 7)", path.name))
    header = [
        f"Model `{name}`, {n} examples"
        + "".join(f", {k} `{v}`" for k, v in (info or {}).items())
        + f"; {seconds:.1f} s."
    ]
    others = [pr for pr in M.PROTOCOLS if pr != protocol]
    write_comparison_report(
        {name: result},
        out_dir / "report.md",
        title=f"Evaluation: {name}",
        notes=header,
        figures=figure_files,
        include_paper=include_paper,
        protocol=protocol,
        other_protocols={pr: {name: by_protocol[pr]} for pr in others},
    )
    logger.info("evaluated %s on %d examples in %.1fs: %s", name, n, seconds, out_dir / "metrics.json")
    return result


def _finite(obj: Any) -> Any:
    """NaN / inf -> None, so that metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ====================================================================================================================
# Figures


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_block(width: int, lines: Sequence[str], pad: int = 4) -> Image.Image:
    font = _font()
    chars = max(20, (width - 2 * pad) // 6)
    wrapped: list[str] = []
    for line in lines:
        wrapped += textwrap.wrap(line, chars) or [""]
    line_h = 12
    block = Image.new("RGB", (width, 2 * pad + line_h * len(wrapped)), (255, 255, 255))
    draw = ImageDraw.Draw(block)
    for k, line in enumerate(wrapped):
        draw.text((pad, pad + k * line_h), line, fill=(0, 0, 0), font=font)
    return block


def _stack(images: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas


def _words(words: Sequence[str], indices: Sequence[int]) -> str:
    return "[" + ", ".join(f'"{words[i]}"' if i < len(words) else f"#{i}" for i in indices) + "]"


def _examples_figure(
    candidates: list[_Example], heatmap: str, name: str, k: int, with_keywords: bool, path: Path
) -> None:
    from .viz import image_grid, overlay_heatmaps

    # Prefer samples whose ground truth is not empty (as the paper's figures do), then the rest, in data order.
    chosen = [c for c in candidates if (c.gt_maps[heatmap] > 0).any()][:k]
    chosen += [c for c in candidates if c not in chosen][: k - len(chosen)]
    rows = [_text_block(3 * 196, [f"{heatmap} heatmaps of {name}: image | ground truth | prediction"])]
    for ex in chosen:
        cells = [
            ex.image,
            overlay_heatmaps(ex.image, {heatmap: ex.gt_maps[heatmap]}),
            overlay_heatmaps(ex.image, {heatmap: ex.pred_maps[heatmap]}),
        ]
        grid = image_grid(cells, cols=3, captions=["image", "ground truth", "prediction"])
        lines = [f"#{ex.index} prompt: {ex.prompt}"]
        predicted = _words(ex.words, ex.pred_words) if with_keywords else "n/a"
        lines.append(f"misaligned words - GT: {_words(ex.words, ex.gt_words)} | predicted: {predicted}")
        if ex.pred_scores:
            lines.append("; ".join(f"{s} GT {ex.gt_scores[s]:.2f} / pred {v:.2f}" for s, v in ex.pred_scores.items()))
        rows.append(_stack([grid, _text_block(grid.width, lines)], gap=0))
    _stack(rows).save(path, optimize=True)


def _scatter_figure(gt: dict, pred: dict, names: list[str], score_metrics: dict, name: str, path: Path) -> None:
    # The object-oriented API: no pyplot global state, no display backend needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(names), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, s in zip(axes, names):
        x = np.asarray(gt[s], dtype=np.float64)
        y = np.asarray(pred[s], dtype=np.float64)
        ax.scatter(x, y, s=10, alpha=0.6)
        if np.nanmin(y) >= -0.05 and np.nanmax(y) <= 1.05:
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
            ax.set_xlim(-0.03, 1.03)
            ax.set_ylim(-0.03, 1.03)
        m = score_metrics[s]
        ax.set_title(f"{s}\nPLCC {m['plcc']:.3f}  SRCC {m['srcc']:.3f}", fontsize=9)
        ax.set_xlabel("ground truth")
        ax.set_ylabel("predicted")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


# ====================================================================================================================
# Report


def _fmt(value: Any, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if percent:
        return f"{round(100 * value, 1) + 0.0:.1f}"
    return f"{round(value, digits) + 0.0:.{digits}f}"


def _get(metrics: Mapping, *keys: str) -> Any:
    node: Any = metrics
    for key in keys:
        if not isinstance(node, Mapping) or node.get(key) is None:
            return None
        node = node[key]
    return node


def _table(rows: list[tuple[str, list[str]]], header: list[str], align: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    return lines


def _table_block(metrics_by_name: Mapping[str, Mapping], which: str) -> tuple[list[str], list[str]]:
    """(markdown lines, names left out because they have none of this table's outputs)."""
    rows, absent = [], []
    if which == "scores":
        header = ["model"] + [f"{label} {m}" for _, label in _TABLE1_ORDER for m in ("PLCC ↑", "SRCC ↑")]
        for name, metrics in metrics_by_name.items():
            cells = [_fmt(_get(metrics, "scores", s, m)) for s, _ in _TABLE1_ORDER for m in ("plcc", "srcc")]
            (rows.append((name, cells)) if any(c != "–" for c in cells) else absent.append(name))
        return _table(rows, header, ["---"] + ["---:"] * 8), absent
    if which in ("implausibility_heatmap", "misalignment_heatmap"):
        header = [
            "model",
            "all: MSE ↓",
            "GT=0: MSE ↓",
            "GT>0: CC ↑",
            "KLD ↓",
            "SIM ↑",
            "NSS ↑",
            "AUC-Judd ↑",
            "n (GT=0 / GT>0)",
        ]
        for name, metrics in metrics_by_name.items():
            m = metrics.get(which)
            if not m:
                absent.append(name)
                continue
            cells = [_fmt(m.get("mse_all"), 5), _fmt(m.get("mse_gt0"), 5)]
            cells += [_fmt(m.get(k)) for k in ("cc", "kld", "sim", "nss", "auc_judd")]
            cells.append(f"{_fmt(m.get('n_gt0'))} / {_fmt(m.get('n_gt_pos'))}")
            rows.append((name, cells))
        return _table(rows, header, ["---"] + ["---:"] * 8), absent
    header = ["model", "Precision (%) ↑", "Recall (%) ↑", "F1 (%) ↑"]
    for name, metrics in metrics_by_name.items():
        m = metrics.get("keywords")
        if not m:
            absent.append(name)
            continue
        rows.append((name, [_fmt(m.get(k), percent=True) for k in ("precision", "recall", "f1")]))
    return _table(rows, header, ["---"] + ["---:"] * 3), absent


_TABLES = (
    ("scores", "Table 1. Score prediction (PLCC / SRCC)"),
    ("implausibility_heatmap", "Table 2. Implausibility heatmap prediction"),
    ("misalignment_heatmap", "Table 3. Misalignment heatmap prediction"),
    ("keywords", "Table 4. Misaligned keyword prediction"),
)


def render_tables(
    metrics_by_name: Mapping[str, Mapping], include_paper: bool = False, protocol: str = "paper", level: int = 2
) -> str:
    """Tables 1-4 in the paper's layout, one row per model, as markdown (`–` where a model has no such output).

    With `include_paper`, each table is followed by the published rows that `protocol` makes comparable: the paper's
    (`PAPER_METRICS`) under `"paper"`, the re-implementation's (`REIMPL_METRICS`) under `"reimpl"`, labelled as such.
    `level` is the markdown heading level of the table titles.
    """
    if protocol not in REFERENCE_ROWS:
        raise ValueError(f"`protocol` must be one of {tuple(REFERENCE_ROWS)}, got {protocol!r}")
    reference_label, reference_rows = REFERENCE_ROWS[protocol]
    out: list[str] = []
    for which, title in _TABLES:
        out += [f"{'#' * level} {title}", ""]
        lines, absent = _table_block(metrics_by_name, which)
        if len(lines) > 2:
            out += lines
            if absent:
                out += ["", "Not produced by: " + ", ".join(f"`{a}`" for a in absent) + "."]
        else:
            out.append("Not produced by any model here (" + ", ".join(f"`{a}`" for a in absent) + ").")
        if which in ("implausibility_heatmap", "misalignment_heatmap") and len(lines) > 2:
            out += [
                "",
                "MSE over all samples and over those with an empty ground truth (GT=0); CC, KLD, SIM, NSS and "
                "AUC-Judd over those with a non-empty ground truth (GT>0).",
            ]
        if include_paper:
            paper_lines, _ = _table_block(reference_rows, which)
            if len(paper_lines) > 2:
                out += ["", f"*For reference, {reference_label}:*", ""] + paper_lines
        out.append("")
    return "\n".join(out)


def _load_metrics(value: Mapping | str | Path) -> Mapping:
    if isinstance(value, Mapping):
        return value
    path = Path(value)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{str(value)!r} is neither a metrics dict nor a metrics.json (or a folder holding one)")
    return json.loads(path.read_text())


def write_comparison_report(
    metrics_by_name: Mapping[str, Mapping | str | Path],
    out_path: str | Path,
    title: str = "Rich feedback evaluation",
    include_paper: bool = False,
    notes: Sequence[str] | None = None,
    figures: Sequence[tuple[str, str]] | None = None,
    protocol: str = "paper",
    other_protocols: Mapping[str, Mapping[str, Mapping | str | Path]] | None = None,
) -> Path:
    """Writes Tables 1-4 with one row per model (each a metrics dict, a metrics.json, or its folder) to `out_path`.

    Args:
        include_paper: add the published rows under each table, labelled as not ours: the paper's (RichHF-18K, Liang
            et al. 2024) under the paper's protocol, the re-implementation's under its own.
        notes: paragraphs placed under the title.
        figures: `(caption, relative path)` of images to embed after the tables.
        protocol: the protocol `metrics_by_name` was computed under (`"paper"` or `"reimpl"`).
        other_protocols: `{protocol: metrics_by_name}` of the same models under other protocols, each rendered in a
            section of its own after the first, beside that protocol's published rows.
    """
    loaded = {name: _load_metrics(m) for name, m in metrics_by_name.items()}
    lines = [f"# {title}", ""]
    for note in notes or []:
        lines += [note, ""]
    if other_protocols:
        lines += [f"## Under {PROTOCOL_TITLES[protocol]}", ""]
        lines.append(render_tables(loaded, include_paper=include_paper, protocol=protocol, level=3))
        for other, models in other_protocols.items():
            other_loaded = {name: _load_metrics(m) for name, m in models.items()}
            lines += [f"## Under {PROTOCOL_TITLES[other]}", ""]
            lines.append(render_tables(other_loaded, include_paper=include_paper, protocol=other, level=3))
    else:
        lines.append(render_tables(loaded, include_paper=include_paper, protocol=protocol))
    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures:
            lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines).rstrip() + "\n")
    return out_path


# ====================================================================================================================
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahf evaluate",
        description="The paper's metrics (Tables 1-4) of a RAHF model or a baseline on a canonical data set split: "
        "metrics.json, report.md and figures.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a saved model folder (RAHF or a trained baseline; a training run's folder uses its "
        "final/), a CLIP checkpoint with --model_type, or a baseline name (center_prior, ...)",
    )
    parser.add_argument("--data", required=True, help="a canonical data set folder (rahf data synth / convert-richhf)")
    parser.add_argument("--split", default="test", help="which split (default: test)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--model_type",
        default=None,
        help="rahf, resnet50, clip_finetuned, clip_score, pickscore, clip_gradient or center_prior; "
        "read from the model folder when omitted",
    )
    parser.add_argument(
        "--processor",
        default=None,
        help="CLIP baselines: where the tokenizer and image processor live, when not with the "
        "checkpoint (PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    )
    parser.add_argument("--name", default=None, help="the model's name in the report (default: the --model's name)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_examples", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    parser.add_argument("--num_figure_examples", type=int, default=6, help="rows of each example figure")
    parser.add_argument("--no_figures", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--with_paper_results",
        action="store_true",
        help="add the paper's RichHF-18K rows to report.md, labelled as the paper's",
    )
    parser.add_argument(
        "--protocol",
        choices=("paper", "reimpl"),
        default="paper",
        help="the metric definitions of metrics.json: 'paper' (MIT saliency benchmark, pooled keyword counts; "
        "default) or 'reimpl' (the first author's re-implementation's: SIM without min-max, KLD eps 1e-8, heatmaps "
        "scored at 384 px, per-sample keyword averages); report.md shows both",
    )
    parser.add_argument(
        "--center_prior_fit_split",
        default="train",
        help="center_prior: the split whose maps fit its peak (MSE only); 'none' keeps peak 1",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`rahf evaluate ...` (and `python -m rahf.evaluation ...`)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .data.schema import load_rich_feedback

    data = load_rich_feedback(args.data)
    if args.split not in data:
        raise ValueError(f"--split {args.split!r} is not in {args.data!r}; its splits are {list(data)}")
    extra = {}
    if args.processor:
        extra["processor_name_or_path"] = args.processor
    rater = load_rater(args.model, model_type=args.model_type, device=args.device, batch_size=args.batch_size, **extra)
    fit_split = args.center_prior_fit_split
    if hasattr(rater, "fit") and fit_split and fit_split != "none":
        if fit_split in data and len(data[fit_split]):
            rater.fit(data[fit_split])
        else:
            logger.warning("no %r split to fit the centre prior's peak on: keeping peak 1", fit_split)
    name = args.name or Path(str(args.model).rstrip("/")).name
    if name == "final":
        name = Path(str(args.model).rstrip("/")).parent.name
    evaluate(
        rater,
        data[args.split],
        args.out,
        name=name,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        num_figure_examples=args.num_figure_examples,
        figures=not args.no_figures,
        info={"model": str(args.model), "data": str(args.data), "split": args.split},
        include_paper=args.with_paper_results,
        protocol=args.protocol,
    )
    logger.info("wrote %s", Path(args.out) / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
