"""Step 1 of the data flow: any image source -> an RGB PIL image, or a clear per-file error.

One loader for training features, the API, the batch command and the app, so every path sees the
same pixels: EXIF orientation applied, every PIL mode (L, LA, P with transparency, RGBA, CMYK, I;16,
F, ...) converted to RGB, animated images reduced to their first frame, and Pillow's
decompression-bomb guard turned into an error instead of a warning.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import features as pil_features  # not captioner.features

from . import colour
from .errors import UNREADABLE, ImageLoadError
from .fetch import FetchConfig, fetch_image, is_url
from .raw import is_raw, is_thumbnail, read_raw

# a str may also be an http(s) URL; bytes are an image file's contents (an upload, a download, a database blob)
ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
BYTES = (bytes, bytearray, memoryview)
# .jfif/.jpe/.jif: JPEG under the names browsers (Chrome on Windows) and old tools save it as
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".jif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic",
                    ".heif", ".avif")
# Folder scans (``captioner caption``, ``prepare`` of a folder) pass over what a photo library's folders hold besides
# the photos: hidden entries (macOS's ._ AppleDouble twin of every photo on a FAT/exFAT drive, which is not an image;
# Android's DCIM/.thumbnails; .Trashes) and the thumbnail and recycle-bin folders that photo NASes and Windows keep
# among the photos (Synology's @eaDir holds five smaller copies of every photo). A file named outright is read.
SYSTEM_FOLDERS = ("@eaDir", "#recycle", "$RECYCLE.BIN", "System Volume Information")


def passed_over(name: str) -> bool:
    """Whether a folder scan leaves out a file or folder of this name (``SYSTEM_FOLDERS``, hidden names)."""
    return name.startswith(".") or name in SYSTEM_FOLDERS


# ISO BMFF brands (bytes 8-12 of an "ftyp" box) of HEVC-coded HEIF: what iPhones save photos as since iOS 11
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")
AVIF_BRANDS = (b"avif", b"avis")
HEIF_INSTALL = "pip install pillow-heif"


def describe(src: ImageSource) -> str:
    """A short name for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, BYTES):
        return f"<{src.nbytes if isinstance(src, memoryview) else len(src)} bytes>"
    return f"<{type(src).__name__}>"


@functools.cache
def _heif_opener() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow, once, when the first such photo arrives; whether it
    is installed. Why optional, not a dependency: its wheel bundles libheif and libde265 (LGPL) and the x265
    encoder (GPL), and most photos are not HEIC; why lazily: JPEG and PNG never pay for the import."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _head(stream: Path | io.BytesIO, n: int) -> bytes:
    """The first ``n`` bytes of a file or of bytes in memory, whatever has been read of them."""
    if isinstance(stream, io.BytesIO):
        return stream.getvalue()[:n]
    with stream.open("rb") as f:
        return f.read(n)


def open_image(stream: Path | io.BytesIO, name: str) -> Image.Image:
    """``Image.open``, which also reads HEIC/HEIF photos when pillow-heif is installed, and says what is missing
    when a photo's format is one this Pillow cannot read (HEIC without pillow-heif, AVIF on an old Pillow): the
    one opener of ``load_image`` and of ``metadata`` (which needs a photo's format where nothing decoded it before,
    as on a Ray driver). ``name`` names the photo in the ``ImageLoadError``."""
    try:
        return Image.open(stream)
    except UnidentifiedImageError:
        head = _head(stream, 12)
        brand = head[8:12] if head[4:8] == b"ftyp" else b""
        if brand in AVIF_BRANDS and not pil_features.check("avif"):
            raise ImageLoadError(name, "an AVIF image, and this Pillow cannot read AVIF (Pillow 11.3 or later "
                                       "can: pip install -U pillow)") from None
        if brand not in HEIF_BRANDS:
            raise
        if not _heif_opener():
            raise ImageLoadError(name, f"a HEIC/HEIF photo (the iPhone's format): reading it needs pillow-heif "
                                       f"({HEIF_INSTALL})") from None
        if isinstance(stream, io.BytesIO):
            stream.seek(0)
        return Image.open(stream)


# A JPEG stored with up to this many times Pillow's bomb-warning limit (89 MP by default: up to 358 MP, every phone
# sensor's 200 MP and long panoramas) is read when a reduced-scale decode brings it under that limit (``open_header``)
DRAFTED_JPEG_FACTOR = 4
JPEG_SOI = b"\xff\xd8\xff"
NCLX_HEAD = 1 << 16  # an AVIF's colour description is in its meta box, which encoders write before the pixels


def _large_jpeg(stream: Path | io.BytesIO, min_side: int | None) -> Image.Image | None:
    """A JPEG Pillow's bomb guard refused from its header, opened without that check and drafted to ``min_side``
    (no draft without one: only its header is read), when it is one the guard should let through: stored under
    ``DRAFTED_JPEG_FACTOR`` times the warning limit, baseline (a progressive decode holds the whole photo's DCT
    coefficients, ~2 bytes a stored pixel, whatever the scale) and decoding under the limit. None otherwise."""
    if _head(stream, len(JPEG_SOI)) != JPEG_SOI:
        return None
    if isinstance(stream, io.BytesIO):
        stream.seek(0)
    from PIL import JpegImagePlugin  # what ``Image.open`` calls for a JPEG, before its bomb check
    opened = JpegImagePlugin.jpeg_factory(stream if isinstance(stream, io.BytesIO) else str(stream))
    limit, (width, height) = Image.MAX_IMAGE_PIXELS or 0, opened.size
    if min_side:
        opened.draft(opened.mode, (min_side, min_side))
    if (opened.info.get("progressive") or width * height > DRAFTED_JPEG_FACTOR * limit
            or (min_side and opened.width * opened.height > limit)):
        opened.close()
        return None
    return opened


def open_header(stream: Path | io.BytesIO, name: str, min_side: int | None = None) -> Image.Image:
    """``open_image`` whose decompression-bomb guard judges a large JPEG by what decoding it will cost.

    Pillow refuses from the header what it would decode to more than twice ``Image.MAX_IMAGE_PIXELS`` (179 MP by
    default) and warns above once, which ``load_image`` turns into a refusal. A JPEG above (a 108 MP or 200 MP
    phone photo, a long panorama) is read when drafting to ``min_side`` brings it under the limit (a 200 MP photo
    decodes at 1/8 scale, 3.1 MP), as the memory and time a bomb would cost are the decoded pixels'
    (``_large_jpeg``). Without ``min_side`` (``metadata``, which reads only the header) such a JPEG opens
    undecoded. Any other format, or a JPEG no draft brings under the limit, raises Pillow's error or warning."""
    try:
        return open_image(stream, name)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        opened = _large_jpeg(stream, min_side)
        if opened is None:
            raise
        return opened


def _open_first_frame(stream: Path | io.BytesIO, name: str, min_side: int | None) -> Image.Image:
    """``open_header`` at the first frame (animated GIF/WebP/PNG), a JPEG drafted to ``min_side``
    (``load_image``); every pixel is wanted without ``min_side``, so no large JPEG is let through then."""
    opened = open_header(stream, name, min_side) if min_side else open_image(stream, name)
    opened.seek(0)
    if min_side:
        opened.draft(opened.mode, (min_side, min_side))  # a no-op unless JPEG/MPO; again is harmless
    return opened


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB; transparency is composited on white, 16-bit scaled down."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _profile(info: dict, nclx: tuple[int, int] | None) -> bytes | None:
    """A photo's colour profile: its ICC profile, else the one its nclx colour description stands for (HEIC/AVIF:
    ``colour.nclx_profile``), as pillow-heif reports it in ``info`` or ``nclx`` (an AVIF's, ``read_nclx``) has it."""
    if info.get("icc_profile"):
        return info["icc_profile"]
    described = info.get("nclx_profile")
    if isinstance(described, dict):
        nclx = described.get("color_primaries"), described.get("transfer_characteristics")
    return colour.nclx_profile(*nclx) if nclx else None


def _to_srgb(img: Image.Image, icc: bytes | None, min_side: int | None) -> Image.Image:
    """``_to_rgb``, then from the colour space of the photo's ICC profile to sRGB (``colour.to_srgb``). Where a
    profile is converted and ``min_side`` allows, the photo is first box-reduced by a whole factor to no less than
    ``min_side`` (what a JPEG's draft did already): converting costs ~47 ns a pixel, 0.56 s for a 12 MP HEIC, 5 ms
    reduced. Photos without a profile or with sRGB's are not reduced (``Preprocess`` resizes them)."""
    img = _to_rgb(img)
    if min_side and colour.needs_conversion(img, icc) and min(img.size) >= 2 * min_side:
        img = img.reduce(min(img.size) // min_side)
    return colour.to_srgb(img, icc)


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"array of shape {arr.shape} is not HxW, HxWx3 or HxWx4")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"array of dtype {arr.dtype} is not numeric pixel data")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("array contains NaN or infinite values")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        elif arr.dtype == np.uint16:
            arr = arr / 257.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def load_image(src: ImageSource, min_side: int | None = None, fetch: FetchConfig = FetchConfig()) -> Image.Image:
    """Return an RGB image for a path, http(s) URL, image file bytes, PIL image or numpy array; raise
    ``ImageLoadError`` otherwise (a source of any other type included).

    A URL is downloaded under ``fetch``'s limits (``fetch.fetch_image``; by default private addresses
    are refused) and its bytes then decoded exactly like a file's.

    ``min_side``: the shorter side the caller needs (``Preprocess.min_side``). A JPEG file is then decoded
    at the smallest DCT scale (1/2, 1/4 or 1/8: Pillow's ``draft``) whose shorter side is still at least
    ``min_side``, so a 12 MP camera photo is never decoded at full size only to be shrunk to 256 pixels
    (one 4000x3000 JPEG on this project's 2-core CPU: 148 ms full decode + resize, 21 ms drafted). The
    scale is the same for both sides, so EXIF orientation, applied afterwards, does not change it.
    Other formats, images smaller than 2x ``min_side`` and PIL/numpy inputs are unaffected. The
    decompression-bomb guard judges the full stored size (Pillow checks it when opening, before any draft),
    except that a JPEG above Pillow's warning limit is read when drafted under it (``open_header``: 108 MP and
    200 MP phone photos).

    HEIC/HEIF photos (iPhones) are read when the optional pillow-heif is installed (``open_image``); it applies the
    file's own rotation and resets the EXIF orientation, so nothing is turned twice. Without it, or for AVIF on
    a Pillow without AVIF, the error says what to install.

    A camera RAW file (by its extension: ``raw.RAW_EXTENSIONS``) is read through LibRaw when the optional rawpy
    is installed (``raw.read_raw``): its embedded JPEG preview, decoded as above, turned upright, or a demosaic
    where the preview is too small; never by Pillow, which would read a 160x120 thumbnail of the TIFF-based ones.
    """
    name = describe(src)
    nclx = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(src, Image.Image):
                img = src
            elif isinstance(src, np.ndarray):
                img = _from_array(src)
            elif not isinstance(src, (str, os.PathLike, *BYTES)):
                raise ImageLoadError(name, "not an image source: give a path, an http(s) URL, an image file's bytes, "
                                           "a PIL image or a numpy array")
            else:
                if isinstance(src, BYTES):
                    data = bytes(src)
                    if not data:
                        raise ImageLoadError(name, "empty (0 bytes)")
                    stream: Path | io.BytesIO = io.BytesIO(data)
                elif is_url(src):
                    stream = io.BytesIO(fetch_image(src, fetch))
                else:
                    stream = Path(src)
                    if stream.is_dir():
                        raise ImageLoadError(name, "is a directory, not an image file")
                    if not stream.exists():
                        raise ImageLoadError(name, "file not found")
                    if stream.stat().st_size == 0:
                        raise ImageLoadError(name, "empty file (0 bytes)")
                raw = isinstance(stream, Path) and is_raw(stream)
                if not raw:
                    with _open_first_frame(stream, name, min_side) as opened:
                        raw = is_thumbnail(opened)  # a camera RAW by content: bytes, a download, a renamed file
                        if not raw:
                            opened.load()
                            img = opened.copy()
                            if opened.format == "AVIF":  # Pillow's AVIF reader does not report an nclx description
                                nclx = colour.read_nclx(_head(stream, NCLX_HEAD))
                if raw:
                    if isinstance(stream, io.BytesIO):
                        stream.seek(0)
                    img = read_raw(stream, name, min_side, lambda data: _open_first_frame(data, name, min_side))
            icc = _profile(img.info, nclx)
            img = ImageOps.exif_transpose(img)
            if img.width == 0 or img.height == 0:
                raise ImageLoadError(name, f"image has no pixels ({img.width}x{img.height})")
            return _to_srgb(img, icc, min_side)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(name, f"refused as a possible decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image (Pillow cannot identify the format)") from None
    except UNREADABLE as err:
        raise ImageLoadError(name, f"unreadable or corrupt image ({str(err).strip()})") from None
