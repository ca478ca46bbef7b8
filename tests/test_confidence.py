"""Caption confidence: a calibrator fitted on val, stored beside the weights, shown by caption / report / app."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from captioner import api
from captioner.api import Captioner, default_checkpoint
from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.confidence import CALIBRATION, Calibration, expected_calibration_error, fit_logistic, read_calibration
from captioner.errors import CheckpointError
from captioner.report import entry, orders

from app_fixtures import load_app
from conftest import BACKGROUNDS, COLOURS, FLICKR8K, SHAPES, draw


def test_ece_matches_a_hand_computed_example():
    # bins of width 0.1: {0.1} -> |0.1 - 0| ; {0.3, 0.35} -> 2 * |0.325 - 0.5| ; {0.9, 1.0} -> 2 * |0.95 - 1|
    confidence, good = [0.1, 0.3, 0.35, 0.9, 1.0], [0, 1, 0, 1, 1]
    assert expected_calibration_error(np.array(confidence), np.array(good), bins=10) == pytest.approx(
        (0.1 + 2 * 0.175 + 2 * 0.05) / 5)
    assert expected_calibration_error(np.array([0.25, 0.75]), np.array([0, 1]), bins=2) == pytest.approx(0.25)


def test_fitted_calibrator_is_in_unit_interval_and_rises_with_log_prob_per_word():
    rng = np.random.default_rng(0)
    per_word, tokens = rng.normal(-1.0, 0.3, 2000), rng.integers(5, 16, 2000).astype(float)
    good = (rng.random(2000) < 1 / (1 + np.exp(-(per_word + 1.0) * 6))).astype(float)  # better per word: good
    calibration = fit_logistic(np.stack([per_word, tokens], 1), good, ["per_word_logprob", "tokens"])
    grid = np.stack([np.linspace(-20, 5, 200), np.full(200, 10.0)], 1)  # far outside the data too
    conf = calibration.confidence(grid)
    assert np.all((conf >= 0) & (conf <= 1)) and np.all(np.diff(conf) >= 0) and conf[-1] - conf[0] > 0.9
    assert expected_calibration_error(calibration.confidence(np.stack([per_word, tokens], 1)), good) < 0.05


def test_bundled_calibration_rises_with_log_prob_per_word_and_reports_val_and_test():
    calibration = read_calibration(default_checkpoint())
    assert calibration is not None and calibration.info["fitted_on"] == "val"
    assert set(calibration.info["ece"]) == {"val", "test"}
    x = np.tile(calibration.mean, (50, 1))
    x[:, calibration.features.index("per_word_logprob")] = np.linspace(-3, 0, 50)
    assert np.all(np.diff(calibration.confidence(x)) > 0)


def test_bundled_confidence_rises_with_the_match_between_photo_and_caption():
    """The matching model's cosine is a signal (Spearman +0.37 with CIDEr-D on val) that also knows a caption
    does not fit a photo unlike Flickr8k's: the coffee cup's "a black and white dog is sitting in the grass" 0.20,
    below 95 % of val's captions."""
    calibration = read_calibration(default_checkpoint())
    x = np.tile(calibration.mean, (50, 1))
    x[:, calibration.features.index("match")] = np.linspace(-0.2, 0.8, 50)
    assert np.all(np.diff(calibration.confidence(x)) > 0)


@pytest.fixture(scope="module")
def bundled_copy(tmp_path_factory):
    """The shipped model (with its calibration.json) copied, so tests may change its files."""
    directory = tmp_path_factory.mktemp("bundled") / "model"
    shutil.copytree(default_checkpoint(), directory)
    return directory


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("photos")
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    for i, combo in enumerate(combos):
        draw(*combo, size=160, seed=i).save(folder / f"p{i:02d}.jpg")
    return sorted(str(p) for p in folder.glob("*.jpg"))


def test_a_checkpoint_without_calibration_gives_no_confidence(bundled_copy, tmp_path, photos):
    plain = tmp_path / "plain"
    shutil.copytree(bundled_copy, plain, ignore=shutil.ignore_patterns(CALIBRATION))
    cap = Captioner.from_pretrained(plain, device="cpu")
    assert cap.calibration is None and load_checkpoint(plain).calibration is None
    assert all("confidence" not in h for h in cap.caption(photos[:2], strategy="beam", num_return=2)[0])
    calibrated = Captioner.from_pretrained(bundled_copy, device="cpu")
    nbest = calibrated.caption(photos[:4], strategy="beam", beam_size=3, num_return=3)
    conf = [h["confidence"] for per_image in nbest for h in per_image]
    assert len(conf) == 12 and all(0 <= c <= 1 for c in conf) and len(set(conf)) > 1


def test_calibrate_fits_on_val_and_writes_calibration_json(bundled_copy, tmp_path, capsys):
    """`captioner calibrate` end to end on 30 real Flickr8k val photos (prepare + features + calibrate)."""
    if not (FLICKR8K / "Flickr8k.token.txt").is_file():
        pytest.skip(f"real Flickr8k not found at {FLICKR8K}")
    splits = {}
    for name, official, count in (("train", "trainImages", 5), ("val", "devImages", 30), ("test", "testImages", 1)):
        lines = (FLICKR8K / f"Flickr_8k.{official}.txt").read_text().split()
        splits[name] = tmp_path / f"{name}.txt"
        splits[name].write_text("\n".join(lines[:count]) + "\n")
    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(bundled_copy, model, ignore=shutil.ignore_patterns(CALIBRATION))
    assert main(["prepare", "flickr8k", str(FLICKR8K / "Flickr8k.token.txt"), "--images", str(FLICKR8K / "images"),
                 "--out", str(data), *[a for n, p in splits.items() for a in ("--split-file", f"{n}={p}")]]) == 0
    assert main(["features", str(data), "--checkpoint", str(model), "--device", "cpu", "--workers", "0"]) == 0
    assert main(["calibrate", str(data), "--checkpoint", str(model), "--report-split", "", "--device", "cpu"]) == 0
    assert f"wrote {model / CALIBRATION}" in capsys.readouterr().out
    calibration = read_calibration(model)
    assert calibration.info["fitted_on"] == "val" and set(calibration.info["ece"]) == {"val"}
    # fitted for the decoding users get: the model's decoding.json, which the app's default (guided beam) equals
    default = Captioner.from_pretrained(model, device="cpu", calibrated=False).decode_config()
    assert calibration.info["settings"] == [default.to_json()] and default.strategy == "beam" and default.guide
    assert all(row["images"] == 30 for row in calibration.info["ece"]["val"])
    photo = str(FLICKR8K / "images" / splits["val"].read_text().split()[0])
    nbest = Captioner.from_pretrained(model, device="cpu").caption(photo, strategy="beam", num_return=2)
    assert all(0 <= h["confidence"] <= 1 for h in nbest)


@pytest.mark.parametrize("options", [{"strategy": "greedy"}, {"strategy": "beam", "beam_size": 3, "num_return": 3,
                                     "match_weight": 0.0, "specificity_levels": None, "guide": False}, {}])
def test_match_is_the_matching_models_cosine_whatever_the_decoding(bundled_copy, photos, options):
    """Confidence reads each caption's match with its photo: reranking by the matcher sets it, greedy and plain
    beam search leave it to ``fill_match``; either way it is the matcher's cosine for that caption and photo."""
    cap = Captioner.from_pretrained(bundled_copy, device="cpu")
    assert "match" in cap.calibration.features
    feats = cap.features(photos[:3])
    nbest = cap.generate(feats, cap.decode_config(**options))
    for i, hyps in enumerate(nbest):
        sims = cap.matcher.similarity(feats, cap.vocab, [h["tokens"] for h in hyps], [i] * len(hyps))
        assert [h["match"] for h in hyps] == pytest.approx(sims, abs=1e-4) and all("confidence" in h for h in hyps)


def test_caption_text_alone_skips_the_confidence_it_would_throw_away(bundled_copy, photos, monkeypatch):
    """``caption(image)`` returns only the text: the tagger and matching passes behind the confidence are not
    run for it (the n-best dicts, ``generate`` and the app, which show it, still get it)."""
    cap = Captioner.from_pretrained(bundled_copy, device="cpu")
    calls = []
    monkeypatch.setattr(api, "fill_match", lambda *a: calls.append("match"))
    monkeypatch.setattr(api, "tag_probs", lambda *a: calls.append("tag") or np.zeros(len(a[1])))
    monkeypatch.setattr(api, "add_confidence", lambda *a: calls.append("confidence"))
    assert isinstance(cap.caption(photos[0], strategy="greedy"), str)
    assert isinstance(cap.caption(photos[:2])[1], str)  # the model's own decoding too
    assert calls == []
    cap.caption(photos[0], strategy="beam", num_return=2)
    assert calls == ["tag", "match", "confidence"]


def test_a_calibration_that_uses_match_needs_the_matching_model(bundled_copy, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(bundled_copy, directory, ignore=shutil.ignore_patterns("matching.*", "decoding.json"))
    with pytest.raises(CheckpointError, match="uses match, but the directory has no matching.json"):
        Captioner.from_pretrained(directory, device="cpu")
    assert Captioner.from_pretrained(directory, device="cpu", calibrated=False).matcher is None


def run_caption(args, capsys) -> tuple[int, str]:
    code = main(["caption", *args, "--device", "cpu", "--workers", "0"])
    return code, capsys.readouterr().err


def test_min_confidence_flags_exactly_the_rows_below_it(bundled_copy, photos, tmp_path, capsys):
    images, calibrated = photos[:10], bundled_copy
    first = tmp_path / "all.jsonl"
    assert run_caption([*images, "-o", str(first), "--checkpoint", str(calibrated)], capsys)[0] == 0
    conf = sorted({json.loads(line)["confidence"] for line in first.read_text().splitlines()})
    assert len(conf) >= 2
    threshold = conf[len(conf) // 2]  # one caption sits exactly on it: not below, so not flagged
    out = tmp_path / "flagged.jsonl"
    code, err = run_caption([*images, "-o", str(out), "--checkpoint", str(calibrated),
                             "--min-confidence", str(threshold)], capsys)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and all(r["review"] == (r["confidence"] < threshold) for r in records)
    below = sum(r["confidence"] < threshold for r in records)
    assert 0 < below < len(records) and f"{below} caption(s) below --min-confidence {threshold}" in err
    gallery = [entry(r) for r in records]
    assert sum(e.get("review", False) for e in gallery) == below
    assert [gallery[i]["confidence"] for i in orders(gallery)["confidence"]] == sorted(r["confidence"] for r in records)


def test_min_confidence_without_a_calibration_is_a_clear_error(bundled_copy, photos, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(bundled_copy, plain, ignore=shutil.ignore_patterns(CALIBRATION))
    code, err = run_caption([photos[0], "-o", str(tmp_path / "o.jsonl"), "--checkpoint", str(plain),
                             "--min-confidence", "0.5"], capsys)
    assert code == 2 and "no calibration.json" in err and "captioner calibrate" in err


def test_min_confidence_outside_zero_one_is_refused(bundled_copy, photos, tmp_path, capsys):
    code, err = run_caption([photos[0], "-o", str(tmp_path / "o.jsonl"), "--checkpoint", str(bundled_copy),
                             "--min-confidence", "50"], capsys)
    assert code == 2 and "[0, 1]" in err and not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("text, change, problem", [
    ("{not json", None, "not valid JSON"),
    (json.dumps({"format": "something-else"}), None, "not a captioner calibration"),
    (None, lambda c: {"weights": [1.0]}, "one entry per feature"),
    (None, lambda c: {"weights": [float("nan"), *c["weights"][1:]]}, "finite"),
    (None, lambda c: {"std": [0.0, *c["std"][1:]]}, "std > 0"),
    (None, lambda c: {"features": [*c["features"][:-1], "magic"]}, "features must be"),
    (None, lambda c: {"bias": "high"}, "invalid calibration"),
])
def test_a_tampered_calibration_json_is_a_clear_checkpoint_error(bundled_copy, tmp_path, capsys, text, change,
                                                                 problem):
    directory = tmp_path / "model"
    shutil.copytree(bundled_copy, directory)
    if change is not None:
        shipped = json.loads((bundled_copy / CALIBRATION).read_text())
        text = json.dumps(shipped | change(shipped))
    (directory / CALIBRATION).write_text(text)
    with pytest.raises(CheckpointError, match=problem) as caught:
        Captioner.from_pretrained(directory, device="cpu")
    assert str(directory / CALIBRATION) in str(caught.value)
    code, err = run_caption([str(directory), "--checkpoint", str(directory)], capsys)
    assert code == 2 and err.count("\n") == 1 and CALIBRATION in err  # one line naming the file
    # ... and `captioner calibrate` replaces it rather than tripping over it
    assert isinstance(Captioner.from_pretrained(directory, device="cpu", calibrated=False), Captioner)


def test_calibration_round_trips_through_json():
    c = Calibration(["per_word_logprob", "tokens"], [-1.0, 10.0], [0.2, 3.0], [0.7, -0.3], -0.4, {"fitted_on": "val"})
    again = Calibration.from_json(json.loads(json.dumps(c.to_json())), "x")
    x = np.array([[-0.8, 9.0], [-1.5, 14.0]])
    assert again == c and np.allclose(again.confidence(x), c.confidence(x))


def test_the_app_shows_the_confidence_beside_the_best_caption_and_in_the_nbest(bundled_copy, photos):
    app = load_app()
    cap = Captioner.from_pretrained(bundled_copy, device="cpu")
    best, table, _ = app.caption_upload(cap, {"path": photos[0]}, "beam", 1.0, 1.0, 3, 3, True)
    expected = cap.caption(photos[0], strategy="beam", beam_size=3, num_return=3, guide=True)
    assert best.value == expected[0]["caption"] and f"confidence {expected[0]['confidence']:.2f}" in best.label
    assert [row[2] for row in table] == [h["confidence"] for h in expected]
    headers = next(b for b in app.build_demo(cap).blocks.values() if getattr(b, "elem_id", None) == "nbest").headers
    assert headers == ["#", "caption", "confidence", "log-prob", "score"]


def test_export_keeps_one_models_calibration_and_gives_an_ensemble_none(bundled_copy, trained_run, tmp_path, capsys):
    assert main(["export", str(bundled_copy), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / CALIBRATION).read_bytes() == (bundled_copy / CALIBRATION).read_bytes()
    assert Captioner.from_pretrained(tmp_path / "one").calibration is not None
    best = trained_run / "best"
    member = tmp_path / "member"  # a member's calibration says nothing of the ensemble's captions
    shutil.copytree(best, member)
    # a calibration of signals every model has (the bundled one's "match" needs a matching model this one lacks)
    (member / CALIBRATION).write_text(json.dumps(
        Calibration(["per_word_logprob", "tokens"], [-1.0, 10.0], [0.2, 3.0], [0.7, -0.3], -0.4).to_json()))
    assert Captioner.from_pretrained(member).calibration is not None
    assert main(["export", str(member), str(best), "--out", str(tmp_path / "ensemble")]) == 0
    assert not (tmp_path / "ensemble" / CALIBRATION).exists()


def test_reliability_diagram_keeps_its_plot_wide_with_a_long_decoding_name(tmp_path):
    """The bundled decoding's description is over 150 characters; as one legend line it squeezed the plot into a
    sliver of the figure (docs/reliability.png until 2026-11-29)."""
    import matplotlib.pyplot as plt
    from captioner.confidence import plot_reliability, reliability_figure
    setting = {"strategy": "beam", "beam_size": 5, "length_penalty": 1.0, "guide": True, "match_weight": 4.0,
               "specificity_levels": (0.0, 0.15, 0.3, 0.45, 0.6), "specificity_cost": 0.15}
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 300)
    curves = {split: [{"confidence": conf, "good": (rng.uniform(0, 1, 300) < conf).astype(float), "setting": setting}]
              for split in ("val", "test")}
    fig = reliability_figure(curves, 10)
    assert fig.axes[0].get_position().width > 0.6  # of the figure's width
    plt.close(fig)
    plot_reliability(curves, 10, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000
