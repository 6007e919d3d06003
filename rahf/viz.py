"""Pictures people would rather see than read: heatmap overlays with a legend, image grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# One colour per heatmap kind; more kinds cycle through the rest.
HEATMAP_COLOURS = {
    "implausibility": (255, 40, 40),
    "misalignment": (40, 120, 255),
}
_EXTRA_COLOURS = [(255, 200, 0), (0, 200, 120), (200, 0, 200)]


def heatmap_to_image(heatmap: np.ndarray) -> Image.Image:
    """A float heatmap in [0, 1] -> mode "L" image (0..255)."""
    arr = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    return Image.fromarray(np.round(arr * 255).astype(np.uint8), mode="L")


def overlay_heatmaps(
    image: Image.Image, heatmaps: dict[str, np.ndarray], alpha: float = 0.65, legend: bool = True
) -> Image.Image:
    """Tints `image` with each heatmap in its colour (opacity proportional to heat) and adds a legend strip."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base * 0.75  # dim the photo a little so that the heat reads
    extra = iter(_EXTRA_COLOURS)
    colours = {}
    for name, heat in heatmaps.items():
        colour = HEATMAP_COLOURS.get(name) or next(extra, (255, 255, 255))
        colours[name] = colour
        h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
        if h.shape != base.shape[:2]:
            h = (
                np.asarray(heatmap_to_image(h).resize((base.shape[1], base.shape[0]), Image.Resampling.BILINEAR))
                / 255.0
            )
        a = (alpha * h)[..., None]
        out = out * (1 - a) + np.asarray(colour, dtype=np.float32) * a
    result = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if not legend:
        return result
    font = ImageFont.load_default()
    row = 14
    strip = Image.new("RGB", (result.width, row * len(colours) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for k, (name, colour) in enumerate(colours.items()):
        y = 3 + k * row
        draw.rectangle([4, y + 2, 14, y + 12], fill=colour)
        draw.text((20, y), name, fill=(0, 0, 0), font=font)
    canvas = Image.new("RGB", (result.width, result.height + strip.height), (255, 255, 255))
    canvas.paste(result, (0, 0))
    canvas.paste(strip, (0, result.height))
    return canvas


def image_grid(
    images: Sequence[Image.Image], cols: int | None = None, captions: Sequence[str] | None = None, pad: int = 2
) -> Image.Image:
    """Images in a grid (each cell the size of the largest), with optional captions under them."""
    if not images:
        raise ValueError("`images` is empty: nothing to put in a grid")
    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    cap_h = 12 if captions else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + cap_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        x, y = pad + c * (w + pad), pad + r * (h + cap_h + pad)
        grid.paste(im.convert("RGB"), (x, y))
        if captions:
            draw.text((x, y + h), str(captions[k])[: max(4, w // 6)], fill=(0, 0, 0), font=font)
    return grid


def image_rows(
    rows: Sequence[Sequence[Image.Image]],
    labels: Sequence[str],
    column_titles: Sequence[str] | None = None,
    pad: int = 2,
) -> Image.Image:
    """Rows of images, each under a full-width text line (e.g. its prompt), with optional titles over the columns."""
    if not rows or not any(rows):
        raise ValueError("`rows` is empty: nothing to put in a picture")
    if len(labels) != len(rows):
        raise ValueError(f"got {len(rows)} rows and {len(labels)} labels: give one label per row")
    cols = max(len(r) for r in rows)
    w = max(im.width for r in rows for im in r)
    h = max(im.height for r in rows for im in r)
    line = 12
    top = line if column_titles else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, top + len(rows) * (h + line + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, title in enumerate(column_titles or []):
        draw.text((pad + c * (w + pad), 0), str(title)[: max(4, w // 6)], fill=(0, 0, 0), font=font)
    for r, (images, label) in enumerate(zip(rows, labels)):
        y = top + pad + r * (h + line + pad)
        draw.text((pad, y), str(label)[: max(8, (cols * (w + pad)) // 6)], fill=(0, 0, 0), font=font)
        for c, im in enumerate(images):
            grid.paste(im.convert("RGB"), (pad + c * (w + pad), y + line))
    return grid
