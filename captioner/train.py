"""``captioner train``: teacher forcing on cached CNN features, clipped gradients, exact resume, DDP.

Why from the cache: with a frozen encoder the CNN output never changes, so an epoch only runs the
decoder (``--finetune-encoder`` trains end to end from images instead). Why the sampler: the data
order is a pure function of (seed, epoch), and the RNG states and step are checkpointed, so
``--resume`` replays exactly the batches and dropout masks an uninterrupted run would have seen.
Under ``torchrun`` the same code runs DistributedDataParallel with a DistributedSampler; rank 0
alone validates and writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .api import Captioner, resolve_model
from .captions import encode_captions
from .checkpoint import (check_output_space, load_checkpoint, load_trainer_state, restore_trainer_state,
                         save_checkpoint, trainer_state)
from .config import ModelConfig, default_encoder
from .encoder import EncoderConfig, build_encoder, state_digest
from .errors import ConfigError, DatasetError, TrainingError
from .evaluate import caption_features, caption_split, score
from .features import (FeatureCache, ImageFiles, ImagePairs, PairIndex, cache_complete, cache_dir,
                       collate_images)
from .finetune import init_decoder, start_vocab
from .manifest import REPORT, VOCAB, load_manifest, split_records
from .model import CaptionDecoder, caption_loss
from .runlog import RunLog
from .runtime import autocast, resolve_device, resolve_precision
from .views import draw_views, ensure_view_cache, make_features, open_view_cache, view_features
from .vocab import Vocab


SCHEDULES = ("cosine", "plateau", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUMABLE = ("epochs", "max_steps", "device", "workers")  # what --resume may change: the length, where it runs


@dataclass
class TrainConfig:
    """Optimisation choices; saved in every run's ``train_config.json``.

    The defaults are the shipped model's recipe (checkpoints/flickr8k-mobilenet_v2-lstm/MODEL_CARD.md), so
    ``captioner train DATA --out RUN`` reproduces it; the CLI's flags are generated from these fields.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.0
    clip: float = 5.0  # gradient-norm clipping; 0 disables (the norm is still logged)
    schedule: str = "cosine"  # cosine | plateau | constant, after a linear warm-up
    warmup_steps: int = 200
    plateau_factor: float = 0.5
    label_smoothing: float = 0.0
    # Epochs without a better validation BLEU-4 before stopping; 0: never. Off by default: early stopping on
    # greedy BLEU stopped runs while their val loss still fell (test beam-3 BLEU-4 15.0 vs 17.4, MODEL_CARD.md).
    patience: int = 0
    seed: int = 1
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    save_every: int = 0  # also save last/ every N steps (0: only at epoch ends)
    log_every: int = 20
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    val_bleu_images: int = 0  # val images captioned for the validation metrics (0: the whole split)
    finetune_encoder: bool = False
    encoder_lr: float = 1e-5
    # Random crops per training photo besides the centre crop, encoded once into a view cache (captioner/views.py);
    # each epoch draws one of the photo's views. 0: the centre crop only (the plain feature cache).
    views: int = 0
    # The CNN's last N blocks trained at ``encoder_lr`` from the cached activations that enter them (views.py).
    tune_blocks: int = 0
    # A checkpoint directory or bundled model name ("fast") to start from: its model, encoder and vocabulary,
    # the data's new words appended (captioner/finetune.py). "": a new model.
    init_from: str = ""
    workers: int = 2

    def __post_init__(self) -> None:
        """A typo in a choice would otherwise train silently with another schedule or precision."""
        for name, choices in (("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.views < 0 or self.tune_blocks < 0:
            raise ConfigError(f"views and tune_blocks must be >= 0, got {self.views} and {self.tune_blocks}")
        if self.finetune_encoder and (self.views or self.tune_blocks):
            raise ConfigError("finetune_encoder trains the whole CNN from the images; views and tune_blocks work "
                              "from a cache: choose one")


def resume_config(out: Path, overrides: dict) -> TrainConfig:
    """The settings of the run saved in ``out``, with only the ``RESUMABLE`` ones in ``overrides`` replaced.

    Why: a resumed run must continue exactly (same length, same learning-rate schedule); changing its
    length is an explicit ``epochs`` / ``max_steps``, and anything else that would change it is refused.
    """
    path = Path(out) / "train_config.json"
    if not path.is_file():
        raise TrainingError(f"{path}: missing, so there is no run to resume in {out}")
    fixed = sorted(set(overrides) - set(RESUMABLE))
    if fixed:
        raise ConfigError(f"--resume continues the run in {out} with its saved settings: "
                          f"{', '.join('--' + n.replace('_', '-') for n in fixed)} cannot change "
                          f"(only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)})")
    return TrainConfig(**{**json.loads(path.read_text()), **overrides})


@dataclass
class TrainState:
    """Everything besides tensors needed to continue a run exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    best_bleu4: float = -1.0
    bad_epochs: int = 0
    lr_scale: float = 1.0  # plateau schedule's running factor
    history: list = field(default_factory=list)


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop all-<pad> columns so a batch is only as long as its longest caption."""
    return tokens[:, : int((tokens != 0).sum(1).max())]


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_factor(step: int, total: int, config: TrainConfig, lr_scale: float) -> float:
    """Linear warm-up, then cosine decay to 5% (or the plateau factor, or constant)."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.schedule == "cosine":
        progress = min(1.0, step / max(1, total))
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    if config.schedule == "plateau":
        return warm * lr_scale
    return warm


def build_optimizer(decoder: nn.Module, config: TrainConfig, encoder: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over the decoder, plus the encoder at its own (smaller) ``encoder_lr`` when it is fine-tuned."""
    groups = [{"params": list(decoder.parameters()), "lr": config.lr}]
    if encoder is not None:
        groups.append({"params": list(encoder.parameters()), "lr": config.encoder_lr})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


class StepStats(NamedTuple):
    """What ``train_step`` reports; tensors, so that the caller decides when to wait for the device."""

    loss: torch.Tensor  # () mean cross-entropy over the batch's real tokens
    grad_norm: torch.Tensor  # () total gradient norm before clipping
    tokens: int  # real target tokens in the batch


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, features: torch.Tensor, tokens: torch.Tensor,
               clip: float, lrs: Sequence[float] | None = None, scaler: torch.amp.GradScaler | None = None,
               precision: str = "fp32", encoder: nn.Module | None = None, label_smoothing: float = 0.0) -> StepStats:
    """The project's one optimizer step, shared by the Trainer, ``captioner gradflow`` and the benchmark.

    Set each parameter group's learning rate (``lrs``, the schedule's; None keeps them), forward under
    autocast on (B, D) features (or (B, 3, H, W) pixels through ``encoder`` when it is fine-tuned) and
    (B, T) tokens, cross-entropy over real tokens, backward, unscale, clip the total gradient norm to
    ``clip`` (0: no clipping), step. A non-finite loss or gradient raises before the step is applied
    (under fp16 the scaler skips such steps itself).
    """
    if lrs is not None:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    with autocast(precision, features.device):
        if encoder is not None:
            features = encoder(features)
        loss, n_tokens = caption_loss(model, features, tokens, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if not scaler.is_enabled() and not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise TrainingError(f"non-finite loss/gradient ({loss.item()}, norm {grad_norm.item()})")
    scaler.step(optimizer)
    scaler.update()
    return StepStats(loss.detach(), grad_norm, n_tokens)


class Trainer:
    """One training run: data, model, optimizer, validation and checkpoints.

    ``Trainer(...)`` starts a run: its model from ``ModelConfig``'s defaults, the prepare report's ``max_len``
    and the data's vocabulary size, under ``model_options`` (the ``ModelConfig`` fields given, e.g.
    ``hidden``), its encoder from ``encoder_config`` (default: ``config.default_encoder()``); with
    ``config.init_from``, both from that checkpoint, its vocabulary extended (then give neither).
    ``Trainer.resume(...)`` continues the run saved in ``out``.
    """

    def __init__(self, data_dir: Path, out: Path, config: TrainConfig, *, model_options: dict | None = None,
                 encoder_config: EncoderConfig | None = None) -> None:
        self._open(data_dir, out, config)
        if config.init_from:
            if model_options or encoder_config is not None:
                raise ConfigError("init_from: the model and encoder come from the checkpoint; "
                                  "pass no model_options and no encoder_config")
            loaded = load_checkpoint(resolve_model(config.init_from))
            self.model_config, self.decoder = init_decoder(loaded, self.vocab)  # rows added for the new words
            self.encoder = loaded.encoder
        else:
            self.encoder, enc_cfg = build_encoder(encoder_config or default_encoder())
            report_path = self.data_dir / REPORT
            report = json.loads(report_path.read_text()) if report_path.is_file() else {}
            report_len = {"max_len": report["max_len"]} if "max_len" in report else {}  # else ModelConfig's
            self.model_config = ModelConfig(vocab_size=len(self.vocab), encoder=enc_cfg,
                                            **{**report_len, **(model_options or {})})
            self.decoder = CaptionDecoder(self.model_config)
        self._build()

    @classmethod
    def resume(cls, data_dir: Path, out: Path, overrides: dict | None = None) -> Trainer:
        """Continue the run saved in ``out`` exactly where it stopped: its own settings (``resume_config``:
        only the ``RESUMABLE`` ones in ``overrides`` may change), and model, encoder, optimizer, RNG states
        and step from ``out/last``."""
        self = cls.__new__(cls)
        self._open(data_dir, out, resume_config(out, overrides or {}))
        last = self.out / "last"
        loaded = load_checkpoint(last)
        if loaded.vocab.words != self.vocab.words:
            raise TrainingError(f"{last}/vocab.json differs from {self.data_dir}/vocab.json: "
                                "this run was trained on another data directory")
        tensors, meta = load_trainer_state(last)
        self.state = TrainState(**meta["train_state"])
        self.log.drop_after(self.state.step)
        self.model_config = loaded.config
        self.decoder = CaptionDecoder(self.model_config)
        self.decoder.load_state_dict(loaded.decoder_state)
        self.encoder = loaded.encoder
        self._build()
        restore_trainer_state(self.optimizer, tensors, meta)
        return self

    def _open(self, data_dir: Path, out: Path, config: TrainConfig) -> None:
        """What every run needs before its model: device, precision, the data's splits and vocabulary."""
        self.data_dir, self.out, self.config = Path(data_dir), Path(out), config
        self.rank, self.world = _distributed()
        self.device = resolve_device(config.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(config.precision, self.device)
        records = load_manifest(self.data_dir)
        splits = Counter(r.split for r in records)
        if not (splits["train"] and splits["val"]):
            raise DatasetError(f"{self.data_dir}: training needs a 'train' and a 'val' split, this data has images in "
                               f"{', '.join(f'{s} ({n})' for s, n in sorted(splits.items()))}; prepare the captions "
                               "again with both (e.g. --val-size N); a test-only set is for `captioner evaluate`")
        self.train_records = split_records(records, "train")
        self.val_records = split_records(records, "val")
        self.vocab = Vocab.load(self.data_dir / VOCAB)
        if config.init_from:
            self.vocab = start_vocab(resolve_model(config.init_from), self.vocab)
        self.state = TrainState()
        self.log = RunLog(self.out, enabled=self.rank == 0, world=self.world)
        torch.manual_seed(config.seed)

    def _build(self) -> None:
        """With the model chosen: check the output space, load the data, build the optimizer."""
        if self.rank == 0:
            check_output_space(self.out, [self.decoder, self.encoder],
                               [self.decoder] + ([self.encoder] if self.config.finetune_encoder else []))
        self._prepare_data()
        self._build_optimizer()

    def _prepare_data(self) -> None:
        cfg, enc = self.config, self.model_config.encoder
        self.train_caps = encode_captions(self.train_records, self.vocab, self.model_config.max_len)
        self.val_caps = encode_captions(self.val_records, self.vocab, self.model_config.max_len)
        self.view_of = torch.zeros(len(self.train_caps.image_ids), dtype=torch.long)  # view 0: the centre crop
        if cfg.views or cfg.tune_blocks:
            self._prepare_views()
        elif not cfg.finetune_encoder:
            directory = cache_dir(self.data_dir, enc)
            if not cache_complete(directory):
                if self.rank == 0:
                    print(f"no complete feature cache at {directory}: building it")
                    make_features(self.data_dir, enc, self.encoder, device=cfg.device, workers=cfg.workers)
                if self.world > 1:
                    dist.barrier()
            cache = FeatureCache(directory)
            if not cache.encoder.same_features(enc):
                made = [f"{e.name} {e.weights} {e.image_size}px sha256 {e.provenance.get('sha256', '-')[:12]}"
                        for e in (cache.encoder, enc)]
                raise ConfigError(f"{directory}: these features were made by another encoder or preprocessing "
                                  f"({made[0]}) than the model's ({made[1]}); delete that folder to rebuild it")
            # one view per image, and nothing between the cache and the decoder: the view cache's layout
            self.train_inputs = cache.gather(self.train_caps.image_ids)[:, None]  # (N_train, 1, D)
            self.val_inputs, self.tail = cache.gather(self.val_caps.image_ids), nn.Identity()

    def _prepare_views(self) -> None:
        """The view cache (built when missing): every training image's views in memory (float16), the val
        images' centre crops, and the CNN blocks that turn them into features (``self.tail``)."""
        cfg, enc = self.config, self.model_config.encoder
        if self.rank == 0:
            ensure_view_cache(self.data_dir, enc, self.encoder, cfg.views, cfg.tune_blocks, cfg.device, cfg.workers)
        if self.world > 1:
            dist.barrier()
        cache, self.tail = open_view_cache(self.data_dir, enc, self.encoder, cfg.views, cfg.tune_blocks)
        self.train_inputs = cache.gather(self.train_caps.image_ids, np.float16)  # (N_train, views + 1, *shape)
        self.val_inputs = cache.gather(self.val_caps.image_ids)[:, 0]  # centre crops

    def _build_optimizer(self) -> None:
        cfg = self.config
        self.decoder.to(self.device)
        self.encoder.to(self.device)
        self.encoder.requires_grad_(cfg.finetune_encoder)
        tuned = self._trained_cnn()
        if tuned is not None:
            tuned.requires_grad_(True)
        self.optimizer = build_optimizer(self.decoder, cfg, tuned)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.model: nn.Module = self.decoder
        if self.world > 1:
            self.model = DistributedDataParallel(self.decoder, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if cfg.finetune_encoder:
                self.encoder = DistributedDataParallel(self.encoder, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            elif cfg.tune_blocks:
                self.tail = DistributedDataParallel(self.tail, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _trained_cnn(self) -> nn.Module | None:
        """What of the CNN trains with the decoder: all of it (``finetune_encoder``), its last blocks, or nothing."""
        cfg = self.config
        return self.encoder if cfg.finetune_encoder else self.tail if cfg.tune_blocks else None

    def _loader(self, epoch: int) -> DataLoader:
        cfg = self.config
        sampler = DistributedSampler(PairIndex(len(self.train_caps.tokens)), num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = list(sampler)[self.state.step_in_epoch * cfg.batch_size:] if epoch == self.state.epoch else list(sampler)
        if cfg.views:
            self.view_of = draw_views(len(self.train_inputs), cfg.views, cfg.seed, epoch)
        if cfg.finetune_encoder:
            images = ImageFiles([r.path for r in self.train_records], self.model_config.encoder.preprocess)
            return DataLoader(ImagePairs(images, self.train_caps), batch_size=cfg.batch_size, sampler=order,
                              num_workers=cfg.workers, collate_fn=self._collate_images, generator=torch.Generator())
        return DataLoader(PairIndex(len(self.train_caps.tokens)), batch_size=cfg.batch_size, sampler=order,
                          collate_fn=self._collate_cached, generator=torch.Generator())

    def _collate_cached(self, idx: list[int]):
        idx_t = torch.tensor(idx)
        images, tokens = self.train_caps.pair_image[idx_t], trim_padding(self.train_caps.tokens[idx_t])
        inputs = self.train_inputs[images, self.view_of[images]].float()  # each image's view of this epoch
        return (inputs.contiguous(memory_format=torch.channels_last) if self.config.tune_blocks else inputs), tokens

    def _collate_images(self, items):
        pixels = torch.stack([p for p, _ in items])
        return pixels, trim_padding(self.train_caps.tokens[torch.tensor([i for _, i in items])])

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_caps.tokens) // self.world / self.config.batch_size)

    def fit(self) -> dict:
        """Train until ``epochs`` (or ``max_steps``, or early stopping); return the best metrics."""
        cfg = self.config
        if self.rank == 0:
            (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        self.log.open()
        total = cfg.epochs * self.steps_per_epoch()
        stop = False
        while self.state.epoch < cfg.epochs and not stop:
            stop = self._train_epoch(total)
            if stop:
                break
            metrics = self._validate()
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            stop = self._end_epoch(metrics)
        self.log.close()
        if self.world > 1:
            dist.barrier()
        return {"best_bleu4": self.state.best_bleu4, "epochs": self.state.epoch, "steps": self.state.step}

    def _train_epoch(self, total: int) -> bool:
        """One epoch (or its rest, when resuming); True when ``max_steps`` was reached."""
        cfg = self.config
        self.decoder.train()
        self.encoder.train(cfg.finetune_encoder)
        for feats, tokens in self.log.epoch_bar(self._loader(self.state.epoch), self.state.epoch, cfg.epochs):
            feats, tokens = feats.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True)
            lrs = [base * lr_factor(self.state.step, total, cfg, self.state.lr_scale) for base in self.base_lrs]
            try:  # forward, loss, backward, clip, step
                loss, grad_norm, n_tokens = train_step(
                    self.model, self.optimizer, feats, tokens, cfg.clip, lrs, scaler=self.scaler,
                    precision=self.precision, encoder=self._trained_cnn(),
                    label_smoothing=cfg.label_smoothing)
            except TrainingError as err:
                raise TrainingError(f"{err} at epoch {self.state.epoch + 1} step {self.state.step}: stopped; the last "
                                    f"good checkpoint is kept in {self.out / 'last'}. Try a lower --lr or --clip.") from None
            self.state.step += 1
            self.state.step_in_epoch += 1
            self.log.step(self.state.step, self.state.epoch, loss, grad_norm, lrs[0], n_tokens,
                          write=self.state.step % cfg.log_every == 0 or cfg.log_every == 1)
            if cfg.save_every and self.state.step % cfg.save_every == 0:
                self._save("last")
            if cfg.max_steps and self.state.step >= cfg.max_steps:
                self._save("last")
                return True
        return False

    @torch.no_grad()
    def _validate(self) -> dict:
        """Teacher-forced validation loss, and the metrics of free-running greedy decoding (rank 0 only).

        The metrics that pick ``best/`` are computed the way ``captioner evaluate --split val`` reports them
        for that checkpoint (``--from-cache`` unless the encoder is fine-tuned): the same ``Captioner``
        decoding, caption text, tokenizer and scoring, so the two numbers cannot disagree.
        """
        if self.rank != 0:
            return {}
        self.decoder.eval()
        self.encoder.eval()
        val_feats = self._val_features()
        total_loss, total_tokens = 0.0, 0
        for i in range(0, len(self.val_caps.tokens), 512):
            tokens = trim_padding(self.val_caps.tokens[i:i + 512]).to(self.device)
            feats = val_feats[self.val_caps.pair_image[i:i + 512]].to(self.device)
            with autocast(self.precision, self.device):
                loss, n = caption_loss(self.decoder, feats, tokens)
            total_loss += loss.item() * n
            total_tokens += n
        records = self.val_records[: self.config.val_bleu_images or None]
        captioner = self._captioner()
        greedy = captioner.decode_config(strategy="greedy")
        if self.config.finetune_encoder:
            captions = caption_split(captioner, records, greedy, workers=self.config.workers)
        else:
            captions = caption_features(captioner, records, val_feats[: len(records)], greedy)
        return {"val_loss": total_loss / max(1, total_tokens), **score(records, captions)}

    def _captioner(self) -> Captioner:
        """The in-memory model as ``Captioner.from_pretrained`` would load it from a checkpoint. It gets a copy
        of the encoder because it prepares its own for inference (eval, channels-last weights on a CPU)."""
        encoder = copy.deepcopy(getattr(self.encoder, "module", self.encoder))
        return Captioner(encoder, self.decoder, self.vocab, self.model_config, str(self.device), self.precision)

    def _val_features(self) -> torch.Tensor:
        """(N_val, D) features of the val images by the model's current CNN."""
        if self.config.finetune_encoder:
            return self._encode_val()
        with autocast(self.precision, self.device):
            return view_features(getattr(self.tail, "module", self.tail), self.val_inputs.to(self.device)).cpu()

    def _encode_val(self) -> torch.Tensor:
        images = ImageFiles([r.path for r in self.val_records], self.model_config.encoder.preprocess)
        loader = DataLoader(images, batch_size=64, num_workers=self.config.workers, collate_fn=collate_images)
        encoder = getattr(self.encoder, "module", self.encoder)
        return torch.cat([encoder(px.to(self.device)).float().cpu() for _, px, _ in loader])

    def _end_epoch(self, metrics: dict) -> bool:
        """Record metrics, keep best/ and last/, decide early stopping (broadcast from rank 0)."""
        stop = torch.zeros(1)
        if self.rank == 0:
            bleu4 = metrics["Bleu_4"]
            improved = bleu4 > self.state.best_bleu4
            if improved:
                self.state.best_bleu4, self.state.bad_epochs = bleu4, 0
            else:
                self.state.bad_epochs += 1
                if self.config.schedule == "plateau":
                    self.state.lr_scale *= self.config.plateau_factor
            record = {"epoch": self.state.epoch, "step": self.state.step, **metrics, "best_bleu4": self.state.best_bleu4,
                      "time": time.time()}
            self.state.history.append(record)
            self.log.epoch(record, metrics, self.state.epoch, improved)
            if improved:
                self._save("best", with_state=False)
            self._save("last")
            stop[0] = float(self.config.patience > 0 and self.state.bad_epochs >= self.config.patience)
        if self.world > 1:
            dist.broadcast(stop, 0)
        return bool(stop.item())

    def _save(self, name: str, with_state: bool = True) -> None:
        if self.rank != 0:
            return
        tensors, meta = trainer_state(self.optimizer, asdict(self.state)) if with_state else (None, None)
        encoder = getattr(self.encoder, "module", self.encoder)
        config = self.model_config
        if self.config.finetune_encoder or self.config.tune_blocks:  # its features are no longer the file's
            blocks = "all" if self.config.finetune_encoder else self.config.tune_blocks
            provenance = {**config.encoder.provenance, "tuned": {"blocks": blocks, "sha256": state_digest(encoder)}}
            config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, provenance=provenance))
        try:
            save_checkpoint(self.out / name, config, self.vocab, self.decoder, encoder, tensors, meta)
        except OSError as err:
            raise TrainingError(f"{self.out / name}: could not write the checkpoint ({err.strerror}); the previous "
                                f"one is intact, continue with --resume once there is space") from None
