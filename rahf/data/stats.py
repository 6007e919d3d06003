"""`rahf data stats`: the paper's data figures (Fig. 2 score histograms, Fig. 4 annotator agreement) and `stats.json`.

Scores are shown as the paper shows them, in [0, 1] after (s - 1) / 4, with the 1-5 Likert scale on a second axis.
The annotator agreement of Fig. 4 needs per-annotator scores: they come from a per-annotator column of the data set
(as `rahf data consolidate` keeps it) or, failing that, from the raw annotations (`DIR/raw/annotations.jsonl`, as
`rahf data synth` writes them).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from tqdm.auto import tqdm

from rahf.data.jsonl import read_jsonl
from rahf.data.schema import HEATMAP_NAMES, SCORE_NAMES, SPLITS, load_rich_feedback

logger = logging.getLogger(__name__)

# Columns a consolidated data set may keep per-annotator scores in, first match wins.
ANNOTATOR_SCORE_COLUMNS = ("annotator_scores", "per_annotator_scores", "raw_scores")
# Means of three 1-5 Likert ratings fall on multiples of 1/12 in [0, 1]: one histogram bin per value, as in Fig. 2.
SCORE_BIN_EDGES = (np.arange(14) - 0.5) / 12.0
# Differences of Likert ratings fall on multiples of 1/4 in [0, 1], as in Fig. 4.
MAX_DIFF_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
FIG2_NAME = "fig2_score_histograms.png"
FIG4_NAME = "fig4_annotator_max_diff.png"


def _summary(values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        return {"count": 0}
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=SCORE_BIN_EDGES)
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean_likert": float(values.mean() * 4 + 1),
        "quantiles": {f"q{int(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES},
        "histogram": {
            "bin_centers": [round(k / 12.0, 4) for k in range(13)],
            "counts": [int(c) for c in counts],
        },
    }


def _max_diff_01(per_annotator: Iterable[float]) -> float | None:
    """max - min of one image's per-annotator scores, in [0, 1] units; 1-5 or [0, 1] is read from the values."""
    values = np.asarray([float(v) for v in per_annotator if v is not None], dtype=np.float64)
    if values.size < 2:
        return None
    spread = float(values.max() - values.min())
    # A value above 1 can only be on the 1-5 scale; with all values <= 1 both readings agree unless some are < 1.
    return spread / 4.0 if values.max() > 1.0 else spread


def _per_annotator_from_value(value: Any) -> dict[str, list[float]] | None:
    """A per-annotator score cell -> {score name: [one value per annotator]}.

    Accepts a mapping {name: [values]} or a list of mappings [{name: value}, ...] (one per annotator).
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {name: list(value[name]) for name in SCORE_NAMES if value.get(name) is not None}
    if isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value):
        return {name: [v[name] for v in value if v.get(name) is not None] for name in SCORE_NAMES}
    raise ValueError(
        f"per-annotator scores must be {{name: [values]}} or [{{name: value}}, ...], got {type(value).__name__}"
    )


def _agreement(per_image: list[dict[str, list[float]]]) -> dict[str, Any] | None:
    if not per_image:
        return None
    out: dict[str, Any] = {
        "num_images": len(per_image),
        "mean_annotators": float(np.mean([max((len(v) for v in p.values()), default=0) for p in per_image])),
        "max_diff": {},
    }
    for name in SCORE_NAMES:
        diffs = np.asarray(
            [d for p in per_image if (d := _max_diff_01(p.get(name, []))) is not None], dtype=np.float64
        )
        if diffs.size == 0:
            continue
        # Snap to the Likert grid of Fig. 4; other spreads (e.g. 0.5-step ratings) go to the nearest bar.
        snapped = np.clip(np.round(diffs * 4.0) / 4.0, 0.0, 1.0)
        out["max_diff"][name] = {
            "mean": float(diffs.mean()),
            "counts": {f"{v:.2f}": int(np.isclose(snapped, v).sum()) for v in MAX_DIFF_VALUES},
            "share_perfect": float((diffs <= 1e-9).mean()),
            # The paper's "good agreement": max diff <= 0.25 ([0, 1] units) = 1 Likert point.
            "share_le_0.25": float((diffs <= 0.25 + 1e-9).mean()),
        }
    return out


def _read_raw_annotations(path: Path) -> dict[str, dict[str, list[float]]]:
    """raw/annotations.jsonl -> {uid: {score name: [1-5 ratings]}}; unreadable lines are skipped with a warning."""
    per_uid: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    skipped = 0
    for _, record in read_jsonl(path):  # a bad line (not UTF-8, too deep, too long, ...) is a value, never a crash
        try:
            scores = record["scores"]
            for name in SCORE_NAMES:
                if scores.get(name) is not None:
                    per_uid[str(record["uid"])][name].append(float(scores[name]))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            skipped += 1
    if skipped:
        logger.warning("%s: skipped %d unreadable lines (run `rahf data consolidate` for a report)", path, skipped)
    return {uid: dict(v) for uid, v in per_uid.items()}


def compute_stats(
    dataset_dict: DatasetDict,
    *,
    annotator_scores: Mapping[str, Mapping[str, list[float]]] | None = None,
    annotator_source: str | None = None,
) -> dict[str, Any]:
    """Statistics of a canonical `DatasetDict`, per split.

    Args:
        dataset_dict (`DatasetDict`): the canonical set (`rahf.data.schema`).
        annotator_scores (`Mapping[str, Mapping[str, list[float]]]`, *optional*): {uid: {score name: per-annotator
            scores}} (1-5 or [0, 1]), used when the set has no per-annotator column (`ANNOTATOR_SCORE_COLUMNS`).
        annotator_source (`str`, *optional*): where `annotator_scores` came from, recorded in the result.

    Returns:
        `dict`: `{"splits": {split: {"count", "scores", "heatmaps", "words", "annotator_agreement"}}}` where `scores`
        holds mean/std/quantiles/histogram of each score in [0, 1], `heatmaps` the share of images with a non-empty
        map and the mean share of pixels with heat, `words` the share of misaligned words, and
        `annotator_agreement` the distribution of max - min across annotators (None without per-annotator scores).
    """
    if not isinstance(dataset_dict, DatasetDict):
        raise ValueError(f"`dataset_dict` must be a datasets.DatasetDict, got {type(dataset_dict).__name__}")
    result: dict[str, Any] = {"splits": {}}
    for split in [s for s in SPLITS if s in dataset_dict] + [s for s in dataset_dict if s not in SPLITS]:
        ds = dataset_dict[split]
        entry: dict[str, Any] = {"count": len(ds)}
        entry["scores"] = {name: _summary(np.asarray(ds[name], dtype=np.float64)) for name in SCORE_NAMES}

        heat = {name: {"nonempty": 0, "coverage": [], "mean_heat": []} for name in HEATMAP_NAMES}
        columns = [f"{name}_map" for name in HEATMAP_NAMES]
        for example in tqdm(ds.select_columns(columns), total=len(ds), desc=f"heatmaps {split}", leave=False):
            for name in HEATMAP_NAMES:
                array = np.asarray(example[f"{name}_map"].convert("L"), dtype=np.float32) / 255.0
                heat[name]["nonempty"] += int(array.max() > 0)
                heat[name]["coverage"].append(float((array > 0).mean()))
                heat[name]["mean_heat"].append(float(array.mean()))
        entry["heatmaps"] = {}
        for name, h in heat.items():
            coverage = np.asarray(h["coverage"])
            nonempty = coverage[coverage > 0]
            entry["heatmaps"][name] = {
                "nonempty_share": h["nonempty"] / len(ds) if len(ds) else 0.0,
                "mean_coverage": float(coverage.mean()) if coverage.size else 0.0,
                "mean_coverage_nonempty": float(nonempty.mean()) if nonempty.size else 0.0,
                "mean_heat": float(np.mean(h["mean_heat"])) if h["mean_heat"] else 0.0,
            }

        labels = ds["word_labels"]
        total = sum(len(v) for v in labels)
        misaligned = sum(int(np.sum(np.asarray(v) == 0)) for v in labels)
        entry["words"] = {
            "total": int(total),
            "misaligned": int(misaligned),
            "misaligned_share": misaligned / total if total else 0.0,
            "images_with_misaligned_share": (sum(1 for v in labels if 0 in v) / len(ds)) if len(ds) else 0.0,
        }

        column = next((c for c in ANNOTATOR_SCORE_COLUMNS if c in ds.column_names), None)
        if column is not None:
            per_image = [p for v in ds[column] if (p := _per_annotator_from_value(v))]
            agreement = _agreement(per_image)
            source = f"column {column!r}"
        elif annotator_scores is not None:
            per_image = [dict(annotator_scores[uid]) for uid in ds["uid"] if uid in annotator_scores]
            agreement = _agreement(per_image)
            source = annotator_source or "annotator_scores"
        else:
            agreement, source = None, None
        if agreement is not None:
            agreement["source"] = source
        entry["annotator_agreement"] = agreement
        result["splits"][split] = entry
    return result


def _figure(nrows: int, ncols: int, width: float, height: float):
    # A bare Figure with an Agg canvas: no pyplot state, no display backend, safe in library code and workers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_score_histograms(stats: Mapping[str, Any], path: str | Path) -> Path:
    """Fig. 2: one row per split, one panel per score; x in [0, 1] below, the 1-5 Likert mean on top."""
    splits = list(stats["splits"])
    fig, axes = _figure(len(splits), len(SCORE_NAMES), 3.2 * len(SCORE_NAMES), 2.6 * len(splits) + 0.6)
    for r, split in enumerate(splits):
        for c, name in enumerate(SCORE_NAMES):
            ax = axes[r][c]
            summary = stats["splits"][split]["scores"][name]
            if summary.get("count", 0):
                centers = summary["histogram"]["bin_centers"]
                ax.bar(centers, summary["histogram"]["counts"], width=1 / 12 * 0.85, color=f"C{c}")
                ax.axvline(summary["mean"], color="k", linestyle="--", linewidth=1)
                ax.set_title(f"{split}: {name} (mean {summary['mean']:.2f}, n={summary['count']})", fontsize=9)
            else:
                ax.set_title(f"{split}: {name} (no data)", fontsize=9)
            ax.set_xlim(-0.06, 1.06)
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
            ax.set_xlabel(f"{name} score in [0, 1] = (s - 1) / 4", fontsize=8)
            if c == 0:
                ax.set_ylabel("images")
            top = ax.secondary_xaxis("top", functions=(lambda x: x * 4 + 1, lambda s: (s - 1) / 4))
            top.set_xticks([1, 2, 3, 4, 5])
            top.tick_params(labelsize=7)
            if r == 0:
                top.set_xlabel("mean 1-5 Likert rating", fontsize=8)
    fig.suptitle("Score histograms (cf. Fig. 2 of Rich Human Feedback, CVPR 2024)")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_annotator_max_diff(stats: Mapping[str, Any], path: str | Path) -> Path | None:
    """Fig. 4: per split, counts of images by max - min of the annotators' ratings, grouped by score."""
    splits = [s for s, e in stats["splits"].items() if e.get("annotator_agreement")]
    if not splits:
        return None
    fig, axes = _figure(1, len(splits), 4.6 * len(splits), 3.6)
    width = 0.8 / len(SCORE_NAMES)
    x = np.arange(len(MAX_DIFF_VALUES))
    for c, split in enumerate(splits):
        ax = axes[0][c]
        agreement = stats["splits"][split]["annotator_agreement"]
        for k, name in enumerate(SCORE_NAMES):
            diff = agreement["max_diff"].get(name)
            if diff is None:
                continue
            counts = [diff["counts"][f"{v:.2f}"] for v in MAX_DIFF_VALUES]
            ax.bar(
                x + (k - (len(SCORE_NAMES) - 1) / 2) * width,
                counts,
                width=width,
                color=f"C{k}",
                label=f"{name} ({diff['share_le_0.25']:.0%} <= 0.25)",
            )
        ax.set_xticks(x, [f"{v:.2f}\n({int(v * 4)} Likert)" for v in MAX_DIFF_VALUES], fontsize=8)
        ax.set_xlabel("max - min across annotators, [0, 1] units")
        ax.set_ylabel("images")
        ax.set_title(f"{split} (n={agreement['num_images']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Annotator disagreement (cf. Fig. 4 of Rich Human Feedback, CVPR 2024)")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def write_stats(data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Loads (and validates) the canonical set in `data_dir`; writes `stats.json` and the figures to `out_dir`.

    Per-annotator scores come from the data set's per-annotator column when it has one, otherwise from
    `data_dir/raw/annotations.jsonl` when present (Fig. 4 is skipped without either).

    Examples:
        >>> from rahf.data.stats import write_stats
        >>> stats = write_stats("synth", "synth-stats")
        >>> stats["splits"]["train"]["scores"]["overall"]["mean"]
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dataset_dict = load_rich_feedback(data_dir)
    annotator_scores, source = None, None
    raw = data_dir / "raw" / "annotations.jsonl"
    has_column = any(c in ds.column_names for ds in dataset_dict.values() for c in ANNOTATOR_SCORE_COLUMNS)
    if not has_column and raw.is_file():
        annotator_scores, source = _read_raw_annotations(raw), str(raw)
    stats = compute_stats(dataset_dict, annotator_scores=annotator_scores, annotator_source=source)
    stats["data_dir"] = str(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"fig2": FIG2_NAME}
    plot_score_histograms(stats, out_dir / FIG2_NAME)
    if plot_annotator_max_diff(stats, out_dir / FIG4_NAME) is not None:
        figures["fig4"] = FIG4_NAME
    else:
        logger.warning("no per-annotator scores in %s: Fig. 4 (annotator agreement) skipped", data_dir)
    stats["figures"] = figures
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("wrote %s", ", ".join(str(out_dir / f) for f in ["stats.json", *figures.values()]))
    return stats


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `stats` to the `rahf data` subcommands."""
    parser = subparsers.add_parser(
        "stats",
        help="score histograms (Fig. 2), annotator agreement (Fig. 4) and stats.json",
        description=(
            "Reads a canonical data set (rahf data synth / convert-richhf / consolidate) and writes stats.json, "
            f"{FIG2_NAME} and, where per-annotator scores exist, {FIG4_NAME}."
        ),
    )
    parser.add_argument("data_dir", metavar="DIR", help="folder of a saved canonical DatasetDict")
    parser.add_argument("--out", required=True, help="folder for stats.json and the PNG figures")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    stats = write_stats(args.data_dir, args.out)
    for split, entry in stats["splits"].items():
        means = ", ".join(f"{n} {entry['scores'][n].get('mean', float('nan')):.3f}" for n in SCORE_NAMES)
        logger.info("%s: %d images; mean %s", split, entry["count"], means)
    return 0
