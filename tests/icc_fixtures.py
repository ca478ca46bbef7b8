"""ICC colour profiles written from their definitions, for tests of colour management without profile files.

A matrix/TRC display profile (ICC v2: the kind Apple's Display P3 and Adobe RGB (1998) are) is a header, a
description, the white point, three colorants (each primary's XYZ under D50, the profile connection space) and
three tone curves (a pure gamma, or sRGB's curve as Display P3 has); ``captioner.colour.matrix_profile`` writes
one (the project makes them from HEIC/AVIF nclx descriptions). Here: the published profiles' colorants, and
``rgb_to_srgb``, the same conversion done independently in numpy, to check a CMM against.
"""

from __future__ import annotations

import numpy as np

from captioner.colour import SRGB_CURVE, matrix_profile  # noqa: F401  (the writer is the project's: nclx needs it)

# colorants (rXYZ, gXYZ, bXYZ) adapted to D50 (Bradford), as the published profiles store them
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
SRGB = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def decode_curve(encoded: np.ndarray, gamma: float | str) -> np.ndarray:
    """Values in [0, 1] through a profile's tone curve to linear light."""
    if gamma == SRGB_CURVE:
        return np.where(encoded < 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)
    return encoded ** gamma


def rgb_to_srgb(pixels: np.ndarray, colorants, gamma: float | str) -> np.ndarray:
    """8-bit RGB in a matrix/TRC space to 8-bit sRGB (relative colorimetric, clipped), by the formulas."""
    linear = decode_curve(pixels.astype(np.float64) / 255.0, gamma)
    to_xyz = np.array(colorants).T  # columns: the primaries' XYZ
    srgb_linear = linear @ (np.linalg.inv(np.array(SRGB).T) @ to_xyz).T
    srgb_linear = np.clip(srgb_linear, 0.0, 1.0)
    encoded = np.where(srgb_linear <= 0.0031308, 12.92 * srgb_linear, 1.055 * srgb_linear ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255.0).astype(np.uint8)


def with_nclx(avif: bytes, primaries: int, transfer: int) -> bytes:
    """An AVIF file (as Pillow writes it: nclx BT.709 primaries, sRGB transfer, 1 / 13) whose nclx colour
    description says ``primaries`` and ``transfer`` instead; the coded pixels stay the same."""
    data = bytearray(avif)
    at = data.find(b"colrnclx")
    assert at > 0 and data[at + 8:at + 12] == bytes([0, 1, 0, 13]), "not an AVIF as Pillow writes it"
    data[at + 8:at + 12] = primaries.to_bytes(2, "big") + transfer.to_bytes(2, "big")
    return bytes(data)
