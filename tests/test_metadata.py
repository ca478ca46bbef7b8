"""``captioner caption --write-metadata``: captions written into photos (XMP, EXIF, IPTC) or beside them
(sidecars) without ever damaging one. Real image files made with Pillow; what was written is read back
by independent readers (Pillow's EXIF / raw XMP, and exiftool where it is installed)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli import main
from captioner.metadata import write_caption
from conftest import draw

CAPTION = "a red square on a white background"
EXIFTOOL = shutil.which("exiftool")
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool not installed (apt-get install "
                                    "libimage-exiftool-perl)")
NS = {"rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#", "dc": "http://purl.org/dc/elements/1.1/",
      "Iptc4xmpCore": "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/", "xmp": "http://ns.adobe.com/xap/1.0/"}
CREATOR_XMP = (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
               b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
               b'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="4"/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')
ARTIST = 0x013B
DESCRIPTION = 0x010E


def photo(path: Path, artist: str | None = None, description: str | bytes | None = None,
          xmp: bytes | None = None) -> Path:
    """A noisy photo (so a re-encode could not hide), optionally with EXIF Artist / description and XMP."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    if artist:
        exif[ARTIST] = artist
    if description:
        exif[DESCRIPTION] = description
    options = {"exif": exif} if len(exif) else {}
    if xmp:
        options["xmp"] = xmp
    if path.suffix == ".webp":
        options["lossless"] = True
    img.save(path, **options)
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def pillow_exif(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.getexif())


def pillow_xmp(path: Path, prop: str) -> str | None:
    """The x-default text of an XMP lang-alt property, parsed from the raw packet Pillow returns."""
    with Image.open(path) as im:
        packet = im.info.get("xmp")
    return xmp_text(packet, prop) if packet else None


def xmp_text(packet: bytes | str, prop: str) -> str | None:
    root = ET.fromstring(packet.encode() if isinstance(packet, str) else packet.strip(b"\x00 \n"))
    li = root.find(f".//{prop}/rdf:Alt/rdf:li", NS)
    return None if li is None else li.text


def exiftool(path: Path) -> dict:
    out = subprocess.run([EXIFTOOL, "-j", "-G1", str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def statuses(outcomes) -> dict[str, str]:
    return {f"{o.kind}:{Path(o.target).suffix}": o.status for o in outcomes}


# --- round trips ----------------------------------------------------------------------------------------

def test_jpeg_gets_xmp_exif_and_iptc_that_pillow_reads(tmp_path):
    path = photo(tmp_path / "a.jpg")
    outcomes = write_caption(path, CAPTION, ["xmp", "exif", "iptc"])
    assert [o.status for o in outcomes] == ["written"] * 3
    assert pillow_exif(path)[DESCRIPTION] == CAPTION
    assert pillow_xmp(path, "dc:description") == CAPTION
    assert pillow_xmp(path, "Iptc4xmpCore:AltTextAccessibility") == CAPTION


@needs_exiftool
def test_jpeg_fields_read_back_by_exiftool(tmp_path):
    path = photo(tmp_path / "a.jpg")
    caption = "a café by the sea"  # non-ASCII: IPTC gets its UTF-8 character set
    write_caption(path, caption, ["xmp", "exif", "iptc"])
    tags = exiftool(path)
    assert tags["IFD0:ImageDescription"] == caption
    assert tags["XMP-dc:Description"] == caption
    assert tags["XMP-iptcCore:AltTextAccessibility"] == caption
    assert tags["IPTC:Caption-Abstract"] == caption
    assert tags["IPTC:CodedCharacterSet"] == "UTF8"


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_png_and_webp_get_xmp_and_exif(tmp_path, suffix):
    path = photo(tmp_path / f"a{suffix}")
    outcomes = write_caption(path, CAPTION, ["xmp", "exif"])
    assert [o.status for o in outcomes] == ["written", "written"]
    assert pillow_exif(path)[DESCRIPTION] == CAPTION
    assert pillow_xmp(path, "dc:description") == CAPTION
    if EXIFTOOL:
        tags = exiftool(path)
        assert tags["XMP-dc:Description"] == CAPTION and tags["IFD0:ImageDescription"] == CAPTION


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_iptc_in_png_or_webp_is_reported_unsupported_and_the_file_is_untouched(tmp_path, suffix):
    path = photo(tmp_path / f"a{suffix}")
    before = path.read_bytes()
    [outcome] = write_caption(path, CAPTION, ["iptc"])
    assert outcome.status == "unsupported"
    assert "sidecar" in outcome.message and ("PNG" in outcome.message or "WEBP" in outcome.message)
    assert path.read_bytes() == before


def test_sidecars_work_for_any_format_and_keep_other_sidecar_fields(tmp_path):
    path = tmp_path / "anim.gif"
    draw("red", "square", "white").save(path)
    (tmp_path / "anim.xmp").write_bytes(CREATOR_XMP)
    outcomes = write_caption(path, CAPTION, ["xmp", "sidecar"])
    assert statuses(outcomes) == {"xmp:.gif": "unsupported", "sidecar:.xmp": "written", "sidecar:.txt": "written"}
    packet = (tmp_path / "anim.xmp").read_bytes()
    assert xmp_text(packet, "dc:description") == CAPTION
    assert b'Rating="4"' in packet or b"<xmp:Rating>4</xmp:Rating>" in packet
    assert (tmp_path / "anim.txt").read_text(encoding="utf-8") == CAPTION + "\n"
    if EXIFTOOL:
        assert exiftool(tmp_path / "anim.xmp")["XMP-dc:Description"] == CAPTION


# --- never damage a photo -------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_pixels_are_unchanged(tmp_path, suffix):
    path = photo(tmp_path / f"a{suffix}")
    before = pixels(path)
    kinds = ["xmp", "exif", "iptc"] if suffix == ".jpg" else ["xmp", "exif"]
    assert all(o.status == "written" for o in write_caption(path, CAPTION, kinds))
    assert np.array_equal(pixels(path), before)


def test_existing_exif_and_xmp_fields_are_kept(tmp_path):
    path = photo(tmp_path / "a.jpg", artist="Alice Example", xmp=CREATOR_XMP)
    write_caption(path, CAPTION, ["xmp", "exif", "iptc"])
    assert pillow_exif(path)[ARTIST] == "Alice Example"
    with Image.open(path) as im:
        packet = im.info["xmp"]
    assert b'Rating="4"' in packet or b"<xmp:Rating>4</xmp:Rating>" in packet
    if EXIFTOOL:
        tags = exiftool(path)
        assert tags["IFD0:Artist"] == "Alice Example" and tags["XMP-xmp:Rating"] == 4


def test_the_photo_is_replaced_atomically_keeping_its_mode(tmp_path):
    path = photo(tmp_path / "a.jpg")
    os.chmod(path, 0o640)
    inode = path.stat().st_ino
    write_caption(path, CAPTION, ["xmp", "exif"])
    assert path.stat().st_ino != inode  # a new file moved over the old one, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]  # no temporary file left behind


def test_a_symlinked_photo_stays_a_link(tmp_path):
    target = photo(tmp_path / "real.jpg")
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    write_caption(link, CAPTION, ["exif"])
    assert link.is_symlink() and pillow_exif(target)[DESCRIPTION] == CAPTION


def test_dry_run_writes_nothing(tmp_path):
    path = photo(tmp_path / "a.jpg")
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    outcomes = write_caption(path, CAPTION, ["xmp", "exif", "iptc", "sidecar"], dry_run=True)
    assert {o.status for o in outcomes} == {"would write"}
    assert all(CAPTION in o.message for o in outcomes)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


def test_an_existing_description_is_skipped_unless_overwrite(tmp_path):
    path = photo(tmp_path / "a.jpg", description="Grandma's birthday, 1987")
    before = path.read_bytes()
    [outcome] = write_caption(path, CAPTION, ["exif"])
    assert outcome.status == "skipped" and "Grandma" in outcome.message and "--overwrite-existing" in outcome.message
    assert path.read_bytes() == before
    [outcome] = write_caption(path, CAPTION, ["exif"], overwrite=True)
    assert outcome.status == "written"
    assert pillow_exif(path)[DESCRIPTION] == CAPTION


def test_an_existing_txt_sidecar_is_skipped_unless_overwrite(tmp_path):
    path = photo(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("my own notes\n")
    assert statuses(write_caption(path, CAPTION, ["sidecar"]))["sidecar:.txt"] == "skipped"
    assert (tmp_path / "a.txt").read_text() == "my own notes\n"
    write_caption(path, CAPTION, ["sidecar"], overwrite=True)
    assert (tmp_path / "a.txt").read_text() == CAPTION + "\n"


def test_writing_the_same_caption_again_changes_nothing(tmp_path):
    path = photo(tmp_path / "a.jpg")
    write_caption(path, CAPTION, ["xmp", "exif", "iptc"])
    inode, before = path.stat().st_ino, path.read_bytes()
    assert {o.status for o in write_caption(path, CAPTION, ["xmp", "exif", "iptc"])} == {"unchanged"}
    assert path.stat().st_ino == inode and path.read_bytes() == before


@needs_exiftool
def test_latin1_exif_and_iptc_descriptions_are_read_not_a_crash(tmp_path):
    """Old cameras and Windows wrote Latin-1 into EXIF ImageDescription and IPTC captions ("Caf\u00e9" as 43 61 66 E9):
    pyexiv2 raised UnicodeDecodeError, which ended a whole `caption --write-metadata` run. Such a description is an
    existing one like any other: skipped, or replaced with overwrite; the other fields are kept."""
    import pyexiv2
    path = photo(tmp_path / "old.jpg", artist="Ann", description=b"Caf\xe9 au lait")
    with pyexiv2.Image(str(path)) as img:
        img.modify_iptc({"Iptc.Application2.Caption": "Caf\u00e9 au lait"}, encoding="latin-1")
    outcomes = write_caption(path, CAPTION, ["exif", "iptc"])
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert all("Caf\u00e9 au lait" in o.message for o in outcomes)
    outcomes = write_caption(path, CAPTION, ["exif", "iptc"], overwrite=True)
    assert [o.status for o in outcomes] == ["written", "written"]
    fields = exiftool(path)
    assert fields["IFD0:ImageDescription"] == CAPTION and fields["IPTC:Caption-Abstract"] == CAPTION
    assert fields["IFD0:Artist"] == "Ann"


def test_a_photo_pillow_cannot_open_is_an_error_outcome(tmp_path):
    """A PNG whose header chunk is cut (Pillow raises ValueError, not OSError): an outcome, not an exception."""
    path = photo(tmp_path / "cut.png")
    data = bytearray(path.read_bytes())
    data[8:12] = (4).to_bytes(4, "big")  # IHDR's length: 13 -> 4
    path.write_bytes(bytes(data))
    [outcome] = write_caption(path, CAPTION, ["xmp"])
    assert outcome.status == "error" and "cannot read the photo (ValueError" in outcome.message


def test_read_only_and_vanished_photos_are_errors_naming_the_file(tmp_path):
    path = photo(tmp_path / "a.jpg")
    os.chmod(path, 0o444)
    before = path.read_bytes()
    [outcome] = write_caption(path, CAPTION, ["exif"])
    assert outcome.status == "error" and outcome.target == str(path) and "read-only" in outcome.message
    assert path.read_bytes() == before and stat.S_IMODE(path.stat().st_mode) == 0o444
    [outcome] = write_caption(tmp_path / "gone.jpg", CAPTION, ["exif"])
    assert outcome.status == "error" and "vanished" in outcome.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


# --- the command ----------------------------------------------------------------------------------------

def caption(capsys, trained_run: Path, *argv) -> tuple[int, str, str]:
    code = main(["caption", "--checkpoint", str(trained_run / "best"), "--device", "cpu", "--workers", "0",
                 *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_command_writes_metadata_and_records_it(trained_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    jpg, png = photo(folder / "a.jpg", artist="Alice"), photo(folder / "b.png")
    out = tmp_path / "captions.jsonl"
    code, _, err = caption(capsys, trained_run, folder, "-o", out, "--write-metadata", "xmp,exif,iptc")
    assert code == 0, err
    records = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    a, b = records[str(jpg)], records[str(png)]
    assert [(m["kind"], m["status"]) for m in a["metadata"]] == [("xmp", "written"), ("exif", "written"),
                                                                  ("iptc", "written")]
    assert [(m["kind"], m["status"]) for m in b["metadata"]] == [("xmp", "written"), ("exif", "written"),
                                                                  ("iptc", "unsupported")]
    assert pillow_exif(jpg)[DESCRIPTION] == a["caption"] and pillow_exif(jpg)[ARTIST] == "Alice"
    assert pillow_xmp(png, "dc:description") == b["caption"]
    assert f"unsupported: {png}: iptc:" in err
    assert "metadata (xmp,exif,iptc): 5 written, 1 unsupported" in err


def test_caption_command_read_only_photo_is_an_error_and_the_rest_go_on(trained_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    locked, fine = photo(folder / "a.jpg"), photo(folder / "b.jpg")
    os.chmod(locked, 0o444)
    before = locked.read_bytes()
    code, out, err = caption(capsys, trained_run, folder, "--write-metadata", "exif")
    assert code == 1
    assert f"error: {locked}: exif metadata: read-only file" in err
    assert pillow_exif(fine)[DESCRIPTION] and locked.read_bytes() == before
    records = {r["path"]: r for r in map(json.loads, out.splitlines())}
    assert records[str(locked)]["metadata"][0]["status"] == "error" and "caption" in records[str(locked)]


def test_caption_command_dry_run_and_skip_then_overwrite(trained_run, tmp_path, capsys):
    path = photo(tmp_path / "a.jpg", description="old words")
    before = path.read_bytes()
    code, _, err = caption(capsys, trained_run, path, "--write-metadata", "exif,sidecar", "--dry-run")
    assert code == 0 and f"would write: {tmp_path / 'a.txt'}: sidecar:" in err
    assert f"skipped: {path}: exif: already has a description ('old words')" in err
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]
    code, out, err = caption(capsys, trained_run, path, "--write-metadata", "exif", "--overwrite-existing")
    assert code == 0 and pillow_exif(path)[DESCRIPTION] == json.loads(out)["caption"]


def test_dry_run_without_write_metadata_is_refused(trained_run, tmp_path, capsys):
    code, _, err = caption(capsys, trained_run, photo(tmp_path / "a.jpg"), "--dry-run")
    assert code == 2 and "--write-metadata" in err


HEIC_METADATA = """
import sys
from captioner.metadata import write_caption
print(write_caption(sys.argv[1], "a dog runs", ["xmp"])[0].status)
"""


def test_heic_embedded_kinds_are_unsupported_with_the_sidecar_hint_even_where_nothing_decoded_it(tmp_path):
    """A Ray driver writes metadata for photos its actors decoded: in that process no HEIC was opened before, and
    the photo must still be recognised (unsupported: use sidecar), not reported unreadable."""
    pillow_heif = pytest.importorskip("pillow_heif")
    photo = tmp_path / "IMG_0004.HEIC"
    pillow_heif.from_pillow(draw("red", "square", "white")).save(photo, quality=90)
    done = subprocess.run([sys.executable, "-c", HEIC_METADATA, str(photo)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "unsupported"
    outcome = write_caption(photo, "a dog runs", ["xmp"])[0]
    assert outcome.status == "unsupported" and "sidecar" in outcome.message


def test_a_200_megapixel_photo_gets_its_caption(tmp_path):
    """Pillow's bomb guard refuses to open a JPEG over 179 MP, which the writer did to learn its format: a 200 MP
    phone photo, captioned through a reduced-scale decode, raised DecompressionBombError out of the batch. Only
    the header is read: the photo is written like any other."""
    from PIL import JpegImagePlugin
    path = tmp_path / "200mp.jpg"
    Image.new("L", (16320, 12240), 90).save(path, quality=75)
    assert [o.status for o in write_caption(path, CAPTION, ["xmp", "exif"])] == ["written"] * 2
    with JpegImagePlugin.jpeg_factory(str(path)) as im:  # Image.open would refuse it
        assert im.size == (16320, 12240)
        assert xmp_text(im.info["xmp"], "dc:description") == CAPTION
        assert im.getexif()[DESCRIPTION] == CAPTION
