"""Photos stored in a wider colour space than sRGB (an iPhone's Display P3, a camera's Adobe RGB) are converted to
sRGB by ``load_image``, as a browser does before showing them; the converted pixels are checked against the same
conversion done by its formulas in numpy (``icc_fixtures.rgb_to_srgb``), not against LittleCMS itself."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms
from PIL import features as pil_features

from captioner.colour import NCLX_PRIMARIES, d50_colorants, read_nclx
from captioner.images import load_image
from icc_fixtures import ADOBE_RGB, DISPLAY_P3, SRGB, SRGB_CURVE, matrix_profile, rgb_to_srgb, with_nclx

P3 = matrix_profile(DISPLAY_P3, SRGB_CURVE, "Display P3")
ADOBE = matrix_profile(ADOBE_RGB, 563 / 256, "Adobe RGB (1998)")


def p3_red_in_srgb() -> tuple[int, int, int]:
    """Display P3's (200, 50, 50) in sRGB: (218, 24, 40)."""
    return tuple(int(v) for v in rgb_to_srgb(np.array([[(200, 50, 50)]], np.uint8), DISPLAY_P3, SRGB_CURVE)[0, 0])


def noise(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def saved(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("profile, colorants, curve", [(P3, DISPLAY_P3, SRGB_CURVE), (ADOBE, ADOBE_RGB, 563 / 256)],
                         ids=["display-p3", "adobe-rgb"])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_a_wide_gamut_photo_is_converted_to_srgb(tmp_path, profile, colorants, curve, fmt):
    pixels = noise()
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(saved(pixels, fmt, icc_profile=profile, **({"lossless": True} if fmt == "WEBP" else {})))
    expected = rgb_to_srgb(pixels, colorants, curve)
    assert np.abs(pixels.astype(int) - expected).mean() > 8  # read as sRGB, the colours would be this far off
    for src in (path, path.read_bytes()):
        got = np.asarray(load_image(src)).astype(int)
        assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()


def test_a_p3_jpeg_is_converted_also_when_drafted_and_turned(tmp_path):
    """A phone's JPEG: decoded at a reduced scale and turned by its EXIF orientation, then converted."""
    flat = np.zeros((1200, 1600, 3), np.uint8)
    flat[:] = (200, 50, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1600x1200, shown turned 90 degrees
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(saved(flat, "JPEG", quality=95, icc_profile=P3, exif=exif.tobytes()))
    img = load_image(path, min_side=256)
    assert img.size == (300, 400)
    expected = p3_red_in_srgb()
    assert img.getpixel((150, 200)) == pytest.approx(expected, abs=3)  # (218, 24, 40), not (200, 50, 50)


def test_a_large_photo_with_a_profile_is_reduced_before_converting_and_only_then(tmp_path):
    """Converting costs ~47 ns a pixel (0.56 s for a 12 MP HEIC): a large non-JPEG photo with a profile to convert
    is first box-reduced by a whole factor to no less than ``min_side``; without ``min_side`` every pixel is
    converted, and a photo without a profile is left to ``Preprocess``'s resize as before."""
    pixels = np.kron(noise(30, 40), np.ones((50, 50, 1), np.uint8))  # 2000x1500, blocks of 50x50 pixels
    path = tmp_path / "large.png"
    path.write_bytes(saved(pixels, icc_profile=P3))
    reduced = load_image(path, min_side=256)
    assert reduced.size == (400, 300)  # 1500 // 256 = 5
    expected = rgb_to_srgb(pixels[::5, ::5], DISPLAY_P3, SRGB_CURVE)  # each 5x5 box lies inside one block
    assert np.abs(np.asarray(reduced).astype(int) - expected).max() <= 1
    assert load_image(path).size == (2000, 1500)
    untagged = tmp_path / "untagged.png"
    untagged.write_bytes(saved(pixels))
    assert load_image(untagged, min_side=256).size == (2000, 1500)


def test_srgb_damaged_and_non_rgb_profiles_leave_the_pixels_as_they_are(tmp_path):
    pixels = noise()
    srgb_builtin = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    srgb_camera = matrix_profile(SRGB, SRGB_CURVE, "sRGB IEC61966-2.1")  # as cameras embed it
    damaged = bytearray(P3)
    damaged[40:200] = bytes(160)  # header and tag table zeroed
    grey = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # not an RGB space
    for profile in (srgb_builtin, srgb_camera, bytes(damaged), b"not a profile", grey):
        got = np.asarray(load_image(saved(pixels, icc_profile=profile)))
        assert np.array_equal(got, pixels)


def test_transparency_is_composited_then_converted():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = (200, 50, 50)
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0  # top half transparent: white, which is white in every space
    img = load_image(saved(rgba, icc_profile=P3))
    expected = p3_red_in_srgb()
    assert img.getpixel((5, 15)) == pytest.approx(expected, abs=1)
    assert img.getpixel((5, 5)) == pytest.approx((255, 255, 255), abs=1)


def test_an_iphone_heic_in_display_p3_is_converted(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    flat = np.zeros((240, 320, 3), np.uint8)
    flat[:] = (200, 50, 50)
    path = tmp_path / "IMG_0002.HEIC"
    Image.fromarray(flat).save(path, quality=95, icc_profile=P3)
    expected = p3_red_in_srgb()
    assert load_image(path).getpixel((160, 120)) == pytest.approx(expected, abs=4)


def nclx_avif(pixels: np.ndarray, primaries: int, transfer: int) -> bytes:
    return with_nclx(saved(pixels, "AVIF", quality=100), primaries, transfer)


def test_an_avif_described_as_display_p3_by_nclx_is_converted(tmp_path):
    """Android phones and AVIF encoders declare Display P3 by an nclx description (primaries 12, sRGB's transfer
    13), not an ICC profile; Pillow reports neither. Converted as the P3 profile would be; the same pixels
    described as BT.709 (1), or with an HDR (PQ, 16) or BT.709 (1) transfer, are left as decoded."""
    if not pil_features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    flat = np.zeros((96, 128, 3), np.uint8)
    flat[:] = (200, 50, 50)
    path = tmp_path / "PXL_0001.avif"
    path.write_bytes(nclx_avif(flat, 12, 13))
    as_decoded = np.asarray(load_image(nclx_avif(flat, 1, 13))).astype(int)
    expected = rgb_to_srgb(as_decoded.astype(np.uint8), DISPLAY_P3, SRGB_CURVE).astype(int)
    assert np.abs(as_decoded - expected).max() > 15  # read as sRGB the red would be this far off
    for src in (path, path.read_bytes()):
        assert np.abs(np.asarray(load_image(src)).astype(int) - expected).max() <= 1
    for primaries, transfer in ((1, 13), (12, 16), (12, 1), (2, 2)):
        assert np.array_equal(np.asarray(load_image(nclx_avif(flat, primaries, transfer))), as_decoded)


def test_a_heic_described_as_display_p3_by_nclx_is_converted(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    flat = np.zeros((240, 320, 3), np.uint8)
    flat[:] = (200, 50, 50)
    path, plain = tmp_path / "20261130_101500.heic", tmp_path / "plain.heic"
    Image.fromarray(flat).save(path, quality=100, nclx_profile={"color_primaries": 12, "transfer_characteristics": 13,
                                                                 "matrix_coefficients": 6, "full_range_flag": 1})
    Image.fromarray(flat).save(plain, quality=100)
    as_decoded = np.asarray(load_image(plain)).astype(int)
    expected = rgb_to_srgb(as_decoded.astype(np.uint8), DISPLAY_P3, SRGB_CURVE).astype(int)
    assert np.abs(np.asarray(load_image(path)).astype(int) - expected).max() <= 1


def test_nclx_primaries_become_the_published_colorants():
    """Display P3's xy chromaticities, adapted to D50 by Bradford's transform, are the colorants Apple's profile
    stores (and sRGB's those of sRGB's profile), to the profiles' 4 decimals."""
    assert np.abs(d50_colorants(NCLX_PRIMARIES[12]) - np.array(DISPLAY_P3)).max() < 1.5e-4
    srgb_xy = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06), (0.3127, 0.3290))
    assert np.abs(d50_colorants(srgb_xy) - np.array(SRGB)).max() < 2.5e-4


def test_a_damaged_or_missing_colr_box_is_no_description():
    assert read_nclx(b"....colrnclx\x00\x0c") is None  # cut short
    assert read_nclx(b"....colrprof....") is None
    assert read_nclx(b"\x00\x00\x00\x13colrnclx\x00\x0c\x00\x0d\x00\x06\x80") == (12, 13)
