"""The paper's evaluation metrics: saliency-style heatmap metrics (MIT benchmark), PLCC/SRCC, keyword precision/recall/F1.

Heatmap metrics follow Bylinskii et al. ("What do different evaluation metrics tell us about saliency models?") as
docs/reference.md (section 4) states them; P is the predicted map, G the ground truth, both HxW, and the fixations are the pixels where
G > 0. Where the published definitions divide by zero (constant maps, empty maps) every function here returns a
documented finite value instead of NaN:

- a constant map has no spread: `cc`, `plcc`, `srcc` give 0.0 and `nss` gives 0.0 (its z-score is 0 everywhere);
- a map with zero total mass, or one that min-max normalisation turns to all zeros (a constant map), is read as the
  uniform distribution by `kld` and `sim` (the maximum-entropy reading of "no information"; it is also the limit of
  `c * ones` as `c -> 0`, so the metric is continuous there);
- `nss` and `auc_judd` need at least one fixation and raise `ValueError` on an empty G; `heatmap_metrics` scores them
  on the samples with a non-empty G only, as the paper does;
- `auc_judd` with every pixel a fixation has no negatives, so no false-positive rate: it returns 0.5 (chance).

NaN or infinite inputs are a `ValueError`, never a silent NaN result.

Two protocols (docs/reference.md, section 4). `protocol="paper"` (the default) is the MIT definitions above.
`protocol="reimpl"` is the first author's re-implementation's, whose published figures users quote: `sim` without
min-max normalisation, `kld` with eps 1e-8, `heatmap_metrics` scoring at 384 x 384 and `keyword_prf` averaging per
sample. CC, NSS and AUC-Judd are the same under both.

Examples:
    >>> import numpy as np
    >>> g = np.zeros((8, 8)); g[2:4, 2:4] = 1.0
    >>> round(cc(2 * g + 1, g), 6), round(sim(g, g), 6), auc_judd(g, g) > 0.99
    (1.0, 1.0, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "EPS",
    "PROTOCOLS",
    "REIMPL_EPS",
    "REIMPL_SCORE_SIZE",
    "auc_judd",
    "cc",
    "heatmap_metrics",
    "keyword_prf",
    "kld",
    "nss",
    "plcc",
    "resize_bilinear",
    "sim",
    "srcc",
]

# MATLAB's `eps` (machine epsilon of float64), as the MIT benchmark's KLD uses.
EPS = 2.2204e-16
# The re-implementation's epsilon (its SIM and KLD) and the side of the square its heatmaps are scored at.
REIMPL_EPS = 1e-8
REIMPL_SCORE_SIZE = 384
PROTOCOLS = ("paper", "reimpl")
# Amplitude of the uniform jitter added to P by AUC-Judd to break ties, as in the MIT benchmark code.
_AUC_JITTER = 1e-7


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"`protocol` must be one of {PROTOCOLS} ('paper': the MIT saliency benchmark's definitions; 'reimpl': the "
            f"first author's re-implementation's), got {protocol!r}"
        )
    return protocol


def _reimpl_distribution(m: np.ndarray) -> np.ndarray:
    # No uniform fallback here: the re-implementation divides by (sum + eps), so a map of zero mass stays all zero.
    return m / (m.sum() + REIMPL_EPS)


def _as_map(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D HxW map, got an array of shape {arr.shape}; squeeze channel/batch axes first"
        )
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty (shape {arr.shape}); pass a map with at least one pixel")
    if not np.isfinite(arr).all():
        raise ValueError(
            f"`{name}` contains {int((~np.isfinite(arr)).sum())} NaN or infinite values; metrics are undefined on them, "
            "fix the map (e.g. np.nan_to_num) before scoring"
        )
    return arr


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_map(pred, "pred"), _as_map(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(
            f"`pred` and `gt` must have the same shape, got pred {p.shape} and gt {g.shape}; "
            "resize the prediction to the ground truth's size first"
        )
    return p, g


def _as_vector(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers, got an array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN or infinite values; drop or fix those samples before correlating")
    return arr


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    # Exact constancy test first: `a - a.mean()` of a constant float array is not exactly 0 and would give noise.
    if a.max() == a.min() or b.max() == b.min():
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0.0:  # a constant input has no spread to correlate with
        return 0.0
    return float(np.clip((a * b).sum() / denom, -1.0, 1.0))


def _to_distribution(m: np.ndarray) -> np.ndarray:
    total = m.sum()
    if total <= 0.0:
        return np.full_like(m, 1.0 / m.size)
    return m / total


def _min_max(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    if hi == lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def cc(pred: np.ndarray, gt: np.ndarray) -> float:
    """Linear correlation coefficient: Pearson's r between P and G (both z-scored), in [-1, 1].

    Invariant to affine rescaling `a * P + b` with `a > 0`. A constant P or G gives 0.0.
    """
    p, g = _pair(pred, gt)
    return _pearson(p.ravel(), g.ravel())


def _check_non_negative(p: np.ndarray, g: np.ndarray, what: str) -> None:
    for name, m in (("pred", p), ("gt", g)):
        if m.min() < 0.0:
            raise ValueError(
                f"`{name}` has negative values (min {m.min():.4g}); {what} compares distributions, pass a non-negative map"
            )


def kld(pred: np.ndarray, gt: np.ndarray, protocol: str = "paper") -> float:
    """Kullback-Leibler divergence of P from G: `sum(G * log(EPS + G / (P + EPS)))`, each map divided by its sum.

    Lower is better; `kld(g, g)` is ~0. Both maps must be non-negative. A map with zero total mass is read as uniform.
    With `protocol="reimpl"`: eps = 1e-8, each map divided by (its sum + eps), no uniform reading of an empty map.
    """
    _check_protocol(protocol)
    p, g = _pair(pred, gt)
    _check_non_negative(p, g, "KLD")
    if protocol == "reimpl":
        p, g = _reimpl_distribution(p), _reimpl_distribution(g)
        return float((g * np.log(g / (p + REIMPL_EPS) + REIMPL_EPS)).sum())
    p, g = _to_distribution(p), _to_distribution(g)
    return float((g * np.log(EPS + g / (p + EPS))).sum())


def sim(pred: np.ndarray, gt: np.ndarray, protocol: str = "paper") -> float:
    """Similarity (histogram intersection): both maps min-max normalised, then divided by their sums; `sum(min(P, G))`.

    In [0, 1], 1 for identical distributions. A constant map (all zeros after min-max) is read as uniform.
    With `protocol="reimpl"`: no min-max normalisation, each map divided by (its sum + 1e-8); a floor in P (a constant
    added everywhere) then lowers SIM, where min-max normalisation would remove it.
    """
    _check_protocol(protocol)
    p, g = _pair(pred, gt)
    if protocol == "reimpl":
        _check_non_negative(p, g, "the re-implementation's SIM")
        return float(np.minimum(_reimpl_distribution(p), _reimpl_distribution(g)).sum())
    p, g = _to_distribution(_min_max(p)), _to_distribution(_min_max(g))
    return float(np.minimum(p, g).sum())


def nss(pred: np.ndarray, gt: np.ndarray) -> float:
    """Normalised scanpath saliency: P z-scored (sample standard deviation), averaged over the fixations (G > 0).

    Invariant to affine rescaling `a * P + b` with `a > 0`. A constant P gives 0.0. Raises on an empty G.
    """
    p, g = _pair(pred, gt)
    fixations = g > 0
    if not fixations.any():
        raise ValueError(
            "`gt` has no fixations (no pixel > 0), so NSS is undefined; score only samples with a non-empty ground "
            "truth (heatmap_metrics does this for you)"
        )
    if p.max() == p.min():  # exact test: the std of a constant float array can be a tiny non-zero number
        return 0.0
    z = (p - p.mean()) / p.std(ddof=1)
    return float(z[fixations].mean())


def auc_judd(pred: np.ndarray, gt: np.ndarray, jitter: bool = True, seed: int | None = 0) -> float:
    """AUC-Judd: area under the ROC curve of P as a detector of the fixations (G > 0), thresholded at each fixation.

    P is min-max normalised (after adding uniform noise in [0, 1e-7) when `jitter`, to break ties, as the MIT code
    does). Each value of P at a fixation is a threshold; the true-positive rate is the share of fixations at or above
    it, the false-positive rate the share of non-fixation pixels at or above it; (0, 0) and (1, 1) are added and the
    curve integrated with the trapezoidal rule.

    Args:
        pred: the predicted map, HxW.
        gt: the ground-truth map, HxW; its fixations are the pixels > 0.
        jitter: add the tie-breaking noise. Without it, tied pixels count together, so a constant P scores 0.5.
        seed: seed of the jitter's generator, so that scores are reproducible; `None` draws fresh noise.

    Returns:
        The area, in [0, 1]; 1 for a P that ranks every fixation above every other pixel, 0.5 for chance. With no
        non-fixation pixel (G > 0 everywhere) the false-positive rate is undefined and 0.5 is returned.
    """
    p, g = _pair(pred, gt)
    fixations = g > 0
    n_fix = int(fixations.sum())
    if n_fix == 0:
        raise ValueError(
            "`gt` has no fixations (no pixel > 0), so AUC-Judd is undefined; score only samples with a non-empty ground "
            "truth (heatmap_metrics does this for you)"
        )
    n_neg = p.size - n_fix
    if n_neg == 0:
        return 0.5
    if jitter:
        p = p + np.random.default_rng(seed).random(p.shape) * _AUC_JITTER
    p = _min_max(p)
    fix_values = np.sort(p[fixations])  # ascending
    neg_values = np.sort(p[~fixations])
    thresholds = fix_values[::-1]  # one per fixation, from the highest
    # Count of values >= t in an ascending array is len - searchsorted(t, side="left").
    tp = (n_fix - np.searchsorted(fix_values, thresholds, side="left")) / n_fix
    fp = (n_neg - np.searchsorted(neg_values, thresholds, side="left")) / n_neg
    tp = np.concatenate([[0.0], tp, [1.0]])
    fp = np.concatenate([[0.0], fp, [1.0]])
    return float(np.sum((fp[1:] - fp[:-1]) * (tp[1:] + tp[:-1]) / 2.0))


def plcc(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson linear correlation of two score vectors, in [-1, 1]; 0.0 when either is constant."""
    a, b = _as_vector(x, "x"), _as_vector(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"`x` and `y` must have the same length, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"correlation needs at least 2 samples, got {a.shape[0]}; score a larger set")
    return _pearson(a, b)


def srcc(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: Pearson's r of the ranks, ties given their average rank; 0.0 when either is constant."""
    a, b = _as_vector(x, "x"), _as_vector(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"`x` and `y` must have the same length, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"correlation needs at least 2 samples, got {a.shape[0]}; score a larger set")
    return _pearson(rankdata(a, method="average"), rankdata(b, method="average"))


def keyword_prf(
    pred: Sequence[Iterable[int]], gt: Sequence[Iterable[int]], protocol: str = "paper"
) -> tuple[float, float, float]:
    """Precision, recall and F1 of the misaligned words, counted word by word over all samples (micro-averaged).

    With `protocol="reimpl"`, the re-implementation's: precision, recall and F1 computed per sample, then each
    averaged over the samples; a ratio with a zero denominator is 0, so a sample with no misaligned word scores 0 on
    all three, whatever was predicted (and an empty set scores 0, not 1).

    Args:
        pred: per sample, the indices (into the prompt's words) predicted misaligned.
        gt: per sample, the indices that are misaligned in the annotation.

    Returns:
        `(precision, recall, f1)`, each in [0, 1]: precision = hits / predicted words, recall = hits / misaligned
        words, F1 their harmonic mean. Zero denominators: when nothing is predicted and nothing is misaligned in any
        sample, the prediction is perfect and all three are 1.0; otherwise a ratio with a zero denominator is 0.0
        (predicting nothing while words are misaligned gives precision 0; predicting words when none is misaligned
        gives recall 0), and F1 is 0.0 when precision + recall is 0.
    """
    _check_protocol(protocol)
    if len(pred) != len(gt):
        raise ValueError(f"`pred` and `gt` must have one entry per sample, got {len(pred)} and {len(gt)}")
    hits = n_pred = n_gt = 0
    per_sample: list[tuple[float, float, float]] = []
    for i, (p, g) in enumerate(zip(pred, gt)):
        p_set, g_set = set(p), set(g)
        for name, s in (("pred", p_set), ("gt", g_set)):
            bad = [w for w in s if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < 0]
            if bad:
                raise ValueError(
                    f"`{name}[{i}]` must hold non-negative integer word indices, got {sorted(map(repr, bad))}"
                )
        sample_hits = len(p_set & g_set)
        hits += sample_hits
        n_pred += len(p_set)
        n_gt += len(g_set)
        if protocol == "reimpl":
            sp = sample_hits / len(p_set) if p_set else 0.0
            sr = sample_hits / len(g_set) if g_set else 0.0
            per_sample.append((sp, sr, 2 * sp * sr / (sp + sr) if sp + sr > 0 else 0.0))
    if protocol == "reimpl":
        if not per_sample:
            return 0.0, 0.0, 0.0
        means = np.mean(np.asarray(per_sample), axis=0)
        return float(means[0]), float(means[1]), float(means[2])
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0, 1.0
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_gt if n_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


_HEATMAP_FNS = {"cc": cc, "kld": kld, "sim": sim, "nss": nss, "auc_judd": auc_judd}


def resize_bilinear(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """`m` resampled to `height` x `width` by plain bilinear interpolation (OpenCV `INTER_LINEAR`, pixel centres
    aligned, no antialiasing), in float64."""
    import cv2

    m = np.asarray(m, dtype=np.float64)
    if m.shape == (height, width):
        return m
    return cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float64, copy=False)


def heatmap_metrics(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], protocol: str = "paper"
) -> dict[str, float | int | None]:
    """The paper's heatmap table row over a set: MSE on all samples and on empty-G samples; CC, KLD, SIM, NSS,
    AUC-Judd averaged over the samples whose G is not empty.

    Args:
        preds: predicted maps, each HxW.
        gts: ground-truth maps, each the same shape as its prediction (under `"paper"`; under `"reimpl"` any shape).
        protocol: `"paper"` scores each pair at its own size with the MIT definitions; `"reimpl"` first resamples
            both maps to 384 x 384 (bilinear, `resize_bilinear`), then uses the re-implementation's SIM and KLD;
            everything, the GT = 0 / GT > 0 split included, is then read at 384 x 384.

    Returns:
        A dict with `mse_all`, `mse_gt0`, `cc`, `kld`, `sim`, `nss`, `auc_judd` (float, or None where the samples they
        average over are none) and the counts `n_all`, `n_gt0` (G empty) and `n_gt_pos` (G not empty). MSE is the mean
        over pixels of `(P - G) ** 2`, averaged over samples. AUC-Judd uses its default seeded jitter.
    """
    _check_protocol(protocol)
    if len(preds) != len(gts):
        raise ValueError(f"`preds` and `gts` must have one map per sample, got {len(preds)} and {len(gts)}")
    size = REIMPL_SCORE_SIZE
    mse_all: list[float] = []
    mse_gt0: list[float] = []
    per_metric: dict[str, list[float]] = {name: [] for name in _HEATMAP_FNS}
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        try:
            if protocol == "reimpl":
                pred, gt = _as_map(pred, "pred"), _as_map(gt, "gt")
                pred, gt = resize_bilinear(pred, size, size), resize_bilinear(gt, size, size)
            p, g = _pair(pred, gt)
            mse = float(np.mean((p - g) ** 2))
            mse_all.append(mse)
            if not (g > 0).any():
                mse_gt0.append(mse)
                continue
            for name, fn in _HEATMAP_FNS.items():
                per_metric[name].append(fn(p, g, protocol=protocol) if name in ("kld", "sim") else fn(p, g))
        except ValueError as err:
            raise ValueError(f"sample {i}: {err}") from err

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    out: dict[str, float | int | None] = {"mse_all": mean(mse_all), "mse_gt0": mean(mse_gt0)}
    out.update({name: mean(values) for name, values in per_metric.items()})
    out.update({"n_all": len(mse_all), "n_gt0": len(mse_gt0), "n_gt_pos": len(mse_all) - len(mse_gt0)})
    return out
