"""Consensus reranking: the beam's captions ordered by agreement with the captions of the nearest training photos
(``captioner/consensus.py``), built by ``captioner consensus-index`` into a user's own checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.cli import main
from captioner.consensus import INDEX, TENSORS, ConsensusIndex, read_index
from captioner.decoding import DecodeConfig
from captioner.encoder import EncoderConfig
from captioner.errors import CheckpointError, ConfigError
from captioner.manifest import load_manifest, split_records
from captioner.tuning import DECODING


@pytest.fixture
def model(trained_run, tmp_path) -> Path:
    """The tiny trained model, copied so a test may add an index to it."""
    directory = tmp_path / "model"
    shutil.copytree(trained_run / "best", directory)
    return directory


def index_of(captions: list[list[str]], features: list[list[float]]) -> ConsensusIndex:
    feats = torch.nn.functional.normalize(torch.tensor(features), dim=1).half()
    return ConsensusIndex(feats, [[c.split() for c in caps] for caps in captions], EncoderConfig(feature_dim=2), "train")


def test_rerank_follows_the_nearest_photos_captions_and_the_weight_brings_the_model_back():
    index = index_of([["a red circle on white", "a red circle"], ["a blue square on white", "a blue square"],
                      ["a green triangle", "a green triangle on white"]],
                     [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    candidates = [{"tokens": "a blue square".split(), "score": -1.0}, {"tokens": "a red circle".split(), "score": -3.0}]
    near_red = torch.tensor([[0.9, 0.1]])
    assert index.neighbours(near_red, 1) == [[0]]
    assert index.rerank([candidates], near_red, 1, 0.0)[0][0]["tokens"] == ["a", "red", "circle"]
    assert index.rerank([candidates], torch.tensor([[0.1, 0.9]]), 1, 0.0)[0][0]["tokens"] == ["a", "blue", "square"]
    assert index.rerank([candidates], near_red, 1, 100.0)[0][0]["tokens"] == ["a", "blue", "square"]  # model's order


def test_consensus_index_cli_builds_an_index_the_model_decodes_with(model, data_dir, capsys):
    assert main(["consensus-index", str(data_dir), "--checkpoint", str(model)]) == 0
    assert "photos of split 'train'" in capsys.readouterr().out
    cap = Captioner.from_pretrained(model, device="cpu")
    train = split_records(load_manifest(data_dir), "train")
    assert cap.consensus is not None and len(cap.consensus.captions) == len(train)
    assert torch.allclose(cap.consensus.features.float().norm(dim=1), torch.ones(len(train)), atol=1e-2)
    image = train[0].path
    plain = cap.caption(image, strategy="beam", beam_size=3, num_return=3)
    reranked = cap.caption(image, strategy="beam", beam_size=3, num_return=3, consensus=2, consensus_weight=0.0)
    assert sorted(c["caption"] for c in reranked) == sorted(c["caption"] for c in plain)  # the same candidates
    rows = cap.consensus.neighbours(cap.features([image]), 2)[0]
    agreement = [sum(cap.consensus.scorer.score(r, c["tokens"]) for r in rows) / 2 for c in reranked]
    assert agreement == sorted(agreement, reverse=True)
    assert main(["caption", image, "--checkpoint", str(model), "--device", "cpu", "--strategy", "beam",
                 "--consensus", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["caption"] == reranked[0]["caption"]


def test_consensus_needs_an_index_a_beam_and_never_indexes_test(model, data_dir, capsys):
    cap = Captioner.from_pretrained(model, device="cpu")
    with pytest.raises(ConfigError, match="captioner consensus-index"):
        cap.caption(torch.zeros(64, 64, 3).numpy(), strategy="beam", consensus=5)
    with pytest.raises(ConfigError, match="strategy 'beam'"):
        DecodeConfig(strategy="greedy", consensus=5)
    assert main(["consensus-index", str(data_dir), "--checkpoint", str(model), "--split", "test"]) == 2
    assert "test split" in capsys.readouterr().err
    assert main(["consensus-index", str(data_dir), "--checkpoint", "fast"]) == 2
    assert "bundled model ships no dataset captions" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["tensors", "json", "encoder"])
def test_a_broken_or_foreign_index_is_an_error_naming_it_and_can_be_rebuilt(model, data_dir, damage):
    assert main(["consensus-index", str(data_dir), "--checkpoint", str(model)]) == 0
    if damage == "tensors":
        (model / TENSORS).write_bytes((model / TENSORS).read_bytes()[:-8])
    elif damage == "json":
        (model / INDEX).write_text("{not json")
    else:
        data = json.loads((model / INDEX).read_text())
        data["encoder"]["name"] = "resnet50"
        (model / INDEX).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=str(model / INDEX)):
        Captioner.from_pretrained(model, device="cpu")
    assert main(["consensus-index", str(data_dir), "--checkpoint", str(model)]) == 0  # a rebuild replaces it
    assert read_index(model, Captioner.from_pretrained(model, device="cpu").config.encoder) is not None


def test_tune_decoding_measures_reranked_settings_as_evaluate_does_and_can_recommend_one(model, data_dir, capsys,
                                                                                          tmp_path):
    assert main(["consensus-index", str(data_dir), "--checkpoint", str(model)]) == 0
    assert main(["tune-decoding", str(data_dir), "--checkpoint", str(model), "--device", "cpu", "--beam-sizes", "3",
                 "--length-penalties", "0", "--consensus", "1,3", "--consensus-weights", "0,0.3", "--specificities", "0",
                 "--cider-tie", "0"]) == 0
    result = json.loads((model / DECODING).read_text())
    rows = result["grid"]["rows"]
    assert [(r.get("consensus"), r.get("consensus_weight")) for r in rows] == [
        (None, None), (1, 0.0), (1, 0.3), (3, 0.0), (3, 0.3)]
    best = max((r for r in rows if r["bleu4"] >= rows[0]["bleu4"]), key=lambda r: r["cider_d"])
    assert result["defaults"].get("consensus") == best.get("consensus")
    capsys.readouterr()
    for row in rows[1:]:  # each reranked row is what `captioner evaluate --consensus K` reports
        out = tmp_path / f"c{row['consensus']}-{row['consensus_weight']}.json"
        assert main(["evaluate", str(data_dir), "--split", "val", "--checkpoint", str(model), "--from-cache",
                     "--device", "cpu", "--strategy", "beam", "--beam-size", "3", "--length-penalty", "0",
                     "--no-guide", "--consensus", str(row["consensus"]), "--consensus-weight",
                     str(row["consensus_weight"]), "-o", str(out)]) == 0
        measured = json.loads(out.read_text())
        assert (round(measured["Bleu_4"], 5), round(measured["CIDEr"], 5)) == (row["bleu4"], row["cider_d"])
    # a recommended reranking is every entry point's default; export leaves the index (the dataset's captions) out
    # unless asked, re-choosing among the grid's settings that need none; a recommendation without its index fails
    result["defaults"] = {"strategy": "beam", "beam_size": 3, "length_penalty": 0.0, "guide": False, "consensus": 3,
                          "consensus_weight": 0.3}
    (model / DECODING).write_text(json.dumps(result))
    cap = Captioner.from_pretrained(model, device="cpu")
    assert (cap.decode_config().consensus, cap.decode_config().consensus_weight) == (3, 0.3)
    assert cap.decode_config(strategy="greedy").consensus == 0
    assert main(["export", str(model), "--out", str(tmp_path / "plain")]) == 0
    plain = Captioner.from_pretrained(tmp_path / "plain", device="cpu")
    assert plain.consensus is None and not (tmp_path / "plain" / TENSORS).exists()
    assert plain.decoding == {"strategy": "beam", "beam_size": 3, "length_penalty": 0.0, "guide": False}  # rows[0]
    assert main(["export", str(model), "--out", str(tmp_path / "with"), "--with-consensus-index"]) == 0
    carried = Captioner.from_pretrained(tmp_path / "with", device="cpu")
    assert carried.consensus is not None and carried.decoding["consensus"] == 3
    (model / INDEX).unlink()
    with pytest.raises(CheckpointError, match="recommends consensus reranking"):
        Captioner.from_pretrained(model, device="cpu")
