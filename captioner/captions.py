"""Captions tokenised once into padded id tensors, so training never re-tokenises per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .manifest import Record
from .tokenizer import tokenize
from .vocab import Vocab


@dataclass
class CaptionTensors:
    """All (image, caption) pairs of a split: ``tokens[i]`` describes image ``image_ids[pair_image[i]]``."""

    tokens: torch.Tensor  # (M, max_len + 2) int64: <start> w.. <end> <pad>..
    lengths: torch.Tensor  # (M,) tokens including <start> and <end>
    pair_image: torch.Tensor  # (M,) index into image_ids
    image_ids: list[int]


def encode_captions(records: list[Record], vocab: Vocab, max_len: int) -> CaptionTensors:
    """Tokenise and map every caption; longer captions are cut to ``max_len`` words."""
    rows, image_index = [], []
    for i, record in enumerate(records):
        for caption in record.captions:
            rows.append(vocab.encode(tokenize(caption)[:max_len]))
            image_index.append(i)
    tokens = torch.full((len(rows), max_len + 2), vocab.specials.pad, dtype=torch.long)
    for j, ids in enumerate(rows):
        tokens[j, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(r) for r in rows])
    return CaptionTensors(tokens, lengths, torch.tensor(image_index), [r.id for r in records])


def references(records: list[Record]) -> dict[int, list[list[str]]]:
    """Tokenised reference captions per image id: what BLEU/CIDEr compare against."""
    return {r.id: [tokenize(c) for c in r.captions] for r in records}
