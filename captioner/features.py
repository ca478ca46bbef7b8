"""Image files -> pixels -> features: the image datasets and the feature cache.

The cache: every manifest image encoded once, stored as a float16 memory-mapped array.

Layout: ``DATA_DIR/features/<encoder>-<weights>-<size>/`` with ``features.npy`` (N, D) float16,
``index.json`` (image ids in row order + encoder config), ``progress.json`` (rows done) and
``report.json`` (``failed``: the images that could not be read, with the reason). Rows are written in
order and progress is saved after each flushed batch, so an interrupted run resumes at the first
missing row instead of starting over. An unreadable image does not stop the run (hours of encoding
are not lost to one bad file): its row stays empty, it is listed in the report, the next run of
``captioner features`` retries it, and training refuses to use the cache for it, naming it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from captioner.encoder import Encoder, EncoderConfig, Preprocess, build_encoder
from captioner.errors import DatasetError, ImageLoadError
from captioner.fetch import FetchConfig
from captioner.images import load_image
from captioner.runtime import loader_workers, resolve_device

from .captions import CaptionTensors
from .manifest import Record, load_manifest, write_json_atomic

INDEX, PROGRESS, ARRAY, FAILURES = "index.json", "progress.json", "features.npy", "report.json"


class ImageFiles(Dataset):
    """Decodes and preprocesses image files in DataLoader workers; failures come back as messages.

    Large JPEGs are decoded at the smallest DCT scale that still covers ``preprocess.min_side``
    (``load_image``'s ``min_side``); ``full_decode=True`` decodes every pixel (for comparisons only:
    on the bundled model's Flickr8k test split both give the same captions, see benchmarks/README.md).
    An http(s) URL among ``paths`` is downloaded under ``fetch``. ``uint8=True`` returns the cropped pixels
    unnormalised (``Preprocess.to_uint8``) for a device that normalises them itself (``Captioner.encode``).
    """

    def __init__(self, paths: list[str], preprocess: Preprocess, full_decode: bool = False,
                 fetch: FetchConfig = FetchConfig(), uint8: bool = False) -> None:
        self.paths, self.preprocess, self.fetch = paths, preprocess, fetch
        self.min_side = None if full_decode else preprocess.min_side
        self.pixels = preprocess.to_uint8 if uint8 else preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.pixels(load_image(self.paths[i], self.min_side, self.fetch)), None
        except ImageLoadError as err:
            return i, None, str(err)

    def __getitems__(self, indices: list[int]) -> list[tuple[int, torch.Tensor | None, str | None]]:
        """A DataLoader batch. In the main process (no workers: ``stream`` on a CPU) its images are decoded
        on every core at once, as JPEG decoding and resizing release the GIL; otherwise the cores but one
        would idle between encoder batches. Why: entropy-decoding a 12 MP JPEG costs ~9 ms on one core
        even at 1/8 scale, more than the rest of the pipeline spends per image."""
        threads = min(len(indices), os.cpu_count() or 1)
        if get_worker_info() is not None or threads < 2:
            return [self[i] for i in indices]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.__getitem__, indices))


class PairIndex(Dataset):
    """Caption-pair indices for training on cached features: a batch is gathered from in-memory tensors by
    the loader's ``collate_fn``, so a step never touches the disk."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class ImagePairs(Dataset):
    """(pixels, caption row) pairs for end-to-end encoder fine-tuning (``train --finetune-encoder``)."""

    def __init__(self, images: ImageFiles, caps: CaptionTensors) -> None:
        self.images, self.caps = images, caps

    def __len__(self) -> int:
        return len(self.caps.tokens)

    def __getitem__(self, i: int):
        _, pixels, error = self.images[int(self.caps.pair_image[i])]
        if error:
            raise DatasetError(error)
        return pixels, i


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]], combine: Callable = torch.stack):
    """``combine`` the good images' pixels (stacked); keep the indices and errors of the bad ones."""
    good = [(i, x) for i, x, err in items if err is None]
    errors = [(i, err) for i, _, err in items if err is not None]
    pixels = combine([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, errors


def cache_dir(data_dir: Path, config: EncoderConfig) -> Path:
    return Path(data_dir) / "features" / config.cache_key()


class FeatureCache:
    """Read side of a finished cache: ``features[row]`` for image ``ids[row]``."""

    def __init__(self, directory: Path) -> None:
        index_path = directory / INDEX
        if not index_path.is_file():
            raise DatasetError(f"{directory}: no feature cache; run `captioner features` first (with --checkpoint "
                               "CHECKPOINT for a model whose CNN blocks were tuned)")
        index = json.loads(index_path.read_text())
        progress = json.loads((directory / PROGRESS).read_text())
        self.index, self.ids = index, index["ids"]
        if progress["done"] < len(self.ids):
            raise DatasetError(f"{directory}: feature cache incomplete ({progress['done']}/{len(self.ids)} rows); "
                               "run `captioner features` again to finish it")
        self.encoder = EncoderConfig.from_json(index["encoder"])
        self.features = np.load(directory / ARRAY, mmap_mode="r")
        self.row = {image_id: r for r, image_id in enumerate(self.ids)}
        self.directory, self.failed = directory, read_failures(directory)

    def rows(self, ids: list[int]) -> np.ndarray:
        """Row numbers of these image ids; an error names the ids the cache has no row or no feature for."""
        missing = [i for i in ids if i not in self.row]
        if missing:
            raise DatasetError(f"feature cache has no row for image id {missing[0]} ({len(missing)} missing): "
                               "the manifest changed since the cache was built; rebuild it")
        unreadable = sorted({i for i in ids if i in self.failed})
        if unreadable:
            first, more = self.failed[unreadable[0]], " ..." if len(unreadable) > 5 else ""
            raise DatasetError(f"{len(unreadable)} image(s) could not be encoded by `captioner features`: ids "
                               f"{unreadable[:5]}{more} (first: {first['path']}: {first['error']}; "
                               f"all listed in {self.directory / FAILURES}); replace the files and run `captioner "
                               "features` again (it retries only those), or re-run `captioner prepare`, which "
                               "leaves unreadable images out")
        return np.array([self.row[i] for i in ids], dtype=np.int64)

    def gather(self, ids: list[int], dtype: type = np.float32) -> torch.Tensor:
        """(len(ids), *row shape) features of these images, in this order, in memory."""
        return torch.from_numpy(np.asarray(self.features[self.rows(ids)], dtype=dtype))


def cache_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished cache (feature or view cache)."""
    try:
        FeatureCache(directory)
        return True
    except (DatasetError, FileNotFoundError):
        return False


def read_failures(directory: Path) -> dict[int, dict]:
    """The cache's unreadable images by id, ``{"id", "path", "error"}`` (none in caches older than the report)."""
    path = directory / FAILURES
    return {f["id"]: f for f in json.loads(path.read_text())["failed"]} if path.is_file() else {}


def feature_index(records: list[Record], config: EncoderConfig) -> dict:
    """What a feature cache was made from: the images and the encoder (equal indexes, interchangeable caches)."""
    return {"ids": [r.id for r in records], "encoder": config.to_json()}


def build_features(data_dir: Path, config: EncoderConfig, batch_size: int = 64, device: str = "auto",
                   workers: int = 2, encoder: Encoder | None = None) -> Path:
    """Encode every manifest image (resuming a partial cache, retrying the images that failed before); return
    the cache directory. Unreadable images are printed as warnings and listed in the cache's report.
    ``encoder``: a built one whose ``config`` this is (a checkpoint's, e.g. with tuned blocks); default: built
    from ``config``, its weights file hash-checked."""
    records = load_manifest(data_dir)
    if encoder is None:
        encoder, config = build_encoder(config)
    else:
        encoder = copy.deepcopy(encoder)  # for_inference changes the weights' layout; the caller may be training it
    dev = resolve_device(device)
    model = encoder.for_inference(dev)
    dataset = ImageFiles([r.path for r in records], config.preprocess)
    return fill_cache(cache_dir(data_dir, config), feature_index(records, config), (config.feature_dim,), records,
                      dataset,
                      lambda batch: model.encode(batch.to(dev, non_blocking=True)).float().cpu().numpy(),
                      collate_images, batch_size, dev, workers)


def fill_cache(directory: Path, index: dict, shape: tuple[int, ...], records: list[Record], dataset: Dataset,
               encode: Callable, collate: Callable, batch_size: int, dev: torch.device, workers: int) -> Path:
    """Create or resume the cache in ``directory``: a (len(records), *shape) float16 array whose row r is
    ``encode`` of ``dataset[r]``'s pixels (as batched by ``collate``), described by ``index``. A cache
    with another index starts over; one that is complete and has no failures is reused."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = [r.id for r in records]
    index = json.loads(json.dumps(index))  # tuples -> lists, as read back
    index_path, progress_path, array_path = directory / INDEX, directory / PROGRESS, directory / ARRAY
    done = 0
    if index_path.is_file() and array_path.is_file() and progress_path.is_file():
        if json.loads(index_path.read_text()) == index:
            done = json.loads(progress_path.read_text())["done"]
    failed = read_failures(directory) if done else {}
    if done == len(ids) and not failed:
        print(f"feature cache {directory} is complete ({len(ids)} images): reusing it")
        return directory
    if done == 0:
        np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float16, shape=(len(ids), *shape)).flush()
        write_json_atomic(index_path, index)
        write_json_atomic(directory / FAILURES, {"failed": []})
        write_json_atomic(progress_path, {"done": 0})
    elif done < len(ids):
        print(f"resuming feature cache {directory} at row {done}/{len(ids)}")
    if failed:
        print(f"retrying {len(failed)} image(s) that could not be encoded before")
    row_of = {image_id: r for r, image_id in enumerate(ids)}
    rows = sorted({row_of[i] for i in failed} | set(range(done, len(ids))))
    failed = encode_into(encode, dev, records, dataset, collate, directory, rows, failed, batch_size, workers)
    for failure in failed.values():
        print(f"warning: image id {failure['id']}: {failure['path']}: {failure['error']}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} image(s) could not be encoded (listed in {directory / FAILURES}); training needs them: "
              "replace the files and run `captioner features` again, or re-run `captioner prepare`", file=sys.stderr)
    return directory


def encode_into(encode: Callable, dev: torch.device, records: list[Record], dataset: Dataset, collate: Callable,
                directory: Path, rows: list[int], failed: dict[int, dict], batch_size: int,
                workers: int) -> dict[int, dict]:
    """Encode these rows of the cache, in order. After each batch the features are flushed, then the report,
    then the progress (rows attempted), so a kill loses at most one batch. ``failed`` (by image id) gains
    the images that cannot be read and loses those that now encode; the result is the updated report."""
    array_path, progress_path = directory / ARRAY, directory / PROGRESS
    array = np.load(array_path, mmap_mode="r+")
    done = json.loads(progress_path.read_text())["done"]
    loader = DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                        num_workers=loader_workers(workers, dev), collate_fn=collate, pin_memory=dev.type == "cuda")
    encoded, t0 = 0, time.perf_counter()
    # fork_rng: the loader draws its seed from the global generator, and a training run that builds its cache
    # first must see the same random numbers (initial weights, dropout) as one that finds it built
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), tqdm(total=len(rows), desc="features",
                                                                        unit="img") as bar:
        for idx, pixels, errors in loader:
            if pixels is not None:
                array[idx] = encode(pixels).astype(np.float16)  # idx: absolute row numbers, in order
                array.flush()
            for row in idx:
                failed.pop(records[row].id, None)
            for row, error in errors:
                record = records[row]
                failed[record.id] = {"id": record.id, "path": record.path, "error": error.removeprefix(f"{record.path}: ")}
            write_json_atomic(directory / FAILURES, {"failed": list(failed.values())})
            done = max(done, 1 + max(idx + [row for row, _ in errors]))
            write_json_atomic(progress_path, {"done": done})
            encoded += len(idx)
            bar.update(len(idx) + len(errors))
    rate = encoded / max(1e-9, time.perf_counter() - t0)
    print(f"encoded {encoded} images at {rate:.1f} img/s into {array_path} "
          f"({array_path.stat().st_size / 1e6:.1f} MB)")
    return failed
