"""ICC colour profiles written from their definitions, for tests of colour management without profile files.

A matrix/TRC display profile (ICC v2: the kind Apple's Display P3 and Adobe RGB (1998) are) is a header, a
description, the white point, three colorants (each primary's XYZ under D50, the profile connection space) and
three tone curves (a pure gamma, or sRGB's curve as Display P3 has); ``rgb_to_srgb`` is the same conversion done
independently in numpy, to check a CMM against.
"""

from __future__ import annotations

import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)
# colorants (rXYZ, gXYZ, bXYZ) adapted to D50 (Bradford), as the published profiles store them
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
SRGB = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def _s15(values) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _xyz(values) -> bytes:
    return b"XYZ " + bytes(4) + _s15(values)


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return (b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_ + bytes(8)  # unicode: language, count 0
            + bytes(3) + bytes(67))  # ScriptCode: code, count, 67 bytes


SRGB_CURVE = "srgb"  # as a ``gamma``: IEC 61966-2-1's piecewise curve (linear toe, then 2.4 power)
SRGB_PARAMETERS = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # ICC parametricCurveType 3: g, a, b, c, d


def _curve(gamma: float | str) -> bytes:
    if gamma == SRGB_CURVE:
        return b"para" + bytes(4) + struct.pack(">HH", 3, 0) + _s15(SRGB_PARAMETERS)
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def decode_curve(encoded: np.ndarray, gamma: float | str) -> np.ndarray:
    """Values in [0, 1] through a profile's tone curve to linear light."""
    if gamma == SRGB_CURVE:
        return np.where(encoded < 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)
    return encoded ** gamma


def matrix_profile(colorants, gamma: float | str, description: str) -> bytes:
    """An ICC v2 RGB display profile: ``colorants`` the D50 XYZ of red, green and blue, one tone curve (a gamma,
    or ``SRGB_CURVE``)."""
    curve = _curve(gamma)
    tags = [(b"desc", _desc(description)), (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(colorants[0])),
            (b"gXYZ", _xyz(colorants[1])), (b"bXYZ", _xyz(colorants[2])), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve), (b"cprt", b"text" + bytes(4) + b"No copyright, test profile\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
              + bytes(4 + 4 + 4 + 4 + 8 + 4) + _s15(D50) + bytes(4 + 16 + 28))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def rgb_to_srgb(pixels: np.ndarray, colorants, gamma: float | str) -> np.ndarray:
    """8-bit RGB in a matrix/TRC space to 8-bit sRGB (relative colorimetric, clipped), by the formulas."""
    linear = decode_curve(pixels.astype(np.float64) / 255.0, gamma)
    to_xyz = np.array(colorants).T  # columns: the primaries' XYZ
    srgb_linear = linear @ (np.linalg.inv(np.array(SRGB).T) @ to_xyz).T
    srgb_linear = np.clip(srgb_linear, 0.0, 1.0)
    encoded = np.where(srgb_linear <= 0.0031308, 12.92 * srgb_linear, 1.055 * srgb_linear ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255.0).astype(np.uint8)
