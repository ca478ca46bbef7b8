"""Caption-file readers: COCO, Karpathy and Flickr8k formats -> ``Record`` lists.

Readers only parse and validate the caption files (errors name the file and the line or key);
image files are checked later, once, by ``prepare``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from captioner.errors import DatasetError
from captioner.manifest import Record


def _load_json(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def _need(obj: object, key: str, kind: type | tuple, where: str, path: Path) -> object:
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetError(f"{path}: {where} has no key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DatasetError(f"{path}: {where}.{key} should be {name}, got {type(value).__name__}")
    return value


def read_coco_file(path: Path, images_dir: Path, split: str) -> list[Record]:
    """One official COCO captions file (``images[]`` + ``annotations[]``) as one split."""
    data = _load_json(path)
    images = _need(data, "images", list, "top level", path)
    annotations = _need(data, "annotations", list, "top level", path)
    files: dict[int, str] = {}
    for i, img in enumerate(images):
        image_id = _need(img, "id", int, f"images[{i}]", path)
        file_name = _need(img, "file_name", str, f"images[{i}]", path)
        if image_id in files:
            raise DatasetError(f"{path}: images[{i}] repeats image id {image_id}")
        files[image_id] = file_name
    captions: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(annotations):
        image_id = _need(ann, "image_id", int, f"annotations[{i}]", path)
        caption = _need(ann, "caption", str, f"annotations[{i}]", path)
        if image_id not in files:
            raise DatasetError(f"{path}: annotations[{i}] refers to unknown image id {image_id}")
        captions[image_id].append(caption)
    return [Record(i, str(images_dir / files[i]), split, captions.get(i, [])) for i in sorted(files)]


def cut_splits(train: list[Record], val_size: int, test_size: int, seed: int, source: str) -> None:
    """Move a seeded random ``val_size`` images of ``train`` into 'val' and the next ``test_size`` into 'test'.

    The order is a shuffle of the records sorted by id, so the same ids and seed give the same cut on any
    machine; the three parts are disjoint by construction."""
    if not (val_size or test_size):
        return
    if val_size < 0 or test_size < 0:
        raise DatasetError(f"--val-size and --test-size must not be negative (got {val_size}, {test_size})")
    if val_size + test_size >= len(train):
        raise DatasetError(f"--val-size + --test-size ({val_size + test_size}) must be smaller than "
                           f"the {len(train)} images of {source}")
    order = sorted(train, key=lambda r: r.id)
    random.Random(seed).shuffle(order)
    for r in order[:val_size]:
        r.split = "val"
    for r in order[val_size:val_size + test_size]:
        r.split = "test"


def read_coco(paths: list[Path], images_dirs: list[Path], split_names: list[str] | None,
              val_size: int = 0, test_size: int = 0, seed: int = 0) -> list[Record]:
    """Several COCO files, each a split; optionally cut seeded val/test slices from the first (train)."""
    split_names = split_names or (["train", "val", "test"][: len(paths)] if len(paths) <= 3 else None)
    if split_names is None or len(split_names) != len(paths):
        raise DatasetError(f"give one --split-names entry per annotation file ({len(paths)} files)")
    if len(images_dirs) not in (1, len(paths)):
        raise DatasetError("give one --images directory, or one per annotation file")
    dirs = images_dirs * len(paths) if len(images_dirs) == 1 else images_dirs
    records: list[Record] = []
    for path, images_dir, split in zip(paths, dirs, split_names):
        records += read_coco_file(path, images_dir, split)
    cut_splits([r for r in records if r.split == split_names[0]], val_size, test_size, seed, str(paths[0]))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise DatasetError("the same image id appears in more than one annotation file")
    return records


def read_karpathy(path: Path, images_dir: Path) -> list[Record]:
    """Karpathy's dataset_{coco,flickr8k,flickr30k}.json; ``restval`` joins train."""
    data = _load_json(path)
    images = _need(data, "images", list, "top level", path)
    records = []
    seen: set[int] = set()
    for i, img in enumerate(images):
        where = f"images[{i}]"
        filename = _need(img, "filename", str, where, path)
        split = _need(img, "split", str, where, path)
        sentences = _need(img, "sentences", list, where, path)
        captions = [_need(s, "raw", str, f"{where}.sentences[{j}]", path) for j, s in enumerate(sentences)]
        image_id = img.get("cocoid", img.get("imgid", i))
        if not isinstance(image_id, int) or image_id in seen:
            raise DatasetError(f"{path}: {where} has a missing or repeated id {image_id!r}")
        seen.add(image_id)
        folder = img.get("filepath", "")
        records.append(Record(image_id, str(images_dir / folder / filename),
                              "train" if split == "restval" else split, captions))
    return records


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start})") from None


FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}  # the official split lists, beside the token file


def flickr8k_split_files(token_file: Path, given: dict[str, Path]) -> dict[str, Path]:
    """The split lists to read: the official ones beside ``token_file``, replaced or extended by ``given``."""
    return {**{split: token_file.parent / name for split, name in FLICKR8K_SPLIT_FILES.items()}, **given}


def read_flickr8k(token_file: Path, split_files: dict[str, Path], images_dir: Path) -> tuple[list[Record], list[dict]]:
    """``Flickr8k.token.txt`` plus the split lists; images listed in no split are reported, not kept.

    Ids are positions in sorted file-name order, so they are stable across runs and machines.
    """
    captions: dict[str, list[str]] = defaultdict(list)
    for lineno, line in enumerate(_read_lines(token_file), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, number = key.rpartition("#")
        if not tab or not hash_ or not number.isdigit():
            raise DatasetError(f"{token_file}:{lineno}: expected 'NAME.jpg#N<TAB>caption', got {line[:80]!r}")
        captions[name].append(caption.strip())
    split_of: dict[str, str] = {}
    for split, split_path in split_files.items():
        for lineno, name in enumerate(_read_lines(split_path), 1):
            name = name.strip()
            if not name:
                continue
            if name in split_of:
                raise DatasetError(f"{split_path}:{lineno}: {name} is already in split {split_of[name]!r}")
            split_of[name] = split
    skipped = [{"image": name, "reason": "listed in no split file"} for name in sorted(captions) if name not in split_of]
    skipped += [{"image": name, "reason": "in a split file but has no captions"}
                for name in sorted(split_of) if name not in captions]
    names = sorted(n for n in captions if n in split_of)
    ids = {name: i for i, name in enumerate(sorted(set(captions) | set(split_of)))}
    return [Record(ids[n], str(images_dir / n), split_of[n], captions[n]) for n in names], skipped
