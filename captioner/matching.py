"""After decoding: rerank the beam by how well each caption matches the photo, by a small matching model.

Consensus reranking (``captioner/consensus.py``) showed what the beam leaves on the table: its five fluent
captions, ordered by what people called similar photos, gained 2.6 CIDEr-D on Flickr8k val. But its index
*is* the dataset's captions, which a shipped model must not carry. A visual-semantic embedding (Kiros et
al., 2014; VSE++, Faghri et al., 2018) learns the same knowledge as weights: an image projection and a
caption GRU into one space where a photo and the captions people wrote for it are close. Reranking the beam
by the model's score + ``match_weight`` x cosine(photo, caption) prefers the candidate that says what is
specific to *this* photo over the generic one the decoder's likelihood favours. It holds no caption text
(word vectors of the vocabulary the checkpoint already has), so it ships beside the bundled model.

Trained by ``captioner matching`` on the checkpoint's own features (the CNN's tuned blocks included, through
the view cache when ``views`` > 0, as ``captioner scst`` reads them), in minutes on a CPU: symmetric InfoNCE
over in-batch pairs (CLIP's loss), which is the whole recipe. Files: ``matching.safetensors`` (the weights)
and ``matching.json`` (the config, the encoder it was trained on, the vocabulary size, val recall, and the
SHA-256 of the tensor file, so a mismatched pair is refused).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn import functional as F

from .captions import CaptionTensors
from .encoder import EncoderConfig
from .errors import CheckpointError, ConfigError
from .sidecar import read_pair, write_pair
from .vocab import Vocab

TENSORS, CONFIG = "matching.safetensors", "matching.json"
FORMAT = "captioner-matching/1"


@dataclass
class MatchingConfig:
    """The matching model's shape and training; saved in ``matching.json``. Defaults: the shipped model's
    (MODEL_CARD.md, "Matching reranking"), chosen by val recall and val reranking."""

    embed: int = 300
    hidden: int = 512  # caption GRU width
    joint: int = 1024  # the shared space
    epochs: int = 12
    batch_size: int = 128  # pairs per step: the in-batch negatives
    lr: float = 2e-4  # Adam; divided by 10 after half the epochs
    temperature: float = 0.05
    clip: float = 2.0
    views: int = 4  # >0: each epoch draws one of this many random crops (or the centre crop) per photo
    seed: int = 1

    def __post_init__(self) -> None:
        if min(self.embed, self.hidden, self.joint, self.epochs, self.batch_size) < 1 or self.views < 0:
            raise ConfigError("matching: embed, hidden, joint, epochs and batch_size must be >= 1, views >= 0")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("matching: lr and temperature must be > 0")


class MatchingModel(nn.Module):
    """Photo features and captions into one space; ``similarity`` is their cosine."""

    def __init__(self, feature_dim: int, vocab_size: int, config: MatchingConfig, pad_id: int = 0) -> None:
        super().__init__()
        self.image_proj = nn.Linear(feature_dim, config.joint)
        self.embed = nn.Embedding(vocab_size, config.embed, padding_idx=pad_id)
        self.gru = nn.GRU(config.embed, config.hidden, batch_first=True)
        self.text_proj = nn.Linear(config.hidden, config.joint)

    def images(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, joint) unit vectors."""
        return F.normalize(self.image_proj(features.float()), dim=-1)

    def captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(N, T) ``<start> w.. <end> <pad>..`` rows and their lengths (``<start>``/``<end>`` included) ->
        (N, joint) unit vectors: the GRU's state after ``<end>``."""
        steps = (lengths - 1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens[:, 1:]), steps, batch_first=True,
                                                   enforce_sorted=False)
        _, last = self.gru(packed)
        return F.normalize(self.text_proj(last[-1]), dim=-1)


def token_rows(vocab: Vocab, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised captions -> padded ``<start> w.. <end>`` id rows and their lengths, as training saw them."""
    ids = [vocab.encode(words) for words in captions]
    rows = torch.full((len(ids), max(map(len, ids))), vocab.specials.pad, dtype=torch.long)
    for i, row in enumerate(ids):
        rows[i, :len(row)] = torch.tensor(row)
    return rows, torch.tensor([len(row) for row in ids])


@dataclass
class Matcher:
    """A trained matching model with what it was trained for: an encoder's features and a vocabulary."""

    model: MatchingModel
    config: MatchingConfig
    encoder: EncoderConfig
    recall: dict  # val caption -> photo recall at 1 / 5 / 10 when trained

    @torch.no_grad()
    def similarity(self, features: torch.Tensor, vocab: Vocab, captions: list[list[str]],
                   owner: list[int]) -> list[float]:
        """Cosine between each caption and the photo ``owner[i]`` (a row of the (B, D) ``features``)."""
        if not captions:
            return []
        rows, lengths = token_rows(vocab, captions)
        device = next(self.model.parameters()).device
        text = self.model.captions(rows.to(device), lengths)
        return (text * self.model.images(features.to(device))[torch.tensor(owner, device=device)]).sum(1).tolist()

    def rerank(self, nbest: list[list[dict]], features: torch.Tensor, vocab: Vocab, weight: float) -> list[list[dict]]:
        """Per photo its candidates ordered by the model's score + ``weight`` x their match with the photo, best
        first; each candidate gains ``"match"`` (the cosine, -1 to 1)."""
        flat = [(i, c) for i, candidates in enumerate(nbest) for c in candidates]
        sims = self.similarity(features, vocab, [c["tokens"] for _, c in flat], [i for i, _ in flat])
        for (_, candidate), sim in zip(flat, sims):
            candidate["match"] = round(sim, 4)
        return [sorted(candidates, key=lambda c: -(c["score"] + weight * c["match"])) for candidates in nbest]


def pick_levels(per_level: list[list[list[dict]]], levels: tuple[float, ...], cost: float) -> list[list[dict]]:
    """Specificity by fit (``DecodeConfig.specificity_levels``): per level, per photo its reranked n-best (each
    candidate with its ``"match"``) -> per photo the n-best of the level whose first caption has the highest
    match - ``cost`` x level; a tie goes to the lower level. Why the match decides: it is the one judge of
    whether a rarer word ("poodle" for "dog") is what *this* photo shows, which the rarity bonus alone cannot
    know; the cost keeps the plainer caption unless the rarer one fits clearly better. The fit is rounded to 6
    decimals, so that a tie is a tie whatever the float error of ``cost x level``."""
    picked = []
    for photo in range(len(per_level[0])):
        fit = [(round(per_level[i][photo][0]["match"] - cost * level, 6), -level, i) for i, level in enumerate(levels)
               if per_level[i][photo]]
        picked.append(per_level[max(fit)[2]][photo] if fit else [])
    return picked


def contrastive_loss(images: torch.Tensor, captions: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch pairs: row i of each is one (photo, caption) pair."""
    logits = images @ captions.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def recall(model: MatchingModel, features: torch.Tensor, captions: CaptionTensors) -> dict:
    """Caption -> photo retrieval over a split: the fraction of captions whose photo ranks in the top 1 / 5 / 10."""
    model.eval()
    sims = model.captions(captions.tokens, captions.lengths) @ model.images(features).T  # (M, N)
    own = sims.gather(1, captions.pair_image[:, None])
    rank = (sims > own).sum(1)
    return {f"r{k}": round((rank < k).float().mean().item(), 4) for k in (1, 5, 10)}


def train_matching(train_features: torch.Tensor, train_captions: CaptionTensors, val_features: torch.Tensor,
                   val_captions: CaptionTensors, vocab: Vocab, encoder: EncoderConfig, config: MatchingConfig,
                   log=print) -> Matcher:
    """Train on (N, views + 1, D) training features (view 0 the centre crop) and their captions; each epoch
    every caption is paired with one view of its photo, drawn afresh. Val recall is logged per epoch."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = MatchingModel(train_features.shape[-1], len(vocab.words), config, vocab.specials.pad)
    optimizer = torch.optim.Adam(model.parameters(), config.lr)
    pairs = len(train_captions.tokens)
    for epoch in range(1, config.epochs + 1):
        if epoch == config.epochs // 2 + 1:
            for group in optimizer.param_groups:
                group["lr"] = config.lr / 10
        model.train()
        started, total = time.time(), 0.0
        view = torch.randint(train_features.shape[1], (train_features.shape[0],), generator=generator)
        for batch in torch.randperm(pairs, generator=generator).split(config.batch_size):
            photo = train_captions.pair_image[batch]
            loss = contrastive_loss(model.images(train_features[photo, view[photo]]),
                                    model.captions(train_captions.tokens[batch], train_captions.lengths[batch]),
                                    config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            total += loss.item() * len(batch)
        found = recall(model, val_features, val_captions)
        log(f"matching epoch {epoch}: loss {total / pairs:.4f}, val caption->photo recall {found} "
            f"({time.time() - started:.0f} s)")
    return Matcher(model.eval(), config, encoder, found)


def save_matcher(matcher: Matcher, directory: Path) -> Path:
    """Write the pair (``sidecar.write_pair``: a crash between the files leaves one ``read_matcher`` refuses)."""
    return write_pair(directory, TENSORS, CONFIG, {k: v.half() for k, v in matcher.model.state_dict().items()},
                      {"format": FORMAT, "config": asdict(matcher.config), "encoder": matcher.encoder.to_json(),
                       "vocab_size": matcher.model.embed.num_embeddings, "val_recall": matcher.recall})


def read_matcher(directory: Path, encoder: EncoderConfig, vocab: Vocab) -> Matcher | None:
    """The checkpoint's matching model (None without one). Refused, naming the file: a broken or mismatched
    pair, one trained on another encoder's features or for another vocabulary."""
    path = Path(directory) / CONFIG
    try:
        pair = read_pair(directory, TENSORS, CONFIG, FORMAT)
        if pair is None:
            return None
        data, tensors = pair
        config = MatchingConfig(**data["config"])
        trained_on = EncoderConfig.from_json(data["encoder"])
        if data["vocab_size"] != len(vocab.words):
            raise ValueError(f"trained for {data['vocab_size']} words, the checkpoint has {len(vocab.words)}")
        model = MatchingModel(encoder.feature_dim, len(vocab.words), config, vocab.specials.pad)
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError, RuntimeError,
            SafetensorError, ConfigError) as err:
        raise CheckpointError(f"{path}: not a valid matching model ({type(err).__name__}: {str(err)[:300]}); "
                              "delete it or re-create it with `captioner matching`") from None
    if not trained_on.same_features(encoder):
        raise CheckpointError(f"{path}: trained on another encoder's features ({trained_on.cache_key()}, this "
                              f"model's is {encoder.cache_key()}); re-create it with `captioner matching`")
    return Matcher(model.eval(), config, trained_on, data.get("val_recall", {}))
