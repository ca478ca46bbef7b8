"""Part of step 1 (image -> pixels): camera RAW photos (.CR2, .NEF, .ARW, .DNG, ...) read through LibRaw.

Why the embedded preview, not the sensor data: every camera stores a JPEG rendering of the photo beside the raw
sensor values (often full size, 1-2 MP in some makes; the picture shown on the camera's screen, in the camera's
colours), and ``load_image`` decodes a JPEG at 1/8 scale in milliseconds, where demosaicing 24 MP takes seconds. LibRaw
(``rawpy``, an optional dependency: its wheel bundles LibRaw, LGPL) finds that preview in every format it
reads; a file whose preview is smaller than the caller needs is demosaiced (at half size when that suffices).
Why never Pillow: it opens the TIFF-based formats (DNG, NEF, ARW, ...) as their first image directory, a 160x120
thumbnail, and a caption of that looks like a caption of the photo.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path
from typing import Callable

from PIL import Image

from .errors import UNREADABLE, ImageLoadError

# What cameras save (LibRaw reads these and more); matched case-insensitively on the file name
RAW_EXTENSIONS = (".3fr", ".arw", ".cr2", ".cr3", ".crw", ".dcr", ".dng", ".erf", ".iiq", ".kdc", ".mos", ".mrw",
                  ".nef", ".nrw", ".orf", ".pef", ".raf", ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".x3f")
RAW_INSTALL = "pip install rawpy"
# LibRaw's ``sizes.flip`` (the file's orientation) -> the transpose that makes the embedded preview upright: the
# orientation applies to every image in the file (DNG requires it; camera formats store the preview unturned, as
# their own viewers turn it), and LibRaw turns its own demosaic but hands the preview over as stored
UPRIGHT = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def is_raw(path: str | Path) -> bool:
    """Whether a file name is a camera RAW format's (by extension: LibRaw identifies by content, Pillow must not)."""
    return str(path).lower().endswith(RAW_EXTENSIONS)


@functools.cache
def available() -> bool:
    """Whether rawpy is installed (found, not imported: a folder scan asks before any RAW file is read)."""
    return importlib.util.find_spec("rawpy") is not None


def is_thumbnail(img: Image.Image) -> bool:
    """Whether Pillow opened a TIFF directory that calls itself a reduced-resolution copy of another image in the
    file (NewSubfileType bit 0): what the first directory of a TIFF-based camera RAW is, so the file is one whatever
    its name says (an image's bytes, a download, a renamed file)."""
    return img.format == "TIFF" and bool(img.tag_v2.get(254, 0) & 1)


def read_raw(source: Path | io.BytesIO, name: str, min_side: int | None,
             open_jpeg: Callable[[io.BytesIO], Image.Image]) -> Image.Image:
    """The upright photo of a camera RAW file: its embedded preview when that has a shorter side of at least
    ``min_side`` (no ``min_side``: the sensor's, i.e. every pixel), else LibRaw's demosaic (camera white balance,
    8 bits; half size when that still covers ``min_side``). ``open_jpeg`` opens the preview's bytes as
    ``load_image`` opens a JPEG file (DCT-scale draft, bomb guard). Raises ``ImageLoadError`` naming ``name``."""
    try:
        import rawpy
    except ImportError:
        kind = source.suffix if isinstance(source, Path) and is_raw(source) else "its first image is a thumbnail"
        raise ImageLoadError(name, f"a camera RAW photo ({kind}): reading it needs rawpy ({RAW_INSTALL})") from None
    try:
        with rawpy.imread(str(source) if isinstance(source, Path) else source) as raw:
            short = min(raw.sizes.width, raw.sizes.height)
            preview = _preview(raw, rawpy, min_side or short, open_jpeg)
            if preview is not None:
                turn = UPRIGHT.get(raw.sizes.flip)
                upright = preview.transpose(turn) if turn else preview
                # the preview's own EXIF/XMP orientation, if any, must not turn it again in ``load_image``
                upright.info = {k: v for k, v in upright.info.items() if k not in ("exif", "xmp")}
                return upright
            half = bool(min_side) and short >= 2 * min_side
            pixels = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)  # (h, w, colours)
            if pixels.shape[-1] not in (1, 3):
                raise ImageLoadError(name, f"unreadable or corrupt camera RAW file ({pixels.shape[-1]} colours)")
            return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)  # one colour: grey
    except rawpy.LibRawFileUnsupportedError:
        raise ImageLoadError(name, "not a camera RAW file LibRaw can read (an unsupported camera, or a file that "
                                   "only looks like one by its name or its thumbnail)") from None
    except rawpy.LibRawError as err:
        raise ImageLoadError(name, f"unreadable or corrupt camera RAW file ({_text(err)})") from None


def _preview(raw, rawpy, need: int, open_jpeg: Callable[[io.BytesIO], Image.Image]) -> Image.Image | None:
    """The embedded JPEG preview, decoded, if its shorter side is at least ``need``; else None.

    A bitmap thumbnail is never read: it is the small one (160x120 in DNG, NEF, ARW), and rawpy wraps LibRaw's copy
    of it in an array of the size the file claims, so a damaged file that claims more is read past its end (a
    segmentation fault that ends the whole batch, found by fuzzing); such a file is demosaiced instead."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format != rawpy.ThumbFormat.JPEG:
        return None
    try:
        with open_jpeg(io.BytesIO(thumb.data)) as jpeg:  # drafted: .size is what decoding gives
            if min(jpeg.size) < need:
                return None
            jpeg.load()
            return jpeg.copy()
    except UNREADABLE:  # a damaged preview, which LibRaw does not always refuse: the sensor data may be whole
        return None


def _text(err: Exception) -> str:
    """LibRaw's messages arrive as bytes (b'Input/output error')."""
    arg = err.args[0] if err.args else err
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)
