"""rahf.metrics against independent computations: scipy, brute-force loops, hand-worked examples and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from rahf.metrics import EPS, auc_judd, cc, heatmap_metrics, keyword_prf, kld, nss, plcc, sim, srcc


def _blob_map(rng: np.random.Generator, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A sparse ground-truth-like map: zeros with a few bright blobs."""
    g = np.zeros(shape)
    for _ in range(2):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        g[y : y + 4, x : x + 4] = rng.uniform(0.3, 1.0)
    return g


# --- brute-force reference implementations, written independently of the library ---------------------------------


def _auc_judd_bruteforce(s: np.ndarray, g: np.ndarray) -> float:
    """Pure-Python loops over pixels: one ROC point per fixation threshold, trapezoids summed by hand."""
    lo, hi = s.min(), s.max()
    s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    flat_s, flat_fix = s.ravel().tolist(), (g.ravel() > 0).tolist()
    fix_values = sorted((v for v, f in zip(flat_s, flat_fix) if f), reverse=True)
    n_fix = len(fix_values)
    n_neg = len(flat_s) - n_fix
    xs, ys = [0.0], [0.0]
    for t in fix_values:
        tp = sum(1 for v, f in zip(flat_s, flat_fix) if f and v >= t)
        fp = sum(1 for v, f in zip(flat_s, flat_fix) if (not f) and v >= t)
        xs.append(fp / n_neg)
        ys.append(tp / n_fix)
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for k in range(1, len(xs)):
        area += (xs[k] - xs[k - 1]) * (ys[k] + ys[k - 1]) / 2
    return area


def _kld_loop(p: np.ndarray, g: np.ndarray) -> float:
    p = p.ravel() / p.sum()
    g = g.ravel() / g.sum()
    return sum(gi * math.log(EPS + gi / (pi + EPS)) for pi, gi in zip(p, g))


# --- CC ---------------------------------------------------------------------------------------------------------------


def test_cc_matches_scipy_pearson() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, g = rng.random((12, 9)), _blob_map(rng, (12, 9))
        assert cc(p, g) == pytest.approx(stats.pearsonr(p.ravel(), g.ravel())[0], abs=1e-12)


def test_cc_affine_invariance_and_sign() -> None:
    rng = np.random.default_rng(1)
    p, g = rng.random((10, 10)), _blob_map(rng, (10, 10))
    assert cc(3.5 * p + 7.0, g) == pytest.approx(cc(p, g), abs=1e-12)
    assert cc(-p, g) == pytest.approx(-cc(p, g), abs=1e-12)
    assert cc(g, g) == pytest.approx(1.0)


def test_cc_constant_map_is_zero_not_nan() -> None:
    g = _blob_map(np.random.default_rng(2))
    assert cc(np.full_like(g, 0.3), g) == 0.0
    assert cc(g, np.zeros_like(g)) == 0.0


# --- KLD --------------------------------------------------------------------------------------------------------------


def test_kld_hand_example() -> None:
    p = np.array([[1.0, 0.0], [0.0, 1.0]])  # -> [0.5, 0, 0, 0.5]
    g = np.array([[1.0, 0.0], [0.0, 0.0]])  # -> [1, 0, 0, 0]
    assert kld(p, g) == pytest.approx(math.log(2.0), rel=1e-12)


def test_kld_matches_loop_and_scipy_entropy() -> None:
    rng = np.random.default_rng(3)
    p, g = rng.random((8, 8)) + 0.01, _blob_map(rng, (8, 8))
    assert kld(p, g) == pytest.approx(_kld_loop(p, g), rel=1e-10)
    # for strictly positive maps the eps terms are negligible and KLD is the textbook KL(G || P)
    g_pos = g + 0.05
    assert kld(p, g_pos) == pytest.approx(stats.entropy(g_pos.ravel(), p.ravel()), rel=1e-9)


def test_kld_identity_scale_invariance_and_degenerate_maps() -> None:
    g = _blob_map(np.random.default_rng(4))
    assert kld(g, g) == pytest.approx(0.0, abs=1e-9)
    assert kld(5.0 * g, g) == pytest.approx(0.0, abs=1e-9)
    # an all-zero prediction is read as uniform: same score as any constant prediction, finite
    uniform = kld(np.full_like(g, 0.2), g)
    assert kld(np.zeros_like(g), g) == pytest.approx(uniform)
    assert math.isfinite(uniform) and uniform > 0
    with pytest.raises(ValueError, match="negative"):
        kld(g - 0.5, g)


# --- SIM --------------------------------------------------------------------------------------------------------------


def test_sim_identity_and_hand_example() -> None:
    g = _blob_map(np.random.default_rng(5))
    assert sim(g, g) == pytest.approx(1.0)
    assert sim(2 * g + 1, g) == pytest.approx(1.0)  # min-max normalisation removes the affine map
    p = np.array([[1.0, 0.0], [0.0, 0.0]])  # -> [1, 0, 0, 0]
    q = np.array([[1.0, 1.0], [0.0, 0.0]])  # -> [0.5, 0.5, 0, 0]
    assert sim(p, q) == pytest.approx(0.5)
    disjoint = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert sim(p, disjoint) == pytest.approx(0.0)


def test_sim_matches_loop() -> None:
    rng = np.random.default_rng(6)
    p, g = rng.random((7, 5)), _blob_map(rng, (7, 5))

    def norm(m: np.ndarray) -> list[float]:
        vals = [(v - m.min()) / (m.max() - m.min()) for v in m.ravel()]
        total = sum(vals)
        return [v / total for v in vals]

    expected = sum(min(a, b) for a, b in zip(norm(p), norm(g)))
    assert sim(p, g) == pytest.approx(expected, rel=1e-12)


def test_sim_constant_prediction_is_uniform() -> None:
    g = np.zeros((4, 4))
    g[0, 0] = 1.0
    assert sim(np.full((4, 4), 0.7), g) == pytest.approx(1 / 16)


# --- NSS --------------------------------------------------------------------------------------------------------------


def test_nss_matches_scipy_zscore_and_is_affine_invariant() -> None:
    rng = np.random.default_rng(7)
    p, g = rng.random((9, 11)), _blob_map(rng, (9, 11))
    z = stats.zscore(p, axis=None, ddof=1)
    assert nss(p, g) == pytest.approx(z[g > 0].mean(), rel=1e-12)
    assert nss(0.1 * p - 4.0, g) == pytest.approx(nss(p, g), rel=1e-12)


def test_nss_hand_example() -> None:
    p = np.array([[0.0, 0.0], [0.0, 4.0]])  # mean 1, sample std 2 -> z = [-0.5, -0.5, -0.5, 1.5]
    g = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert nss(p, g) == pytest.approx(1.5)


def test_nss_constant_and_empty() -> None:
    g = _blob_map(np.random.default_rng(8))
    assert nss(np.ones_like(g), g) == 0.0
    with pytest.raises(ValueError, match="no fixations"):
        nss(g, np.zeros_like(g))


# --- AUC-Judd ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_judd_matches_bruteforce(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, g = rng.random((10, 12)), _blob_map(rng, (10, 12))
    assert auc_judd(p, g, jitter=False) == pytest.approx(_auc_judd_bruteforce(p, g), abs=1e-12)
    # the jitter is far below the spacing of random values, so it changes nothing here
    assert auc_judd(p, g, jitter=True) == pytest.approx(_auc_judd_bruteforce(p, g), abs=1e-12)


def test_auc_judd_with_ties_matches_bruteforce() -> None:
    rng = np.random.default_rng(9)
    p = rng.integers(0, 4, size=(8, 8)).astype(float)  # many ties
    g = _blob_map(rng, (8, 8))
    assert auc_judd(p, g, jitter=False) == pytest.approx(_auc_judd_bruteforce(p, g), abs=1e-12)


def test_auc_judd_perfect_inverted_random() -> None:
    rng = np.random.default_rng(10)
    g = _blob_map(rng, (32, 32))
    n_fix = int((g > 0).sum())
    assert auc_judd(g, g) == pytest.approx(1.0)
    assert auc_judd(1.0 - (g > 0), g) == pytest.approx(1 / (2 * n_fix), abs=1e-9)
    random_scores = [auc_judd(np.random.default_rng(s).random((32, 32)), g) for s in range(5)]
    assert abs(np.mean(random_scores) - 0.5) < 0.08


def test_auc_judd_degenerate_cases() -> None:
    g = _blob_map(np.random.default_rng(11))
    assert auc_judd(np.full_like(g, 0.4), g, jitter=False) == pytest.approx(0.5)
    assert auc_judd(np.random.default_rng(0).random((4, 4)), np.ones((4, 4))) == 0.5
    with pytest.raises(ValueError, match="no fixations"):
        auc_judd(g, np.zeros_like(g))
    # seeded jitter: reproducible for a given seed
    assert auc_judd(np.zeros_like(g), g, seed=3) == auc_judd(np.zeros_like(g), g, seed=3)


# --- input validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [cc, kld, sim, nss, auc_judd])
def test_map_metrics_reject_bad_inputs(fn) -> None:
    g = _blob_map(np.random.default_rng(12))
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(8, 8\)"):
        fn(g, g[:8, :8])
    bad = g.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, g)
    with pytest.raises(ValueError, match="2-D"):
        fn(g[None], g[None])


# --- PLCC / SRCC ------------------------------------------------------------------------------------------------------


def test_plcc_srcc_match_scipy_with_ties() -> None:
    rng = np.random.default_rng(13)
    x = rng.random(50)
    y = 0.5 * x + 0.3 * rng.random(50)
    assert plcc(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    xt, yt = np.round(x * 4) / 4, np.round(y * 3) / 3  # heavy ties, as Likert means have
    assert srcc(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0], abs=1e-12)
    assert srcc([1, 2, 2, 3], [1, 3, 3, 4]) == pytest.approx(1.0)


def test_plcc_srcc_degenerate_and_errors() -> None:
    assert plcc([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
    assert srcc([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0
    assert srcc(np.arange(10), -(np.arange(10) ** 3)) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same length"):
        plcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        srcc([1.0], [2.0])
    with pytest.raises(ValueError, match="NaN"):
        plcc([1.0, float("nan")], [1.0, 2.0])


# --- keywords ---------------------------------------------------------------------------------------------------------


def test_keyword_prf_counts_words_over_all_samples() -> None:
    pred = [{0, 2}, set(), {1}]
    gt = [{2, 3}, {4}, {1}]
    # hits: {2}, {}, {1} = 2; predicted 3; misaligned 4 -> pooled, not averaged per sample
    p, r, f = keyword_prf(pred, gt)
    assert (p, r) == pytest.approx((2 / 3, 2 / 4))
    assert f == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_keyword_prf_zero_denominator_conventions() -> None:
    assert keyword_prf([set(), set()], [set(), set()]) == (1.0, 1.0, 1.0)
    assert keyword_prf([set()], [{1, 2}]) == (0.0, 0.0, 0.0)
    assert keyword_prf([{0}], [set()]) == (0.0, 0.0, 0.0)
    assert keyword_prf([[0, 0, 1]], [[1]]) == pytest.approx((0.5, 1.0, 2 / 3))  # duplicates count once
    with pytest.raises(ValueError, match="one entry per sample"):
        keyword_prf([{0}], [])
    with pytest.raises(ValueError, match="integer word indices"):
        keyword_prf([{"cat"}], [{0}])


# --- aggregation ------------------------------------------------------------------------------------------------------


def test_heatmap_metrics_splits_empty_and_nonempty_ground_truth() -> None:
    rng = np.random.default_rng(14)
    gts = [_blob_map(rng), np.zeros((16, 16)), _blob_map(rng), np.zeros((16, 16)), np.zeros((16, 16))]
    preds = [np.clip(g + 0.1 * rng.random(g.shape), 0, 1) for g in gts]
    out = heatmap_metrics(preds, gts)
    assert (out["n_all"], out["n_gt0"], out["n_gt_pos"]) == (5, 3, 2)
    mses = [np.mean((p - g) ** 2) for p, g in zip(preds, gts)]
    assert out["mse_all"] == pytest.approx(np.mean(mses))
    assert out["mse_gt0"] == pytest.approx(np.mean([mses[1], mses[3], mses[4]]))
    for name, fn in {"cc": cc, "kld": kld, "sim": sim, "nss": nss, "auc_judd": auc_judd}.items():
        assert out[name] == pytest.approx(np.mean([fn(preds[0], gts[0]), fn(preds[2], gts[2])])), name
    assert out["cc"] > 0.9 and out["auc_judd"] > 0.9


def test_heatmap_metrics_none_where_no_samples() -> None:
    out = heatmap_metrics([np.zeros((4, 4))], [np.zeros((4, 4))])
    assert out["mse_all"] == 0.0 and out["mse_gt0"] == 0.0
    assert all(out[k] is None for k in ("cc", "kld", "sim", "nss", "auc_judd"))
    g = np.eye(4)
    out = heatmap_metrics([g], [g])
    assert out["mse_gt0"] is None and out["n_gt0"] == 0 and out["cc"] == pytest.approx(1.0)
    empty = heatmap_metrics([], [])
    assert empty["n_all"] == 0 and empty["mse_all"] is None


def test_heatmap_metrics_errors_name_sample_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"sample 1: .*\(4, 4\).*\(5, 5\)"):
        heatmap_metrics([np.eye(4), np.eye(4)], [np.eye(4), np.eye(5)])
    with pytest.raises(ValueError, match="one map per sample"):
        heatmap_metrics([np.eye(4)], [])


# --- the re-implementation's protocol, against a transcription of its definitions (docs/reference.md, section 4) -------


def _reimpl_sim_loop(p: np.ndarray, g: np.ndarray) -> float:
    """Each map divided by (its sum + 1e-8), no min-max rescaling; the sum of the pixel-wise minimum."""
    ps, gs = float(p.sum()) + 1e-8, float(g.sum()) + 1e-8
    return sum(min(pi / ps, gi / gs) for pi, gi in zip(p.ravel().tolist(), g.ravel().tolist()))


def _reimpl_kld_loop(p: np.ndarray, g: np.ndarray) -> float:
    """Maps divided by their sums (+ 1e-8); the sum over pixels of g * log(g / (p + 1e-8) + 1e-8)."""
    ps, gs = float(p.sum()) + 1e-8, float(g.sum()) + 1e-8
    total = 0.0
    for pi, gi in zip(p.ravel().tolist(), g.ravel().tolist()):
        pi, gi = pi / ps, gi / gs
        total += gi * math.log(gi / (pi + 1e-8) + 1e-8)
    return total


def _reimpl_keywords_loop(pred, gt) -> tuple[float, float, float]:
    """Per sample P, R, F1 (0 for a zero denominator: nothing to find scores 0), then the mean of each."""
    ps, rs, fs = [], [], []
    for p, g in zip(pred, gt):
        p, g = set(p), set(g)
        hits = len(p & g)
        precision = hits / len(p) if len(p) > 0 else 0.0
        recall = hits / len(g) if len(g) > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        ps.append(precision)
        rs.append(recall)
        fs.append(f1)
    return sum(ps) / len(ps), sum(rs) / len(rs), sum(fs) / len(fs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reimpl_sim_and_kld_match_their_transcription(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = _blob_map(rng)
    p = np.clip(0.15 + g * 0.6 + 0.1 * rng.random(g.shape), 0, 1)  # a prediction with a floor
    assert sim(p, g, protocol="reimpl") == pytest.approx(_reimpl_sim_loop(p, g), abs=1e-12)
    assert kld(p, g, protocol="reimpl") == pytest.approx(_reimpl_kld_loop(p, g), abs=1e-12)
    assert kld(p, g, protocol="paper") == pytest.approx(_kld_loop(p, g), abs=1e-12)  # the MIT one is unchanged
    # Min-max normalisation removes the floor; the re-implementation's SIM pays for it.
    assert sim(p, g, protocol="reimpl") < sim(p, g) - 0.1


def test_reimpl_keywords_average_per_sample_and_nothing_to_find_scores_zero() -> None:
    pred = [{0, 2}, set(), {1}, set(), {3}]
    gt = [{2, 3}, {4}, {1}, set(), set()]
    got = keyword_prf(pred, gt, protocol="reimpl")
    assert got == pytest.approx(_reimpl_keywords_loop(pred, gt), abs=1e-15)
    # samples: (1/2, 1/2, 1/2), (0, 0, 0), (1, 1, 1), (0, 0, 0), (0, 0, 0)
    assert got == pytest.approx((1.5 / 5, 1.5 / 5, 1.5 / 5))
    pooled = keyword_prf(pred, gt)  # hits 2, predicted 4, misaligned 4
    assert pooled == pytest.approx((0.5, 0.5, 0.5))
    assert keyword_prf([set()], [set()], protocol="reimpl") == (0.0, 0.0, 0.0)
    assert keyword_prf([set()], [set()]) == (1.0, 1.0, 1.0)
    assert keyword_prf([], [], protocol="reimpl") == (0.0, 0.0, 0.0)


def test_reimpl_heatmaps_are_scored_at_384_after_bilinear_resampling() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    gt = np.zeros((512, 512))
    gt[100:220, 300:420] = 0.8
    gt[400:430, 20:90] = 0.4
    pred = np.clip(0.05 + 0.7 * gt + 0.05 * rng.random(gt.shape), 0, 1)
    out = heatmap_metrics([pred, pred], [gt, np.zeros_like(gt)], protocol="reimpl")

    def down(m: np.ndarray) -> np.ndarray:  # bilinear, half-pixel centres, no antialiasing: torch's own
        t = torch.from_numpy(m)[None, None]
        return torch.nn.functional.interpolate(t, size=(384, 384), mode="bilinear", align_corners=False)[0, 0].numpy()

    p384, g384 = down(pred), down(gt)
    assert (out["n_all"], out["n_gt0"], out["n_gt_pos"]) == (2, 1, 1)
    assert out["cc"] == pytest.approx(cc(p384, g384), abs=1e-9)
    assert out["sim"] == pytest.approx(_reimpl_sim_loop(p384, g384), abs=1e-9)
    assert out["kld"] == pytest.approx(_reimpl_kld_loop(p384, g384), abs=1e-9)
    assert out["nss"] == pytest.approx(nss(p384, g384), abs=1e-9)
    mse = [np.mean((p384 - g384) ** 2), np.mean(p384**2)]
    assert out["mse_all"] == pytest.approx(np.mean(mse), rel=1e-9)
    assert out["mse_gt0"] == pytest.approx(mse[1], rel=1e-9)
    paper = heatmap_metrics([pred], [gt])  # at 512 with the MIT definitions
    assert paper["sim"] > out["sim"] + 0.05


def test_protocol_is_checked() -> None:
    g = np.eye(4)
    for call in (lambda: sim(g, g, protocol="mit"), lambda: kld(g, g, protocol=""), lambda: keyword_prf([], [], "x")):
        with pytest.raises(ValueError, match="`protocol` must be one of"):
            call()
    with pytest.raises(ValueError, match="`protocol` must be one of"):
        heatmap_metrics([g], [g], protocol="PAPER")
