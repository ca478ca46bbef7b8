"""The decoder step's small-batch CPU path (``CaptionDecoder._step_small``, used up to ``ONE_THREAD_ROWS``
rows): the numbers of the plain step up to float rounding, fresh after the weights change, and the
thread count restored afterwards."""

from __future__ import annotations

import pytest
import torch

from captioner.config import ModelConfig
from captioner.decoding import DecodeConfig, decode
from captioner.encoder import EncoderConfig
from captioner.model import CaptionDecoder


def make_decoder(layers: int = 1, cell: str = "lstm", seed: int = 0) -> CaptionDecoder:
    torch.manual_seed(seed)
    enc = EncoderConfig(name="mobilenet_v2", weights="none", feature_dim=24)
    config = ModelConfig(vocab_size=40, encoder=enc, cell=cell, layers=layers, hidden=32, embed=16, dropout=0.0)
    return CaptionDecoder(config).eval()


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, CaptionDecoder.ONE_THREAD_ROWS])
def test_small_batch_step_matches_the_plain_step(layers, rows):
    dec = make_decoder(layers)
    feats, tokens = torch.randn(rows, 24), torch.randint(4, 40, (rows,))
    with torch.inference_mode():
        state = dec.init_state(feats)
        logits, new = dec.step(tokens, state)  # small-batch path
        ref_logits, ref = dec._step(tokens, state)  # lstm_cell + nn.Linear
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for s, r in zip(new, ref):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [DecodeConfig(strategy="greedy"),
                                    DecodeConfig(strategy="beam", beam_size=3, num_return=3)], ids=["greedy", "beam3"])
def test_decoded_captions_do_not_depend_on_the_path(config, monkeypatch):
    dec, feats = make_decoder(seed=3), torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dec.out.weight.mul_(8.0)
    small = decode(dec, feats, config)  # 5 or 15 rows: the small-batch path
    monkeypatch.setattr(CaptionDecoder, "ONE_THREAD_ROWS", 0)  # every step through the plain path
    plain = decode(dec, feats, config)
    assert [[h.tokens for h in per] for per in small] == [[h.tokens for h in per] for per in plain]


def test_transposed_weights_follow_weight_updates():
    dec = make_decoder()
    tokens, feats = torch.tensor([5]), torch.randn(1, 24)
    with torch.no_grad():
        before, _ = dec.step(tokens, dec.init_state(feats))
        dec.rnn.weight_hh_l0.mul_(2.0)  # an optimizer step or load_state_dict updates in place
        dec.out.weight.add_(0.1)
        after, _ = dec.step(tokens, dec.init_state(feats))
        ref, _ = dec._step(tokens, dec.init_state(feats))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)


def test_thread_count_is_restored_after_a_step():
    dec, threads = make_decoder(), torch.get_num_threads()
    with torch.no_grad():
        dec.step(torch.tensor([5]), dec.init_state(torch.randn(1, 24)))
    assert torch.get_num_threads() == threads


def test_training_mode_and_grad_take_the_plain_step():
    dec = make_decoder()
    tokens, feats = torch.tensor([5, 6]), torch.randn(2, 24)
    logits, _ = dec.step(tokens, dec.init_state(feats))  # grad enabled: the autograd graph reaches the weights
    logits.sum().backward()
    assert dec.rnn.weight_hh_l0.grad is not None and dec.out.weight.grad is not None
