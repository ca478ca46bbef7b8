"""A small random decoder with varied captions, its features, and the teacher-forced log-probability of a
caption: shared by the decoding tests (``from decoder_fixtures import decoder, feats``)."""

from __future__ import annotations

import pytest
import torch

from captioner.config import ModelConfig
from captioner.encoder import EncoderConfig
from captioner.model import CaptionDecoder


@pytest.fixture(scope="module")
def decoder() -> CaptionDecoder:
    """A random decoder with a peaked output layer, so captions are varied and end at various lengths."""
    torch.manual_seed(3)
    enc = EncoderConfig(name="mobilenet_v2", weights="none", feature_dim=24)
    dec = CaptionDecoder(ModelConfig(vocab_size=40, encoder=enc, hidden=32, embed=16, dropout=0.0)).eval()
    with torch.no_grad():
        dec.out.weight.mul_(8.0)
        dec.out.bias[2] += 1.5  # <end> likely enough that most captions finish
    return dec


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return torch.randn(6, 24, generator=torch.Generator().manual_seed(1))


def model_logprob(decoder: CaptionDecoder, feat: torch.Tensor, tokens: list[int], max_len: int) -> float:
    """The model's log-probability of ``tokens`` (+ ``<end>`` unless cut at ``max_len``) by teacher forcing, with
    ``<pad>``, ``<start>`` and ``<unk>`` banned as decoding bans them."""
    seq = [1] + tokens + ([2] if len(tokens) < max_len else [])
    state, total = decoder.init_state(feat[None]), 0.0
    with torch.no_grad():
        for prev, nxt in zip(seq[:-1], seq[1:]):
            logits, state = decoder.step(torch.tensor([prev]), state)
            logp = torch.log_softmax(logits, -1)
            logp[0, [0, 1, 3]] = float("-inf")
            total += logp[0, nxt].item()
    return total
