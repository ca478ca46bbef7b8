"""Matching reranking: a small image-caption embedding (``captioner/matching.py``), trained by ``captioner
matching`` beside a checkpoint, reorders the beam by the model's score + weight x the photo-caption match."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.api import Captioner
from captioner.captions import CaptionTensors
from captioner.cli import main
from captioner.decoding import DecodeConfig
from captioner.encoder import EncoderConfig
from captioner.errors import CheckpointError, ConfigError
from captioner.manifest import load_manifest, split_records
from captioner.matching import CONFIG, TENSORS, MatchingConfig, MatchingModel, read_matcher, recall, train_matching
from captioner.tuning import DECODING
from captioner.vocab import Vocab

TINY = ["--views", "0", "--epochs", "4", "--embed", "16", "--hidden", "32", "--joint", "32", "--batch-size", "16"]


def class_data(per_class: int, seed: int) -> tuple[torch.Tensor, CaptionTensors, Vocab]:
    """Photos of 6 kinds (a noisy feature around each kind's centre) with captions naming the kind: which
    caption belongs to which photo is learnable only from the words."""
    kinds = ["cat", "dog", "bird", "horse", "car", "boat"]
    vocab = Vocab.build([["a", k, "on", "grass"] for k in kinds], min_count=1)
    centres = torch.randn(len(kinds), 24, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    kind = torch.arange(len(kinds)).repeat(per_class)
    features = centres[kind] + 0.3 * torch.randn(len(kind), 24, generator=g)
    rows = [vocab.encode(["a", kinds[k], "on", "grass"]) for k in kind.tolist()]
    tokens = torch.tensor(rows)
    return features, CaptionTensors(tokens, torch.full((len(rows),), tokens.shape[1]), torch.arange(len(rows)),
                                    list(range(len(rows)))), vocab


def test_training_learns_which_caption_names_which_photo():
    train_x, train_c, vocab = class_data(20, seed=1)
    val_x, val_c, _ = class_data(5, seed=2)
    config = MatchingConfig(embed=16, hidden=32, joint=32, epochs=15, batch_size=24, lr=3e-3, views=0)
    untrained = recall(MatchingModel(24, len(vocab.words), config), val_x, val_c)
    matcher = train_matching(train_x[:, None], train_c, val_x, val_c, vocab, EncoderConfig(feature_dim=24), config,
                             log=lambda _: None)
    # 30 val photos, 5 of each kind, tied captions: a caption that found its kind ranks its photo in the top 5
    assert matcher.recall["r5"] >= 0.9 > untrained["r5"] + 0.3
    cat, dog = matcher.similarity(val_x[:1], vocab, [["a", "cat", "on", "grass"], ["a", "dog", "on", "grass"]], [0, 0])
    assert cat > dog  # val photo 0 is a cat


def test_rerank_orders_by_score_plus_weight_times_match():
    features, captions, vocab = class_data(1, seed=1)
    matcher = train_matching(features[:, None], captions, features, captions, vocab, EncoderConfig(feature_dim=24),
                             MatchingConfig(embed=4, hidden=4, joint=4, epochs=1, views=0), log=lambda _: None)
    candidates = [{"tokens": ["a", k, "on", "grass"], "score": s} for k, s in (("cat", -1.0), ("dog", -1.2))]
    photo = torch.randn(1, 24)
    cat, dog = matcher.similarity(photo, vocab, [c["tokens"] for c in candidates], [0, 0])
    by_match = ["cat", "dog"] if cat > dog else ["dog", "cat"]
    assert [c["tokens"][1] for c in matcher.rerank([candidates], photo, vocab, 0.0)[0]] == ["cat", "dog"]
    assert [c["tokens"][1] for c in matcher.rerank([candidates], photo, vocab, 1e4)[0]] == by_match
    weight = 0.2 / abs(cat - dog) * 0.99  # just too little to overturn the 0.2 score gap
    assert matcher.rerank([candidates], photo, vocab, weight)[0][0]["tokens"][1] == "cat"


def test_matching_cli_trains_a_model_the_checkpoint_reranks_with(model, data_dir, capsys):
    assert main(["matching", str(data_dir), "--checkpoint", str(model), *TINY]) == 0
    assert "val caption->photo recall" in capsys.readouterr().out
    cap = Captioner.from_pretrained(model, device="cpu")
    assert cap.matcher is not None and cap.matcher.config.hidden == 32
    image = split_records(load_manifest(data_dir), "train")[0].path
    plain = cap.caption(image, strategy="beam", beam_size=3, num_return=3)
    reranked = cap.caption(image, strategy="beam", beam_size=3, num_return=3, match_weight=1.0)
    assert sorted(c["caption"] for c in reranked) == sorted(c["caption"] for c in plain)  # the same candidates
    totals = [c["score"] + 1.0 * c["match"] for c in reranked]
    assert totals == sorted(totals, reverse=True)
    assert main(["caption", image, "--checkpoint", str(model), "--device", "cpu", "--strategy", "beam",
                 "--match-weight", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["caption"] == reranked[0]["caption"]


def test_matching_needs_a_model_and_a_beam(model):
    cap = Captioner.from_pretrained(model, device="cpu")
    with pytest.raises(ConfigError, match="captioner matching"):
        cap.caption(torch.zeros(64, 64, 3).numpy(), strategy="beam", match_weight=1.0)
    with pytest.raises(ConfigError, match="strategy 'beam'"):
        DecodeConfig(strategy="greedy", match_weight=1.0)
    with pytest.raises(ConfigError, match="choose one reranking"):
        DecodeConfig(strategy="beam", match_weight=1.0, consensus=5)


@pytest.mark.parametrize("damage", ["tensors", "json", "encoder", "vocab"])
def test_a_broken_or_foreign_matching_model_is_an_error_naming_it_and_can_be_retrained(model, data_dir, damage):
    assert main(["matching", str(data_dir), "--checkpoint", str(model), *TINY]) == 0
    data = json.loads((model / CONFIG).read_text())
    if damage == "tensors":
        (model / TENSORS).write_bytes((model / TENSORS).read_bytes()[:-8])
    elif damage == "json":
        (model / CONFIG).write_text("{not json")
    elif damage == "encoder":
        data["encoder"]["name"] = "resnet50"
        (model / CONFIG).write_text(json.dumps(data))
    else:
        data["vocab_size"] += 1
        (model / CONFIG).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=str(model / CONFIG)):
        Captioner.from_pretrained(model, device="cpu")
    assert main(["matching", str(data_dir), "--checkpoint", str(model), *TINY]) == 0  # retraining replaces it
    cap = Captioner.from_pretrained(model, device="cpu")
    assert read_matcher(model, cap.config.encoder, cap.vocab) is not None


def test_tune_decoding_measures_matched_settings_as_evaluate_does_and_export_keeps_the_model(model, data_dir,
                                                                                             tmp_path):
    assert main(["matching", str(data_dir), "--checkpoint", str(model), *TINY]) == 0
    assert main(["tune-decoding", str(data_dir), "--checkpoint", str(model), "--device", "cpu", "--beam-sizes", "3",
                 "--length-penalties", "0", "--match-weights", "0.5,4", "--consensus", "", "--specificities", "0",
                 "--specificity-levels", ""]) == 0
    result = json.loads((model / DECODING).read_text())
    rows = result["grid"]["rows"]
    assert [r.get("match_weight") for r in rows] == [None, 0.5, 4.0]
    for row in rows[1:]:  # each reranked row is what `captioner evaluate --match-weight W` reports
        out = tmp_path / f"m{row['match_weight']}.json"
        assert main(["evaluate", str(data_dir), "--split", "val", "--checkpoint", str(model), "--from-cache",
                     "--device", "cpu", "--strategy", "beam", "--beam-size", "3", "--length-penalty", "0",
                     "--no-guide", "--match-weight", str(row["match_weight"]), "-o", str(out)]) == 0
        measured = json.loads(out.read_text())
        assert (round(measured["Bleu_4"], 5), round(measured["CIDEr"], 5)) == (row["bleu4"], row["cider_d"])
    result["defaults"] = {"strategy": "beam", "beam_size": 3, "length_penalty": 0.0, "guide": False, "match_weight": 4.0}
    (model / DECODING).write_text(json.dumps(result))
    assert Captioner.from_pretrained(model, device="cpu").decode_config().match_weight == 4.0
    assert main(["export", str(model), "--out", str(tmp_path / "exported")]) == 0  # weights, no captions: it ships
    exported = Captioner.from_pretrained(tmp_path / "exported", device="cpu")
    assert exported.matcher is not None and exported.decoding["match_weight"] == 4.0
    (model / CONFIG).unlink()
    with pytest.raises(CheckpointError, match="recommends matching reranking"):
        Captioner.from_pretrained(model, device="cpu")
