"""The on-disk dataset every reader produces: one record per image with all its raw captions."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.errors import DatasetError

MANIFEST = "manifest.json"
VOCAB = "vocab.json"
REPORT = "prepare_report.json"
FORMAT = "captioner-manifest/1"


@dataclass
class Record:
    """One image: a stable integer id (COCO image_id where the source has one), its file, split, captions."""

    id: int
    path: str
    split: str
    captions: list[str]


# File names that are not UTF-8: old Windows systems and cameras wrote Latin-1 names ("caf\xe9.jpg"), which reach
# Python as str with lone surrogates ("caf\udce9.jpg"). Files that list photos keep them so that the photo is found
# again (--resume, a manifest): a CSV row holds the name's own bytes (written and read with this error handler), JSON
# escapes them (``json_text``); a terminal or a page shows them as U+FFFD (``displayable``).
SURROGATES = "surrogateescape"


def displayable(text: str) -> str:
    """``text`` with a name's undecodable bytes shown as U+FFFD."""
    return text.encode("utf-8", SURROGATES).decode("utf-8", "replace")


def json_text(data: object, **options) -> str:
    """JSON with non-ASCII text kept readable, unless a name that is not UTF-8 (``SURROGATES``) would make it
    unwritable as UTF-8: then it is escaped (\\udce9), which ``json.load`` reads back to the same str."""
    text = json.dumps(data, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, **options)
    return text


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON through a temp file + rename so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json_text(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_manifest(data_dir: Path, records: list[Record], source: str) -> None:
    write_json_atomic(data_dir / MANIFEST, {"format": FORMAT, "source": source,
                                            "records": [asdict(r) for r in records]})


def load_manifest(data_dir: str | Path) -> list[Record]:
    """Records of a prepared data directory; a clear error if it was not prepared."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no manifest; run `captioner prepare ... --out {data_dir}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise DatasetError(f"{path}: unknown manifest format {data.get('format')!r}")
        return [Record(**r) for r in data["records"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: corrupt manifest ({err})") from None


def split_records(records: list[Record], split: str) -> list[Record]:
    """Records of one split, with a clear error when the split is empty or unknown."""
    chosen = [r for r in records if r.split == split]
    if not chosen:
        known = sorted({r.split for r in records})
        raise DatasetError(f"split {split!r} has no images; the manifest has {known}")
    return chosen
