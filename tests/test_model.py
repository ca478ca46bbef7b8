"""The decoder: shapes, <pad> kept out of loss and gradient, and it can learn (clipping: test_training.py)."""

from __future__ import annotations

import pytest
import torch

from captioner.config import ModelConfig
from captioner.encoder import EncoderConfig
from captioner.model import CaptionDecoder, caption_loss


def make(cell: str = "lstm", layers: int = 1, feed_image: bool = False, dropout: float = 0.0) -> CaptionDecoder:
    torch.manual_seed(0)
    enc = EncoderConfig(name="mobilenet_v2", weights="none", feature_dim=20)
    return CaptionDecoder(ModelConfig(vocab_size=30, encoder=enc, cell=cell, layers=layers, hidden=16, embed=8,
                                      dropout=dropout, feed_image=feed_image))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 8, 9, 2, 0, 0, 0], [1, 4, 5, 6, 7, 8, 2]])
    return torch.randn(3, 20), tokens


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2])
def test_state_and_step_shapes(cell, layers):
    dec = make(cell, layers)
    feats, _ = batch()
    state = dec.init_state(feats)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (layers, 3, 16) for s in state)
    logits, state = dec.step(torch.tensor([1, 1, 1]), state)
    assert logits.shape == (3, 30)


def test_forward_returns_only_real_positions():
    dec = make()
    feats, tokens = batch()
    logits, targets = dec(feats, tokens)
    real = int((tokens[:, 1:] != 0).sum())  # 4 + 3 + 6 targets
    assert logits.shape == (real, 30) and targets.shape == (real,)
    assert not (targets == 0).any()


def test_feed_image_changes_the_initial_state():
    feats, _ = batch()
    plain, fed = make(feed_image=False), make(feed_image=True)
    fed.load_state_dict(plain.state_dict(), strict=False)
    assert not torch.allclose(plain.init_state(feats)[0], fed.init_state(feats)[0])


def test_loss_is_the_mean_cross_entropy_of_the_real_target_tokens():
    dec = make()
    feats, tokens = batch()
    loss, n = caption_loss(dec, feats, tokens)
    # by hand, on the decoding path (init_state + step): -log p(target) summed over targets that are not <pad>
    state, total, count = dec.init_state(feats), torch.zeros(()), 0
    for t in range(tokens.shape[1] - 1):
        logits, state = dec.step(tokens[:, t], state)
        logp = torch.log_softmax(logits, dim=-1)
        for row in range(len(tokens)):
            if tokens[row, t + 1] != 0:
                total -= logp[row, tokens[row, t + 1]]
                count += 1
    assert n == count == 4 + 3 + 6  # w.. and <end> of each caption
    assert torch.allclose(loss, total / count, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_pad_positions_change_neither_loss_nor_gradients(cell):
    """Each caption alone, without any padding, gives the same token-summed loss and gradients as in the
    padded batch: the positions after <end> contribute nothing."""
    dec = make(cell)
    feats, tokens = batch()

    def summed(f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dec.zero_grad()
        loss, n = caption_loss(dec, f, t)
        (loss * n).backward()
        return (loss * n).detach(), [p.grad.clone() for p in dec.parameters()]

    padded_loss, padded_grads = summed(feats, tokens)
    alone = [summed(feats[i:i + 1], tokens[i:i + 1, : int((tokens[i] != 0).sum())]) for i in range(len(tokens))]
    assert torch.allclose(padded_loss, sum(loss for loss, _ in alone), atol=1e-5)
    for k, grad in enumerate(padded_grads):
        assert torch.allclose(grad, sum(grads[k] for _, grads in alone), atol=1e-6)


def test_padding_does_not_change_loss():
    dec = make()
    feats, tokens = batch()
    padded = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(caption_loss(dec, feats, tokens)[0], caption_loss(dec, feats, padded)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_decoder_overfits_a_handful_of_captions(cell):
    dec = make(cell)
    feats, tokens = batch()
    opt = torch.optim.Adam(dec.parameters(), lr=0.03)
    for _ in range(150):
        loss, _ = caption_loss(dec, feats, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
