"""Specification of captioner.metrics: pycocoevalcap's numbers from the project's own tokens."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from captioner.metrics import bleu, cider_d, rouge_l, score_all
from captioner.tokenizer import tokenize

SUBJECTS = ["man", "woman", "dog", "cat", "child", "group of people", "bird", "horse", "boy", "girl"]
ADJECTIVES = ["", "young", "small", "large", "brown", "white", "black", "happy", "old"]
ACTIONS = ["sitting on", "standing next to", "walking along", "running through", "looking at", "lying on"]
PLACES = ["the beach", "a bench", "the grass", "a street", "the snow", "a wooden table", "the water", "a field"]
ENDINGS = ["", ".", " in the sun.", " on a cloudy day", ", smiling.", " near some trees"]


def _caption(rng: random.Random, subject: str, place: str) -> str:
    """One COCO-like caption of a scene, with varied wording and punctuation."""
    adjective = rng.choice(ADJECTIVES)
    article = rng.choice(["A", "a", "The", "One"])
    return f"{article} {adjective} {subject} {rng.choice(ACTIONS)} {place}{rng.choice(ENDINGS)}"


def _corpus(num_images: int = 50, seed: int = 0) -> tuple[dict[int, list[list[str]]], dict[int, list[str]]]:
    """Deterministic refs (5 per image) and hypotheses mixing copies, edits, paraphrases, noise and
    very short/empty captions (the cases where naive corpus BLEU drifts from pycocoevalcap)."""
    rng = random.Random(seed)
    vocabulary = sorted({token for words in SUBJECTS + ACTIONS + PLACES for token in tokenize(words)})
    refs: dict[int, list[list[str]]] = {}
    hyps: dict[int, list[str]] = {}
    for image_id in range(num_images):
        subject, place = rng.choice(SUBJECTS), rng.choice(PLACES)
        refs[image_id] = [tokenize(_caption(rng, subject, place)) for _ in range(5)]
        kind = image_id % 5
        if kind == 0:  # a copy of one reference
            hyps[image_id] = list(rng.choice(refs[image_id]))
        elif kind == 1:  # a reference with one word replaced and one dropped
            tokens = list(rng.choice(refs[image_id]))
            tokens[rng.randrange(len(tokens))] = rng.choice(vocabulary)
            del tokens[rng.randrange(len(tokens))]
            hyps[image_id] = tokens
        elif kind == 2:  # a fresh caption of the same scene
            hyps[image_id] = tokenize(_caption(rng, subject, place))
        elif kind == 3:  # unrelated words
            hyps[image_id] = [rng.choice(vocabulary) for _ in range(rng.randint(4, 12))]
        else:  # very short, including empty
            hyps[image_id] = rng.choice(refs[image_id])[: rng.randint(0, 3)]
    return refs, hyps


def _pycocoevalcap_scores(refs: dict[int, list[list[str]]], hyps: dict[int, list[str]]) -> dict[str, float]:
    """Reference numbers: pycocoevalcap on the same tokens, space-joined as it expects."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {image_id: [" ".join(r) for r in references] for image_id, references in refs.items()}
    res = {image_id: [" ".join(hypothesis)] for image_id, hypothesis in hyps.items()}
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"Bleu_{n}": float(s) for n, s in enumerate(bleu_scores, start=1)},
        "CIDEr": float(Cider().compute_score(gts, res)[0]),
        "ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
    }


@pytest.fixture(scope="module")
def corpus() -> tuple[dict[int, list[list[str]]], dict[int, list[str]]]:
    return _corpus()


@pytest.fixture(scope="module")
def theirs(corpus) -> dict[str, float]:
    return _pycocoevalcap_scores(*corpus)


@pytest.fixture(scope="module")
def ours(corpus) -> dict[str, float]:
    return score_all(*corpus)


def test_corpus_exercises_short_and_empty_hypotheses(corpus):
    _, hyps = corpus
    assert any(len(h) == 0 for h in hyps.values())
    assert any(0 < len(h) < 4 for h in hyps.values())


@pytest.mark.parametrize("name", ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L"])
def test_score_agrees_with_pycocoevalcap(ours, theirs, name):
    assert ours[name] == pytest.approx(theirs[name], abs=1e-4)


def test_score_all_returns_pycocoevalcap_names(ours):
    assert list(ours) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L"]


def test_cider_is_on_the_usual_x10_scale(corpus):
    refs, _ = corpus
    perfect = {image_id: references[0] for image_id, references in refs.items()}
    assert cider_d(refs, perfect) > 1.0


def test_bleu_of_a_reference_against_its_references_is_one(corpus):
    refs, _ = corpus
    hyps = {image_id: references[0] for image_id, references in refs.items()}
    assert bleu(refs, hyps) == pytest.approx({f"Bleu_{n}": 1.0 for n in range(1, 5)})


def test_bleu_hand_computed_with_brevity_penalty():
    refs = {7: [["the", "cat", "is", "on", "the", "mat"], ["there", "is", "a", "cat", "on", "the", "mat"]]}
    hyps = {7: ["the", "cat", "sat", "on", "mat"]}
    # unigrams: the, cat, on, mat match; sat does not     -> p1 = 4/5
    # bigrams: "the cat" matches; "cat sat", "sat on", "on mat" do not -> p2 = 1/4
    # hypothesis length c = 5; closest reference length r = 6 (|6-5| < |7-5|) -> BP = exp(1 - 6/5)
    # BLEU-1 = BP * 4/5 ≈ 0.65498;  BLEU-2 = BP * sqrt(4/5 * 1/4) ≈ 0.36614
    brevity = math.exp(1 - 6 / 5)
    scores = bleu(refs, hyps)
    assert scores["Bleu_1"] == pytest.approx(brevity * 4 / 5)
    assert scores["Bleu_2"] == pytest.approx(brevity * math.sqrt(4 / 5 * 1 / 4))


def test_bleu_is_exactly_zero_without_warning_when_an_order_has_no_match():
    refs = {7: [["the", "cat", "is", "on", "the", "mat"], ["there", "is", "a", "cat", "on", "the", "mat"]]}
    hyps = {7: ["the", "cat", "sat", "on", "mat"]}  # no trigram in common with any reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = bleu(refs, hyps)
    assert scores["Bleu_3"] == 0.0
    assert scores["Bleu_4"] == 0.0


def test_rouge_l_hand_computed():
    refs = {1: [["a", "b", "c", "d"], ["a", "x"]]}
    hyps = {1: ["a", "c", "d"]}
    # LCS with ref 1 = 3 ("a c d"), with ref 2 = 1 ("a"): P = max(3/3, 1/3) = 1, R = max(3/4, 1/2) = 3/4
    # F = (1 + 1.2^2) * P * R / (R + 1.2^2 * P)
    assert rouge_l(refs, hyps) == pytest.approx((1 + 1.44) * 0.75 / (0.75 + 1.44))


def test_empty_hypothesis_scores_zero():
    refs = {1: [["a", "dog", "runs"]], 2: [["a", "cat", "sleeps"]]}
    hyps: dict[int, list[str]] = {1: [], 2: []}
    assert score_all(refs, hyps) == {
        "Bleu_1": 0.0, "Bleu_2": 0.0, "Bleu_3": 0.0, "Bleu_4": 0.0, "CIDEr": 0.0, "ROUGE_L": 0.0,
    }


def test_mismatched_image_ids_raise_naming_the_ids():
    refs = {1: [["a", "dog"]], 2: [["a", "cat"]]}
    hyps = {1: ["a", "dog"], 3: ["a", "cat"]}
    with pytest.raises(ValueError, match=r"without hypothesis: \[2\].*without references: \[3\]"):
        score_all(refs, hyps)


def test_image_without_references_raises():
    refs = {1: [["a", "dog"]], 2: []}
    hyps = {1: ["a", "dog"], 2: ["a", "cat"]}
    with pytest.raises(ValueError, match=r"at least one reference.*\[2\]"):
        score_all(refs, hyps)
