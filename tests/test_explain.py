"""Per-word saliency maps (captioner/explain.py): what the maps are, where they lie, and that they follow the dog."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.api import Captioner
from captioner.cli import main
from captioner.encoder import Encoder, Preprocess, build_encoder
from captioner.explain import GradCam, crop_box
from conftest import FLICKR8K, TEST_ENCODER

REPO = Path(__file__).resolve().parents[1]
# Flickr8k val photos (never test): a white dog jumping a hurdle on grass; a photo whose references name no animal.
DOG_PHOTO, OTHER_PHOTO = "2714220101_c31db50b10.jpg", "2931950813_93145c4746.jpg"


@pytest.fixture(scope="module")
def cap() -> Captioner:
    return Captioner.from_pretrained(device="cpu")


def flickr(name: str) -> Path:
    path = FLICKR8K / "images" / name
    if not path.is_file():
        pytest.skip(f"real Flickr8k photo not found: {path}")
    return path


def composite_module():
    """benchmarks/saliency_composite.py as a module (a script, not a package): the composites it scores."""
    spec = importlib.util.spec_from_file_location("saliency_composite", REPO / "benchmarks" / "saliency_composite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_one_normalised_map_per_word_of_the_api_caption(cap) -> None:
    photo = flickr(DOG_PHOTO)
    expl = cap.explain(photo, strategy="beam", beam_size=3)
    best = cap.caption(photo, strategy="beam", beam_size=3, num_return=1)
    assert expl.caption == best
    assert expl.words == cap.caption(photo, strategy="beam", beam_size=3, num_return=2)[0]["tokens"]
    assert expl.maps.dtype == np.float32
    assert expl.maps.shape == (len(expl.words), expl.image.height, expl.image.width)
    assert expl.maps.min() >= 0
    assert np.allclose(expl.maps.reshape(len(expl.words), -1).max(1), 1.0)  # each word's peak is 1
    left, top, right, bottom = expl.crop_box
    outside = expl.maps.copy()
    outside[:, top:bottom, left:right] = 0
    assert not outside.any()  # nothing where the CNN saw nothing


def test_logprobs_are_the_teacher_forced_ones(cap) -> None:
    """Row t of the batched pass scores word t: the log-probabilities equal the decoder's own teacher forcing."""
    photo = flickr(DOG_PHOTO)
    expl = cap.explain(photo)
    features = cap.features([photo])
    tokens = torch.tensor([cap.vocab.encode(expl.words)])
    with torch.no_grad():
        logits, targets = cap.decoder(features, tokens)  # (n + 1, V): the words, then <end>
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:-1, 0]
    assert np.allclose(expl.logprobs, expected.numpy(), atol=2e-3)


def test_maps_are_grad_cam_of_the_last_convolutional_block(cap) -> None:
    """Reference computed the slow, obvious way: MobileNetV2's features, their mean, one backward per word."""
    photo = flickr(DOG_PHOTO)
    pixels = cap.preprocess(Image.open(photo).convert("RGB"))[None]
    words = cap.caption(photo, strategy="beam", beam_size=3, num_return=2)[0]["tokens"]
    tokens = [cap.vocab.index[w] for w in words]
    cams, _ = cap.gradcam(pixels, cap.decoder, tokens, cap.vocab.specials.start)
    assert cap.gradcam.layer == "features.18"
    acts = cap.encoder.backbone.features(pixels).detach().requires_grad_()  # (1, 1280, 7, 7)
    logits, targets = cap.decoder(acts.mean((2, 3)), torch.tensor([cap.vocab.encode(words)]))
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    for t in range(len(words)):
        (grad,) = torch.autograd.grad(logp[t], acts, retain_graph=True)
        reference = torch.relu((grad.mean((2, 3))[:, :, None, None] * acts).sum(1))[0].detach()  # (7, 7)
        assert torch.allclose(cams[t], reference, rtol=1e-3, atol=1e-6 * float(reference.max())), words[t]
    assert not torch.allclose(cams[0], cams[1])  # words do get different maps


def test_the_traced_backbone_gives_the_encoders_features() -> None:
    """The map explains the network that captions: for another backbone family too (resnet18 here)."""
    encoder, _ = build_encoder(TEST_ENCODER)
    gradcam = GradCam(Encoder(encoder.backbone))
    assert gradcam.layer == "layer4.1.relu_1"  # the block right before the global average pooling
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = gradcam.extractor(pixels)
        assert out["maps"].shape == (2, 512, 2, 2)
        assert torch.allclose(out["features"].flatten(1), encoder(pixels), atol=1e-5)


@pytest.mark.parametrize("size", [(300, 500), (640, 360), (224, 224)])
def test_crop_box_is_the_square_the_cnn_sees(size) -> None:
    """A photo whose red channel encodes x and green y: the preprocessed corners name the box's corners."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    ramp = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.zeros_like(xs)], -1).round().astype(np.uint8)
    pre = Preprocess()
    seen = pre(Image.fromarray(ramp)) * torch.tensor(pre.std)[:, None, None] + torch.tensor(pre.mean)[:, None, None]
    left, top, right, bottom = crop_box(width, height, pre)
    half = pre.crop / 2  # pixel centres: crop pixel i covers photo [box0 + i * step, box0 + (i + 1) * step]
    step_x, step_y = (right - left) / pre.crop, (bottom - top) / pre.crop
    for i in (0, pre.crop - 1):
        x_seen = float(seen[0, int(half), i]) * (width - 1)
        y_seen = float(seen[1, i, int(half)]) * (height - 1)
        assert abs(x_seen - (left + (i + 0.5) * step_x - 0.5)) < 2.5
        assert abs(y_seen - (top + (i + 0.5) * step_y - 0.5)) < 2.5


def test_the_dog_map_follows_the_dog_when_the_halves_swap(cap) -> None:
    """Every "dog" (or "dogs", "puppy": the benchmark's words) of the caption puts a clear majority of its map on
    the dog's half, wherever that half is: a map that ignored (or mirrored) where the photo sits could not do so in
    both placements."""
    bench = composite_module()
    dog, other = flickr(DOG_PHOTO), flickr(OTHER_PHOTO)
    for dog_left in (True, False):
        expl = cap.explain(bench.composite(str(dog), str(other), dog_left, 224))
        shares = [bench.half_share(m, dog_left) for w, m in zip(expl.words, expl.maps) if w in bench.DOG_WORDS]
        assert shares and min(shares) > 0.6, (expl.caption, shares)


def test_cli_writes_the_grid_and_reports_bad_input_in_one_line(cap, tmp_path, capsys) -> None:
    photo = flickr(DOG_PHOTO)
    out = tmp_path / "explained.png"
    assert main(["explain", str(photo), "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"caption: {cap.caption(photo)}"
    assert [line.split()[0] for line in printed[1:-1]] == cap.explain(photo).words  # a line per word
    with Image.open(out) as grid:
        assert grid.width > 512 and grid.height > 256  # the photo and one overlay per word, in rows of four
    assert main(["explain", str(tmp_path / "missing.jpg"), "-o", str(out)]) == 2
    assert main(["explain", str(photo), "-o", str(tmp_path / "x.unknown")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "missing.jpg: file not found" in errors[0] and "x.unknown" in errors[1]
