"""Specificity: the beam ranks hypotheses by log-probability + specificity x the words' rarity in the training
captions (``Vocab.rarity``), while every hypothesis still reports the model's own log-probability."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.cli import main
from captioner.decoding import DecodeConfig, decode
from captioner.errors import CheckpointError, ConfigError, VocabError
from captioner.tuning import DECODING
from captioner.vocab import Vocab

from decoder_fixtures import decoder, feats, model_logprob  # noqa: F401 (fixtures)

MAX_LEN = 12


def rarity(seed: int = 5) -> torch.Tensor:
    r = torch.rand(40, generator=torch.Generator().manual_seed(seed)) * 3
    r[:4] = 0.0  # the special tokens, as Vocab.rarity gives them
    return r


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_beam_ranks_by_logprob_plus_rarity_and_reports_the_models_logprob(decoder, feats, alpha):
    r, s = rarity(), 0.5
    out = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=4, num_return=4, length_penalty=alpha,
                                              max_len=MAX_LEN, specificity=s), rarity=r)
    for feat, hyps in zip(feats, out):
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            length = len(h.tokens) + (len(h.tokens) < MAX_LEN)
            bonus = s * float(r[sorted(set(h.tokens))].sum())  # each word's rarity once
            assert h.score == pytest.approx((h.logprob + bonus) / length ** alpha, rel=1e-5)
            assert h.logprob == pytest.approx(model_logprob(decoder, feat, h.tokens, MAX_LEN), abs=1e-4)


def test_more_specificity_says_rarer_words(decoder, feats):
    r = rarity()

    def mean_rarity(specificity: float) -> float:
        out = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=4, max_len=MAX_LEN,
                                                  specificity=specificity), rarity=r)
        words = [t for hyps in out for t in hyps[0].tokens]
        return float(r[words].mean())

    assert mean_rarity(0.0) < mean_rarity(1.0) < mean_rarity(4.0)
    one_rare = torch.zeros(40)
    one_rare[17] = 3.0
    plain = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=4, max_len=MAX_LEN))
    assert not all(17 in hyps[0].tokens for hyps in plain)
    forced = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=4, max_len=MAX_LEN, specificity=100.0),
                    rarity=one_rare)
    assert all(17 in hyps[0].tokens for hyps in forced)


def test_a_word_earns_its_bonus_once_per_caption(decoder, feats):
    """Paid on every use, a rare word's bonus made the beam repeat it ("murky murky murky water")."""
    one_rare = torch.zeros(40)
    one_rare[17] = 3.0
    out = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=4, max_len=MAX_LEN, specificity=100.0),
                 rarity=one_rare)
    assert [hyps[0].tokens.count(17) for hyps in out] == [1] * len(feats)


def test_specificity_zero_is_plain_beam_search(decoder, feats):
    config = DecodeConfig(strategy="beam", beam_size=4, num_return=3, length_penalty=0.8, max_len=MAX_LEN)
    plain, given = decode(decoder, feats, config), decode(decoder, feats, config, rarity=rarity())
    assert [[(h.tokens, h.logprob, h.score) for h in x] for x in plain] == \
           [[(h.tokens, h.logprob, h.score) for h in x] for x in given]


@pytest.mark.parametrize("bad", [dict(strategy="greedy", specificity=0.5), dict(strategy="sample", specificity=0.5),
                                 dict(strategy="beam", specificity=-0.1)])
def test_specificity_is_a_non_negative_beam_option(bad):
    with pytest.raises(ConfigError, match="specificity"):
        DecodeConfig(**bad)


def test_specificity_needs_the_rarity(decoder, feats):
    with pytest.raises(ConfigError, match="rarity"):
        decode(decoder, feats, DecodeConfig(strategy="beam", specificity=0.5))


def test_rarity_is_the_log_ratio_to_the_commonest_word():
    vocab = Vocab.build([["a", "dog"]] * 40 + [["a", "poodle"]] * 5, min_count=5)
    r = dict(zip(vocab.words, vocab.rarity()))
    assert r["a"] == 0.0 and r["<end>"] == 0.0 and r["<unk>"] == 0.0
    assert r["dog"] == pytest.approx(math.log(45 / 40)) and r["poodle"] == pytest.approx(math.log(45 / 5))
    with pytest.raises(VocabError, match="counts"):
        Vocab(vocab.words).rarity()


@pytest.fixture
def model(trained_run, tmp_path) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(trained_run / "best", directory)
    return directory


def test_api_and_cli_take_specificity_and_a_vocabulary_without_counts_is_named(model, coco_files, tmp_path):
    cap = Captioner.from_pretrained(model, device="cpu", calibrated=False)
    photos = sorted(coco_files["images"].glob("val_*.jpg"))[:3]
    rarity_of = dict(zip(cap.vocab.words, cap.vocab.rarity()))
    options = dict(strategy="beam", beam_size=3, num_return=3, length_penalty=0.0, guide=False)
    specific = cap.caption([str(p) for p in photos], specificity=2.0, **options)
    for nbest in specific:
        assert [c["score"] for c in nbest] == sorted((c["score"] for c in nbest), reverse=True)
        for c in nbest:
            assert c["score"] == pytest.approx(c["logprob"] + 2.0 * sum(rarity_of[w] for w in c["tokens"]), abs=1e-3)
    out = tmp_path / "c.jsonl"
    assert main(["caption", *map(str, photos), "--checkpoint", str(model), "--device", "cpu", "--strategy", "beam",
                 "--beam-size", "3", "--length-penalty", "0", "--specificity", "2", "--no-guide", "-o", str(out),
                 "--workers", "0"]) == 0
    assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == [n[0]["caption"] for n in specific]
    vocab = json.loads((model / "vocab.json").read_text())
    (model / "vocab.json").write_text(json.dumps({"words": vocab["words"]}))
    plain = Captioner.from_pretrained(model, device="cpu", calibrated=False)
    with pytest.raises(ConfigError, match="counts"):
        plain.caption(str(photos[0]), specificity=1.0, **options)


def assert_tuned_rows_are_what_evaluate_measures(model: Path, data_dir: Path, capsys, option: str,
                                                 values: tuple[float, float]) -> None:
    """``tune-decoding`` over a grid dimension (``--{option}s 0,X``: a row per value) measures its second row as
    ``evaluate --{option} X`` does, and records the option in the row and in evaluate's decoding."""
    flag = option.replace("_", "-")
    grid = {"specificity": "--specificities", "tag_bonus": "--tag-bonuses"}[option]
    assert main(["tune-decoding", str(data_dir), "--checkpoint", str(model), "--device", "cpu", "--beam-sizes", "3",
                 "--length-penalties", "0", *(["--specificities", "0"] if option != "specificity" else []),
                 grid, ",".join(map(str, values))]) == 0
    rows = json.loads((model / DECODING).read_text())["grid"]["rows"]
    assert [r.get(option, 0.0) for r in rows] == list(values)
    capsys.readouterr()
    out = model.parent / f"{option}.json"
    assert main(["evaluate", str(data_dir), "--split", "val", "--checkpoint", str(model), "--from-cache",
                 "--device", "cpu", "--strategy", "beam", "--beam-size", "3", "--length-penalty", "0",
                 f"--{flag}", str(values[1]), "--no-guide", "-o", str(out)]) == 0
    measured = json.loads(out.read_text())
    assert (round(measured["Bleu_4"], 5), round(measured["CIDEr"], 5)) == (rows[1]["bleu4"], rows[1]["cider_d"])
    assert measured["decoding"][option] == values[1]


def test_tune_decoding_measures_each_specificity_as_evaluate_does(model, data_dir, capsys):
    assert_tuned_rows_are_what_evaluate_measures(model, data_dir, capsys, "specificity", (0.0, 1.5))


def test_a_recommended_specificity_without_word_counts_is_a_load_error_naming_the_files(model):
    (model / DECODING).write_text(json.dumps({"format": "captioner-decoding/1",
                                              "defaults": {"strategy": "beam", "specificity": 0.15}}))
    assert Captioner.from_pretrained(model, device="cpu").decode_config().specificity == 0.15
    vocab = json.loads((model / "vocab.json").read_text())
    (model / "vocab.json").write_text(json.dumps({"words": vocab["words"]}))
    with pytest.raises(CheckpointError, match=r"decoding\.json: recommends a specificity.*vocab\.json.*counts"):
        Captioner.from_pretrained(model, device="cpu")
