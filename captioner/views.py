"""Training views: random crops of each training photo and what enters the CNN's last blocks, cached.

Why: the feature cache makes training cheap because the CNN never runs per step, but it holds one centre
crop per photo, and a frozen CNN cannot learn what the captions need. This cache keeps both levers cheap:
``views`` random resized crops (and flips) of every training photo besides its centre crop, encoded once,
one drawn per photo and epoch (``train --views``); and instead of the pooled feature, the activations that
enter the CNN's last ``tail`` blocks, so that ``train --tune-blocks`` runs and trains only those blocks
per step (for MobileNetV2's last two, ~0.13 s per 128 captions on the 2-core CPU) instead of the whole CNN.

Layout: ``DATA_DIR/features/<encoder>-views<V>-tail<K>/``, as the feature cache (``features.fill_cache``:
resumable, unreadable images reported), its array (N, V + 1, *shape) with view 0 the centre crop; only
the training split's rows have views 1..V. ``index.json`` records the augmentation, the seed and the
SHA-256 of the blocks that made the activations, so a cache is never used with other weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .encoder import Encoder, EncoderConfig, Preprocess, run_laid_out, split_encoder, state_digest
from .errors import ConfigError, DatasetError, ImageLoadError
from .features import (FeatureCache, build_features, cache_complete, cache_dir, collate_images, feature_index,
                       fill_cache)
from .images import load_image
from .manifest import Record, load_manifest
from .runtime import resolve_device


@dataclass(frozen=True)
class Augment:
    """One random view: a crop of ``scale`` of the resized photo's area at an aspect ratio within ``ratio``,
    resized to the encoder's input, mirrored with probability ``flip``. Milder than ImageNet's (8-100 %):
    a caption describes the whole scene, and a crop that loses its subject makes the caption wrong."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    seed: int = 0

    def __call__(self, img: Image.Image, preprocess: Preprocess, image_id: int, view: int) -> torch.Tensor:
        """View ``view`` (>= 1) of image ``image_id``: the same pixels every time it is asked for."""
        rng = random.Random(f"{self.seed}:{image_id}:{view}")
        img = TF.resize(img, [preprocess.resize], interpolation=InterpolationMode(preprocess.interpolation),
                        antialias=True)
        area = img.width * img.height * rng.uniform(*self.scale)
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = min(img.width, round(math.sqrt(area * aspect)))
        h = min(img.height, round(math.sqrt(area / aspect)))
        top, left = rng.randint(0, img.height - h), rng.randint(0, img.width - w)
        img = TF.resized_crop(img, top, left, h, w, [preprocess.crop, preprocess.crop],
                              interpolation=InterpolationMode(preprocess.interpolation), antialias=True)
        if rng.random() < self.flip:
            img = TF.hflip(img)
        return preprocess.normalise(img)


class ViewImages(Dataset):
    """Image ``i`` -> (i, (k, 3, H, W) pixels: its centre crop, then ``views[i]`` random views, or None, error)."""

    def __init__(self, records: list[Record], preprocess: Preprocess, views: list[int], augment: Augment) -> None:
        self.records, self.preprocess, self.views, self.augment = records, preprocess, views, augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        record = self.records[i]
        try:
            img = load_image(record.path, self.preprocess.min_side)
        except ImageLoadError as err:
            return i, None, str(err)
        crops = [self.preprocess(img)] + [self.augment(img, self.preprocess, record.id, v)
                                          for v in range(1, self.views[i] + 1)]
        return i, torch.stack(crops), None


def concat_views(pixels: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """A batch's (k_i, 3, H, W) view stacks -> (all their views, k_i per image): ``collate_images``'s combine."""
    return torch.cat(pixels), [len(x) for x in pixels]


def untuned(config: EncoderConfig) -> EncoderConfig:
    """The config without its "tuned" mark. Why: tuning the last blocks leaves the stem as it was, so a model's
    view cache stays valid while those blocks change (``stem_sha256`` is what guards the cache)."""
    return dataclasses.replace(config, provenance={k: v for k, v in config.provenance.items() if k != "tuned"})


def view_cache_dir(data_dir: Path, config: EncoderConfig, views: int, tail: int) -> Path:
    return Path(data_dir) / "features" / f"{untuned(config).cache_key()}-views{views}-tail{tail}"


def cache_index(records: list[Record], config: EncoderConfig, stem: nn.Module, views: int, tail: int,
                split: str, augment: Augment) -> dict:
    """What a view cache was made from; equal indexes mean interchangeable caches."""
    return {"ids": [r.id for r in records], "encoder": untuned(config).to_json(), "views": views, "tail": tail,
            "view_split": split, "augment": asdict(augment), "stem_sha256": state_digest(stem)}


def build_view_cache(data_dir: Path, config: EncoderConfig, encoder: Encoder, views: int, tail: int,
                     split: str = "train", augment: Augment = Augment(), batch_size: int = 16, device: str = "auto",
                     workers: int = 2) -> Path:
    """Encode every manifest image's centre crop, and ``views`` random views of each ``split`` image, up to
    the input of ``encoder``'s last ``tail`` blocks (``tail`` 0: the pooled feature); return the directory."""
    if views < 0:
        raise ConfigError(f"views must be >= 0, got {views}")
    records = load_manifest(data_dir)
    dev = resolve_device(device)
    model = copy.deepcopy(encoder).for_inference(dev)  # a copy: for_inference changes the weights' layout
    stem, _ = split_encoder(model, tail, config.name)
    index = cache_index(records, config, stem, views, tail, split, augment)
    stored = stem if tail else model  # tail 0: the pooled feature, i.e. the whole encoder
    with torch.no_grad():
        shape = tuple(stored(torch.zeros(1, 3, config.image_size, config.image_size, device=dev)).shape[1:])

    def encode(batch: tuple[torch.Tensor, list[int]]) -> np.ndarray:
        pixels, counts = batch
        out = run_laid_out(stored, pixels.to(dev, non_blocking=True)).float().cpu().numpy()
        rows = np.zeros((len(counts), views + 1, *shape), dtype=np.float32)  # rows without views stay zero
        rows[np.repeat(np.arange(len(counts)), counts), np.concatenate([np.arange(c) for c in counts])] = out
        return rows

    dataset = ViewImages(records, config.preprocess, [views if r.split == split else 0 for r in records], augment)
    return fill_cache(view_cache_dir(data_dir, config, views, tail), index, (views + 1, *shape), records, dataset,
                      encode, functools.partial(collate_images, combine=concat_views), batch_size, dev, workers)


def ensure_view_cache(data_dir: Path, config: EncoderConfig, encoder: Encoder, views: int, tail: int,
                      device: str = "auto", workers: int = 2) -> None:
    """Build (or finish) the view cache unless it is complete."""
    directory = view_cache_dir(data_dir, config, views, tail)
    if not cache_complete(directory):
        print(f"no complete view cache at {directory}: building it")
        build_view_cache(data_dir, config, encoder, views, tail, device=device, workers=workers)


def open_view_cache(data_dir: Path, config: EncoderConfig, encoder: Encoder, views: int,
                    tail: int) -> tuple[FeatureCache, nn.Module]:
    """The view cache and the blocks that turn its rows into ``encoder``'s features (sharing its weights;
    ``Identity`` for ``tail`` 0, whose rows are features); refused when the cache was made by other weights
    than ``encoder``'s stem."""
    stem, blocks = split_encoder(encoder, tail, config.name)
    cache = FeatureCache(view_cache_dir(data_dir, config, views, tail))
    if cache.index.get("stem_sha256") != state_digest(stem) or not cache.encoder.same_features(untuned(config)):
        raise ConfigError(f"{cache.directory}: made by other CNN weights than this model's; delete it to rebuild it")
    return cache, blocks if tail else nn.Identity()


class CentreCrops(Dataset):
    """Image ``i`` -> (i, its centre crop's cached row, None), or (i, None, error) where the view cache
    could not read the photo: ``fill_cache``'s dataset, reading the view cache instead of the image files."""

    def __init__(self, cache: FeatureCache, records: list[Record]) -> None:
        self.cache, self.records = cache, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        image_id = self.records[i].id
        if image_id in self.cache.failed:
            return i, None, self.cache.failed[image_id]["error"]
        return i, torch.from_numpy(np.asarray(self.cache.features[self.cache.row[image_id], 0], np.float32)), None


def features_from_view_cache(data_dir: Path, config: EncoderConfig, encoder: Encoder, batch_size: int = 64,
                             device: str = "auto") -> Path | None:
    """Make ``encoder``'s feature cache from a complete view cache of its CNN by running only the blocks the
    view cache stops before on the stored centre crops; None (nothing written) when no view cache fits.

    Why: a model trained with ``--tune-blocks`` needs its own feature cache (``features --checkpoint``), and
    the view cache its training read already holds what enters those blocks: for a ResNet-152 with its last
    block tuned this takes 30 s on the 2-core CPU where a CNN pass over Flickr8k's photos takes 19 min. A
    view cache fits when it was made from this manifest by the same weights up to its depth (any number of
    views; the shallowest fitting one is used). Its rows are float16, so the features differ from a CNN pass
    by about the feature cache's own float16 rounding (max 0.0011 on that ResNet-152): the index is the
    same, and either cache serves for the other."""
    records = load_manifest(data_dir)
    prefix = f"{untuned(config).cache_key()}-views"
    found = []
    for directory in Path(data_dir, "features").glob(f"{prefix}*-tail*"):
        views, _, tail = directory.name.removeprefix(prefix).partition("-tail")
        if views.isdigit() and tail.isdigit() and cache_complete(directory):
            found.append((int(tail), int(views)))
    for tail, views in sorted(found):
        try:
            cache, blocks = open_view_cache(data_dir, config, encoder, views, tail)
        except ConfigError:  # made by other weights than this encoder's stem
            continue
        if cache.ids != [r.id for r in records]:
            continue
        print(f"view cache {cache.directory}: its centre crops through the last {tail} block(s) give the features")
        dev = resolve_device(device)
        blocks = copy.deepcopy(blocks).eval().to(dev)  # a copy: the caller's encoder keeps its device and mode
        return fill_cache(cache_dir(data_dir, config), feature_index(records, config), (config.feature_dim,),
                          records, CentreCrops(cache, records),
                          lambda rows: view_features(blocks, rows.to(dev)).cpu().numpy(),
                          collate_images, batch_size, dev, workers=0)
    return None


def make_features(data_dir: Path, config: EncoderConfig, encoder: Encoder, batch_size: int = 64,
                  device: str = "auto", workers: int = 2) -> Path:
    """``encoder``'s feature cache, from a fitting view cache when there is one (``features_from_view_cache``),
    else by a CNN pass over the photos (``build_features``, which also reuses or resumes a cache already
    there): what `captioner features` and training run."""
    derived = None
    if not cache_complete(cache_dir(data_dir, config)):
        derived = features_from_view_cache(data_dir, config, encoder, batch_size, device)
    return derived or build_features(data_dir, config, batch_size, device, workers, encoder)


@torch.no_grad()
def view_features(blocks: nn.Module, rows: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(N, *row shape) cached rows -> (N, D) float32 features through the frozen ``blocks``."""
    return torch.cat([blocks(x.float()).float() for x in rows.split(chunk)]) if len(rows) else rows.float()


def draw_views(n: int, views: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) view of each training image for this epoch: a pure function of (seed, epoch), so that a resumed
    epoch draws the same views as the uninterrupted one."""
    return torch.randint(views + 1, (n,), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def model_features(data_dir: Path, config: EncoderConfig, encoder: Encoder, views: int, train: list[Record],
                   val: list[Record], device: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's own features, for what trains on top of it (``captioner scst``, ``captioner matching``):
    (N, views + 1, D) of the ``train`` records, view 0 the centre crop, through the CNN's tuned blocks; with
    ``views`` 0 the feature cache's one view (N, 1, D). And (N_val, D) centre crops of ``val``. A missing
    cache is made first (``make_features``, ``ensure_view_cache``), as training makes its own."""
    if not views:
        directory = cache_dir(data_dir, config)
        if not cache_complete(directory):
            print(f"no complete feature cache at {directory}: building it")
            make_features(data_dir, config, encoder, device=device)
        cache = FeatureCache(directory)
        missing = [r.id for r in train if r.id in cache.failed]
        if missing:
            raise DatasetError(f"{cache.directory}: {len(missing)} training images could not be encoded "
                               f"(e.g. id {missing[0]}); fix or re-prepare the data directory")
        return cache.gather([r.id for r in train])[:, None], cache.gather([r.id for r in val])
    tail = config.provenance.get("tuned", {}).get("blocks", 0)
    if tail == "all":
        raise ConfigError("views: this model's whole CNN was trained (--finetune-encoder), so no view cache "
                          "holds its activations; leave out --views")
    ensure_view_cache(data_dir, config, encoder, views, tail, device)
    cache, blocks = open_view_cache(data_dir, config, encoder, views, tail)
    rows = cache.gather([r.id for r in train], np.float16)  # (N, views + 1, *shape)
    features = view_features(blocks, rows.flatten(0, 1)).view(*rows.shape[:2], -1)
    return features, view_features(blocks, cache.gather([r.id for r in val])[:, 0])
