"""Heatmap -> inpainting mask (threshold, drop specks, dilate) and the feathered alpha used to paste the result back.

Sizes are fractions of the image (areas of its area, lengths of its shorter side), so one `MaskConfig` gives the same
mask on a 64 px preview and a 1024 px render.

Examples:
    >>> import numpy as np
    >>> heat = np.zeros((64, 64), dtype=np.float32); heat[30:34, 30:34] = 0.9
    >>> mask = heatmap_to_mask(heat, MaskConfig(threshold=0.5, dilation=1 / 16), size=(128, 128))
    >>> mask.shape, mask.dtype, bool(mask[64, 64]), bool(mask[0, 0])
    ((128, 128), dtype('bool'), True, False)
    >>> alpha = feather_mask(mask, feather=0.02)
    >>> float(alpha[~mask].max()), float(alpha[64, 64])
    (0.0, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_THRESHOLD",
    "MaskConfig",
    "disk_kernel",
    "feather_mask",
    "heatmap_to_mask",
    "mask_to_pil",
    "override_mask_config",
]

# One public RAHF-based baseline (NTIRE 2025) thresholds heatmaps at 40/255 for masks (docs/reference.md, section 7).
DEFAULT_THRESHOLD = 40 / 255


@dataclass
class MaskConfig:
    """How a heatmap becomes an inpainting mask. Lengths are fractions of the image's shorter side, areas of its area.

    Args:
        threshold (`float`, *optional*): absolute heat level in [0, 1]; the mask is the pixels strictly above it.
            Defaults to `DEFAULT_THRESHOLD` (40/255) unless `threshold_quantile` is given. Mutually exclusive with it.
        threshold_quantile (`float`, *optional*): a quantile q in [0, 1] instead of an absolute level: the mask is the
            pixels strictly above the q-quantile of this heatmap's values (q = 0.95 keeps about the hottest 5%; a flat
            heatmap gives an empty mask).
        min_area (`float`, *optional*, defaults to 0.0): connected components (8-connected) covering less than this
            fraction of the image area are dropped, before dilation, so that isolated specks do not become holes.
        dilation (`float`, *optional*, defaults to 0.0): radius of the disk the mask is dilated by, as a fraction of
            the shorter side (`round(dilation * min(H, W))` pixels; 0 pixels means no dilation).
        dilation_iterations (`int`, *optional*, defaults to 1): how many times the dilation is applied; each grows the
            mask by about the radius again.
        feather (`float`, *optional*, defaults to 0.0): width of the blending ramp used by `feather_mask`, as a
            fraction of the shorter side; the ramp lies inside the mask.
    """

    threshold: float | None = None
    threshold_quantile: float | None = None
    min_area: float = 0.0
    dilation: float = 0.0
    dilation_iterations: int = 1
    feather: float = 0.0

    def __post_init__(self) -> None:
        if self.threshold is not None and self.threshold_quantile is not None:
            raise ValueError(
                f"Pass either `threshold` ({self.threshold}) or `threshold_quantile` ({self.threshold_quantile}), not "
                "both: set the other to None"
            )
        for name in ("threshold", "threshold_quantile", "min_area"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")
        for name in ("dilation", "feather"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f"`{name}` must be a fraction of the image's shorter side in [0, 1], got {value!r} "
                    "(e.g. 0.02 for 2%, about 20 px on a 1024 px image)"
                )
        if isinstance(self.dilation_iterations, bool) or not isinstance(self.dilation_iterations, int):
            raise ValueError(f"`dilation_iterations` must be an int >= 0, got {self.dilation_iterations!r}")
        if self.dilation_iterations < 0:
            raise ValueError(f"`dilation_iterations` must be >= 0, got {self.dilation_iterations}")

    @property
    def resolved_threshold(self) -> float | None:
        """The absolute threshold to use: `threshold`, or the default when no quantile is set; None with a quantile."""
        if self.threshold_quantile is not None:
            return None
        return DEFAULT_THRESHOLD if self.threshold is None else float(self.threshold)


def _check_size(size: Any) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(
            f"`size` must be a (width, height) pair of positive ints, as PIL's `Image.size`, got {size!r}"
        )
    return int(size[0]), int(size[1])


def _pixels(fraction: float, height: int, width: int) -> int:
    return int(round(fraction * min(height, width)))


def disk_kernel(radius: int) -> np.ndarray:
    """A (2r+1)x(2r+1) uint8 structuring element of the pixels within Euclidean distance `radius` of the centre.

    An exact disk: `cv2.MORPH_ELLIPSE` approximates it and reaches further along the diagonals, so a dilation by it
    would not grow the mask by the radius it was asked for.
    """
    if radius < 0:
        raise ValueError(f"`radius` must be >= 0, got {radius}")
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


def _validate_heatmap(heatmap: Any) -> np.ndarray:
    heat = np.asarray(heatmap)
    if heat.ndim != 2:
        raise ValueError(
            f"`heatmap` must be a 2-D HxW array, got shape {heat.shape}; pass one channel (e.g. heatmap[0] or "
            "heatmap.squeeze())"
        )
    if heat.size == 0:
        raise ValueError(f"`heatmap` is empty (shape {heat.shape})")
    if heat.dtype.kind not in "biuf":
        raise ValueError(f"`heatmap` must hold real numbers, got dtype {heat.dtype}")
    heat = heat.astype(np.float32)
    if np.isnan(heat).any():
        raise ValueError(f"`heatmap` contains {int(np.isnan(heat).sum())} NaN values; fix the prediction first")
    lo, hi = float(heat.min()), float(heat.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"`heatmap` values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]; divide 0-255 maps by 255 or clip"
        )
    return heat


def override_mask_config(config: MaskConfig, source: str = "mask options", **overrides: Any) -> MaskConfig:
    """`config` with `overrides` (`MaskConfig` fields) on top. Setting one kind of threshold (`threshold` or
    `threshold_quantile`) to a value clears the config's threshold of the other kind, unless both are given. `source`
    names the overrides in the error on an unknown field."""
    if not isinstance(config, MaskConfig):
        raise ValueError(f"`config` must be a MaskConfig, got {type(config).__name__}")
    fields = [f.name for f in dataclasses.fields(MaskConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; valid ones are {fields}")
    if overrides.get("threshold_quantile") is not None and "threshold" not in overrides:
        overrides["threshold"] = None
    if overrides.get("threshold") is not None and "threshold_quantile" not in overrides:
        overrides["threshold_quantile"] = None
    return dataclasses.replace(config, **overrides)


def heatmap_to_mask(
    heatmap: np.ndarray,
    config: MaskConfig | None = None,
    size: tuple[int, int] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Turns a heatmap into a binary inpainting mask: resize, threshold, drop small components, dilate.

    Args:
        heatmap: HxW heat in [0, 1] (e.g. `RichFeedback.heatmaps["implausibility"]`).
        config: the `MaskConfig`; defaults to `MaskConfig()`.
        size: `(width, height)` of the image the mask is for (PIL's `Image.size`); the heatmap is resized to it first
            (area interpolation when shrinking, bilinear when enlarging). None keeps the heatmap's size.
        **kwargs: `MaskConfig` fields that override those of `config`, e.g. `threshold=0.3`.

    Returns:
        A bool array of shape (height, width); True where to inpaint. An all-False mask is a valid answer (nothing to
        fix).
    """
    if kwargs:
        config = override_mask_config(config if config is not None else MaskConfig(), **kwargs)
    elif config is None:
        config = MaskConfig()
    elif not isinstance(config, MaskConfig):
        raise ValueError(f"`config` must be a MaskConfig or None, got {type(config).__name__}")

    heat = _validate_heatmap(heatmap)
    if size is not None:
        width, height = _check_size(size)
        if (width, height) != (heat.shape[1], heat.shape[0]):
            shrinking = width * height < heat.shape[0] * heat.shape[1]
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            heat = np.clip(cv2.resize(heat, (width, height), interpolation=interpolation), 0.0, 1.0)
    height, width = heat.shape

    threshold = config.resolved_threshold
    if threshold is None:
        threshold = float(np.quantile(heat, config.threshold_quantile))
    mask = (heat > threshold).astype(np.uint8)

    min_pixels = config.min_area * height * width
    if min_pixels > 0 and mask.any():
        n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
        keep[0] = False  # label 0 is the background
        mask = keep[labels].astype(np.uint8)

    radius = _pixels(config.dilation, height, width)
    if radius > 0 and config.dilation_iterations > 0 and mask.any():
        mask = cv2.dilate(mask, disk_kernel(radius), iterations=config.dilation_iterations)
    return mask.astype(bool)


def feather_mask(mask: np.ndarray, feather: float) -> np.ndarray:
    """A blending alpha for pasting an inpainted image back: 0 outside the mask exactly, ramping up to 1 inside it.

    The ramp is linear in the Euclidean distance to the nearest pixel outside the mask: `min(1, d / w)` with
    `w = round(feather * min(H, W))` pixels, so `alpha * new + (1 - alpha) * old` never changes a pixel outside the
    mask, and pixels deeper than `w` are fully replaced. The image border is not an edge (no ramp there). `feather`
    of 0 (or under half a pixel) gives the hard mask as 0/1 floats.

    Args:
        mask: HxW bool (or 0/1) mask.
        feather: ramp width as a fraction of the shorter side, in [0, 1].

    Returns:
        float32 HxW alpha in [0, 1].
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"`mask` must be a 2-D HxW array, got shape {m.shape}")
    if m.dtype != np.bool_:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("`mask` must be boolean or hold only 0 and 1; threshold it first (e.g. heatmap_to_mask)")
        m = m.astype(bool)
    if not (isinstance(feather, (int, float)) and not math.isnan(feather) and 0.0 <= feather <= 1.0):
        raise ValueError(f"`feather` must be a fraction of the shorter side in [0, 1], got {feather!r}")
    width_px = _pixels(feather, *m.shape)
    if width_px == 0 or not m.any():
        return m.astype(np.float32)
    if m.all():
        return np.ones(m.shape, dtype=np.float32)
    distance = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    alpha = np.minimum(distance / float(width_px), 1.0).astype(np.float32)
    alpha[~m] = 0.0
    return alpha


def mask_to_pil(mask: np.ndarray) -> Image.Image:
    """A bool mask (or a float alpha in [0, 1]) as a PIL image of mode "L": 255 where True / alpha 1, 0 elsewhere."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"`mask` must be a 2-D HxW array, got shape {m.shape}")
    if m.dtype == np.bool_:
        return Image.fromarray(m.astype(np.uint8) * 255)
    m = m.astype(np.float32)
    if np.isnan(m).any() or m.min() < 0.0 or m.max() > 1.0:
        raise ValueError(
            f"`mask` must be boolean or floats in [0, 1], got range [{np.nanmin(m):.4g}, {np.nanmax(m):.4g}]"
        )
    return Image.fromarray(np.round(m * 255.0).astype(np.uint8))
