"""The decoder step's CPU inference paths, FBGEMM's float16-weight products (``captioner/fp16_step.py``), ONNX
Runtime (``captioner/onnx_step.py``), both at any number of rows, and torch's small-batch path
(``CaptionDecoder._step_small``, up to ``ONE_THREAD_ROWS`` rows): the numbers of the plain step up to float
rounding, fresh after the weights change, chosen by the rules ``cpu_runtime`` states, and the thread count
restored afterwards."""

from __future__ import annotations

import pytest
import torch

from captioner import fp16_step
from captioner.config import ModelConfig
from captioner.decoding import DecodeConfig, decode
from captioner.encoder import EncoderConfig
from captioner.model import CaptionDecoder


# onnxruntime is a dependency and FBGEMM is in every x86 torch build: neither path may be skipped
RUNTIMES = ["torch", "onnxruntime", "fbgemm"]


def make_decoder(layers: int = 1, cell: str = "lstm", seed: int = 0, runtime: str = "auto",
                 fp16: bool | None = None) -> CaptionDecoder:
    """A small random decoder; ``fp16`` (default: when the runtime is fbgemm) rounds its weights to float16
    values, as an exported checkpoint stores them."""
    torch.manual_seed(seed)
    enc = EncoderConfig(name="mobilenet_v2", weights="none", feature_dim=24)
    config = ModelConfig(vocab_size=40, encoder=enc, cell=cell, layers=layers, hidden=32, embed=16, dropout=0.0)
    dec = CaptionDecoder(config).eval()
    if runtime == "fbgemm" if fp16 is None else fp16:
        with torch.no_grad():
            for weight in dec.parameters():
                weight.copy_(weight.half())
    dec.cpu_runtime = runtime
    return dec


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, CaptionDecoder.ONE_THREAD_ROWS, 200])
def test_inference_step_matches_the_plain_step(layers, rows, runtime):
    dec = make_decoder(layers, runtime=runtime)
    feats, tokens = torch.randn(rows, 24), torch.randint(4, 40, (rows,))
    with torch.inference_mode():
        state = dec.init_state(feats)
        logits, new = dec.step(tokens, state)  # onnxruntime, or torch's small-batch path up to ONE_THREAD_ROWS
        ref_logits, ref = dec._step(tokens, state)  # lstm_cell + nn.Linear
    assert hasattr(dec, "_onnx_cache") == (runtime == "onnxruntime")
    assert (getattr(dec, "_fp16_cache", (None, None))[1] is not None) == (runtime == "fbgemm")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for s, r in zip(new, ref):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("config", [DecodeConfig(strategy="greedy"),
                                    DecodeConfig(strategy="beam", beam_size=3, num_return=3)], ids=["greedy", "beam3"])
def test_decoded_captions_do_not_depend_on_the_path(config, runtime, monkeypatch):
    dec, feats = make_decoder(seed=3, runtime=runtime), torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dec.out.weight.mul_(8.0)
    small = decode(dec, feats, config)  # 5 or 15 rows: onnxruntime or the small-batch path
    dec.cpu_runtime = "torch"
    monkeypatch.setattr(CaptionDecoder, "ONE_THREAD_ROWS", 0)  # every step through the plain path
    plain = decode(dec, feats, config)
    assert [[h.tokens for h in per] for per in small] == [[h.tokens for h in per] for per in plain]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("change", ["weight_hh", "out_weight", "out_bias", "embedding"])
def test_prepared_weights_follow_weight_updates(runtime, change):
    dec = make_decoder(runtime=runtime)
    tokens, feats = torch.tensor([5]), torch.randn(1, 24)
    with torch.no_grad():
        before, _ = dec.step(tokens, dec.init_state(feats))
        {"weight_hh": lambda: dec.rnn.weight_hh_l0.mul_(2.0),  # an optimizer step or load_state_dict updates in place
         "out_weight": lambda: dec.out.weight.mul_(-2.0), "out_bias": lambda: dec.out.bias.add_(0.5),
         "embedding": lambda: dec.embed.weight.mul_(3.0)}[change]()
        after, _ = dec.step(tokens, dec.init_state(feats))
        ref, _ = dec._step(tokens, dec.init_state(feats))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp16", [True, False], ids=["float16-exact", "float32"])
def test_auto_takes_fbgemm_only_for_weights_exact_in_float16(fp16):
    dec = make_decoder(runtime="auto", fp16=fp16)
    with torch.no_grad():
        dec.step(torch.tensor([5, 7]), dec.init_state(torch.randn(2, 24)))
    assert (dec._fp16_cache[1] is not None) == fp16
    assert hasattr(dec, "_onnx_cache") != fp16  # float32 weights are never rounded: onnxruntime runs them


def test_without_fbgemm_auto_falls_back_and_fbgemm_says_why(monkeypatch):
    monkeypatch.setattr(fp16_step, "available", lambda: False)  # an ARM build of torch, or a CPU without AVX2
    dec = make_decoder(runtime="auto", fp16=True)
    with torch.no_grad():
        dec.step(torch.tensor([5]), dec.init_state(torch.randn(1, 24)))
        assert dec._fp16_cache[1] is None and hasattr(dec, "_onnx_cache")
        dec.cpu_runtime = "fbgemm"
        with pytest.raises(ValueError, match="no FBGEMM"):
            dec.step(torch.tensor([5]), dec.init_state(torch.randn(1, 24)))


def test_fbgemm_refuses_weights_that_float16_would_change():
    dec = make_decoder(runtime="fbgemm", fp16=False)
    with torch.no_grad(), pytest.raises(ValueError, match="runs weights stored in float16"):
        dec.step(torch.tensor([5]), dec.init_state(torch.randn(1, 24)))


def test_an_unknown_runtime_is_an_error():
    dec = make_decoder(runtime="tensorrt")
    with torch.no_grad(), pytest.raises(ValueError, match="cpu_runtime must be one of"):
        dec.step(torch.tensor([5]), dec.init_state(torch.randn(1, 24)))


def test_thread_count_is_restored_after_a_step():
    dec, threads = make_decoder(runtime="torch"), torch.get_num_threads()
    with torch.no_grad():
        dec.step(torch.tensor([5]), dec.init_state(torch.randn(1, 24)))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_training_mode_and_grad_take_the_plain_step(runtime):
    dec = make_decoder(runtime=runtime)
    tokens, feats = torch.tensor([5, 6]), torch.randn(2, 24)
    logits, _ = dec.step(tokens, dec.init_state(feats))  # grad enabled: the autograd graph reaches the weights
    logits.sum().backward()
    assert dec.rnn.weight_hh_l0.grad is not None and dec.out.weight.grad is not None
