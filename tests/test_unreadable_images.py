"""An image that turns unreadable after ``captioner prepare`` is reported and skipped, never the end of a
long run: ``captioner features`` lists it in the cache's report.json, encodes the rest and retries it on
the next run; ``captioner evaluate`` scores the rest and lists it in metrics.json; training refuses a
cache with a hole in it and names the images. Each of these commands exits 1 when an image failed."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from captioner.cli import main
from captioner.evaluate import score
from captioner.features import FeatureCache, cache_dir
from captioner.manifest import load_manifest, save_manifest
from conftest import TEST_ENCODER
from test_images import bad_files

ENCODER = ["--encoder", TEST_ENCODER.name, "--weights", "none", "--image-size", "64"]
DAMAGED_ROWS = {8: "truncated", 9: "random", 11: "text"}  # batches of 2: rows 8-9 all bad, 10-11 mixed
REASONS = {"truncated": "truncated", "random": "not an image", "text": "not an image"}


def with_paths(data_dir: Path, target: Path, paths: dict[int, str]) -> Path:
    """A copy of the data directory's manifest (plus vocab and report) where these image ids use other files."""
    target.mkdir(exist_ok=True)
    for name in ("vocab.json", "prepare_report.json"):
        shutil.copy(data_dir / name, target / name)
    records = [dataclasses.replace(r, path=paths.get(r.id, r.path)) for r in load_manifest(data_dir)]
    save_manifest(target, records, "test")
    return target


@pytest.fixture(scope="module")
def damaged(data_dir, tmp_path_factory) -> tuple[Path, dict[int, Path]]:
    """8 training and all 16 validation images of the prepared dataset, three validation images damaged;
    returns the data directory and the damaged files by image id."""
    root = tmp_path_factory.mktemp("damaged")
    records = load_manifest(data_dir)
    kept = [r for r in records if r.split == "train"][:8] + [r for r in records if r.split == "val"]
    small = root / "small"
    small.mkdir()
    save_manifest(small, kept, "test")
    for name in ("vocab.json", "prepare_report.json"):
        shutil.copy(data_dir / name, small / name)
    bad = bad_files(root / "bad")
    files = {kept[row].id: bad[kind] for row, kind in DAMAGED_ROWS.items()}
    return with_paths(small, root / "data", {i: str(p) for i, p in files.items()}), files


@pytest.fixture(scope="module")
def encoded(damaged, tmp_path_factory) -> tuple[int, str, Path]:
    """``captioner features`` run once on the damaged dataset: exit code, stderr, cache directory."""
    data, _ = damaged
    capture = tmp_path_factory.mktemp("capture") / "stderr"
    with capture.open("w") as err, pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stderr", err)
        code = main(["features", str(data), *ENCODER, "--batch-size", "2", "--workers", "0"])
    return code, capture.read_text(), cache_dir(data, TEST_ENCODER)


def test_features_encode_the_rest_and_list_unreadable_images(damaged, encoded, data_dir):
    data, files = damaged
    code, err, directory = encoded
    assert code == 1
    report = {f["id"]: f for f in json.loads((directory / "report.json").read_text())["failed"]}
    assert set(report) == set(files)
    for image_id, path in files.items():
        kind = DAMAGED_ROWS[[r.id for r in load_manifest(data)].index(image_id)]
        assert report[image_id]["path"] == str(path) and REASONS[kind] in report[image_id]["error"]
        assert f"warning: image id {image_id}: {path}: " in err
    assert "3 image(s) could not be encoded" in err
    ids = [r.id for r in load_manifest(data)]
    assert json.loads((directory / "progress.json").read_text()) == {"done": len(ids)}
    good = [i for i in ids if i not in files]
    cache, reference = FeatureCache(directory), FeatureCache(cache_dir(data_dir, TEST_ENCODER))
    np.testing.assert_allclose(cache.gather(good).numpy(), reference.gather(good).numpy(), rtol=1e-2, atol=1e-3)


def test_training_names_the_images_the_cache_could_not_encode(damaged, encoded, tmp_path, capsys):
    data, files = damaged
    code = main(["train", str(data), "--out", str(tmp_path / "run"), *ENCODER, "--hidden", "16", "--embed", "8",
                 "--epochs", "1", "--workers", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "3 image(s) could not be encoded by `captioner features`" in lines[-1]
    assert str(sorted(files)) in lines[-1] and "report.json" in lines[-1]


def scored_over_the_rest(metrics: dict, per_image: Path, data: Path) -> None:
    """The scores are those of the captioned images alone."""
    captions = {item["image_id"]: item["caption"] for item in json.loads(per_image.read_text())}
    records = [r for r in load_manifest(data) if r.id in captions]
    assert len(records) == metrics["images"] == 13
    assert score(records, captions) == {k: metrics[k] for k in score(records, captions)}


@pytest.mark.parametrize("source", ["images", "cache"])
def test_evaluate_scores_the_rest_and_lists_unreadable_images(source, damaged, encoded, trained_run, tmp_path, capsys):
    data, files = damaged
    out, per_image = tmp_path / "metrics.json", tmp_path / "per_image.json"
    code = main(["evaluate", str(data), "--split", "val", "--checkpoint", str(trained_run / "best"), "--device", "cpu",
                 "--workers", "0", "-o", str(out), "--per-image", str(per_image),
                 *(["--from-cache"] if source == "cache" else [])])
    stdout, err = capsys.readouterr()
    assert code == 1
    metrics = json.loads(out.read_text())
    assert metrics["failed_count"] == 3
    assert {f["image_id"]: f["path"] for f in metrics["failed"]} == {i: str(p) for i, p in files.items()}
    for image_id, path in files.items():
        assert f"warning: image id {image_id}: {path}: " in err
    assert "13 images of split 'val'" in stdout and "3 could not be captioned" in stdout
    scored_over_the_rest(metrics, per_image, data)


def test_features_retry_only_the_failed_images_once_they_are_fixed(damaged, encoded, data_dir, tmp_path, capsys):
    data, files = damaged
    originals = {r.id: r.path for r in load_manifest(data_dir) if r.id in files}
    fixed = with_paths(data, tmp_path / "fixed", originals)
    shutil.copytree(data / "features", fixed / "features")
    assert main(["features", str(fixed), *ENCODER, "--batch-size", "2", "--workers", "0"]) == 0
    out, _ = capsys.readouterr()
    assert "retrying 3 image(s)" in out and "encoded 3 images" in out
    directory = cache_dir(fixed, TEST_ENCODER)
    assert json.loads((directory / "report.json").read_text()) == {"failed": []}
    reference = FeatureCache(cache_dir(data_dir, TEST_ENCODER))
    np.testing.assert_allclose(FeatureCache(directory).gather(sorted(files)).numpy(),
                               reference.gather(sorted(files)).numpy(), rtol=1e-2, atol=1e-3)
