"""The one dataclass that holds every architecture and vocabulary choice; saved in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .encoder import EncoderConfig

CELLS = ("lstm", "gru", "rnn")


@dataclass
class ModelConfig:
    """Encoder + bridge + decoder sizes. A checkpoint's config.json alone rebuilds the model."""

    vocab_size: int
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    cell: str = "lstm"  # lstm | gru | rnn (tanh, the lecture's baseline)
    layers: int = 1
    hidden: int = 512
    embed: int = 256
    dropout: float = 0.5
    feed_image: bool = False  # also feed the projected image as the first input step (Show and Tell)
    max_len: int = 30  # longest caption (tokens, without <start>/<end>) used in training
    members: int = 1  # >1: an ensemble of this many decoders of this architecture (``captioner export``)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.layers < 1 or self.hidden < 1 or self.embed < 1 or self.vocab_size < 5 or self.members < 1:
            raise ValueError(f"invalid model sizes: {self}")

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
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**{**data, "encoder": EncoderConfig.from_json(data.get("encoder", {}))})
