"""Specificity by fit: the beam decoded at several specificities at once, and each photo keeps the level whose
caption the matching model finds fits it best, less a cost per unit of specificity (``DecodeConfig.specificity_levels``,
``matching.pick_levels``)."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.api import Captioner
from captioner.cli import main
from captioner.decoding import DecodeConfig, decode
from captioner.errors import CheckpointError, ConfigError
from captioner.manifest import load_manifest, split_records
from captioner.matching import CONFIG, pick_levels
from captioner.tuning import DECODING

from decoder_fixtures import decoder, feats  # noqa: F401 (fixtures)
from test_matching import TINY
from test_specificity import MAX_LEN, rarity

LEVELS = (0.0, 1.5, 3.0)


def hyps_of(out) -> list[list[tuple]]:
    return [[(h.tokens, round(h.logprob, 5), round(h.score, 5)) for h in per] for per in out]


@pytest.mark.parametrize("guided", [False, True])
def test_levels_decode_each_row_as_its_own_specificity_does(decoder, feats, guided):
    r = rarity()
    constraints = [[5 + i] for i in range(len(feats))] if guided else None
    config = DecodeConfig(strategy="beam", beam_size=3, num_return=3, length_penalty=0.8, max_len=MAX_LEN)
    together = decode(decoder, feats, DecodeConfig(**{**config.to_json(), "specificity_levels": LEVELS}),
                      constraints=constraints, rarity=r)
    assert len(together) == len(LEVELS) * len(feats)  # level-major rows
    alone = [decode(decoder, feats, DecodeConfig(**{**config.to_json(), "specificity": s}), constraints=constraints,
                    rarity=r) for s in LEVELS]
    assert len({str(hyps_of(a)) for a in alone}) == len(LEVELS)  # the levels do say different things here
    for i, level in enumerate(alone):
        assert hyps_of(together[i * len(feats):(i + 1) * len(feats)]) == hyps_of(level)


def test_pick_levels_keeps_the_best_match_less_the_cost_and_ties_go_to_the_plainer_caption():
    def nbest(match: float, name: str) -> list[dict]:
        return [{"caption": name, "match": match}, {"caption": name + " 2", "match": 0.9}]

    levels = (0.0, 0.5, 1.0)
    per_level = [[nbest(0.30, "plain a"), nbest(0.30, "plain b"), nbest(0.50, "plain c")],
                 [nbest(0.40, "mid a"), nbest(0.36, "mid b"), nbest(0.20, "mid c")],
                 [nbest(0.50, "rare a"), nbest(0.40, "rare b"), nbest(0.10, "rare c")]]
    first = lambda picked: [n[0]["caption"] for n in picked]  # noqa: E731
    assert first(pick_levels(per_level, levels, 0.0)) == ["rare a", "rare b", "plain c"]
    assert first(pick_levels(per_level, levels, 0.1)) == ["rare a", "mid b", "plain c"]
    assert first(pick_levels(per_level, levels, 0.2)) == ["plain a", "plain b", "plain c"]  # a: 0.3 each: a tie
    assert pick_levels(per_level, levels, 0.0)[0] == per_level[2][0]  # the level's whole n-best, in its order
    shuffled = pick_levels([per_level[2], per_level[0], per_level[1]], (1.0, 0.0, 0.5), 0.1)
    assert first(shuffled) == ["rare a", "mid b", "plain c"]  # levels given in any order


@pytest.mark.parametrize("bad, message", [
    (dict(strategy="greedy", specificity_levels=(0, 1)), "strategy 'beam'"),
    (dict(strategy="beam", specificity=0.2, specificity_levels=(0, 1)), "without a fixed specificity"),
    (dict(strategy="beam", consensus=5, specificity_levels=(0, 1)), "without consensus"),
    (dict(strategy="beam", specificity_levels=(0.5,)), "two or more"),
    (dict(strategy="beam", specificity_levels=(0, 0)), "two or more"),
    (dict(strategy="beam", specificity_levels=(-1, 1)), ">= 0"),
    (dict(strategy="beam", specificity_levels=(0, 1), specificity_cost=-0.1), "specificity_cost")])
def test_levels_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        DecodeConfig(**bad)


@pytest.fixture
def matched(model, data_dir) -> Captioner:
    assert main(["matching", str(data_dir), "--checkpoint", str(model), *TINY]) == 0
    return Captioner.from_pretrained(model, device="cpu", calibrated=False)


def test_each_photo_gets_the_caption_of_the_level_that_fits_it_best(model, matched, data_dir, capsys):
    photos = [r.path for r in split_records(load_manifest(data_dir), "val")[:6]]
    options = dict(strategy="beam", beam_size=3, num_return=3, length_penalty=0.0, guide=False, match_weight=1.0)
    alone = [matched.caption(photos, specificity=s, **options) for s in LEVELS]  # each level's reranked n-best
    assert any(len({alone[i][p][0]["caption"] for i in range(len(LEVELS))}) > 1 for p in range(len(photos)))
    for cost in (0.0, 0.05, 100.0):
        together = matched.caption(photos, specificity_levels=LEVELS, specificity_cost=cost, **options)
        for p, nbest in enumerate(together):
            fit = [alone[i][p][0]["match"] - cost * s for i, s in enumerate(LEVELS)]
            best = max(range(len(LEVELS)), key=lambda i: (round(fit[i], 6), -i))
            assert [c["caption"] for c in nbest] == [c["caption"] for c in alone[best][p]]
    assert [n[0] for n in matched.caption(photos, specificity_levels=LEVELS, specificity_cost=100.0, **options)] == \
           [n[0] for n in alone[0]]  # a prohibitive cost: the plain captions
    capsys.readouterr()
    assert main(["caption", *photos, "--checkpoint", str(model), "--device", "cpu", "--strategy", "beam",
                 "--beam-size", "3", "--length-penalty", "0", "--no-guide", "--match-weight", "1",
                 "--specificity-levels", ",".join(map(str, LEVELS)), "--specificity-cost", "0.05",
                 "--workers", "0"]) == 0
    cli = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    assert cli == [n[0]["caption"] for n in matched.caption(photos, specificity_levels=LEVELS, specificity_cost=0.05,
                                                            **options)]


def test_levels_need_the_matching_model(model):
    cap = Captioner.from_pretrained(model, device="cpu")
    with pytest.raises(ConfigError, match="specificity by fit needs the checkpoint's matching model"):
        cap.caption(torch.zeros(64, 64, 3).numpy(), strategy="beam", specificity_levels=LEVELS)


def test_tune_decoding_measures_levels_as_evaluate_does_and_the_choice_loads(model, matched, data_dir, tmp_path):
    assert main(["tune-decoding", str(data_dir), "--checkpoint", str(model), "--device", "cpu", "--beam-sizes", "3",
                 "--length-penalties", "0", "--match-weights", "1", "--consensus", "", "--specificities", "0",
                 "--specificity-levels", "0,1.5,3", "--specificity-costs", "0,0.05"]) == 0
    result = json.loads((model / DECODING).read_text())
    rows = result["grid"]["rows"]
    assert [(r.get("specificity", 0.0), r.get("specificity_cost")) for r in rows] == \
           [(0.0, None), (0.0, None), (1.5, None), (1.5, None), (3.0, None), (3.0, None), (0.0, 0.0), (0.0, 0.05)]
    for row in rows[-2:]:  # each row choosing a level per photo is what `captioner evaluate` reports
        assert row["specificity_levels"] == [0.0, 1.5, 3.0] and row["match_weight"] == 1.0
        out = tmp_path / f"fit{row['specificity_cost']}.json"
        assert main(["evaluate", str(data_dir), "--split", "val", "--checkpoint", str(model), "--from-cache",
                     "--device", "cpu", "--strategy", "beam", "--beam-size", "3", "--length-penalty", "0",
                     "--no-guide", "--match-weight", "1", "--specificity-levels", "0,1.5,3",
                     "--specificity-cost", str(row["specificity_cost"]), "-o", str(out)]) == 0
        measured = json.loads(out.read_text())
        assert (round(measured["Bleu_4"], 5), round(measured["CIDEr"], 5)) == (row["bleu4"], row["cider_d"])
    result["defaults"] = {"strategy": "beam", "beam_size": 3, "length_penalty": 0.0, "guide": False,
                          "match_weight": 1.0, "specificity_levels": [0.0, 1.5, 3.0], "specificity_cost": 0.05}
    (model / DECODING).write_text(json.dumps(result))
    cap = Captioner.from_pretrained(model, device="cpu")
    assert cap.decode_config().specificity_levels == LEVELS
    assert cap.decode_config(specificity=0.5).specificity_levels == ()  # a fixed specificity replaces the levels
    assert "specificity by fit (0/1.5/3, cost 0.05)" in cap.decode_config().describe()
    (model / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=r"decoding\.json: recommends specificity by fit.*matching\.json"):
        Captioner.from_pretrained(model, device="cpu")


def test_the_apps_by_fit_box_decodes_as_the_api_does(matched, data_dir):
    import app
    photo = split_records(load_manifest(data_dir), "val")[0].path
    request = (matched, {"path": photo}, "beam", 1.0, 1.0, 3, 3, False, None)
    levels = app.fit_levels(matched)
    assert levels == app.TuneConfig.specificity_levels  # no recommendation: the tuning grid's levels
    best, table, _ = app.caption_upload(*request, 0.4, True)
    nbest = matched.caption(photo, strategy="beam", beam_size=3, num_return=3, guide=False,
                            specificity_levels=levels)
    assert best == nbest[0]["caption"] and [r[-1] for r in table] == [c["score"] for c in nbest]
    fixed = matched.caption(photo, strategy="beam", beam_size=3, num_return=3, guide=False, specificity=0.4)
    assert app.caption_upload(*request, 0.4, False)[0] == fixed[0]["caption"]
