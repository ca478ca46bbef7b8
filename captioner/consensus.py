"""After decoding: consensus reranking of the n-best against what similar training photos were called.

Devlin et al. (2015, "Language models for image captioning: the quirks and what works") and Mao et al.
(m-RNN) rerank a captioner's n-best by its agreement with the human captions of the k training images
nearest to the photo: the candidate with the highest mean CIDEr-D against those captions wins, plus a
small weight on the model's own score. The beam's candidates are all fluent; the neighbours' captions say
which of them people would write for photos like this one. On the bundled model (Flickr8k val, beam 5,
alpha 0.8, guided, k 20, weight 0.1) it moved CIDEr-D 51.1 -> 53.6 and BLEU-4 21.8 -> 22.0 (MODEL_CARD.md).

The index lives beside a checkpoint: ``consensus.safetensors`` (the training photos' pooled features,
L2-normalised, float16, from the checkpoint's own encoder) and ``consensus.json`` (their tokenised captions,
the split, the encoder it was built with and the SHA-256 of the tensor file). It holds a dataset's captions,
so ``captioner consensus-index`` builds it from the user's own data into the user's own checkpoint: the
bundled models never ship one (Flickr8k's captions stay under the dataset's terms).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .captions import references
from .encoder import EncoderConfig
from .errors import CheckpointError, DatasetError
from .metrics import CiderD
from .sidecar import read_pair, write_pair

TENSORS, INDEX = "consensus.safetensors", "consensus.json"
FORMAT = "captioner-consensus/1"


@dataclass
class ConsensusIndex:
    """Training photos' features (N, D) and tokenised captions, rows aligned."""

    features: torch.Tensor  # (N, D) float32, L2-normalised (stored as float16)
    captions: list[list[list[str]]]
    encoder: EncoderConfig
    split: str

    @functools.cached_property
    def scorer(self) -> CiderD:
        """CIDEr-D with the index's captions as references (their document frequencies); built on first use."""
        return CiderD(dict(enumerate(self.captions)))

    def neighbours(self, features: torch.Tensor, k: int) -> list[list[int]]:
        """(B, D) features -> per photo the rows of its ``k`` nearest training photos (cosine similarity)."""
        query = torch.nn.functional.normalize(features.float().cpu(), dim=1)
        return (query @ self.features.float().T).topk(min(k, len(self.captions)), dim=1).indices.tolist()

    def rerank(self, nbest: list[list[dict]], features: torch.Tensor, k: int, weight: float) -> list[list[dict]]:
        """Per photo its candidates (``{"tokens": words, "score": ...}``) ordered by mean CIDEr-D against the
        captions of its ``k`` nearest training photos plus ``weight`` x the model's score, best first."""
        ranked = []
        for candidates, rows in zip(nbest, self.neighbours(features, k)):
            def agreement(candidate: dict) -> float:
                return sum(self.scorer.scores(rows, candidate["tokens"])) / len(rows)
            ranked.append(sorted(candidates, key=lambda c: -(agreement(c) + weight * c["score"])))
        return ranked


def build_index(encoder: EncoderConfig, data_dir: Path, split: str = "train") -> ConsensusIndex:
    """The index of ``split`` from the data directory's feature cache of ``encoder`` (the checkpoint's own:
    ``captioner features`` makes it). The test split is refused: an index of it would rerank towards the
    answers."""
    from .features import FeatureCache, cache_dir
    from .manifest import load_manifest, split_records

    if split == "test":
        raise DatasetError("a consensus index of the test split would rerank towards its own references; "
                           "use the training split")
    records = split_records(load_manifest(data_dir), split)
    cache = FeatureCache(cache_dir(data_dir, encoder))
    records = [r for r in records if r.id not in cache.failed]
    if not records:
        raise DatasetError(f"{data_dir}: no usable images in split {split!r}")
    features = torch.nn.functional.normalize(cache.gather([r.id for r in records]).float(), dim=1)
    refs = references(records)
    return ConsensusIndex(features.half().float(), [refs[r.id] for r in records], encoder, split)  # as stored


def save_index(index: ConsensusIndex, directory: Path) -> Path:
    """Write the pair (``sidecar.write_pair``: a crash between the files leaves one ``read_index`` refuses)."""
    return write_pair(directory, TENSORS, INDEX, {"features": index.features.half()},
                      {"format": FORMAT, "split": index.split, "encoder": index.encoder.to_json(),
                       "captions": index.captions})


def read_index(directory: Path, encoder: EncoderConfig) -> ConsensusIndex | None:
    """The checkpoint's index (None without one). Refused, naming the file: a broken or mismatched pair, and
    an index built with another encoder (its features would not be comparable with this model's)."""
    path = Path(directory) / INDEX
    try:
        pair = read_pair(directory, TENSORS, INDEX, FORMAT)
        if pair is None:
            return None
        data, tensors = pair
        features, captions = tensors["features"].float(), data["captions"]
        if features.ndim != 2 or features.shape[0] != len(captions) or features.shape[1] != encoder.feature_dim:
            raise ValueError(f"features {tuple(features.shape)} for {len(captions)} photos and a "
                             f"{encoder.feature_dim}-d encoder")
        built_with = EncoderConfig.from_json(data["encoder"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a valid consensus index ({type(err).__name__}: {err}); delete it or "
                              "re-create it with `captioner consensus-index`") from None
    if not built_with.same_features(encoder):
        raise CheckpointError(f"{path}: built with another encoder ({built_with.cache_key()}, this model's is "
                              f"{encoder.cache_key()}); re-create it with `captioner consensus-index`")
    return ConsensusIndex(features, captions, built_with, data["split"])
