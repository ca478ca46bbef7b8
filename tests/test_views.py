"""Training views and tuned last blocks (captioner/views.py, ``train --views / --tune-blocks``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.encoder import EncoderConfig, Preprocess, build_encoder, split_encoder, state_digest
from captioner.errors import EncoderError
from captioner.checkpoint import load_checkpoint
from captioner.features import FeatureCache, cache_dir
from captioner.images import load_image
from captioner.manifest import load_manifest
from captioner.views import Augment, build_view_cache, view_cache_dir

from conftest import TEST_ENCODER


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_tail_of_stem_is_the_encoder(name, blocks):
    encoder, config = build_encoder(EncoderConfig(name=name, weights="none", image_size=64))
    stem, tail = split_encoder(encoder, blocks, name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tail(stem(x)), encoder(x), rtol=1e-5, atol=1e-6)
    tail_params = {id(p) for p in tail.parameters()}
    assert tail_params <= {id(p) for p in encoder.parameters()}  # shared, not copied: tuning it tunes the encoder
    assert (len(tail_params) > 0) == (blocks > 0)


def test_too_many_blocks_is_refused():
    encoder, _ = build_encoder(TEST_ENCODER)
    with pytest.raises(EncoderError, match="tune between 0 and"):
        split_encoder(encoder, 100, "resnet18")


def test_a_view_is_the_same_pixels_every_time_and_views_differ():
    img = Image.effect_mandelbrot((120, 90), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    pre, aug = Preprocess(resize=73, crop=64), Augment()
    a, b = aug(img, pre, image_id=7, view=1), aug(img, pre, image_id=7, view=1)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    others = [aug(img, pre, image_id=7, view=v) for v in range(2, 6)] + [aug(img, pre, image_id=8, view=1)]
    assert all(not torch.equal(a, o) for o in others)
    assert not torch.equal(a, pre(img))


def test_view_cache_rows(data_dir):
    encoder, config = build_encoder(TEST_ENCODER)
    directory = build_view_cache(data_dir, config, encoder, views=2, tail=1, device="cpu", workers=0)
    assert directory == view_cache_dir(data_dir, config, 2, 1)
    cache, plain = FeatureCache(directory), FeatureCache(cache_dir(data_dir, config))
    index = json.loads((directory / "index.json").read_text())
    assert index["views"] == 2 and index["tail"] == 1
    assert index["stem_sha256"] == state_digest(split_encoder(encoder, 1, config.name)[0])
    splits = {r.id: r.split for r in load_manifest(data_dir)}
    train = [i for i in cache.ids if splits[i] == "train"]
    val = [i for i in cache.ids if splits[i] == "val"]
    _, tail = split_encoder(encoder, 1, config.name)
    views = cache.gather(train + val)  # (N, 3, C, H, W)
    with torch.no_grad():
        pooled = tail(views[:, 0])
    # view 0 is the centre crop: through the tail it is the plain cache's feature (float16 storage apart)
    torch.testing.assert_close(pooled, plain.gather(train + val), rtol=2e-2, atol=2e-2)
    n = len(train)
    assert views[:n, 1:].abs().amax(dim=(2, 3, 4)).min() > 0  # every training image has its two views
    assert not torch.allclose(views[:n, 1], views[:n, 0]) and not torch.allclose(views[:n, 1], views[:n, 2])
    assert views[n:, 1:].abs().max() == 0  # others: the centre crop only
    again = build_view_cache(data_dir, config, encoder, views=2, tail=1, device="cpu", workers=0)
    assert np.array_equal(FeatureCache(again).gather(train), views[:n].numpy())


def _train(data_dir, out, *extra):
    from captioner.cli import main
    assert main(["train", str(data_dir), "--out", str(out), "--encoder", TEST_ENCODER.name, "--weights", "none",
                 "--image-size", "64", "--hidden", "32", "--embed", "16", "--epochs", "2", "--batch-size", "16",
                 "--warmup-steps", "1", "--workers", "0", "--device", "cpu", *extra]) == 0
    return load_checkpoint(out / "best")


def test_tuning_the_last_blocks_trains_them_and_only_them(data_dir, tmp_path):
    """--tune-blocks: the tail's weights move, the stem's do not; the checkpoint says so, so that the plain
    feature cache (made by the untuned CNN) is never used for it; `features --checkpoint` makes its own."""
    from captioner.cli import main
    start, _ = build_encoder(TEST_ENCODER)
    loaded = _train(data_dir, tmp_path / "run", "--tune-blocks", "2", "--views", "1", "--encoder-lr", "1e-3")
    stem0, tail0 = split_encoder(start, 2, "resnet18")
    stem1, tail1 = split_encoder(loaded.encoder, 2, "resnet18")
    assert state_digest(stem0) == state_digest(stem1)
    moved = [k for k, v in tail1.state_dict().items() if not torch.equal(v, tail0.state_dict()[k])]
    assert any(k.endswith("conv1.weight") for k in moved)
    tuned = loaded.config.encoder.provenance["tuned"]
    assert tuned == {"blocks": 2, "sha256": state_digest(loaded.encoder)}
    assert loaded.config.encoder.cache_key() != TEST_ENCODER.cache_key()
    assert not loaded.config.encoder.same_features(FeatureCache(cache_dir(data_dir, TEST_ENCODER)).encoder)
    assert main(["evaluate", str(data_dir), "--checkpoint", str(tmp_path / "run" / "best"), "--split", "val",
                 "--from-cache"]) != 0  # no cache of the tuned CNN yet: refused, not the untuned one used
    assert main(["features", str(data_dir), "--checkpoint", str(tmp_path / "run" / "best"), "--workers", "0"]) == 0
    cache = FeatureCache(cache_dir(data_dir, loaded.config.encoder))
    ids = cache.ids[:8]
    pixels = torch.stack([loaded.config.encoder.preprocess(load_image(r.path)) for r in load_manifest(data_dir)[:8]])
    with torch.no_grad():
        torch.testing.assert_close(cache.gather(ids), loaded.encoder(pixels), rtol=2e-2, atol=2e-2)


def test_views_without_tuning_leave_the_cnn_alone(data_dir, tmp_path):
    start, _ = build_encoder(TEST_ENCODER)
    loaded = _train(data_dir, tmp_path / "run", "--views", "2")
    assert state_digest(loaded.encoder) == state_digest(start)
    assert "tuned" not in loaded.config.encoder.provenance


def test_an_epoch_draws_the_views_again_and_a_resume_draws_the_same(data_dir, tmp_path):
    from captioner.train import TrainConfig, Trainer
    config = TrainConfig(epochs=2, batch_size=16, views=2, workers=0, device="cpu")
    trainer = Trainer(data_dir, tmp_path / "run", config, encoder_config=TEST_ENCODER,
                      model_options={"hidden": 16, "embed": 8})
    trainer._loader(0)
    first = trainer.view_of.clone()
    trainer._loader(1)
    second = trainer.view_of.clone()
    assert set(first.tolist()) == {0, 1, 2} and not torch.equal(first, second)
    trainer._loader(0)
    assert torch.equal(trainer.view_of, first)
    feats, _ = trainer._collate_cached(list(range(16)))
    images = trainer.train_caps.pair_image[:16]
    assert torch.equal(feats, trainer.train_inputs[images, first[images]].float())


def test_scst_on_views_of_a_tuned_model_uses_its_own_cnn(data_dir, tmp_path):
    """SCST with --views reads the view cache through the checkpoint's tuned blocks: its features are the
    tuned CNN's (not the plain cache's), and each epoch draws views again."""
    from captioner.scst import ScstConfig, ScstTrainer
    loaded = _train(data_dir, tmp_path / "run", "--tune-blocks", "2", "--views", "2", "--encoder-lr", "1e-3")
    trainer = ScstTrainer(data_dir, tmp_path / "scst", ScstConfig(init_from=str(tmp_path / "run" / "best"), views=2,
                                                                 epochs=1, batch_size=16))
    records = trainer.train_records[:4]
    pixels = torch.stack([loaded.config.encoder.preprocess(load_image(r.path)) for r in records])
    with torch.no_grad():
        expected = loaded.encoder(pixels)
    torch.testing.assert_close(trainer.features[:4, 0], expected, rtol=2e-2, atol=2e-2)
    untuned_feats = FeatureCache(cache_dir(data_dir, TEST_ENCODER)).gather([r.id for r in records])
    assert not torch.allclose(untuned_feats, expected, rtol=2e-2, atol=2e-2)
    assert trainer.features.shape[1] == 3
    trainer.fit()
    assert trainer.view_of.max() > 0


def test_scst_without_views_makes_the_tuned_models_own_feature_cache(data_dir, tmp_path):
    """SCST (or matching) on a tuned model whose feature cache is missing makes it, from the view cache its
    training left, instead of refusing: the features are the tuned CNN's."""
    from captioner.scst import ScstConfig, ScstTrainer
    loaded = _train(data_dir, tmp_path / "run", "--tune-blocks", "1", "--views", "1", "--encoder-lr", "1e-3")
    assert not cache_dir(data_dir, loaded.config.encoder).exists()
    trainer = ScstTrainer(data_dir, tmp_path / "scst", ScstConfig(init_from=str(tmp_path / "run" / "best"), epochs=1,
                                                                 batch_size=16))
    records = trainer.train_records[:4]
    pixels = torch.stack([loaded.config.encoder.preprocess(load_image(r.path)) for r in records])
    with torch.no_grad():
        expected = loaded.encoder(pixels)
    assert trainer.features.shape[1] == 1
    torch.testing.assert_close(trainer.features[:4, 0], expected, rtol=2e-2, atol=2e-2)
    assert FeatureCache(cache_dir(data_dir, loaded.config.encoder)).ids == [r.id for r in load_manifest(data_dir)]


def test_a_resumed_run_with_views_and_tuned_blocks_continues_exactly(data_dir, tmp_path):
    """The views drawn, the tuned blocks and their optimizer state all come back on --resume: the losses after
    the interruption are those of the uninterrupted run, bit for bit. The first run also builds the view
    cache, the second finds it built: building it must not change the random numbers training sees."""
    from captioner.cli import main
    full, part, data = tmp_path / "full", tmp_path / "part", tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("features"))
    common = [str(data), "--encoder", TEST_ENCODER.name, "--weights", "none", "--image-size", "64", "--hidden",
              "32", "--embed", "16", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--epochs", "2",
              "--views", "2", "--tune-blocks", "2", "--encoder-lr", "1e-3", "--log-every", "1"]
    assert main(["train", *common, "--out", str(full), "--max-steps", "20"]) == 0
    assert main(["train", *common, "--out", str(part), "--max-steps", "7"]) == 0
    assert main(["train", str(data), "--out", str(part), "--resume", "--epochs", "2", "--max-steps", "20"]) == 0
    a, b = (json_lines(run / "steps.jsonl") for run in (full, part))
    assert len(a) == len(b) == 20 and [r["loss"] for r in b] == [r["loss"] for r in a]
    assert state_digest(load_checkpoint(part / "last").encoder) == state_digest(load_checkpoint(full / "last").encoder)


def json_lines(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return list({r["step"]: r for r in rows}.values())


def _tuned(encoder, config, blocks):
    """A copy of ``encoder`` whose last ``blocks`` blocks moved, marked as ``train --tune-blocks`` marks it."""
    import copy
    import dataclasses
    tuned = copy.deepcopy(encoder)
    _, tail = split_encoder(tuned, blocks, config.name)
    with torch.no_grad():
        for p in tail.parameters():
            p.add_(0.05 * torch.randn_like(p))
    provenance = {**config.provenance, "tuned": {"blocks": blocks, "sha256": state_digest(tuned)}}
    return tuned, dataclasses.replace(config, provenance=provenance)


def test_features_of_a_tuned_cnn_come_from_its_view_cache(data_dir, tmp_path, capsys):
    """`features --checkpoint` of a model with tuned last blocks runs only those blocks on the view cache's
    centre crops: the tuned CNN's features (float16 apart), an index a CNN pass would reuse, the view
    cache's unreadable photos still listed; a view cache made by other weights than the model's stem is
    not used."""
    from captioner.features import build_features, read_failures
    from captioner.views import features_from_view_cache
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("features"))
    encoder, config = build_encoder(TEST_ENCODER)
    torch.manual_seed(0)
    tuned, tuned_config = _tuned(encoder, config, 1)
    assert features_from_view_cache(data, tuned_config, tuned, device="cpu") is None  # no view cache yet
    views = build_view_cache(data, config, encoder, views=1, tail=1, device="cpu", workers=0)
    records = load_manifest(data)
    lost = records[3]
    report = json.loads((views / "report.json").read_text())  # as if the view cache could not read one photo
    (views / "report.json").write_text(json.dumps({"failed": report["failed"] + [
        {"id": lost.id, "path": lost.path, "error": "truncated JPEG"}]}))

    directory = features_from_view_cache(data, tuned_config, tuned, device="cpu")
    assert directory == cache_dir(data, tuned_config)
    assert read_failures(directory)[lost.id]["error"] == "truncated JPEG"
    ids = [r.id for r in records[:8] if r.id != lost.id]
    pixels = torch.stack([tuned_config.preprocess(load_image(r.path)) for r in records[:8] if r.id != lost.id])
    with torch.no_grad():
        expected, untuned_features = tuned.eval()(pixels), encoder.eval()(pixels)
    got = FeatureCache(directory).gather(ids)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(got, untuned_features, rtol=2e-2, atol=2e-2)
    capsys.readouterr()
    (views / "report.json").write_text(json.dumps(report))
    shutil.rmtree(directory)
    directory = features_from_view_cache(data, tuned_config, tuned, device="cpu")
    assert build_features(data, tuned_config, device="cpu", workers=0, encoder=tuned) == directory
    assert "is complete" in capsys.readouterr().out  # same index: a CNN pass reuses it

    deeper, deeper_config = _tuned(encoder, config, 2)  # its stem includes a block the view cache did not see tuned
    assert features_from_view_cache(data, deeper_config, deeper, device="cpu") is None

    capsys.readouterr()
    _train(data, tmp_path / "run")  # a frozen CNN without a feature cache: training makes it the same way
    assert f"view cache {views}: its centre crops" in capsys.readouterr().out
    torch.testing.assert_close(FeatureCache(cache_dir(data, config)).gather(ids), untuned_features, rtol=2e-2, atol=2e-2)
