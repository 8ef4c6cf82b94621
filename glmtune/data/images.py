"""Safe image loading: every image a model sees goes through `load_image`.

Data sets contain broken files (truncated downloads, HTML saved as .jpg, 16-bit scans, CMYK
JPEGs, phone photos rotated by EXIF only, decompression bombs). Each of them either comes out as a
plain RGB image or as a SampleError naming the sample, so that one bad file costs one sample (or
stops the run, as the caller's policy says) instead of a traceback deep inside a DataLoader worker.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from glmtune.data.sample import SampleError

DEFAULT_MAX_PIXELS = 64_000_000

_ALPHA_MODES = ("RGBA", "LA", "PA")
_WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

# PIL.Image.MAX_IMAGE_PIXELS is process-global. We switch it off while one of our loads runs (our
# own max_pixels is the only limit) and restore it when the last concurrent load finishes; the
# counter makes overlapping loads from several threads restore the right value.
_pil_limit_lock = threading.Lock()
_pil_limit_users = 0
_pil_limit_saved: int | None = None


@contextmanager
def _without_pil_pixel_limit():
    global _pil_limit_users, _pil_limit_saved
    with _pil_limit_lock:
        if _pil_limit_users == 0:
            _pil_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_limit_users += 1
    try:
        yield
    finally:
        with _pil_limit_lock:
            _pil_limit_users -= 1
            if _pil_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit_saved


def load_image(path: str | os.PathLike, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` into an RGB image with EXIF orientation applied.

    The size is read from the header and checked against `max_pixels` before any pixel is decoded.
    Any failure -> SampleError(source, "cannot read image <path>: <why>").
    """
    try:
        with _without_pil_pixel_limit(), open(path, "rb") as fp:
            # Opening through our own file object: PIL then does not own (and later close) it, and
            # the image we return stays usable after the file is closed.
            if os.fstat(fp.fileno()).st_size == 0:  # PIL would only say "cannot identify image file"
                raise SampleError(source, f"cannot read image {path}: the file is empty (0 bytes)")
            image = Image.open(fp)  # an animated GIF / WebP / APNG opens at its first frame, which is what we use
            width, height = image.size
            if width * height > max_pixels:
                raise SampleError(
                    source,
                    f"cannot read image {path}: {width}x{height} = {width * height} pixels "
                    f"is over the limit of {max_pixels}",
                )
            image.load()  # decode now, while the file is open; truncation errors surface here
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except SampleError:
        raise
    except FileNotFoundError:
        raise SampleError(source, f"cannot read image {path}: file not found") from None
    except IsADirectoryError:
        raise SampleError(source, f"cannot read image {path}: it is a folder, not an image file") from None
    except UnidentifiedImageError:  # its own message shows our file object, not the path
        reason = "not an image file (or a format PIL cannot read)"
        raise SampleError(source, f"cannot read image {path}: {reason}") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise SampleError(source, f"cannot read image {path}: {type(e).__name__}: {e}") from e


def pad_to_aspect_ratio(image: Image.Image, max_ratio: float) -> Image.Image:
    """`image` centred on white so that its long side is at most `max_ratio` times its short side.

    For image processors that refuse extreme shapes (GLM-4.1V's refuses 200:1, e.g. a 1x2000 strip): padding
    keeps every pixel of the sample instead of dropping the sample."""
    width, height = image.size
    if max(width, height) <= max_ratio * min(width, height):
        return image
    size = (width, max(height, math.ceil(width / max_ratio))) if width > height else \
        (max(width, math.ceil(height / max_ratio)), height)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (what viewers show, and what a
    caption was written against), not dropped to the black the hidden colour channels often hold."""
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in _WIDE_GRAY_MODES:
        # 16-bit grey (PNG, TIFF scans): PIL's convert clips at 255, turning the image white.
        # Scale 0..65535 down to 0..255 instead; 32-bit "I" images holding 8-bit values are kept.
        wide = image.convert("I")
        _, high = wide.getextrema()
        if high > 255:
            wide = wide.point(lambda v: v * (1 / 256))
        return wide.convert("L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, F ...


def image_size(path: str | Path, source: str) -> tuple[int, int]:
    """(width, height) from the header only (for token budgets in `glmtune check`)."""
    try:
        with _without_pil_pixel_limit(), Image.open(path) as image:
            width, height = image.size
            return (height, width) if _rotated(image) else (width, height)
    except Exception as e:  # noqa: BLE001 - as in load_image
        raise SampleError(source, f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _rotated(image: Image.Image) -> bool:
    # EXIF orientations 5-8 swap width and height. Read the raw EXIF block that open() found in
    # the header: image.getexif() would decode all pixels of a PNG to look for a trailing eXIf.
    raw = image.info.get("exif")
    if not raw:
        return False
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(0x0112, 1) in (5, 6, 7, 8)
