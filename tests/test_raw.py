"""Camera RAW photos: read through LibRaw from the preview the camera embedded (upright), or demosaiced; never
as the 160x120 thumbnail Pillow finds in a TIFF-based RAW; clear errors; folders; metadata left untouched."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import batch
from captioner.images import ImageLoadError, load_image
from captioner.metadata import sidecar_paths, write_caption
from conftest import draw, load_error_without
from raw_fixtures import write_dng

rawpy = pytest.importorskip("rawpy")


def quadrant(width: int, height: int) -> Image.Image:
    """Red top-left quadrant on dark grey: where it ends up shows how the photo was turned."""
    arr = np.full((height, width, 3), 40, np.uint8)
    arr[: height // 2, : width // 2] = (230, 20, 20)
    return Image.fromarray(arr)


def embedded_bytes(path: Path) -> bytes:
    with rawpy.imread(str(path)) as raw:
        return raw.extract_thumb().data


def embedded_jpeg(path: Path) -> Image.Image:
    return Image.open(io.BytesIO(embedded_bytes(path))).convert("RGB")


def test_raw_photo_is_its_embedded_preview_turned_upright(tmp_path):
    """A portrait shot: sensor and preview stored landscape, orientation 6. What comes back is the preview (not
    Pillow's 160x120 thumbnail of the file), turned a quarter clockwise, pixel for pixel."""
    path = write_dng(tmp_path / "DSC_0001.NEF", quadrant(320, 240), preview=quadrant(640, 480), orientation=6)
    img = load_image(path, min_side=256)
    assert img.mode == "RGB" and img.size == (480, 640)
    expected = embedded_jpeg(path).transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    r, g, b = img.getpixel((400, 100))  # the red quadrant is now top-right
    assert r > 180 and g < 80 and b < 80


def test_large_preview_is_decoded_at_a_reduced_scale(tmp_path):
    """A camera's preview is full size: like any JPEG it is drafted down to what the model needs."""
    path = write_dng(tmp_path / "IMG_0002.CR2", quadrant(320, 240), preview=quadrant(2400, 1800))
    assert load_image(path, min_side=256).size == (600, 450)  # 1/4 scale: 1/8 would be under 256
    assert load_image(path).size == (2400, 1800)  # no min_side: every pixel the preview has


def test_raw_without_a_large_enough_preview_is_demosaiced(tmp_path):
    """Only the 160x120 bitmap thumbnail embedded (never read: see the damaged-file test): the sensor data is
    demosaiced (upright, colours kept), at half size when that still covers min_side."""
    path = write_dng(tmp_path / "photo.dng", quadrant(320, 240), orientation=6)
    full = load_image(path, min_side=200)
    assert full.size == (240, 320)
    r, g, b = full.getpixel((200, 60))  # red quadrant top-right after the quarter turn
    assert r > 120 and r > 2 * g and r > 2 * b
    assert max(full.getpixel((60, 260))) < 120  # the grey is not red
    assert load_image(path, min_side=100).size == (120, 160)  # half size covers 100
    larger = write_dng(tmp_path / "larger.dng", quadrant(640, 480), orientation=6)
    assert load_image(larger, min_side=200).size == (240, 320)  # half of 480 still covers 200
    assert load_image(larger).size == (480, 640)  # every pixel
    small = write_dng(tmp_path / "small.dng", quadrant(320, 240), preview=quadrant(160, 120))
    assert load_image(small, min_side=200).size == (320, 240)  # a JPEG preview too small: demosaiced


def test_a_preview_that_libraw_hands_over_damaged_falls_back_to_the_sensor_data(tmp_path):
    """LibRaw refuses some damaged previews and hands others over (its check passed this one, whose last 3,000 bytes
    are zeros; the cut-short file of the test above went either way between runs); Pillow then found the JPEG
    truncated and the whole photo was refused, though its sensor data is whole."""
    path = write_dng(tmp_path / "zeros.dng", quadrant(320, 240), preview=quadrant(640, 480))
    data = path.read_bytes()
    path.write_bytes(data[:-3000] + bytes(3000))  # the preview is stored last
    assert load_image(path, min_side=200).size == (320, 240)  # demosaiced


def test_a_damaged_bitmap_thumbnail_is_not_read_past_its_end(tmp_path):
    """A file whose bitmap thumbnail claims 59,256 rows (found by fuzzing the DNGs of these tests): rawpy wraps
    LibRaw's 57,600-byte copy in a 28 MB array, and reading it killed the process (SIGSEGV). Run in a child
    process, so that a crash fails the test instead of ending the suite."""
    path = write_dng(tmp_path / "damaged.NEF", quadrant(160, 120))
    data = bytearray(path.read_bytes())
    height_entry = data.index(struct.pack("<HHI", 257, 4, 1))  # IFD0's ImageLength (LONG, one value): 120
    data[height_entry + 8:height_entry + 12] = struct.pack("<I", 59256)
    path.write_bytes(bytes(data))
    script = "import sys; from captioner.images import load_image; print(load_image(sys.argv[1], 64).size)"
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert done.stdout.strip() == "(160, 120)"  # demosaiced: the sensor data is intact


def test_raw_photo_is_encoded_as_its_preview_not_as_its_thumbnail(trained_run, tmp_path):
    """The sensor data (and so the thumbnail) and the preview are made to show different things here, so the
    features tell which one was read; ``stream`` (the batch command's path) captions it as ``caption`` does."""
    import torch
    from captioner.api import Captioner
    cap = Captioner.from_pretrained(trained_run / "best", device="cpu")
    sensor = draw("red", "square", "white", size=320)
    preview = draw("blue", "circle", "black", size=640)
    path = write_dng(tmp_path / "DSC_0003.ARW", sensor, preview=preview)
    read, shown, thumb = cap.features([str(path), embedded_bytes(path), sensor.resize((160, 160))])
    assert torch.equal(read, shown) and not torch.allclose(read, thumb, atol=1e-3)
    [result] = list(cap.stream([str(path)], cap.decode_config()))
    assert result.error is None and result.nbest[0]["caption"] == cap.caption(str(path))


@pytest.mark.parametrize("content, reason", [
    (b"\x00" * 4096, "not a camera RAW file LibRaw can read"),
    (b"II*\x00" + b"\x13" * 2000, "camera RAW"),
], ids=["zeros", "tiff-header-then-noise"])
def test_unreadable_raw_is_refused_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "broken.NEF"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as err:
        load_image(path, min_side=256)
    assert str(path) in str(err.value)


def test_a_damaged_preview_falls_back_to_the_sensor_data_and_damaged_sensor_data_is_refused(tmp_path):
    path = write_dng(tmp_path / "cut.dng", quadrant(320, 240), preview=quadrant(640, 480))
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 5000])  # the preview's end is gone
    assert load_image(path, min_side=200).size == (320, 240)  # demosaiced
    path.write_bytes(path.read_bytes()[:60000])  # now the sensor data too
    with pytest.raises(ImageLoadError, match="unreadable or corrupt camera RAW file") as err:
        load_image(path, min_side=200)
    assert str(path) in str(err.value)


def test_a_damaged_colour_pattern_gives_a_grey_photo_not_a_crash(tmp_path):
    """A DNG whose CFA pattern entry claims 79 values instead of 4 (found by fuzzing): LibRaw demosaics it to one
    colour, (h, w, 1), which Pillow cannot take as an array (a TypeError, which no caller expects, ended the batch)."""
    path = write_dng(tmp_path / "damaged.dng", quadrant(160, 120))
    data = path.read_bytes()
    entry = struct.pack("<HHI", 33422, 1, 4)  # CFAPattern, BYTE, 4 values
    path.write_bytes(data.replace(entry, struct.pack("<HHI", 33422, 1, 79)))
    img = load_image(path, min_side=130)  # more than the thumbnail has: demosaiced by any version
    assert img.mode == "RGB" and img.width * 3 == img.height * 4  # whatever size LibRaw makes of it


def test_a_raw_file_without_its_name_is_read_as_one(tmp_path):
    """Its bytes (an upload through the API, a database blob) or a renamed copy: Pillow opened the first directory,
    the 160x120 thumbnail, and that was captioned. That directory says it is a reduced-resolution copy of another
    image in the file, so such a file goes to LibRaw; an ordinary TIFF is read by Pillow as before."""
    path = write_dng(tmp_path / "DSC_0008.NEF", quadrant(320, 240), preview=quadrant(640, 480), orientation=6)
    renamed = tmp_path / "photo.tif"
    renamed.write_bytes(path.read_bytes())
    expected = np.asarray(load_image(path, min_side=256))
    for src in (path.read_bytes(), renamed):
        assert np.array_equal(np.asarray(load_image(src, min_side=256)), expected)
    scan = tmp_path / "scan.tif"
    quadrant(320, 240).save(scan)
    assert load_image(scan).size == (320, 240)
    message = load_error_without("rawpy", renamed)
    assert str(renamed) in message and "its first image is a thumbnail" in message and "pip install rawpy" in message


def test_raw_without_rawpy_names_the_file_and_what_to_install(tmp_path):
    path = write_dng(tmp_path / "IMG_0004.CR2", quadrant(320, 240), preview=quadrant(640, 480))
    message = load_error_without("rawpy", path)
    assert str(path) in message and "camera RAW" in message and "pip install rawpy" in message


def test_folder_scan_reads_raw_files_and_passes_them_over_without_rawpy(tmp_path, monkeypatch):
    folder = tmp_path / "card"
    folder.mkdir()
    quadrant(320, 240).save(folder / "IMG_0001.JPG")
    write_dng(folder / "IMG_0001.CR2", quadrant(320, 240), preview=quadrant(640, 480))
    (folder / "notes.txt").write_text("x")
    found = batch.expand_inputs([str(folder)])
    assert [Path(f).name for f in found.files] == ["IMG_0001.CR2", "IMG_0001.JPG"] and found.ignored == 1
    monkeypatch.setattr(batch, "raw_readable", lambda: False)
    found = batch.expand_inputs([str(folder)])
    assert [Path(f).name for f in found.files] == ["IMG_0001.JPG"] and found.unread_raw == 1
    (folder / "IMG_0001.JPG").unlink()
    found = batch.expand_inputs([str(folder)])
    assert not found.files and "1 camera RAW file(s), read with rawpy: pip install rawpy" in found.missing[str(folder)]


def test_caption_command_notes_raw_files_it_could_not_read(trained_run, tmp_path, monkeypatch, capsys):
    from captioner.cli import main
    folder = tmp_path / "card"
    folder.mkdir()
    quadrant(320, 240).save(folder / "IMG_0001.JPG")
    write_dng(folder / "IMG_0001.NEF", quadrant(320, 240), preview=quadrant(640, 480))
    command = ["caption", str(folder), "--checkpoint", str(trained_run / "best"), "-o"]
    assert main([*command, str(tmp_path / "a.jsonl")]) == 0
    assert "captioned 2 of 2" in capsys.readouterr().err
    monkeypatch.setattr(batch, "raw_readable", lambda: False)
    assert main([*command, str(tmp_path / "b.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "note: 1 camera RAW file(s) in the folders were not captioned" in err and "pip install rawpy" in err
    assert "captioned 1 of 1" in err


def test_raw_files_are_never_rewritten_but_get_sidecars(tmp_path):
    path = write_dng(tmp_path / "DSC_0005.NEF", quadrant(320, 240), preview=quadrant(640, 480))
    before = path.read_bytes()
    outcomes = write_caption(path, "a red square", ["xmp", "exif", "iptc"])
    assert {o.status for o in outcomes} == {"unsupported"} and all("sidecar" in o.message for o in outcomes)
    assert path.read_bytes() == before
    assert {o.status for o in write_caption(path, "a red square", ["sidecar"])} == {"written"}
    xmp, txt = sidecar_paths(path)
    assert txt.read_text() == "a red square\n" and b"a red square" in xmp.read_bytes()
    assert path.read_bytes() == before
