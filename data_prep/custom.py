"""Readers for the captions people have of their own photos: a CSV/TSV table, or a folder of photos with
same-name ``.txt`` caption files -> ``Record`` lists plus counted skips.

Like the other readers they only parse the caption files; a row or file that cannot be used is not an
error but a skip naming the file, the line and the reason (``prepare_report.json`` lists and counts them),
so one bad row never costs a whole dataset. Only a file that cannot be read at all, or a table without
the required header, is an error. Image files are checked later, once, by ``prepare``.

Ids are positions in sorted image-path order, so they are stable across runs and machines, and a seeded
``cut_splits`` (the one the COCO reader uses) is reproducible.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from captioner.errors import DatasetError
from captioner.images import IMAGE_EXTENSIONS, passed_over
from captioner.manifest import Record

from .readers import cut_splits

SPLITS = {"train": "train", "restval": "train", "val": "val", "dev": "val", "valid": "val", "validation": "val",
          "test": "test"}  # accepted split names (case-insensitive) -> the manifest's
DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "path")  # first one present names the image column


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _delimiter(path: Path, text: str) -> str:
    """From the suffix (.csv, .tsv), else sniffed from the header line among , TAB ; |."""
    if path.suffix.lower() in DELIMITERS:
        return DELIMITERS[path.suffix.lower()]
    header = text.splitlines()[0] if text else ""
    try:
        return csv.Sniffer().sniff(header, delimiters=",\t;|").delimiter
    except csv.Error:
        raise DatasetError(f"{path}: cannot tell the delimiter from the header line {header[:80]!r}; "
                           "name the file .csv or .tsv") from None


def _skip(image: str | None, path: Path, line: int | None, reason: str) -> dict:
    where = f"{path}:{line}" if line is not None else str(path)
    return {"image": image, "where": where, "reason": reason}


def _assign(rows: dict[str, dict], images_dir: Path, val_size: int, test_size: int, seed: int,
            source: str, has_split: bool) -> list[Record]:
    """``{name: {"split", "captions"}}`` -> records with stable ids; a seeded cut when there is no split column."""
    if has_split and (val_size or test_size):
        raise DatasetError(f"{source} has a split column: --val-size / --test-size cut splits only from "
                           "files without one")
    records = [Record(i, str(images_dir / name), rows[name]["split"], rows[name]["captions"])
               for i, name in enumerate(sorted(rows))]
    cut_splits([r for r in records if r.split == "train"], val_size, test_size, seed, source)
    return records


def read_table(path: Path, images_dir: Path, val_size: int = 0, test_size: int = 0,
               seed: int = 0) -> tuple[list[Record], list[dict]]:
    """A CSV/TSV file with a header naming an ``image`` and a ``caption`` column (optional ``split``); one
    row per caption, several rows per image. Image paths are relative to ``images_dir``.

    Skipped and counted, with their line numbers: rows with the wrong number of fields, no image name, an
    empty caption, an unknown or missing split name, or a split other than the image's earlier rows'."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DatasetError(f"{path}: empty file; expected a header line naming 'image' and 'caption' columns") from None
    except csv.Error as err:
        raise DatasetError(f"{path}:1: unreadable header ({err})") from None
    image_col = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
    if image_col is None or "caption" not in header:
        raise DatasetError(f"{path}:1: the header must name an 'image' and a 'caption' column "
                           f"(and optionally 'split'), got {header}")
    caption_col = header.index("caption")
    split_col = header.index("split") if "split" in header else None
    rows: dict[str, dict] = {}
    skips: list[dict] = []
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DatasetError(f"{path}:{reader.line_num}: malformed row ({err})") from None
        start, line = line + 1, reader.line_num  # a quoted caption may span lines: report where the row starts
        if not any(field.strip() for field in row):
            continue
        name = row[image_col].strip() if image_col < len(row) else ""
        if len(row) != len(header):
            skips.append(_skip(name or None, path, start, f"expected {len(header)} fields, got {len(row)}"))
            continue
        caption = row[caption_col].strip()
        if not name:
            skips.append(_skip(None, path, start, "no image name"))
            continue
        if not caption:
            skips.append(_skip(name, path, start, "empty caption"))
            continue
        split = "train"
        if split_col is not None:
            given = row[split_col].strip()
            if given.lower() not in SPLITS:
                reason = "no split name" if not given else f"unknown split name {given!r}"
                skips.append(_skip(name, path, start, f"{reason} (use train, val or test)"))
                continue
            split = SPLITS[given.lower()]
        entry = rows.setdefault(name, {"split": split, "captions": []})
        if entry["split"] != split:
            skips.append(_skip(name, path, start, f"split {split!r}, but earlier rows put the image in "
                                                  f"{entry['split']!r}"))
            continue
        entry["captions"].append(caption)
    return _assign(rows, images_dir, val_size, test_size, seed, str(path), split_col is not None), skips


def read_folder(folder: Path, val_size: int = 0, test_size: int = 0,
                seed: int = 0) -> tuple[list[Record], list[dict]]:
    """Every photo under ``folder`` (recursively) with a same-name ``.txt`` beside it (``dog.jpg`` +
    ``dog.txt``), one caption per line, blank lines ignored. Splits: a seeded random cut.

    Skipped and counted: photos without a caption file or with no caption in it, caption files that are
    not UTF-8, caption files with no photo, and caption files that two photos (``a.jpg``, ``a.png``) share.
    Hidden and system files and folders are passed over (``images.passed_over``), as ``captioner caption`` does."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    photos: dict[Path, list[Path]] = defaultdict(list)  # caption file -> photos it belongs to
    texts: set[Path] = set()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(passed_over(part) for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() == ".txt":
            texts.add(path)
        elif path.name.lower().endswith(IMAGE_EXTENSIONS):
            photos[path.with_suffix(".txt")].append(path)
    rows: dict[str, dict] = {}
    skips: list[dict] = []
    for txt in sorted(texts - set(photos)):
        skips.append(_skip(None, txt, None, "caption file with no photo of the same name"))
    for txt, images in sorted(photos.items()):
        names = [str(p.relative_to(folder)) for p in images]
        if len(images) > 1:
            skips += [_skip(n, txt, None, f"{txt.name} belongs to {len(images)} photos ({', '.join(names)})")
                      for n in names]
            continue
        if txt not in texts:
            skips.append(_skip(names[0], txt, None, "no caption file"))
            continue
        try:
            lines = _read_text(txt).splitlines()
        except DatasetError as err:
            skips.append(_skip(names[0], txt, None, str(err).removeprefix(f"{txt}: ")))
            continue
        captions = [c.strip() for c in lines if c.strip()]
        if not captions:
            skips.append(_skip(names[0], txt, None, "empty caption file"))
            continue
        rows[names[0]] = {"split": "train", "captions": captions}
    return _assign(rows, folder, val_size, test_size, seed, str(folder), False), skips
