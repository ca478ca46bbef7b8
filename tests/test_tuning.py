"""A checkpoint's recommended decoding: chosen on validation by ``captioner tune-decoding``, stored as
``decoding.json``, used by the API, the CLI, ``evaluate`` and the app unless the caller says otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from captioner.api import Captioner, default_checkpoint
from captioner.checkpoint import load_checkpoint
from captioner.cli import build_parser, main
from captioner.errors import CheckpointError, ConfigError
from captioner.manifest import load_manifest, split_records
from captioner.tuning import DECODING, FORMAT, TuneConfig, choose

from app_fixtures import load_app


@pytest.fixture
def model(trained_run, tmp_path) -> Path:
    """The tiny trained model, copied so a test may write its decoding.json."""
    directory = tmp_path / "model"
    shutil.copytree(trained_run / "best", directory)
    return directory


def recommend(directory: Path, defaults: dict) -> None:
    (directory / DECODING).write_text(json.dumps({"format": FORMAT, "defaults": defaults}))


def test_tune_decoding_measures_every_setting_as_evaluate_does_and_picks_by_its_rule(model, data_dir, capsys):
    assert main(["tune-decoding", str(data_dir), "--checkpoint", str(model), "--device", "cpu",
                 "--beam-sizes", "1,3", "--length-penalties", "0,2", "--specificities", "0", "--cider-tie", "0"]) == 0
    result = json.loads((model / DECODING).read_text())
    rows = result["grid"]["rows"]
    assert [(r["beam_size"], r["length_penalty"]) for r in rows] == [(1, 0.0), (1, 2.0), (3, 0.0), (3, 2.0)]
    eligible = [r for r in rows if r["bleu4"] >= rows[0]["bleu4"]]
    best = max(eligible, key=lambda r: (r["cider_d"], r["distinct_words"]))
    assert result["defaults"] == {"strategy": "beam", "beam_size": best["beam_size"],
                                  "length_penalty": best["length_penalty"], "guide": False}
    assert result["split"] == "val"
    capsys.readouterr()
    for row in rows[1:]:  # each row's numbers are what `captioner evaluate` reports for that setting
        out = model.parent / f"m{row['beam_size']}-{row['length_penalty']}.json"
        assert main(["evaluate", str(data_dir), "--split", "val", "--checkpoint", str(model), "--from-cache",
                     "--device", "cpu", "--strategy", "beam", "--beam-size", str(row["beam_size"]),
                     "--length-penalty", str(row["length_penalty"]), "--no-guide", "-o", str(out)]) == 0
        measured = json.loads(out.read_text())
        assert (round(measured["Bleu_4"], 5), round(measured["CIDEr"], 5)) == (row["bleu4"], row["cider_d"])
        assert measured["decoding"]["length_penalty"] == row["length_penalty"]


def test_no_repeat_ngram_sizes_are_a_grid_dimension_measured_as_evaluate_does(model, data_dir, capsys):
    assert main(["tune-decoding", str(data_dir), "--checkpoint", str(model), "--device", "cpu", "--beam-sizes", "3",
                 "--length-penalties", "0", "--no-repeat-ngrams", "0,1", "--specificities", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.strip().startswith("3 ")]
    assert [row[2] for row in table] == ["0", "1"]  # the norep column: one row per size
    measured = model.parent / "norep.json"
    assert main(["evaluate", str(data_dir), "--split", "val", "--checkpoint", str(model), "--from-cache", "--device",
                 "cpu", "--strategy", "beam", "--beam-size", "3", "--no-repeat-ngram", "1", "--no-guide",
                 "-o", str(measured)]) == 0
    metrics = json.loads(measured.read_text())
    assert f"{metrics['Bleu_4'] * 100:6.2f}".strip() == table[1][7]  # the row's BLEU-4 is evaluate's
    assert metrics["decoding"]["no_repeat_ngram"] == 1
    assert not (model / DECODING).exists()  # a dry run writes nothing
    with pytest.raises(ConfigError):
        TuneConfig(no_repeat_ngrams=())


def test_the_recommended_decoding_is_every_entry_points_default(model, data_dir, capsys, tmp_path):
    recommend(model, {"strategy": "beam", "beam_size": 4, "length_penalty": 1.5})
    cap = Captioner.from_pretrained(model, device="cpu")
    plain = cap.decode_config()
    assert (plain.strategy, plain.beam_size, plain.length_penalty) == ("beam", 4, 1.5)
    narrower = cap.decode_config(strategy="beam", beam_size=2)  # the caller's width, the model's penalty
    assert (narrower.beam_size, narrower.length_penalty) == (2, 1.5)
    greedy = cap.decode_config(strategy="greedy")  # another strategy: none of the model's beam settings
    assert (greedy.strategy, greedy.beam_size, greedy.length_penalty) == ("greedy", 3, 0.0)
    out = tmp_path / "m.json"
    assert main(["evaluate", str(data_dir), "--split", "val", "--checkpoint", str(model), "--from-cache",
                 "--device", "cpu", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["decoding"] == plain.to_json()
    app = load_app()
    assert app.opening_beam_size(cap) == 4
    photo = split_records(load_manifest(data_dir), "val")[0].path
    assert cap.explain(photo, **app.EXPLAIN_OPTIONS).caption == cap.caption(photo, strategy="beam", beam_size=4,
                                                                            length_penalty=1.5)


def test_no_guide_turns_off_a_recommended_guide(model):
    from captioner.cli import _decode_config
    recommend(model, {"strategy": "beam", "beam_size": 3, "guide": True})
    cap = Captioner.from_pretrained(model, device="cpu")
    assert _decode_config(build_parser().parse_args(["caption", "x.jpg"]), cap).guide is True
    assert _decode_config(build_parser().parse_args(["caption", "x.jpg", "--no-guide"]), cap).guide is False


@pytest.mark.parametrize("content, problem", [
    ("{not json", "JSONDecodeError"),
    (json.dumps({"format": "other/1", "defaults": {}}), "format"),
    (json.dumps({"format": FORMAT, "defaults": {"num_return": 3}}), "cannot set"),
    (json.dumps({"format": FORMAT, "defaults": {"strategy": "beam", "beam_size": 0}}), "beam_size"),
    (json.dumps({"format": FORMAT, "defaults": {"strategy": "greedy", "guide": True}}), "guided"),
])
def test_a_broken_decoding_json_is_an_error_naming_it(model, content, problem):
    (model / DECODING).write_text(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model)
    assert str(model / DECODING) in str(err.value) and problem in str(err.value)


def test_export_keeps_one_models_decoding_and_gives_an_ensemble_none(model, tmp_path):
    recommend(model, {"strategy": "beam", "beam_size": 5, "length_penalty": 0.5})
    assert main(["export", str(model), "--out", str(tmp_path / "one")]) == 0
    assert Captioner.from_pretrained(tmp_path / "one", device="cpu").decoding == {
        "strategy": "beam", "beam_size": 5, "length_penalty": 0.5}
    assert main(["export", str(model), str(model), "--out", str(tmp_path / "two")]) == 0
    assert not (tmp_path / "two" / DECODING).exists()


def test_settings_within_the_cider_tie_go_to_the_one_with_the_most_distinct_words():
    def row(bleu4: float, cider_d: float, words: int, beam: int) -> dict:
        return {"strategy": "beam", "beam_size": beam, "length_penalty": 0.0, "bleu4": bleu4, "cider_d": cider_d,
                "distinct_words": words}
    rows = [row(0.20, 0.50, 200, 3), row(0.21, 0.530, 250, 4), row(0.21, 0.527, 310, 5), row(0.21, 0.520, 400, 6),
            row(0.19, 0.531, 500, 7)]  # the last: more words, but a worse BLEU-4 than the reference
    assert choose(rows)["beam_size"] == 4
    assert choose(rows, cider_tie=0.005)["beam_size"] == 5
    assert choose(rows, cider_tie=0.02)["beam_size"] == 6


def test_decoding_is_never_chosen_on_the_test_split():
    with pytest.raises(ConfigError, match="validation"):
        TuneConfig(split="test")


def test_the_bundled_models_decoding_was_chosen_on_val_by_its_rule():
    result = json.loads((default_checkpoint() / DECODING).read_text())
    rows = result["grid"]["rows"]
    assert result["split"] == "val" and len(rows) >= 4
    eligible = [r for r in rows if r["bleu4"] >= rows[0]["bleu4"]]
    best = max(r["cider_d"] for r in eligible)
    tie = result["grid"].get("cider_tie", 0.0)
    chosen = max((r for r in eligible if r["cider_d"] >= best - tie), key=lambda r: (r["distinct_words"], r["cider_d"]))
    for option in ("beam_size", "length_penalty", "no_repeat_ngram", "match_weight", "specificity", "tag_bonus"):
        assert result["defaults"].get(option) == chosen.get(option)
    assert Captioner.from_pretrained(device="cpu").decode_config().to_json() == {
        **Captioner.from_pretrained(device="cpu").decode_config(strategy="greedy").to_json(), **result["defaults"]}
