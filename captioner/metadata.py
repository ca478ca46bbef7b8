"""After captioning: a photo's caption written where photo tools read alt text / descriptions.

``captioner caption … --write-metadata KIND`` calls :func:`write_caption` once per captioned photo.
The kinds, and who reads them:

- ``xmp``: XMP ``dc:description`` (the "Description"/"Caption" of Lightroom, darktable, digiKam, Windows
  Explorer, exiftool's ``XMP-dc:Description``) and ``Iptc4xmpCore:AltTextAccessibility`` (IPTC Photo
  Metadata 2021.1 "Alt Text (Accessibility)", which CMSs and WordPress plug-ins copy into ``alt=``).
  Stored in JPEG (APP1), PNG (iTXt) and WebP (XMP chunk).
- ``exif``: EXIF ``ImageDescription`` (IFD0 0x010E; Pillow's ``getexif()[270]``, macOS Preview,
  Windows "Title"). JPEG, PNG (eXIf) and WebP (EXIF chunk).
- ``iptc``: IPTC-IIM ``Caption-Abstract`` (2:120), the field news agencies, Photo Mechanic and older
  Photoshop read. JPEG only: IIM in PNG/WebP is a private exiv2/ImageMagick convention photo tools ignore.
- ``sidecar``: ``photo.xmp`` (XMP sidecar: ``dc:description`` + alt text, the basename.xmp name that
  exiftool and Lightroom use) and ``photo.txt`` (the caption alone, the convention of caption datasets)
  next to the photo; any image format.

All reading and writing of the metadata itself is done by exiv2 (``pyexiv2``), which rewrites only the
metadata segments: the compressed image data is copied byte for byte, so pixels never change. The rules
that keep a photo safe:

- the new file is written to a temporary file in the same folder, fsynced, given the photo's file mode
  and moved over the photo with ``os.replace`` (atomic: a crash leaves the old photo or the new one);
  a symlink is followed and its target replaced, so the link stays a link;
- every other EXIF / XMP / IPTC field is kept (exiv2 reads the whole block and writes it back);
- a description that is already there is only replaced with ``overwrite=True`` (else: ``skipped``);
- a read-only photo (no write permission bit, or not writable for this user) or one that vanished is an
  ``error`` outcome naming the file; the caller goes on with the next photo;
- ``dry_run=True`` reads and reports (``would write``) but writes nothing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from .errors import UNREADABLE, ImageLoadError
from .fetch import is_url
from .images import open_header
from .raw import is_raw

KINDS = ("xmp", "exif", "iptc", "sidecar")
EMBEDDED = {"JPEG": ("xmp", "exif", "iptc"), "PNG": ("xmp", "exif"), "WEBP": ("xmp", "exif")}
"""Pillow format name -> kinds stored inside the file (what exiv2 writes and photo tools read back)."""

XMP_FIELDS = ("Xmp.dc.description", "Xmp.iptc.AltTextAccessibility")  # exiv2's prefix for Iptc4xmpCore
EXIF_FIELD = "Exif.Image.ImageDescription"
IPTC_FIELD = "Iptc.Application2.Caption"
IPTC_CHARSET = "Iptc.Envelope.CharacterSet"
IPTC_UTF8 = "\x1b%G"  # ISO 2022 escape for UTF-8: without it, readers assume Latin-1 for non-ASCII captions
X_DEFAULT = 'lang="x-default"'
EMPTY_XMP_PACKET = (b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
                    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>\n<?xpacket end="w"?>\n')


def parse_kinds(text: str) -> list[str]:
    """``--write-metadata xmp,exif`` -> ["xmp", "exif"] (argparse ``type``; unknown kinds are refused)."""
    import argparse
    kinds = [k.strip().lower() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown metadata kind {', '.join(bad) or repr(text)} "
                                         f"(choose from {', '.join(KINDS)}; several: xmp,exif)")
    return kinds


@dataclass
class Outcome:
    """What happened to one kind of metadata for one photo; ``target`` is the file written (or not).

    status: ``written``, ``would write`` (dry run), ``unchanged`` (the caption is already there),
    ``skipped`` (another description is there; ``--overwrite-existing`` replaces it), ``unsupported``
    (this kind cannot be stored in this format) or ``error`` (the file could not be read or replaced).
    """

    kind: str
    target: str
    status: str
    message: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != ""}


def write_caption(path: str | os.PathLike, caption: str, kinds: list[str], dry_run: bool = False,
                  overwrite: bool = False) -> list[Outcome]:
    """Write ``caption`` into / next to the photo at ``path`` as ``kinds`` ask; one outcome per target."""
    kinds = list(dict.fromkeys(kinds))
    if is_url(path):  # ``captioner caption URL``: there is no local file to write into
        return [Outcome(k, str(path), "unsupported", "a web image (URL), not a local file") for k in kinds]
    caption = caption.strip()
    outcomes: list[Outcome] = []
    embedded = [k for k in kinds if k != "sidecar"]
    if embedded:
        outcomes += _write_embedded(Path(path), caption, embedded, dry_run, overwrite)
    if "sidecar" in kinds:
        outcomes += _write_sidecars(Path(path), caption, dry_run, overwrite)
    return outcomes


@dataclass
class MetadataWriter:
    """What ``captioner caption --write-metadata`` asked for; writes one photo at a time and keeps every
    outcome for the command's report (non-errors as ``skipped:`` / ``would write:`` lines, errors as
    ``error:`` lines and exit status 1, like a photo that could not be captioned)."""

    kinds: list[str]
    dry_run: bool = False
    overwrite: bool = False
    outcomes: list[tuple[str, Outcome]] = field(default_factory=list)

    def write(self, path: str, caption: str) -> list[dict]:
        """Write one photo's caption; the outcomes as the plain dicts the JSONL record keeps."""
        done = write_caption(path, caption, self.kinds, self.dry_run, self.overwrite)
        self.outcomes += [(path, o) for o in done]
        return [o.as_dict() for o in done]

    def failures(self) -> list[dict]:
        return [{"path": o.target, "error": f"{o.kind} metadata: {o.message}"} for _, o in self.outcomes
                if o.status == "error"]

    def notes(self) -> list[str]:
        """One line per photo and kind that was not simply written: dry run, skipped, unsupported."""
        return [f"{o.status}: {o.target}: {o.kind}: {o.message}" for _, o in self.outcomes
                if o.status in ("would write", "skipped", "unsupported")]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for _, o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        order = ("written", "would write", "unchanged", "skipped", "unsupported", "error")
        return (f"metadata ({','.join(self.kinds)}{', dry run: nothing written' if self.dry_run else ''}): "
                + (", ".join(f"{counts[k]} {k}" for k in order if k in counts) or "no captioned photos"))


# --- inside the photo -------------------------------------------------------------------------------------

def _write_embedded(path: Path, caption: str, kinds: list[str], dry_run: bool, overwrite: bool) -> list[Outcome]:
    """One read, one atomic replace for all embedded kinds of a photo."""
    import pyexiv2

    name = str(path)
    real = Path(os.path.realpath(path))
    fail = lambda message: [Outcome(k, name, "error", message) for k in kinds]  # noqa: E731
    if is_raw(path):  # Pillow would call most of them TIFF; exiv2 could write some, but a RAW original stays untouched
        return [Outcome(k, name, "unsupported", "a camera RAW file is never rewritten; --write-metadata sidecar "
                        "writes photo.xmp beside it, where Lightroom, darktable and digiKam read a RAW file's caption")
                for k in kinds]
    try:
        st = real.stat()
        with warnings.catch_warnings():  # only the header is read: a large photo's bomb warning is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_header(real, name) as im:  # a HEIC's format too, where nothing decoded one in this process
                fmt = im.format
        data = real.read_bytes()
    except FileNotFoundError:
        return fail("file vanished before its caption could be written")
    except ImageLoadError as err:
        return fail(err.reason)
    except Image.DecompressionBombError as err:
        return fail(f"refused as a possible decompression bomb ({err})")
    except UNREADABLE as err:
        return fail(f"cannot read the photo ({err.__class__.__name__}: {err})")
    supported = EMBEDDED.get(fmt or "", ())
    outcomes = {k: Outcome(k, name, "unsupported", f"cannot be stored in a {fmt} file (supported: "
                           f"{_support_table()}); --write-metadata sidecar works for any format")
                for k in kinds if k not in supported}
    todo = [k for k in kinds if k in supported]
    if todo and not dry_run and not _writable(real, st):
        for k in todo:
            outcomes[k] = Outcome(k, name, "error", f"read-only file (mode {stat.S_IMODE(st.st_mode):o}): not "
                                  "changed; make it writable, or use --write-metadata sidecar")
        todo = []
    if todo:
        try:
            img = pyexiv2.ImageData(data)
        except RuntimeError as err:
            return [outcomes.get(k) or Outcome(k, name, "error", f"exiv2 cannot read its metadata: {err}") for k in kinds]
        try:
            changed = False
            for kind in todo:
                outcomes[kind] = _apply(img, kind, name, caption, dry_run, overwrite)
                changed |= outcomes[kind].status == "written"
            new = img.get_bytes() if changed else None
        except RuntimeError as err:
            return [outcomes[k] if k not in todo else Outcome(k, name, "error", f"exiv2: {err}") for k in kinds]
        finally:
            img.close()
        if new is not None:
            try:
                _replace_atomically(real, new, st)
            except FileNotFoundError:
                return fail("file vanished before its caption could be written")
            except OSError as err:
                return fail(f"could not replace the photo, left unchanged ({err.strerror or err})")
    return [outcomes[k] for k in kinds]


def _apply(img, kind: str, target: str, caption: str, dry_run: bool, overwrite: bool) -> Outcome:
    """Read the kind's current description; decide; modify ``img`` (in memory) unless it is a dry run."""
    if kind == "xmp":
        return _apply_xmp(img, target, caption, dry_run, overwrite)
    key = EXIF_FIELD if kind == "exif" else IPTC_FIELD
    current = _read_legacy(img, kind).get(key)
    if isinstance(current, list):  # IPTC datasets may repeat; Caption-Abstract should not
        current = " ".join(current)
    verdict = _decide(kind, target, (current or "").strip(), caption, dry_run, overwrite)
    if verdict.status == "written":
        if kind == "exif":
            img.modify_exif({EXIF_FIELD: caption})
        else:
            fields = {IPTC_FIELD: caption}
            if not caption.isascii() and IPTC_CHARSET not in _read_legacy(img, "iptc"):
                fields[IPTC_CHARSET] = IPTC_UTF8
            img.modify_iptc(fields)
    return verdict


def _read_legacy(img, kind: str) -> dict:
    """EXIF or IPTC-IIM fields. Text in them is ASCII by the EXIF standard and Latin-1 by IIM's convention when no
    character set is declared, and old cameras and Windows wrote Latin-1 into both ("Caf\u00e9" as 43 61 66 E9):
    not UTF-8, so pyexiv2 raised UnicodeDecodeError, which ended a whole batch. Such fields are read as Latin-1
    (every byte is a character); only the caption field is ever written, so the others stay as they were."""
    read = img.read_exif if kind == "exif" else img.read_iptc
    try:
        return read()
    except UnicodeDecodeError:
        return read(encoding="latin-1")


def _apply_xmp(img, target: str, caption: str, dry_run: bool, overwrite: bool) -> Outcome:
    """dc:description and AltTextAccessibility are language alternatives: only x-default is set, other
    languages a photographer wrote are kept. (XMP that is not UTF-8 never gets here: exiv2 refuses the packet.)"""
    xmp = img.read_xmp()
    current = {key: _lang_alt(xmp.get(key)) for key in XMP_FIELDS}
    values = [v.get(X_DEFAULT, "").strip() for v in current.values()]
    if all(v == caption for v in values):
        existing = caption
    else:  # a description that differs decides; one of the two fields missing is simply filled in
        existing = next((v for v in values if v and v != caption), "")
    verdict = _decide("xmp", target, existing, caption, dry_run, overwrite)
    if verdict.status == "written":
        img.modify_xmp({key: {**current[key], X_DEFAULT: caption} for key in XMP_FIELDS})
    return verdict


def _lang_alt(value) -> dict:
    if isinstance(value, dict):
        return dict(value)
    return {X_DEFAULT: value} if isinstance(value, str) and value else {}


def _decide(kind: str, target: str, existing: str, caption: str, dry_run: bool, overwrite: bool) -> Outcome:
    if not caption:
        return Outcome(kind, target, "skipped", "empty caption: nothing written")
    if existing == caption:
        return Outcome(kind, target, "unchanged", "the caption is already there")
    if existing and not overwrite:
        return Outcome(kind, target, "skipped", f"already has a description ({_short(existing)!r}); "
                       "--overwrite-existing replaces it")
    verb = "would replace" if existing else "would write"
    if dry_run:
        return Outcome(kind, target, "would write", f"{verb} {caption!r}" + (f" (now {_short(existing)!r})" if existing else ""))
    return Outcome(kind, target, "written", f"replaced {_short(existing)!r}" if existing else "")


# --- next to the photo ------------------------------------------------------------------------------------

def sidecar_paths(path: Path) -> tuple[Path, Path]:
    """``photo.jpg`` -> ``photo.xmp`` (exiftool / Lightroom basename.xmp) and ``photo.txt``."""
    return path.with_suffix(".xmp"), path.with_suffix(".txt")


def _write_sidecars(path: Path, caption: str, dry_run: bool, overwrite: bool) -> list[Outcome]:
    """An existing sidecar is read and its other fields kept; a missing photo gets no sidecar."""
    xmp_path, txt_path = sidecar_paths(path)
    if not path.exists():
        return [Outcome("sidecar", str(p), "error", f"{path} vanished: no sidecar written") for p in (xmp_path, txt_path)]
    return [_write_xmp_sidecar(xmp_path, caption, dry_run, overwrite),
            _write_txt_sidecar(txt_path, caption, dry_run, overwrite)]


def _write_xmp_sidecar(path: Path, caption: str, dry_run: bool, overwrite: bool) -> Outcome:
    import pyexiv2
    name = str(path)
    real = Path(os.path.realpath(path))
    try:
        st = real.stat() if real.exists() else None
        data = real.read_bytes() if st is not None else EMPTY_XMP_PACKET
        img = pyexiv2.ImageData(data)
    except (OSError, RuntimeError) as err:
        return Outcome("sidecar", name, "error", f"cannot read the existing sidecar ({err})")
    try:
        outcome = _apply_xmp(img, name, caption, dry_run, overwrite)
        outcome.kind = "sidecar"
        if outcome.status == "written":
            return _write_file(real, name, img.get_bytes(), st, outcome)
        return outcome
    except RuntimeError as err:
        return Outcome("sidecar", name, "error", f"exiv2: {err}")
    finally:
        img.close()


def _write_txt_sidecar(path: Path, caption: str, dry_run: bool, overwrite: bool) -> Outcome:
    name = str(path)
    real = Path(os.path.realpath(path))
    try:
        st = real.stat() if real.exists() else None
        existing = real.read_text(encoding="utf-8").strip() if st is not None else ""
    except (OSError, UnicodeDecodeError) as err:
        return Outcome("sidecar", name, "error", f"cannot read the existing file ({err})")
    outcome = _decide("sidecar", name, existing, caption, dry_run, overwrite)
    if outcome.status == "written":
        return _write_file(real, name, (caption + "\n").encode("utf-8"), st, outcome)
    return outcome


def _write_file(real: Path, name: str, data: bytes, st: os.stat_result | None, outcome: Outcome) -> Outcome:
    if st is not None and not _writable(real, st):
        return Outcome(outcome.kind, name, "error", f"read-only file (mode {stat.S_IMODE(st.st_mode):o}): not changed")
    try:
        _replace_atomically(real, data, st)
    except OSError as err:
        return Outcome(outcome.kind, name, "error", f"could not write ({err.strerror or err})")
    return outcome


# --- the file system --------------------------------------------------------------------------------------

def _writable(path: Path, st: os.stat_result) -> bool:
    """Read-only means no write bit at all too: root may write anything, but a 0444 photo was made
    read-only on purpose (a card archive, a shared library) and is left alone."""
    return bool(st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(path, os.W_OK)


def _replace_atomically(path: Path, data: bytes, st: os.stat_result | None) -> None:
    """Temporary file in the same folder (same file system, so the rename is atomic), fsynced, the old
    file's mode applied, then ``os.replace``; the temporary file is removed if anything fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".captioner-tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        if st is not None and not path.exists():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _support_table() -> str:
    return "; ".join(f"{fmt}: {', '.join(kinds)}" for fmt, kinds in EMBEDDED.items())
