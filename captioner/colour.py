"""Part of step 1 (image -> pixels): a photo's colours in sRGB, whatever colour space its file declares.

Phones and cameras store many photos in a wider space than sRGB and say so with an embedded ICC profile: an
iPhone's HEIC and JPEG photos are Display P3, a camera set to Adobe RGB writes that. Read as if they were sRGB
(as Pillow does) their colours are washed out: P3's
red (200, 50, 50) is sRGB (218, 24, 40), and a CNN trained on sRGB photos (ImageNet's, Flickr8k's:
none of Flickr8k's photos carries a profile) sees the wrong colours. ``to_srgb`` converts them with LittleCMS (in
Pillow), as a browser or a photo viewer does before showing them.

HEIC and AVIF files may declare their colours without an ICC profile, by an "nclx" colour description (ITU-T
H.273 code points for primaries and transfer curve; Android phones and many encoders write one): ``nclx_profile``
turns a wide-gamut one into the ICC profile it stands for, so the same conversion applies.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
from PIL import Image, ImageCms

# an embedded sRGB profile (cameras' "sRGB IEC61966-2.1", Pillow's "sRGB built-in") needs no conversion
SRGB_NAMES = ("srgb",)

D50 = (0.9642, 1.0, 0.8249)  # the ICC profile connection space's white
SRGB_CURVE = "srgb"  # as a ``gamma``: IEC 61966-2-1's piecewise curve (linear toe, then 2.4 power)
SRGB_PARAMETERS = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # ICC parametricCurveType 3: g, a, b, c, d
# nclx colour primaries (H.273) wider than sRGB's, as (red, green, blue, white) xy chromaticities; 1 (BT.709, sRGB's
# own) and 2 (unspecified) need nothing
NCLX_PRIMARIES = {9: ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046), (0.3127, 0.3290)),  # BT.2020
                  12: ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), (0.3127, 0.3290))}  # Display P3 (P3-D65)
# nclx transfer characteristics whose decoding curve is a plain one: sRGB's (13, what phones' Display P3 uses), the
# gamma 2.2 and 2.8 of BT.470 M and B/G (4, 5), linear (8). Not converted: BT.709-family camera curves (1, 6, 14,
# 15), whose display curve viewers disagree on, and HDR curves (PQ 16, HLG 18), which need tone mapping
NCLX_TRANSFER = {13: SRGB_CURVE, 4: 2.2, 5: 2.8, 8: 1.0}
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


@functools.lru_cache(maxsize=16)
def _transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """The RGB -> sRGB transform of an embedded profile, built once per profile (7 ms); None when the profile is
    sRGB's, is not an RGB one (a grey or CMYK photo's), or cannot be used. A damaged profile is
    ignored, as browsers do, rather than making the photo unreadable. NOCACHE: lcms's one-pixel cache is not
    thread-safe, and ``ImageFiles`` converts a batch's photos on several threads with the same transform."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if space != "RGB" or ImageCms.getProfileDescription(profile).strip().lower().startswith(SRGB_NAMES):
            return None
        return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "RGB", "RGB",
                                       renderingIntent=ImageCms.Intent.PERCEPTUAL, flags=ImageCms.Flags.NOCACHE)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def needs_conversion(img: Image.Image, icc: bytes | None) -> bool:
    """Whether ``to_srgb`` would change ``img``: an RGB image whose ``icc`` profile is an RGB space other than sRGB."""
    return bool(icc) and img.mode == "RGB" and _transform(bytes(icc)) is not None


def to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """An RGB ``img`` converted from the colour space of its ``icc`` profile to sRGB. Without a profile, with
    sRGB's, or with one that cannot be used, ``img`` is returned as it is: taken to be sRGB, as the web does.
    Cost: ~47 ns a pixel here (9 ms for 500x375 noise, less for photos), which is why ``load_image`` converts
    after reducing."""
    if not needs_conversion(img, icc):
        return img
    return ImageCms.applyTransform(img, _transform(bytes(icc)))


def _s15(values) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _xyz(values) -> bytes:
    return b"XYZ " + bytes(4) + _s15(values)


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return (b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_ + bytes(8)  # unicode: language, count 0
            + bytes(3) + bytes(67))  # ScriptCode: code, count, 67 bytes


def _curve(gamma: float | str) -> bytes:
    if gamma == SRGB_CURVE:
        return b"para" + bytes(4) + struct.pack(">HH", 3, 0) + _s15(SRGB_PARAMETERS)
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def matrix_profile(colorants, gamma: float | str, description: str) -> bytes:
    """An ICC v2 RGB display profile (the kind Apple's Display P3 and Adobe RGB (1998) are): ``colorants`` the D50
    XYZ of red, green and blue, one tone curve for all three (a gamma, or ``SRGB_CURVE``)."""
    curve = _curve(gamma)
    tags = [(b"desc", _desc(description)), (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(colorants[0])),
            (b"gXYZ", _xyz(colorants[1])), (b"bXYZ", _xyz(colorants[2])), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve), (b"cprt", b"text" + bytes(4) + b"No copyright\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4) + _s15(D50) + bytes(4 + 16 + 28))
    return header + struct.pack(">I", len(tags)) + table + body


def d50_colorants(primaries) -> np.ndarray:
    """(red, green, blue, white) xy chromaticities -> the (3, 3) D50 XYZ of the three primaries (rows), adapted
    from the space's white by Bradford's transform, as ICC profiles store them."""
    *rgb, white = [np.array([x, y, 1 - x - y]) / y for x, y in primaries]
    columns = np.stack(rgb, axis=1)
    columns = columns * np.linalg.solve(columns, white)  # scaled so that (1, 1, 1) is the white
    cone = BRADFORD @ columns
    adapt = np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ np.array(D50)) / (BRADFORD @ white))
    return (adapt @ cone).T


@functools.lru_cache(maxsize=8)
def nclx_profile(primaries: int | None, transfer: int | None) -> bytes | None:
    """The ICC profile an nclx colour description stands for, when it is a wide gamut this module converts
    (``NCLX_PRIMARIES`` with a ``NCLX_TRANSFER`` curve); None for sRGB's primaries, unspecified or HDR ones."""
    if primaries not in NCLX_PRIMARIES or transfer not in NCLX_TRANSFER:
        return None
    return matrix_profile(d50_colorants(NCLX_PRIMARIES[primaries]), NCLX_TRANSFER[transfer],
                          f"nclx primaries {primaries} transfer {transfer}")


def read_nclx(head: bytes) -> tuple[int, int] | None:
    """(primaries, transfer) of the first nclx ``colr`` box in the first bytes of an ISOBMFF file (AVIF, whose
    Pillow reader does not report it); None when there is none."""
    at = head.find(b"colrnclx")
    if at < 0 or len(head) < at + 12:
        return None
    return struct.unpack(">HH", head[at + 8:at + 12])
