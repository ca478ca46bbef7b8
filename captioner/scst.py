"""``captioner scst``: self-critical sequence training (Rennie et al., 2017) after cross-entropy.

Teacher forcing optimises the next word given the *reference* prefix; at test time the model continues its
own words, and it is scored with CIDEr-D, not likelihood. SCST closes both gaps with REINFORCE: sample
captions from the model, score each with CIDEr-D against the image's references, and raise the
log-probability of the samples that beat a baseline, lower the others. The baseline is either the greedy
caption's reward (Rennie et al.) or the mean reward of the image's *other* samples (Luo, 2020, "A better
variant of SCST"), which needs no extra decoding pass and gained more val CIDEr-D here (45.2 against 44.2
for the greedy baseline, 3 epochs each from the same weights: MODEL_CARD.md).

Why it is cheap on a CPU: it starts from a trained checkpoint and, like ``captioner train``, reads the
frozen encoder's features from the cache, so a step is the decoder's sampling plus one teacher-forced pass
over the samples. Sampling reuses ``decoding.decode`` (strategy ``sample``) and the reward is the project's
own CIDEr-D (``metrics.CiderD``, document frequencies of the training references, as in the paper).
The best epoch by validation CIDEr-D of beam search (the shipped decoding setting) is kept in ``best/``.

CIDEr-D alone rewards the consensus wording, so SCST made captions plainer (a third of the vocabulary gone,
MODEL_CARD.md). ``match_weight`` adds a discriminability term (Luo et al., 2018, "Discriminability objective
for training descriptive captions"): the cosine between the photo and the sampled caption in the checkpoint's
image-caption matching model (``captioner/matching.py``), which is high for what is specific to *this* photo.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .api import Captioner, resolve_model
from .captions import encode_captions, references
from .checkpoint import load_checkpoint, save_checkpoint
from .decoding import DecodeConfig, Hypothesis, decode
from .errors import ConfigError, DatasetError, TrainingError
from .evaluate import caption_features, score
from .manifest import load_manifest, split_records
from .matching import Matcher, read_matcher, save_matcher
from .metrics import CiderD
from .model import build_decoder
from .views import draw_views, model_features
from .vocab import SpecialIds

BASELINES = ("mean", "greedy")


@dataclass
class ScstConfig:
    """Self-critical training settings; saved in the run's ``scst_config.json``."""

    init_from: str = ""  # required: the cross-entropy checkpoint (directory or bundled model name) to start from
    epochs: int = 3  # the bundled model's recipe (MODEL_CARD.md): its best val CIDEr-D came at epoch 2
    batch_size: int = 50  # images per step; each contributes ``samples`` captions
    samples: int = 5
    baseline: str = "mean"  # mean: of the image's other samples | greedy: the greedy caption's reward
    lr: float = 1e-5  # 5e-5 lost val CIDEr-D and half the vocabulary within one epoch (MODEL_CARD.md)
    clip: float = 5.0
    temperature: float = 1.0
    seed: int = 1
    val_beam: int = 3  # validation decodes with beam search of this width, as the shipped model is scored
    # >0: each epoch draws one of this many random crops (or the centre crop) per training image, from the view
    # cache at the depth of the checkpoint's tuned blocks (``train --views / --tune-blocks``; 0 for a frozen CNN)
    views: int = 0
    # >0: add this times the cross-entropy (per token) of one random training reference per image to the loss, so
    # the policy keeps the references' wording while it chases CIDEr-D (SCST alone cut the vocabulary by a third)
    xe_weight: float = 0.0
    # >0: reward = CIDEr-D + this x cosine(photo, caption) in a matching model (within one photo's samples the
    # cosine's spread is about half CIDEr-D's, 0.11 against 0.21, so 1-2 weighs them alike)
    match_weight: float = 0.0
    # the checkpoint directory (or bundled model name) whose matching model gives that cosine; "" = init_from's.
    # It must read the same features (encoder and tuned blocks) as init_from; it is saved into best/ beside the policy
    matching: str = ""
    log_every: int = 20

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ConfigError("--init-from is required: SCST fine-tunes a model trained with cross-entropy "
                              "(`captioner train`'s best/)")
        if self.xe_weight < 0 or self.match_weight < 0:
            raise ConfigError(f"xe_weight and match_weight must be >= 0, got {self.xe_weight}, {self.match_weight}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {', '.join(BASELINES)}; got {self.baseline!r}")
        if self.samples < (2 if self.baseline == "mean" else 1):
            raise ConfigError("the mean-of-others baseline needs at least 2 samples per image")


def sampled_tokens(hyps: list[Hypothesis], max_len: int, specials: SpecialIds) -> torch.Tensor:
    """Samples -> (N, max_len + 2) ``<start> w.. <end> <pad>..`` rows for teacher forcing. A sample that
    reached ``max_len`` words was cut, not ended, so it gets no ``<end>`` (its last word is its last target)."""
    rows = torch.full((len(hyps), max_len + 2), specials.pad, dtype=torch.long)
    for i, h in enumerate(hyps):
        ids = [specials.start, *h.tokens] + ([specials.end] if len(h.tokens) < max_len else [])
        rows[i, :len(ids)] = torch.tensor(ids)
    return rows


def sequence_logprob(decoder: nn.Module, features: torch.Tensor, tokens: torch.Tensor, pad_id: int,
                     banned: list[int]) -> torch.Tensor:
    """(N, D) features, (N, T) token rows -> (N,) log-probability of each row under ``decoder``, with the
    ``banned`` ids (never sampled by ``decode``) removed from the distribution as decoding removes them."""
    logits, targets = decoder(features, tokens, pad_id)  # (n_real, V), (n_real,): real target positions
    logits = logits.float()
    logits[:, banned] = float("-inf")
    token_logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]  # (n_real,)
    row = (tokens[:, 1:] != pad_id).nonzero()[:, 0]  # row of each real target, in the same order as ``targets``
    return torch.zeros(tokens.shape[0], device=logits.device).index_add(0, row, token_logp)


def advantages(rewards: torch.Tensor, baseline: str, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) sample rewards -> (B, S) reward minus baseline: the greedy caption's reward (B,) or the mean of
    the image's other S-1 samples (leave-one-out, so a sample never lowers its own baseline)."""
    if baseline == "greedy":
        return rewards - greedy[:, None]
    s = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (s - 1)


class ScstTrainer:
    """Starts from ``config.init_from``; writes ``out/best`` (best val CIDEr-D), ``out/log.jsonl``,
    ``out/metrics.jsonl``. Each run starts fresh from its checkpoint: an interrupted one is rerun (an epoch
    is minutes on a CPU); ``best/`` is always a complete checkpoint."""

    def __init__(self, data_dir: Path, out: Path, config: ScstConfig, device: str = "cpu") -> None:
        self.data_dir, self.out, self.config = Path(data_dir), Path(out), config
        self.device = torch.device(device)
        loaded = load_checkpoint(resolve_model(config.init_from))
        self.model_config, self.vocab, self.encoder = loaded.config, loaded.vocab, loaded.encoder
        self.decoder = build_decoder(loaded.config)
        self.decoder.load_state_dict({k: v.float() for k, v in loaded.decoder_state.items()})
        self.decoder.to(self.device)
        self.matcher = self._matcher(loaded) if config.match_weight else None
        records = load_manifest(self.data_dir)
        self.train_records = split_records(records, "train")
        self.val_records = split_records(records, "val")
        if not self.train_records or not self.val_records:
            raise DatasetError(f"{self.data_dir}: SCST needs a train and a val split")
        self.features, self.val_features = model_features(  # (N, views + 1, D), (N_val, D)
            self.data_dir, self.model_config.encoder, self.encoder, config.views, self.train_records, self.val_records,
            device)
        self.view_of = torch.zeros(len(self.train_records), dtype=torch.long)  # view 0: the centre crop
        self.scorer = CiderD(references(self.train_records))
        # the training captions as id rows, each image's contiguous: what ``reference_loss`` draws from
        self.references = encode_captions(self.train_records, self.vocab, self.model_config.max_len)
        self.caption_count = torch.bincount(self.references.pair_image, minlength=len(self.train_records))
        self.first_caption = self.caption_count.cumsum(0) - self.caption_count
        self.optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=config.lr, weight_decay=0.0)
        specials = self.vocab.specials
        self.banned = [specials.pad, specials.start, specials.unk]  # what decode never samples (suppress_unk is on)
        self.sample_config = DecodeConfig(strategy="sample", max_len=self.model_config.max_len,
                                          num_return=config.samples, temperature=config.temperature)
        self.greedy_config = DecodeConfig(strategy="greedy", max_len=self.model_config.max_len)

    def _matcher(self, loaded) -> Matcher:
        """The matching model of ``config.matching`` (or of the starting checkpoint). ``read_matcher`` refuses
        one trained on other features (another CNN, other tuned blocks): its cosine would mean nothing here."""
        source = resolve_model(self.config.matching) if self.config.matching else loaded.directory
        matcher = read_matcher(Path(source), self.model_config.encoder, self.vocab)
        if matcher is None:
            raise ConfigError(f"{source}: has no matching model (matching.json) for --match-weight; train one with "
                              "`captioner matching DATA --checkpoint ...` or name another with --matching")
        matcher.model.to(self.device)
        return matcher

    def rewards(self, image_ids: list[int], hyps: list[Hypothesis], feats: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Reward of each caption: CIDEr-D against its image's training references, plus ``match_weight`` x
        its match with its photo (``feats``: one row per caption) when a matching model is in use; and the
        mean of each part, for the log."""
        words = [self.vocab.decode(h.tokens) for h in hyps]
        cider = torch.tensor([self.scorer.score(i, w) for i, w in zip(image_ids, words)])
        if self.matcher is None:
            return cider, {"cider": cider.mean().item()}
        match = torch.tensor(self.matcher.similarity(feats, self.vocab, words, list(range(len(hyps)))))
        return cider + self.config.match_weight * match, {"cider": cider.mean().item(), "match": match.mean().item()}

    def reference_loss(self, index: torch.Tensor, feats: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy per token of one training reference per image, drawn with ``generator``: the
        cross-entropy training's own loss on the captions it encoded (``encode_captions``); the ``xe_weight`` term."""
        refs = self.references
        picks = torch.randint(0, 2**31 - 1, (len(index),), generator=generator)
        rows = self.first_caption[index] + picks % self.caption_count[index]  # (B,) rows of refs.tokens
        logp = sequence_logprob(self.decoder, feats, refs.tokens[rows].to(self.device), self.vocab.specials.pad, [])
        return -logp.sum() / (refs.lengths[rows] - 1).sum().to(self.device)  # targets: every token after <start>

    def step(self, index: torch.Tensor, generator: torch.Generator) -> dict:
        """One SCST update on the images ``index`` (into the train split)."""
        cfg, vocab = self.config, self.vocab
        feats = self.features[index, self.view_of[index]].to(self.device)  # (B, D): each image's view this epoch
        ids = [self.train_records[i].id for i in index.tolist()]
        self.decoder.eval()  # the policy that samples is the one whose log-probabilities are trained: no dropout
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        samples = [h for per in decode(self.decoder, feats, DecodeConfig(**{**asdict(self.sample_config), "seed": seed}),
                                       vocab.specials) for h in per]
        s = cfg.samples
        rewards, parts = self.rewards([i for i in ids for _ in range(s)], samples, feats.repeat_interleave(s, 0))
        rewards = rewards.view(-1, s)  # (B, S)
        greedy = None
        if cfg.baseline == "greedy":
            best = [per[0] for per in decode(self.decoder, feats, self.greedy_config, vocab.specials)]
            greedy = self.rewards(ids, best, feats)[0]
        adv = advantages(rewards, cfg.baseline, greedy).view(-1).to(self.device)  # (B*S,)
        tokens = sampled_tokens(samples, self.model_config.max_len, vocab.specials)
        logp = sequence_logprob(self.decoder, feats.repeat_interleave(s, 0), tokens.to(self.device), vocab.specials.pad,
                                self.banned)  # (B*S,)
        lengths = torch.tensor([len(h.tokens) for h in samples], dtype=torch.float)
        loss = -(adv * logp).sum() / lengths.add(1).sum().to(self.device)  # per generated token, as XE is
        xe = self.reference_loss(index, feats, generator) if cfg.xe_weight else None
        if xe is not None:
            loss = loss + cfg.xe_weight * xe
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.decoder.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise TrainingError(f"non-finite SCST loss/gradient ({loss.item()}, norm {grad_norm.item()})")
        self.optimizer.step()
        return {"loss": loss.item(), "xe": None if xe is None else xe.item(), "reward": rewards.mean().item(), **parts,
                "advantage_abs": adv.abs().mean().item(),
                "greedy_reward": None if greedy is None else greedy.mean().item(),
                "sample_words": lengths.mean().item(), "grad_norm": grad_norm.item()}

    def validate(self) -> dict:
        """Val-split metrics of beam search from the cache, plus caption length and distinct words."""
        self.decoder.eval()
        captioner = Captioner(self.encoder, self.decoder, self.vocab, self.model_config, str(self.device), "fp32")
        config = captioner.decode_config(strategy="beam", beam_size=self.config.val_beam)
        captions = caption_features(captioner, self.val_records, self.val_features, config)
        metrics = score(self.val_records, captions)
        words = [c.split() for c in captions.values()]
        return {**metrics, "mean_words": sum(map(len, words)) / len(words),
                "distinct_words": len({w for c in words for w in c})}

    def fit(self) -> dict:
        """Validate the starting point, then ``epochs`` passes over the training images in seeded order."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "scst_config.json").write_text(json.dumps(asdict(self.config), indent=1))
        for name in ("log.jsonl", "metrics.jsonl"):
            (self.out / name).unlink(missing_ok=True)
        generator = torch.Generator().manual_seed(self.config.seed)
        best = self._record(0, 0, self.validate(), -1.0)
        step = 0
        for epoch in range(1, self.config.epochs + 1):
            order = torch.randperm(len(self.train_records), generator=generator)
            if self.config.views:
                self.view_of = draw_views(len(self.train_records), self.config.views, self.config.seed, epoch)
            started = time.time()
            for first in range(0, len(order), self.config.batch_size):
                stats = self.step(order[first:first + self.config.batch_size], generator)
                step += 1
                if step % self.config.log_every == 0:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps({"epoch": epoch, "step": step, **stats,
                                            "seconds": round(time.time() - started, 1)}) + "\n")
            best = self._record(epoch, step, self.validate(), best)
        return {"best_val_cider": best, "steps": step}

    def _record(self, epoch: int, step: int, metrics: dict, best: float) -> float:
        """Append the epoch's metrics; write ``best/`` when val CIDEr-D improved (epoch 0: the starting model)."""
        improved = metrics["CIDEr"] > best
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, **metrics, "best": improved, "time": time.time()}) + "\n")
        print(f"epoch {epoch}: val beam-{self.config.val_beam} BLEU-4 {metrics['Bleu_4']:.4f} CIDEr-D "
              f"{metrics['CIDEr']:.4f} words/caption {metrics['mean_words']:.2f} distinct words "
              f"{metrics['distinct_words']}" + ("  (best)" if improved else ""), flush=True)
        if improved:
            side = (lambda directory: save_matcher(self.matcher, directory)) if self.matcher is not None else None
            save_checkpoint(self.out / "best", self.model_config, self.vocab, self.decoder, self.encoder,
                            side_files=side)
        return max(best, metrics["CIDEr"])
