"""Opening image files with a bound on what they may make us allocate: the one place every reader of untrusted
images (prediction, data conversion, consolidation) goes through.

An image's header declares its size before any pixel is decoded, so a file that would decode to more than
`max_pixels` pixels (default `DEFAULT_MAX_IMAGE_PIXELS`, or the `RAHF_MAX_IMAGE_PIXELS` environment variable) is
refused with `ImageTooLargeError` (a `ValueError`) before decoding, and a file that is not an image with
`ValueError` naming it. Pillow's own decompression-bomb check is subsumed: our cap is the one that applies.

Examples:

```python
>>> from rahf.image_io import open_image
>>> image = open_image("a.png")                     # decoded, mode as stored
>>> image = open_image(data_bytes, max_pixels=4096 ** 2)
```
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_IMAGE_PIXELS_ENV",
    "ImageTooLargeError",
    "max_image_pixels",
    "open_image",
]

# 40 megapixels: 6,300 x 6,300, far beyond any generator's output and RAHF's 384 px input, and about 120 MB as RGB.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_PIXELS_ENV = "RAHF_MAX_IMAGE_PIXELS"

_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than the cap; raised before any pixel is decoded."""


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel cap in force: `max_pixels` when given, else `RAHF_MAX_IMAGE_PIXELS`, else the default."""
    if max_pixels is None:
        raw = os.environ.get(MAX_IMAGE_PIXELS_ENV)
        if raw is None or not raw.strip():
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            max_pixels = int(raw)
        except ValueError:
            raise ValueError(
                f"{MAX_IMAGE_PIXELS_ENV}={raw!r} is not an integer; set it to a pixel count such as 40000000"
            ) from None
        source = MAX_IMAGE_PIXELS_ENV
    else:
        source = "`max_pixels`"
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"{source} must be a positive pixel count, got {max_pixels!r}")
    return max_pixels


def _name(source: str | os.PathLike | bytes | bytearray | memoryview) -> str:
    return "<image bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else repr(str(source))


def open_image(
    source: str | os.PathLike | bytes | bytearray | memoryview, max_pixels: int | None = None
) -> Image.Image:
    """Opens and decodes an image file (a path or its bytes), refusing one larger than the pixel cap.

    Args:
        source: a path, or the encoded bytes of a PNG, JPEG, WebP, ... file.
        max_pixels (`int`, *optional*): the largest width x height accepted (default: `max_image_pixels()`).

    Returns:
        The decoded PIL image, in its stored mode, detached from the file.

    Raises:
        ImageTooLargeError: the header declares more than `max_pixels` pixels.
        ValueError: the file is missing or is not an image Pillow can decode.
    """
    cap = max_image_pixels(max_pixels)
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    hint = f"raise the cap with {MAX_IMAGE_PIXELS_ENV}=N (or max_pixels=N) if the image is genuine"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _PIL_LIMIT_LOCK:
                # Pillow refuses twice its own limit at open time; our cap, checked below before decoding, is the
                # one that applies.
                previous = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    img = Image.open(fp)
                finally:
                    Image.MAX_IMAGE_PIXELS = previous
            with img:
                width, height = img.size
                if width * height > cap:
                    raise ImageTooLargeError(
                        f"image {_name(source)} is {width} x {height} = {width * height:,} pixels, more than the cap "
                        f"of {cap:,}; {hint}"
                    )
                img.load()
                return img.copy()
    except ImageTooLargeError:
        raise
    except FileNotFoundError:
        raise ValueError(f"image {_name(source)} does not exist") from None
    except MemoryError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Exception) as err:  # Pillow raises many types on bad files
        raise ValueError(
            f"could not read {_name(source)} as an image ({type(err).__name__}: {err}); pass a PNG, JPEG, WebP, ... "
            "file"
        ) from None
