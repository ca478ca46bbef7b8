"""Training and decoding run the same network: ``forward`` (``nn.LSTM``/``GRU``/``RNN`` over the whole
sequence, cuDNN on a GPU) and ``init_state`` + ``step`` (the fused single-step cell functions) are two
implementations of one decoder, so teacher-forced log-probabilities from both must agree."""

from __future__ import annotations

import pytest
import torch

from captioner.config import CELLS, ModelConfig
from captioner.encoder import EncoderConfig
from captioner.model import CaptionDecoder

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def decoder(cell: str, layers: int, feed_image: bool, device: str) -> CaptionDecoder:
    """A small decoder in eval mode; dropout is set so a train-mode leak would change the numbers."""
    torch.manual_seed(0)
    enc = EncoderConfig(name="mobilenet_v2", weights="none", feature_dim=24)
    config = ModelConfig(vocab_size=40, encoder=enc, cell=cell, layers=layers, hidden=32, embed=16, dropout=0.3,
                         feed_image=feed_image)
    return CaptionDecoder(config).to(device).eval()


def batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) features and (B, T) ``<start> .. <end> <pad>..`` captions of different lengths."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 2],
                           [1, 12, 13, 2, 0, 0, 0, 0, 0],
                           [1, 39, 4, 30, 31, 2, 0, 0, 0]])
    return torch.randn(3, 24, generator=generator).to(device), tokens.to(device)


def stepped_logits(dec: CaptionDecoder, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through ``step``: (B, T-1, V) logits, position t predicting token t+1."""
    state, logits = dec.init_state(features), []
    for t in range(tokens.shape[1] - 1):
        out, state = dec.step(tokens[:, t], state)  # (B, V)
        logits.append(out)
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feed_image", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_forward_and_step_give_the_same_log_probabilities(cell, layers, feed_image, device):
    dec = decoder(cell, layers, feed_image, device)
    features, tokens = batch(device)
    with torch.no_grad():
        logits, targets = dec(features, tokens)  # (n_real, V), (n_real,)
        stepped = stepped_logits(dec, features, tokens)[tokens[:, 1:] != 0]  # same positions, same order
    assert torch.equal(targets, tokens[:, 1:][tokens[:, 1:] != 0])
    torch.testing.assert_close(torch.log_softmax(stepped, -1), torch.log_softmax(logits, -1), rtol=0, atol=1e-5)
