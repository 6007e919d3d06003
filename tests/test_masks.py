"""rahf.pipelines.masks: threshold semantics, quantiles, speck removal, resolution-independent dilation, feathered alpha."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from rahf.pipelines.masks import DEFAULT_THRESHOLD, MaskConfig, disk_kernel, feather_mask, heatmap_to_mask, mask_to_pil


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def test_threshold_is_strictly_above() -> None:
    heat = np.array([[0.0, 0.2, 0.5], [0.50001, 0.9, 1.0]], dtype=np.float32)
    mask = heatmap_to_mask(heat, MaskConfig(threshold=0.5))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, [[False, False, False], [True, True, True]])
    assert heatmap_to_mask(heat, threshold=0.0).sum() == 5  # any heat at all
    assert not heatmap_to_mask(heat, threshold=1.0).any()


def test_default_threshold_is_40_of_255() -> None:
    heat = np.array([[39 / 255, 41 / 255]], dtype=np.float32)
    assert MaskConfig().resolved_threshold == pytest.approx(DEFAULT_THRESHOLD)
    np.testing.assert_array_equal(heatmap_to_mask(heat), [[False, True]])


def test_quantile_threshold() -> None:
    heat = (np.arange(100, dtype=np.float32) / 99).reshape(10, 10)
    mask = heatmap_to_mask(heat, MaskConfig(threshold_quantile=0.9))
    assert mask.sum() == 10  # the hottest 10% of 100 distinct values
    assert heat[mask].min() > heat[~mask].max()
    # an override of the other kind replaces the config's threshold
    assert heatmap_to_mask(heat, MaskConfig(threshold=0.99), threshold_quantile=0.5).sum() == 50
    assert heatmap_to_mask(heat, MaskConfig(threshold_quantile=0.5), threshold=0.99).sum() == 1
    # a flat heatmap has nothing above its own quantile
    assert not heatmap_to_mask(np.full((8, 8), 0.7, np.float32), threshold_quantile=0.5).any()


def test_specks_below_min_area_are_dropped() -> None:
    heat = np.zeros((100, 100), dtype=np.float32)
    heat[10:20, 10:20] = 1.0  # 100 px = 1% of the image
    heat[50:53, 50:53] = 1.0  # 9 px
    heat[80, 80] = 1.0  # 1 px
    kept = heatmap_to_mask(heat, threshold=0.5, min_area=0.005)
    assert kept.sum() == 100 and kept[15, 15] and not kept[51, 51] and not kept[80, 80]
    assert heatmap_to_mask(heat, threshold=0.5, min_area=0.0).sum() == 110
    assert not heatmap_to_mask(heat, threshold=0.5, min_area=0.02).any()
    # diagonal neighbours belong to one component (8-connectivity)
    diag = np.zeros((10, 10), dtype=np.float32)
    diag[[2, 3, 4], [2, 3, 4]] = 1.0
    assert heatmap_to_mask(diag, threshold=0.5, min_area=0.03).sum() == 3


@pytest.mark.parametrize("side", [64, 1024])
def test_dilation_grows_a_pixel_by_the_relative_radius(side: int) -> None:
    radius = side // 16  # dilation = 1/16 of the shorter side: 4 px at 64, 64 px at 1024
    heat = np.zeros((side, side), dtype=np.float32)
    c = side // 2
    heat[c, c] = 1.0
    mask = heatmap_to_mask(heat, threshold=0.5, dilation=1 / 16)
    assert _bbox(mask) == (c - radius, c + radius, c - radius, c + radius)
    yy, xx = np.mgrid[:side, :side]
    dist = np.hypot(yy - c, xx - c)
    np.testing.assert_array_equal(mask, dist <= radius)  # a Euclidean disk, not a square or a diamond


def test_dilation_of_a_disk_and_iterations() -> None:
    side = 256
    yy, xx = np.mgrid[:side, :side]
    dist = np.hypot(yy - 128, xx - 128)
    heat = (dist <= 20).astype(np.float32)
    grown = heatmap_to_mask(heat, threshold=0.5, dilation=8 / side)
    assert _bbox(grown) == (100, 156, 100, 156)  # radius 20 + 8
    assert grown[dist <= 27.5].all() and not grown[dist > 28.5].any()
    twice = heatmap_to_mask(heat, threshold=0.5, dilation=8 / side, dilation_iterations=2)
    assert _bbox(twice) == (92, 164, 92, 164)  # radius 20 + 2 * 8
    # non-square image: the radius follows the shorter side
    wide = np.zeros((64, 256), dtype=np.float32)
    wide[32, 128] = 1.0
    assert _bbox(heatmap_to_mask(wide, threshold=0.5, dilation=0.125)) == (24, 40, 120, 136)


def test_resize_to_target_size_before_thresholding() -> None:
    heat = np.zeros((8, 16), dtype=np.float32)
    heat[:, 8:] = 1.0  # right half hot
    mask = heatmap_to_mask(heat, threshold=0.5, size=(64, 32))
    assert mask.shape == (32, 64)
    assert mask[:, 40:].all() and not mask[:, :24].any()
    with pytest.raises(ValueError, match="width, height"):
        heatmap_to_mask(heat, size=(64, 0))


def test_empty_heatmap_gives_empty_mask() -> None:
    heat = np.zeros((32, 48), dtype=np.float32)
    for config in (
        MaskConfig(),
        MaskConfig(threshold=0.0, dilation=0.1, min_area=0.01),
        MaskConfig(threshold_quantile=0.9),
    ):
        mask = heatmap_to_mask(heat, config, size=(96, 64))
        assert mask.shape == (64, 96) and not mask.any()
    alpha = feather_mask(np.zeros((16, 16), dtype=bool), feather=0.2)
    assert alpha.dtype == np.float32 and not alpha.any()


def test_feather_alpha_is_zero_outside_and_one_deep_inside() -> None:
    side = 128
    mask = np.zeros((side, side), dtype=bool)
    mask[32:96, 32:96] = True
    alpha = feather_mask(mask, feather=8 / side)  # ramp of 8 px
    assert alpha.dtype == np.float32 and alpha.shape == mask.shape
    assert np.all(alpha[~mask] == 0.0)  # exactly, so pasting never touches pixels outside the mask
    assert np.all(alpha[40:88, 40:88] == 1.0)  # deeper than the ramp
    assert 0.0 < alpha[32, 64] < 0.5  # the mask's edge pixel is only partly replaced
    ramp = alpha[64, 32:41]
    assert np.all(np.diff(ramp) >= 0) and ramp[-1] == 1.0
    # pasting with the alpha leaves outside pixels bit-identical
    rng = np.random.default_rng(0)
    old, new = rng.random((side, side, 3)), rng.random((side, side, 3))
    pasted = alpha[..., None] * new + (1.0 - alpha[..., None]) * old
    np.testing.assert_array_equal(pasted[~mask], old[~mask])
    # no feathering: the hard mask; a mask covering the image has no edge to ramp from
    np.testing.assert_array_equal(feather_mask(mask, 0.0), mask.astype(np.float32))
    assert np.all(feather_mask(np.ones((16, 16), dtype=bool), 0.25) == 1.0)


def test_feather_matches_euclidean_distance_ramp() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 5:35] = True
    alpha = feather_mask(mask, feather=0.25)  # 10 px
    ys, xs = np.nonzero(~mask)
    for y, x in [(20, 20), (12, 7), (10, 34), (29, 15)]:
        d = np.min(np.hypot(ys - y, xs - x))
        assert alpha[y, x] == pytest.approx(min(1.0, d / 10.0), abs=1e-3)


def test_mask_to_pil() -> None:
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:4] = True
    img = mask_to_pil(mask)
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(img), mask.astype(np.uint8) * 255)
    alpha = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(mask_to_pil(alpha)), [[0, 128, 255]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_to_pil(np.array([[2.0]]))


def test_disk_kernel() -> None:
    np.testing.assert_array_equal(disk_kernel(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    assert disk_kernel(0).shape == (1, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold_quantile": 2.0}, "threshold_quantile"),
        ({"threshold": 0.3, "threshold_quantile": 0.9}, "not both"),
        ({"min_area": -0.01}, "min_area"),
        ({"dilation": 3.0}, "dilation"),
        ({"dilation_iterations": -1}, "dilation_iterations"),
        ({"feather": -0.2}, "feather"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MaskConfig(**kwargs)


def test_heatmap_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        heatmap_to_mask(np.zeros((1, 8, 8), dtype=np.float32))
    nan_heat = np.zeros((8, 8), dtype=np.float32)
    nan_heat[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        heatmap_to_mask(nan_heat)
    with pytest.raises(ValueError, match="divide 0-255 maps by 255"):
        heatmap_to_mask(np.full((8, 8), 200.0))
    with pytest.raises(ValueError, match="mask options: unknown field"):
        heatmap_to_mask(np.zeros((8, 8)), treshold=0.3)
    with pytest.raises(ValueError, match="threshold"):
        heatmap_to_mask(np.zeros((8, 8)), threshold=1.2)
    with pytest.raises(ValueError, match="feather"):
        feather_mask(np.zeros((8, 8), dtype=bool), feather=2.0)
