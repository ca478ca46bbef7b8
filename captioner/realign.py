"""Between feature and tags: the ImageNet head re-aligned to a CNN whose last blocks were tuned on captions.

Why: ``train --tune-blocks`` trains the CNN's last blocks for captioning, but the ImageNet classifier head kept
beside it (tags, guided decoding, the caption confidence's tag signal) was trained on the untuned CNN and reads the
tuned features with drift: on Flickr8k val the bundled model's head named the untuned CNN's top class for 58 % of the
photos, and on a street photo "bus 0.52, truck 0.41" had become "truck 0.78, bus 0.19", so guidance forced "truck".
``realign_head`` fits a per-channel scale and shift of the tuned features so that the head says on them what it says
on the untuned CNN's features (KL divergence over the training photos; the step with the lowest val KL is kept, the
untouched head included) and folds them into the head's last ``Linear``: same shape, no extra cost per photo. Per
channel rather than a new head: 2 × D numbers fitted on a few thousand photos (a whole new head, 1,000 × D,
fitted worse on val: MODEL_CARD.md). It always starts from the base weights' own head, so running it again gives
the same head.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, replace_encoder_tensors
from .encoder import build_encoder
from .errors import ConfigError, EncoderError
from .manifest import load_manifest, split_records
from .views import model_features, untuned


@dataclass
class RealignConfig:
    """How the scale and shift are fitted (Adam on minibatches of training photos)."""

    steps: int = 1500
    lr: float = 1e-3
    batch_size: int = 256
    eval_every: int = 100  # val KL every this many steps; the best is kept
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or not self.lr > 0:
            raise ConfigError("realign: steps, batch size and eval interval must be >= 1 and lr > 0")


def last_linear(head: nn.Module) -> tuple[str, nn.Linear]:
    """The head's last ``Linear`` and its name inside the head (``"1"`` for MobileNet's dropout + linear,
    ``""`` for a ResNet's bare ``fc``)."""
    found = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise EncoderError("the encoder's classifier head has no Linear layer to re-align")
    return found[-1]


def fold(linear: nn.Linear, scale: torch.Tensor, shift: torch.Tensor) -> nn.Linear:
    """A copy of ``linear`` computing ``linear(x * scale + shift)`` for every x: W·diag(scale), b + W·shift."""
    out = copy.deepcopy(linear).float()
    with torch.no_grad():
        out.weight.copy_(linear.weight.float() * scale[None, :])
        out.bias.copy_(linear.bias.float() + linear.weight.float() @ shift)
    return out


def _kl(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return nn.functional.kl_div(torch.log_softmax(logits, -1), teacher, reduction="batchmean")


@torch.no_grad()
def agreement(linear: nn.Linear, features: torch.Tensor, teacher: torch.Tensor) -> float:
    """Fraction of photos whose top class under ``linear`` is the teacher's top class."""
    return float((linear(features).argmax(1) == teacher.argmax(1)).float().mean())


def fit_channel_affine(linear: nn.Linear, tuned: torch.Tensor, teacher: torch.Tensor, val_tuned: torch.Tensor,
                       val_teacher: torch.Tensor, config: RealignConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(scale, shift) of the tuned features minimising KL(teacher || softmax(linear(x * scale + shift))) on the
    training rows, chosen by val KL among the evaluated steps (step 0, the identity, included); and a report."""
    linear = copy.deepcopy(linear).float().requires_grad_(False)
    scale = torch.ones(tuned.shape[1], requires_grad=True)
    shift = torch.zeros(tuned.shape[1], requires_grad=True)
    opt = torch.optim.Adam([scale, shift], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    def val_kl() -> float:
        with torch.no_grad():
            return float(_kl(linear(val_tuned * scale + shift), val_teacher))

    best = (val_kl(), 0, scale.detach().clone(), shift.detach().clone())
    before = best[0]
    for step in range(1, config.steps + 1):
        rows = torch.randint(0, len(tuned), (min(config.batch_size, len(tuned)),), generator=generator)
        loss = _kl(linear(tuned[rows] * scale + shift), teacher[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % config.eval_every == 0 or step == config.steps:
            kl = val_kl()
            if kl < best[0]:
                best = (kl, step, scale.detach().clone(), shift.detach().clone())
    kl, step, best_scale, best_shift = best
    report = {"val_kl": [round(before, 4), round(kl, 4)], "step": step,
              "val_top1_agreement": [round(agreement(linear, val_tuned, val_teacher), 4),
                                     round(agreement(fold(linear, best_scale, best_shift), val_tuned, val_teacher), 4)]}
    return best_scale, best_shift, report


def realign_head(data_dir: Path, directory: Path, config: RealignConfig, device: str = "auto") -> dict:
    """Re-align the checkpoint's ImageNet head to its tuned CNN and write it into the checkpoint (weights file and
    config, each replaced atomically); return the report recorded in the config's encoder provenance.
    Needs the training and val photos' features by the tuned CNN and by the untuned one (the base weights,
    hash-checked): feature caches, made first where missing."""
    loaded = load_checkpoint(directory, calibrated=False, matching=False)
    encoder_config = loaded.config.encoder
    if "tuned" not in encoder_config.provenance:
        raise ConfigError(f"{directory}: this model's CNN was not tuned, so its ImageNet head already reads the "
                          "features it was trained on: nothing to re-align")
    if loaded.encoder is None or loaded.encoder.head is None:
        raise EncoderError(f"{directory}: the encoder has no ImageNet classifier head to re-align")
    records = load_manifest(data_dir)
    train, val = split_records(records, "train"), split_records(records, "val")
    if not train or not val:
        raise ConfigError(f"{data_dir}: re-aligning the head needs a train and a val split")
    base, base_config = build_encoder(untuned(encoder_config))
    if base.head is None:
        raise EncoderError(f"{base_config.weights}: these base weights have no classifier head to take the classes from")
    name, teacher_linear = last_linear(base.head)
    tuned_train, tuned_val = model_features(data_dir, encoder_config, loaded.encoder, 0, train, val, device)
    base_train, base_val = model_features(data_dir, base_config, base, 0, train, val, device)
    teacher_linear = teacher_linear.float()
    with torch.no_grad():  # the head in eval mode is its last Linear (MobileNet's dropout before it is off)
        teacher = torch.softmax(teacher_linear(base_train[:, 0].float()), -1)
        val_teacher = torch.softmax(teacher_linear(base_val.float()), -1)
    scale, shift, report = fit_channel_affine(teacher_linear, tuned_train[:, 0].float(), teacher, tuned_val.float(),
                                              val_teacher, config)
    folded = fold(teacher_linear, scale, shift)
    prefix = f"encoder.head.{name}." if name else "encoder.head."
    report = {"method": "per-channel scale and shift of the tuned features, fitted to the untuned CNN's class "
                        "probabilities (captioner/realign.py)", "train_photos": len(train), "val_photos": len(val),
              "config": dataclasses.asdict(config), **report}
    replace_encoder_tensors(directory, {prefix + "weight": folded.weight, prefix + "bias": folded.bias},
                            {"head_realigned": report})
    return report
