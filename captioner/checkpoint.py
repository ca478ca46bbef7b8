"""Checkpoint directories: ``model.safetensors`` + ``config.json`` + ``vocab.json`` (+ trainer state).

Why this format: safetensors and JSON are data, never code, so loading a checkpoint from anyone
cannot execute anything (no pickle). Why the symlink: a checkpoint is written into a fresh
versioned directory and then published by atomically replacing the ``NAME`` symlink, so a kill at
any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .confidence import CALIBRATION, Calibration, read_calibration
from .config import ModelConfig
from .encoder import PACKAGED_WEIGHTS, Encoder, EncoderConfig, build_encoder
from .errors import CheckpointError, TrainingError, VocabError
from .consensus import INDEX as CONSENSUS_INDEX
from .consensus import TENSORS as CONSENSUS_TENSORS
from .consensus import ConsensusIndex, read_index
from .matching import CONFIG as MATCHING_CONFIG
from .matching import TENSORS as MATCHING_TENSORS
from .matching import Matcher, read_matcher
from .sidecar import write_tensors_atomic
from .tuning import DECODING, read_decoding, without_consensus
from .vocab import Vocab

MODEL, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"
FORMAT = "captioner-checkpoint/1"


@dataclass
class Loaded:
    config: ModelConfig
    vocab: Vocab
    decoder_state: dict[str, torch.Tensor]
    encoder: Encoder
    directory: Path
    calibration: Calibration | None = None  # calibration.json (``captioner calibrate``), when the directory has one
    decoding: dict = field(default_factory=dict)  # decoding.json's recommended options (``captioner tune-decoding``)
    consensus: ConsensusIndex | None = None  # consensus.json + .safetensors (``captioner consensus-index``)
    matcher: Matcher | None = None  # matching.json + .safetensors (``captioner matching``)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(work: Path, config: ModelConfig, vocab: Vocab, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """model.safetensors (floating tensors as ``dtype``) + config.json + vocab.json into ``work``."""
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(work / MODEL), metadata={"format": FORMAT})
    (work / CONFIG).write_text(json.dumps({"format": FORMAT, **config.to_json()}, indent=1))
    vocab.save(work / VOCAB)


def save_checkpoint(target: Path, config: ModelConfig, vocab: Vocab, decoder: nn.Module, encoder: Encoder | None,
                    trainer_tensors: dict[str, torch.Tensor] | None = None, trainer_json: dict | None = None,
                    side_files: Callable[[Path], object] | None = None) -> Path:
    """Write a checkpoint and atomically point ``target`` (a symlink) at it; return the real directory.
    ``side_files(directory)`` writes files that belong with these weights (e.g. the matching model a
    self-critical policy was rewarded by) into the new directory before it is published."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    version = 0
    while (target.parent / f".{target.name}.v{version}").exists():
        version += 1
    real = target.parent / f".{target.name}.v{version}"
    work = target.parent / f".{target.name}.v{version}.partial"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    modules = {"decoder": decoder} | ({"encoder": encoder} if encoder is not None else {})
    _write(work, config, vocab, {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()},
           torch.float32)
    if trainer_tensors is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainer_tensors.items()}, str(work / STATE_TENSORS))
        (work / STATE_JSON).write_text(json.dumps(trainer_json or {}, indent=1))
    if side_files is not None:
        side_files(work)
    for f in work.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(work, real)
    link = target.parent / f".{target.name}.link"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(real.name)
    if target.exists() and not target.is_symlink():
        shutil.rmtree(target)  # a plain directory from elsewhere: replaced by the link
    os.replace(link, target)
    _fsync_dir(target.parent)
    for old in target.parent.glob(f".{target.name}.v*"):
        if old.resolve() != real.resolve():
            shutil.rmtree(old, ignore_errors=True)
    return real


def replace_encoder_tensors(directory: Path, tensors: dict[str, torch.Tensor], provenance: dict) -> None:
    """Overwrite some of a checkpoint's encoder tensors (each stored in its file's dtype, shape unchanged) and add
    ``provenance`` to its encoder's record: ``captioner realign-head``. The weights file is replaced first, then
    the config, each atomically: a crash between the two leaves the new weights without their record (the model
    loads and runs; re-running the command writes the record)."""
    from .manifest import write_json_atomic
    directory = Path(directory)
    stored = read_tensors(directory / MODEL)
    for key, value in tensors.items():
        if key not in stored or stored[key].shape != value.shape:
            raise CheckpointError(f"{directory / MODEL}: no tensor {key} of shape {tuple(value.shape)} to replace")
        stored[key] = value.to(stored[key].dtype)
    write_tensors_atomic(directory / MODEL, stored, {"format": FORMAT})
    config = _read_json(directory / CONFIG)
    config["encoder"]["provenance"] = {**config["encoder"].get("provenance", {}), **provenance}
    write_json_atomic(directory / CONFIG, config)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint needs {MODEL}, {CONFIG} and {VOCAB})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a truncated file) is a clear error."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err}); "
                              "captioner never unpickles checkpoint files") from None


def read_model_config(directory: Path) -> ModelConfig:
    """A checkpoint directory's ``config.json`` alone (no tensors, no side files)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    raw = _read_json(directory / CONFIG)
    raw.pop("format", None)
    try:
        return ModelConfig.from_json(raw)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG}: invalid config ({err})") from None


def load_checkpoint(directory: str | Path, calibrated: bool = True, matching: bool = True) -> Loaded:
    """Config, vocabulary, decoder tensors and a ready encoder from a checkpoint directory, and its calibration
    unless ``calibrated`` is False (``captioner calibrate`` replaces it, so a broken one must not stop it) and
    its matching model unless ``matching`` is False (``captioner matching`` replaces it, likewise)."""
    directory = Path(directory)
    config = read_model_config(directory)
    try:
        vocab = Vocab.load(directory / VOCAB)
    except VocabError as err:
        raise CheckpointError(str(err)) from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{directory}: config.json says vocab_size {config.vocab_size} but vocab.json has "
                              f"{len(vocab)} words: the files come from different models")
    tensors = read_tensors(directory / MODEL)
    decoder_state = {k.removeprefix("decoder."): v.float() for k, v in tensors.items() if k.startswith("decoder.")}
    encoder_state = {k.removeprefix("encoder."): v.float() if v.is_floating_point() else v
                     for k, v in tensors.items() if k.startswith("encoder.")}
    if encoder_state:
        encoder, _ = build_encoder(EncoderConfig(config.encoder.name, "none", config.encoder.image_size))
        if not any(k.startswith("head.") for k in encoder_state):
            encoder.head = None  # saved without the classifier head (checkpoints before heads were kept)
        try:
            encoder.load_state_dict(encoder_state)
        except RuntimeError as err:
            raise CheckpointError(f"{directory / MODEL}: encoder tensors do not fit {config.encoder.name}: "
                                  f"{str(err)[:300]}") from None
    else:
        encoder, _ = build_encoder(config.encoder)
    calibration = read_calibration(directory) if calibrated else None
    if calibration is not None and "tag_prob" in calibration.features and encoder.head is None:
        raise CheckpointError(f"{directory / CALIBRATION}: uses tag_prob, but the encoder has no ImageNet head; "
                              "re-create it with `captioner calibrate`")
    decoding, consensus = read_decoding(directory), read_index(directory, config.encoder)
    if decoding.get("consensus") and consensus is None:
        raise CheckpointError(f"{directory / DECODING}: recommends consensus reranking, but the directory has no "
                              f"{CONSENSUS_INDEX}; build it with `captioner consensus-index` or re-run `captioner "
                              "tune-decoding`")
    matcher = read_matcher(directory, config.encoder, vocab) if matching else None
    if (decoding.get("match_weight") or decoding.get("specificity_levels")) and matcher is None and matching:
        what = "specificity by fit" if decoding.get("specificity_levels") else "matching reranking"
        raise CheckpointError(f"{directory / DECODING}: recommends {what}, but the directory has no "
                              f"{MATCHING_CONFIG}; train it with `captioner matching` or re-run `captioner tune-decoding`")
    if calibration is not None and "match" in calibration.features and matcher is None:
        raise CheckpointError(f"{directory / CALIBRATION}: uses match, but the directory has no {MATCHING_CONFIG}; "
                              "re-create it with `captioner calibrate`")
    if decoding.get("specificity") or decoding.get("specificity_levels"):
        try:
            vocab.rarity()
        except VocabError as err:
            raise CheckpointError(f"{directory / DECODING}: recommends a specificity, but {directory / VOCAB}: "
                                  f"{err}") from None
    return Loaded(config, vocab, decoder_state, encoder.eval(), directory, calibration, decoding, consensus, matcher)


def load_trainer_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer/RNG tensors and the JSON state saved for ``--resume``."""
    return read_tensors(directory / STATE_TENSORS), _read_json(directory / STATE_JSON)


def check_output_space(out: Path, modules: list[nn.Module], trainable: list[nn.Module]) -> None:
    """Fail now, not after an epoch, when ``out`` is not writable or cannot hold this run's checkpoints.

    ``last/`` holds every weight plus two AdamW moments per trainable weight (float32); while it is
    replaced, old and new versions coexist, and ``best/`` holds the weights again: about three times
    ``last/``. The space is reserved for real with ``posix_fallocate`` (then released), so a full disk
    or a quota is caught whatever the file system reports as free.
    """
    weights = sum(p.numel() for m in modules for p in m.state_dict().values()) * 4
    moments = sum(p.numel() for m in trainable for p in m.parameters()) * 8
    need = 3 * (weights + moments) + (1 << 20)
    probe = out / ".space_probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fh.fileno(), 0, need)
            else:  # pragma: no cover - non-POSIX
                fh.truncate(need)
    except OSError as err:
        problem = (f"not enough free space for this run's checkpoints (about {need / 1e6:.0f} MB needed)"
                   if err.errno in (errno.ENOSPC, errno.EDQUOT) else "output directory is not writable")
        raise TrainingError(f"{out}: {problem} ({err.strerror}); nothing was trained") from None
    finally:
        if probe.is_file():
            probe.unlink()


def _rng_tensors() -> dict[str, torch.Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (for safetensors) + JSON for the scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def trainer_state(optimizer: torch.optim.Optimizer, train_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """What ``--resume`` needs besides the weights, as ``save_checkpoint``'s ``trainer_tensors`` and
    ``trainer_json``: the optimizer's moments and the RNG states (tensors), its scalars and ``train_state``."""
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    return {**optim_tensors, **_rng_tensors()}, {"optimizer": optim_meta, "train_state": train_state}


def restore_trainer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put back the optimizer state and the RNG states of ``trainer_state``, as ``load_trainer_state`` read them."""
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available() and "rng.cuda0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda{i}"] for i in range(torch.cuda.device_count())
                                      if f"rng.cuda{i}" in tensors])


def _complete_encoder(config: ModelConfig, encoder: Encoder) -> tuple[ModelConfig, Encoder]:
    """For shipping: the ImageNet classifier head (tags, guided decoding) and the weights' provenance,
    taken from the encoder's weights (hash-checked) when the checkpoint predates them."""
    spec = config.encoder
    if spec.weights.lower() == "none" or (encoder.head is not None and spec.provenance):
        return config, encoder
    built, built_config = build_encoder(spec)
    if encoder.head is None:
        encoder.head = built.head
    return ModelConfig.from_json({**config.to_json(), "encoder": built_config.to_json()}), encoder


def export_checkpoint(sources: list[Path], target: Path, dtype: torch.dtype = torch.float16,
                      consensus_index: bool = False) -> Path:
    """Copy checkpoints (e.g. runs' ``best/``) into one plain, self-contained directory for shipping:
    encoder weights included (so it runs offline), floating tensors stored as ``dtype``, no trainer
    state. Several sources of one architecture, vocabulary and encoder become an ensemble. An encoder whose
    weights come from an installed package (``PACKAGED_WEIGHTS``, e.g. resnet152 ``resmem``) is not copied
    unless training tuned it: the checkpoint holds the decoder, and loading rebuilds the encoder from the
    package, hash-checked.
    One source's ``calibration.json``, ``decoding.json`` and matching model (weights, no captions) come along (storage precision moves
    log-probabilities by far less than the calibration's resolution); an ensemble's captions differ from each
    member's, so it gets neither and needs ``captioner calibrate`` and ``captioner tune-decoding``. A consensus
    index holds a dataset's captions, so it comes along only with ``consensus_index``; without it a decoding
    that recommends reranking is re-chosen among the settings that need none (``tuning.without_consensus``)."""
    loaded = [load_checkpoint(s) for s in sources]
    first = loaded[0]
    for other in loaded[1:]:
        if other.vocab.words != first.vocab.words:
            raise CheckpointError(f"{other.directory}: vocabulary differs from {first.directory}'s")
        if {**other.config.to_json(), "members": 1} != {**first.config.to_json(), "members": 1} or other.config.members != 1:
            raise CheckpointError(f"{other.directory}: architecture or encoder differs from {first.directory}'s")
    config = first.config
    if len(loaded) == 1:
        tensors = {f"decoder.{k}": v for k, v in first.decoder_state.items()}
    else:
        config = ModelConfig.from_json({**config.to_json(), "members": len(loaded)})
        tensors = {f"decoder.members.{i}.{k}": v for i, m in enumerate(loaded) for k, v in m.decoder_state.items()}
    config, encoder = _complete_encoder(config, first.encoder)
    if (config.encoder.name, config.encoder.weights) not in PACKAGED_WEIGHTS or "tuned" in config.encoder.provenance:
        tensors |= {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    target = Path(target)
    work = target.with_name(target.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _write(work, config, first.vocab, tensors, dtype)
    for name in (CALIBRATION, DECODING, MATCHING_CONFIG, MATCHING_TENSORS) + ((CONSENSUS_INDEX, CONSENSUS_TENSORS)
                                                                             if consensus_index else ()):
        if len(loaded) == 1 and (first.directory / name).is_file():
            shutil.copyfile(first.directory / name, work / name)
    if len(loaded) == 1 and not consensus_index and first.decoding.get("consensus"):
        result = json.loads((first.directory / DECODING).read_text(encoding="utf-8"))
        (work / DECODING).write_text(json.dumps(without_consensus(result), indent=1))
    if target.exists():
        shutil.rmtree(target)
    os.rename(work, target)
    return target
