"""The decoder: shapes, <pad> kept out of loss and gradient, clipping, and it can learn."""

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


def test_pad_positions_carry_no_gradient():
    dec = make()
    feats, tokens = batch()
    loss, _ = caption_loss(dec, feats, tokens)
    loss.backward()
    assert dec.embed.weight.grad[0].abs().sum() == 0  # the <pad> embedding row
    # changing what follows <end> (pads -> any word) leaves the loss unchanged
    other = tokens.clone()
    other[0, 5:] = 9
    other_loss, _ = caption_loss(dec, feats, torch.where(tokens == 0, 0, other))
    assert torch.allclose(loss, other_loss)


def test_padding_does_not_change_loss():
    dec = make()
    feats, tokens = batch()
    padded = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(caption_loss(dec, feats, tokens)[0], caption_loss(dec, feats, padded)[0])


def test_clipping_bounds_the_gradient_norm():
    dec = make("rnn")
    feats, tokens = batch()
    loss, _ = caption_loss(dec, feats * 1000, tokens)
    (loss * 1000).backward()
    before = torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
    after = torch.norm(torch.stack([p.grad.norm() for p in dec.parameters() if p.grad is not None]))
    assert before > 1.0
    assert after <= 1.0 + 1e-4


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
