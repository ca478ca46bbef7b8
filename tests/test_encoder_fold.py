"""The encoder's inference copy with BatchNorm folded into the convolutions (``Encoder.folded``): same features as
the real layers, remade when the weights change, never used where batch statistics or gradients are wanted, and
invisible to the checkpoint."""

import torch
from torch import nn

from captioner.encoder import EncoderConfig, build_encoder


def _encoder(name: str = "mobilenet_v3_small"):
    torch.manual_seed(0)
    encoder, _ = build_encoder(EncoderConfig(name=name, weights="none", image_size=64))
    for m in encoder.modules():  # statistics far from (0, 1), so that a fold that ignores them shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return encoder


def test_folded_features_equal_the_real_layers_and_have_no_batchnorm():
    for name in ("mobilenet_v3_small", "resnet18"):
        encoder = _encoder(name).for_inference(torch.device("cpu"))
        folded = encoder.folded()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), name
        assert any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules()), name  # the real layers keep theirs
        x = torch.randn(5, 3, 64, 64)
        with torch.inference_mode():
            torch.testing.assert_close(encoder.encode(x), encoder(x), rtol=1e-4, atol=1e-4)


def test_the_fold_is_remade_when_the_weights_change():
    encoder = _encoder().for_inference(torch.device("cpu"))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        before = encoder.encode(x)
    other = _encoder()
    for m in other.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(3)
    encoder.load_state_dict(other.state_dict())  # in place, as a checkpoint load or an optimizer step does
    with torch.inference_mode():
        after = encoder.encode(x)
        torch.testing.assert_close(after, encoder(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, after, atol=1e-3)


def test_train_mode_and_gradients_use_the_real_layers():
    encoder = _encoder()
    x = torch.randn(4, 3, 64, 64)
    encoder.train()  # batch statistics, which a fold of the running ones cannot give
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(x), encoder(x))
    encoder.eval()
    encoder.encode(x).sum().backward()
    conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_folding_leaves_the_state_dict_as_it_was():
    encoder = _encoder()
    keys = list(encoder.state_dict())
    encoder.for_inference(torch.device("cpu"))
    with torch.inference_mode():
        encoder.encode(torch.randn(1, 3, 64, 64))
    assert list(encoder.state_dict()) == keys
