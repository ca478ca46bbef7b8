"""Awkward image inputs: each one either loads as an RGB image or raises ``ImageLoadError`` naming the file
and the reason; the API captions the good ones and reports the bad ones the same way."""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from captioner.api import Captioner
from captioner import images
from captioner.images import ImageLoadError, load_image
from conftest import draw, load_error_without


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims ``width`` x ``height`` 1-bit pixels (no pixel data worth the name)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


# --- files that must load ---------------------------------------------------------------------------------------


def good_files(folder: Path) -> dict[str, Path]:
    """Every odd-but-valid kind of image file, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def path(name: str) -> Path:
        files[name.split(".")[0]] = folder / name
        return folder / name

    draw("red", "square", "white").save(path("photo.jpg"), quality=90)
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)).save(path("gray16.png"))
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(path("cmyk.jpg"))  # pure red in CMYK
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 20, 40))  # left half: opaque blue; right half: index 0, transparent
    palette.save(path("palette.png"), transparency=0)
    rotated = Image.new("RGB", (60, 30), (200, 50, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    rotated.save(path("exif_rotated.jpg"), exif=exif.tobytes())
    Image.new("RGB", (1, 1), (10, 200, 10)).save(path("one_pixel.png"))
    frames = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    frames[0].save(path("animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("LA", (30, 30), (0, 0)).save(path("transparent_gray.png"))
    return files


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    return good_files(tmp_path_factory.mktemp("good"))


@pytest.mark.parametrize("name", ["photo", "gray16", "cmyk", "palette", "exif_rotated", "one_pixel", "animated",
                                  "transparent_gray"])
def test_odd_but_valid_files_load_as_rgb(good, name):
    img = load_image(good[name])
    assert img.mode == "RGB"
    assert img.width >= 1 and img.height >= 1


def test_sixteen_bit_grayscale_is_scaled_not_clipped(good):
    img = np.asarray(load_image(good["gray16"]))
    assert img[0, 0].tolist() == [0, 0, 0]
    assert 0 < img[-1, -1, 0] < 255  # 2303 * 28 / 65535 of full scale, not saturated at 255
    assert len(np.unique(img[..., 0])) > 100  # the gradient survives


def test_cmyk_jpeg_keeps_its_colour(good):
    r, g, b = load_image(good["cmyk"]).getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60


def test_palette_transparency_is_composited_on_white(good):
    img = load_image(good["palette"])
    assert img.getpixel((5, 20)) == (0, 0, 255)
    assert img.getpixel((35, 20)) == (255, 255, 255)


def test_exif_orientation_is_applied(good):
    with Image.open(good["exif_rotated"]) as raw:
        assert raw.size == (60, 30)
    assert load_image(good["exif_rotated"]).size == (30, 60)


def test_animated_gif_uses_the_first_frame(good):
    img = load_image(good["animated"])
    r, g, b = img.getpixel((16, 16))
    assert r > 200 and g < 50 and b < 50


def test_one_pixel_image(good):
    assert load_image(good["one_pixel"]).getpixel((0, 0)) == (10, 200, 10)


def test_pil_image_input_is_converted(good):
    assert load_image(Image.new("L", (8, 8), 128)).getpixel((0, 0)) == (128, 128, 128)


def test_image_file_bytes_load_as_the_file_does(good, bad, tmp_path):
    """An image file's contents (an upload, a download, a database blob) load as the file itself, draft scale
    included; empty or unreadable bytes are refused with their size as the name."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(
        tmp_path / "large.jpg", quality=90)
    assert load_image((tmp_path / "large.jpg").read_bytes(), 64).size == (128, 96)  # decoded at 1/8 scale
    for path in (good["photo"], good["exif_rotated"], good["cmyk"], tmp_path / "large.jpg"):
        data = path.read_bytes()
        for src in (data, bytearray(data), memoryview(data)):
            assert np.array_equal(np.asarray(load_image(src, 64)), np.asarray(load_image(path, 64)))
    with pytest.raises(ImageLoadError, match="empty") as caught:
        load_image(b"")
    assert caught.value.source == "<0 bytes>"
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(bad["text"].read_bytes())


@pytest.mark.parametrize("src", [None, 42, {"path": "x.jpg"}, [1, 2]])
def test_a_source_of_another_type_is_refused_by_name(src):
    with pytest.raises(ImageLoadError, match="not an image source: give a path") as caught:
        load_image(src)
    assert caught.value.source == f"<{type(src).__name__}>"


def test_numpy_uint8_grayscale():
    img = load_image(np.full((12, 20), 77, dtype=np.uint8))
    assert img.mode == "RGB" and img.size == (20, 12) and img.getpixel((3, 3)) == (77, 77, 77)


def test_numpy_float_rgb_in_unit_range():
    arr = np.zeros((10, 16, 3), dtype=np.float32)
    arr[..., 2] = 1.0
    arr[..., 0] = 0.5
    img = load_image(arr)
    assert img.mode == "RGB" and img.size == (16, 10)
    r, g, b = img.getpixel((0, 0))
    assert abs(r - 127) <= 1 and g == 0 and b == 255


# --- files that must be refused ---------------------------------------------------------------------------------


def bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / filename for name, filename in [
        ("empty", "empty.jpg"), ("random", "random.jpg"), ("truncated", "truncated.jpg"), ("bad_crc", "bad_crc.png"),
        ("text", "notes.png"), ("directory", "folder.jpg"), ("missing", "missing.jpg"), ("bomb", "bomb.png"),
        ("bomb_warning", "bomb_warning.png")]}
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    draw("blue", "circle", "black", size=200).save(files["truncated"], quality=95)
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    Image.new("RGB", (16, 16), (5, 6, 7)).save(files["bad_crc"])
    data = bytearray(files["bad_crc"].read_bytes())
    data[29] ^= 0xFF  # the IHDR chunk's CRC (8-byte signature + length + type + 13 data bytes)
    files["bad_crc"].write_bytes(bytes(data))
    files["text"].write_text("this is not a picture\n")
    files["directory"].mkdir()
    files["bomb"].write_bytes(png_header_only(20000, 20000))  # 400 Mpixel: Pillow's hard limit
    files["bomb_warning"].write_bytes(png_header_only(10000, 10000))  # 100 Mpixel: Pillow only warns
    return files


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name, reason", [
    ("empty", "empty file (0 bytes)"),
    ("random", "not an image"),
    ("truncated", "truncated"),
    ("bad_crc", "not an image"),
    ("text", "not an image"),
    ("directory", "is a directory"),
    ("missing", "file not found"),
])
def test_unusable_file_is_refused_with_name_and_reason(bad, name, reason):
    with pytest.raises(ImageLoadError) as caught:
        load_image(bad[name])
    err = caught.value
    assert err.source == str(bad[name])
    assert str(err).startswith(f"{bad[name]}: ")
    assert reason in err.reason


@pytest.mark.parametrize("name", ["bomb", "bomb_warning"])
def test_decompression_bomb_is_refused_quickly(bad, name):
    start = time.perf_counter()
    with pytest.raises(ImageLoadError) as caught:
        load_image(bad[name])
    assert time.perf_counter() - start < 2.0  # refused from the header, never decoded
    assert "decompression bomb" in str(caught.value)
    assert str(caught.value).startswith(f"{bad[name]}: ")


def test_bomb_refusal_does_not_change_the_warning_filters(bad):
    import warnings
    before = list(warnings.filters)
    with pytest.raises(ImageLoadError):
        load_image(bad["bomb_warning"])
    assert warnings.filters == before


@pytest.mark.parametrize("arr, shape", [(np.zeros((4, 4, 2), dtype=np.uint8), "(4, 4, 2)"),
                                        (np.zeros((2, 3, 4, 3), dtype=np.uint8), "(2, 3, 4, 3)")])
def test_array_of_the_wrong_shape_is_refused(arr, shape):
    with pytest.raises(ImageLoadError) as caught:
        load_image(arr)
    assert caught.value.source == "<ndarray>" and shape in caught.value.reason


@pytest.mark.parametrize("src", [np.zeros((0, 0), dtype=np.uint8), np.zeros((0, 5, 3), dtype=np.uint8),
                                 Image.new("RGB", (0, 0))], ids=["array_0x0", "array_0x5x3", "pil_0x0"])
def test_an_image_without_pixels_is_refused(src):
    with pytest.raises(ImageLoadError) as caught:
        load_image(src)
    assert caught.value.source.startswith("<")


# --- through the API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner(trained_run) -> Captioner:
    return Captioner.from_pretrained(trained_run / "best", device="cpu")


def test_captioner_captions_every_good_input(captioner, good):
    sources = list(good.values()) + [str(good["photo"]), np.full((12, 20), 77, dtype=np.uint8),
                                     np.random.default_rng(1).random((30, 40, 3)), Image.new("RGBA", (9, 9))]
    captions = captioner.caption(sources)
    assert len(captions) == len(sources)
    assert all(isinstance(c, str) and c.strip() for c in captions)
    assert captioner.caption(good["photo"]) == captions[0]  # one image -> one string, same as in a batch
    assert captioner.caption(good["photo"].read_bytes()) == captions[0]  # its bytes caption as the file does
    assert captioner.caption([]) == [] and captioner.caption([], strategy="beam", num_return=2) == []
    assert captioner.tags([]) == []


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "directory", "bomb"])
def test_captioner_refuses_a_bad_input_naming_it(captioner, good, bad, name):
    with pytest.raises(ImageLoadError) as caught:
        captioner.caption([good["photo"], bad[name]])
    assert caught.value.source == str(bad[name])


def test_stream_reports_bad_files_and_captions_the_rest(captioner, good, bad):
    paths = [str(good["photo"]), str(bad["truncated"]), str(good["cmyk"]), str(bad["text"])]
    results = list(captioner.stream(paths, captioner.decode_config(), batch_size=2, workers=0))
    assert [r.source for r in results] == paths
    assert [r.error is None for r in results] == [True, False, True, False]
    assert results[1].source == str(bad["truncated"]) and "truncated" in results[1].error
    assert "not an image" in results[3].error
    assert results[0].caption and results[2].caption


@pytest.mark.parametrize("decode_batch", [1, 3, 128])
def test_stream_pools_features_without_reordering_or_changing_results(captioner, good, bad, decode_batch):
    """Features of several encoder batches are decoded together; order and captions stay as one by one."""
    paths = [str(good["photo"]), str(bad["truncated"]), str(good["cmyk"]), str(good["photo"]), str(bad["text"]),
             str(good["cmyk"]), str(good["photo"])]
    config = captioner.decode_config(strategy="beam", beam_size=3)
    results = list(captioner.stream(paths, config, batch_size=2, workers=0, decode_batch=decode_batch))
    assert [r.source for r in results] == paths
    assert [r.error is None for r in results] == [True, False, True, True, False, True, True]
    assert [r.caption for r in results if r.error is None] == captioner.caption(
        [p for p, r in zip(paths, results) if r.error is None], strategy="beam", beam_size=3)


def test_file_descriptors_are_not_leaked(good, bad):
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd")
    load_image(good["photo"])  # warm-up: lazy imports open their own files once
    before = len(os.listdir(fd_dir))
    for _ in range(20):
        for path in list(good.values()):
            load_image(path)
        for name in ("random", "truncated", "text", "bomb", "bad_crc"):
            with pytest.raises(ImageLoadError):
                load_image(bad[name])
    assert len(os.listdir(fd_dir)) <= before + 2


# --- HEIC / HEIF (iPhone photos) ---------------------------------------------------------------------------------


def heic_file(path: Path) -> Path:
    """A HEIC photo as an iPhone stores a portrait shot: pixels stored landscape, a rotation in the file, EXIF
    orientation 6. Stored: red top-left quadrant on black, 80x60."""
    pillow_heif = pytest.importorskip("pillow_heif")
    arr = np.zeros((60, 80, 3), np.uint8)
    arr[:30, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    pillow_heif.from_pillow(Image.fromarray(arr)).save(path, quality=95, exif=exif.tobytes())
    return path


def test_heic_photo_loads_upright_once_from_a_file_and_from_bytes(tmp_path):
    path = heic_file(tmp_path / "IMG_0001.HEIC")
    for src in (path, path.read_bytes()):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (60, 80)  # turned a quarter, not twice (that would be 80x60)
        r, g, b = img.getpixel((50, 10))  # the red quadrant is now top-right
        assert r > 200 and g < 60 and b < 60
        assert max(img.getpixel((10, 10))) < 60


def test_a_damaged_heic_is_refused_naming_it_and_the_batch_goes_on(captioner, good, tmp_path):
    """A HEIC whose declared size (its ispe box) disagrees with its coded image: libheif raises RuntimeError, which
    ended a whole `captioner caption` run (found by fuzzing). It is an unreadable file like any other."""
    pillow_heif = pytest.importorskip("pillow_heif")
    path = tmp_path / "IMG_0005.HEIC"
    pillow_heif.from_pillow(Image.new("RGB", (320, 240), (200, 30, 30))).save(path, quality=80)
    data = bytearray(path.read_bytes())
    ispe = data.index(b"ispe") + 8  # after the box type and its version/flags: width, height (4 bytes each)
    data[ispe + 4:ispe + 8] = (36).to_bytes(4, "big")  # 240 rows declared as 36: "Security limit exceeded"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="IMG_0005.HEIC: unreadable or corrupt image"):
        load_image(path)
    results = list(captioner.stream([str(good["photo"]), str(path)], captioner.decode_config(strategy="greedy")))
    assert results[0].error is None and "unreadable or corrupt image" in results[1].error


def test_heic_without_pillow_heif_names_the_file_and_what_to_install(tmp_path):
    path = heic_file(tmp_path / "IMG_0002.heic")
    message = load_error_without("pillow_heif", path)
    assert str(path) in message and "HEIC" in message and "pip install pillow-heif" in message


def test_avif_on_a_pillow_without_avif_says_so(tmp_path, monkeypatch):
    """An AVIF file a Pillow without AVIF cannot identify gets a message naming the format and the fix, not 'not
    an image'; with AVIF support a real AVIF loads (Pillow's wheels have it since 11.3)."""
    if features.check("avif"):
        Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "real.avif")
        assert load_image(tmp_path / "real.avif").size == (40, 30)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "photo.png")
    path = tmp_path / "photo.avif"
    path.write_bytes(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 200)  # an AVIF header, nothing any Pillow reads
    monkeypatch.setattr(images.pil_features, "check", lambda feature: feature != "avif")
    with pytest.raises(ImageLoadError, match="photo.avif: an AVIF image.*pip install -U pillow"):
        load_image(path)
    assert load_image(tmp_path / "photo.png").size == (40, 30)  # other formats are not affected
