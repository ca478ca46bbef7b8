"""Feature cache: every manifest image encoded once, stored as a float16 memory-mapped array.

Layout: ``DATA_DIR/features/<encoder>-<weights>-<size>/`` with ``features.npy`` (N, D) float16,
``index.json`` (image ids in row order + encoder config) and ``progress.json`` (rows done). Rows
are written in order and progress is saved after each flushed batch, so an interrupted run resumes
at the first missing row instead of starting over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.encoder import Encoder, EncoderConfig, Preprocess, build_encoder
from captioner.images import ImageLoadError, load_image
from captioner.runtime import loader_workers, resolve_device

from .manifest import DatasetError, load_manifest, write_json_atomic


class ImageFiles(Dataset):
    """Decodes and preprocesses image files in DataLoader workers; failures come back as messages."""

    def __init__(self, paths: list[str], preprocess: Preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.preprocess(load_image(self.paths[i])), None
        except ImageLoadError as err:
            return i, None, str(err)


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]):
    """Stack the good images; keep the indices and errors of the bad ones."""
    good = [(i, x) for i, x, err in items if err is None]
    errors = [(i, err) for i, _, err in items if err is not None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, errors


def cache_dir(data_dir: Path, config: EncoderConfig) -> Path:
    return Path(data_dir) / "features" / config.cache_key()


class FeatureCache:
    """Read side of a finished cache: ``features[row]`` for image ``ids[row]``."""

    def __init__(self, directory: Path) -> None:
        index_path = directory / "index.json"
        if not index_path.is_file():
            raise DatasetError(f"{directory}: no feature cache; run `captioner features` first")
        index = json.loads(index_path.read_text())
        progress = json.loads((directory / "progress.json").read_text())
        self.ids: list[int] = index["ids"]
        if progress["done"] < len(self.ids):
            raise DatasetError(f"{directory}: feature cache incomplete ({progress['done']}/{len(self.ids)} rows); "
                               "run `captioner features` again to finish it")
        self.encoder = EncoderConfig.from_json(index["encoder"])
        self.features = np.load(directory / "features.npy", mmap_mode="r")
        self.row = {image_id: r for r, image_id in enumerate(self.ids)}

    def rows(self, ids: list[int]) -> np.ndarray:
        """Row numbers of these image ids (an error names the first id the cache does not have)."""
        missing = [i for i in ids if i not in self.row]
        if missing:
            raise DatasetError(f"feature cache has no row for image id {missing[0]} ({len(missing)} missing): "
                               "the manifest changed since the cache was built; rebuild it")
        return np.array([self.row[i] for i in ids], dtype=np.int64)

    def gather(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), D) float32 features of these images, in this order, in memory."""
        return torch.from_numpy(np.asarray(self.features[self.rows(ids)], dtype=np.float32))


def build_features(data_dir: Path, config: EncoderConfig, batch_size: int = 64, device: str = "auto",
                   workers: int = 2) -> Path:
    """Encode every manifest image (resuming a partial cache); return the cache directory."""
    records = load_manifest(data_dir)
    encoder, config = build_encoder(config)
    directory = cache_dir(data_dir, config)
    directory.mkdir(parents=True, exist_ok=True)
    ids = [r.id for r in records]
    index = json.loads(json.dumps({"ids": ids, "encoder": config.to_json()}))  # tuples -> lists, as read back
    index_path, progress_path, array_path = directory / "index.json", directory / "progress.json", directory / "features.npy"
    done = 0
    if index_path.is_file() and array_path.is_file() and progress_path.is_file():
        if json.loads(index_path.read_text()) == index:
            done = json.loads(progress_path.read_text())["done"]
    if done == len(ids):
        print(f"feature cache {directory} is complete ({len(ids)} images): reusing it")
        return directory
    if done == 0:
        np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float16, shape=(len(ids), config.feature_dim)).flush()
        write_json_atomic(index_path, index)
        write_json_atomic(progress_path, {"done": 0})
    else:
        print(f"resuming feature cache {directory} at row {done}/{len(ids)}")
    dev = resolve_device(device)
    encode_into(encoder.for_inference(dev), dev, [r.path for r in records], config.preprocess, array_path, progress_path,
                start=done, batch_size=batch_size, workers=workers)
    return directory


def encode_into(encoder: Encoder, dev: torch.device, paths: list[str], preprocess: Preprocess, array_path: Path,
                progress_path: Path, start: int, batch_size: int, workers: int) -> None:
    array = np.load(array_path, mmap_mode="r+")
    dataset = torch.utils.data.Subset(ImageFiles(paths, preprocess), range(start, len(paths)))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers(workers, dev),
                        collate_fn=collate_images, pin_memory=dev.type == "cuda")
    done, t0 = start, time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(paths), initial=start, desc="features", unit="img") as bar:
        for idx, pixels, errors in loader:
            if errors:
                raise DatasetError(f"cannot encode {errors[0][1]}; re-run `captioner prepare` to skip bad images")
            feats = encoder.encode(pixels.to(dev, non_blocking=True)).float().cpu().numpy()
            array[idx] = feats.astype(np.float16)  # idx: absolute row numbers, in order
            array.flush()
            done = idx[-1] + 1
            write_json_atomic(progress_path, {"done": done})
            bar.update(len(feats))
    rate = (done - start) / max(1e-9, time.perf_counter() - t0)
    print(f"encoded {done - start} images at {rate:.1f} img/s into {array_path} "
          f"({array_path.stat().st_size / 1e6:.1f} MB)")
