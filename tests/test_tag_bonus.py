"""The tag bonus: the beam ranks a hypothesis higher by ``tag_bonus`` x the ImageNet head's probability of each
animal or vehicle word it uses, once per word (``DecodeConfig.tag_bonus``, ``Tagger.word_bonus``), beside the
specificity bonus; hypotheses still report the model's own log-probability."""

from __future__ import annotations

import pytest
import skimage.data
import torch

from captioner.api import Captioner
from captioner.decoding import DecodeConfig, decode, plain_options
from captioner.errors import ConfigError
from captioner.guidance import IMAGENET_CATEGORIES, Tagger
from captioner.tuning import TuneConfig

from decoder_fixtures import decoder, feats, model_logprob  # noqa: F401 (fixtures)
from test_guidance import _one_class_encoder
from test_specificity import MAX_LEN, assert_tuned_rows_are_what_evaluate_measures, rarity
from test_specificity_fit import LEVELS, hyps_of


def tag_bonus(n: int, seed: int = 7) -> torch.Tensor:
    """A (n, 40) per-image bonus on a few words, 0 on the special tokens, as ``Tagger.word_bonus`` gives one."""
    bonus = torch.zeros(n, 40)
    bonus[:, 5:12] = torch.rand(n, 7, generator=torch.Generator().manual_seed(seed)) * 3
    return bonus


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_beam_ranks_by_logprob_plus_each_used_words_bonus_once(decoder, feats, alpha):
    bonus, weight = tag_bonus(len(feats)), 2.0
    out = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=4, num_return=4, length_penalty=alpha,
                                              max_len=MAX_LEN, tag_bonus=weight), tag_bonus=bonus)
    assert any(t in range(5, 12) for hyps in out for t in hyps[0].tokens)
    for i, (feat, hyps) in enumerate(zip(feats, out)):
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            length = len(h.tokens) + (len(h.tokens) < MAX_LEN)
            earned = float(bonus[i, sorted(set(h.tokens))].sum())  # the tensor is already weighted
            assert h.score == pytest.approx((h.logprob + earned) / length ** alpha, rel=1e-5)
            assert h.logprob == pytest.approx(model_logprob(decoder, feat, h.tokens, MAX_LEN), abs=1e-4)


def test_a_large_bonus_puts_each_photos_own_word_in_its_caption(decoder, feats):
    bonus = torch.zeros(len(feats), 40)
    for i in range(len(feats)):
        bonus[i, 5 + i] = 50.0
    out = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=4, max_len=MAX_LEN, tag_bonus=1.0),
                 tag_bonus=bonus)
    assert [hyps[0].tokens.count(5 + i) for i, hyps in enumerate(out)] == [1] * len(feats)


def test_a_word_and_its_plural_earn_one_bonus_between_them(decoder, feats):
    """Given to "dog" and "dogs" alike, the bonus once paid the beam to say both: "two dogs are playing with a dog"
    (11 of the 1,000 val captions at bonus 5). With the words' number partners it is earned once."""
    bonus = torch.zeros(len(feats), 40)
    bonus[:, [5, 6]] = 50.0
    partner = torch.arange(40)
    partner[5], partner[6] = 6, 5
    config = DecodeConfig(strategy="beam", beam_size=4, max_len=MAX_LEN, tag_bonus=1.0)
    both = decode(decoder, feats, config, tag_bonus=bonus)
    assert all(5 in hyps[0].tokens and 6 in hyps[0].tokens for hyps in both)
    once = decode(decoder, feats, config, tag_bonus=bonus, partner=partner)
    assert [len({5, 6} & set(hyps[0].tokens)) for hyps in once] == [1] * len(feats)


def test_the_bonus_adds_to_each_specificity_level(decoder, feats):
    """With specificity levels, every level's row ranks by its own specificity bonus plus the photo's tag bonus."""
    r, bonus = rarity(), tag_bonus(len(feats))
    config = DecodeConfig(strategy="beam", beam_size=3, num_return=3, length_penalty=0.8, max_len=MAX_LEN, tag_bonus=1.0)
    together = decode(decoder, feats, DecodeConfig(**{**config.to_json(), "specificity_levels": LEVELS}), rarity=r,
                      tag_bonus=bonus)
    for i, s in enumerate(LEVELS):
        alone = decode(decoder, feats, DecodeConfig(**{**config.to_json(), "specificity": s}), rarity=r,
                       tag_bonus=bonus)
        assert hyps_of(together[i * len(feats):(i + 1) * len(feats)]) == hyps_of(alone)
    without = decode(decoder, feats, DecodeConfig(**{**config.to_json(), "specificity_levels": LEVELS,
                                                     "tag_bonus": 0.0}), rarity=r, tag_bonus=bonus)
    assert hyps_of(without) != hyps_of(together)  # the bonus does change captions here


def test_a_zero_bonus_is_plain_beam_search_and_a_bonus_needs_its_tensor(decoder, feats):
    config = DecodeConfig(strategy="beam", beam_size=4, num_return=3, length_penalty=0.8, max_len=MAX_LEN)
    assert hyps_of(decode(decoder, feats, config)) == hyps_of(decode(decoder, feats, config,
                                                                     tag_bonus=tag_bonus(len(feats))))
    with pytest.raises(ConfigError, match="Tagger.word_bonus"):
        decode(decoder, feats, DecodeConfig(strategy="beam", tag_bonus=1.0))


@pytest.mark.parametrize("bad", [dict(strategy="greedy", tag_bonus=1.0), dict(strategy="sample", tag_bonus=1.0),
                                 dict(strategy="beam", tag_bonus=-0.5)])
def test_the_tag_bonus_is_a_non_negative_beam_option(bad):
    with pytest.raises(ConfigError, match="tag bonus"):
        DecodeConfig(**bad)


@pytest.mark.parametrize("bonuses", [(), (0.0, -1.0)])
def test_the_tuning_grid_checks_its_tag_bonuses(bonuses):
    with pytest.raises(ConfigError, match="tag bonus"):
        TuneConfig(tag_bonuses=bonuses)


def test_word_bonus_is_the_heads_probability_of_subject_words_and_their_plurals():
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "dogs", "horse", "cup", "mug"]
    counts = {w: 100 for w in words}
    bonus = Tagger(_one_class_encoder("Chihuahua"), words, counts, IMAGENET_CATEGORIES).word_bonus(
        torch.zeros(2, 4), 3.0)
    assert bonus.shape == (2, len(words))
    assert bonus[:, 5].tolist() == pytest.approx([3.0, 3.0]) and bonus[:, 6].tolist() == pytest.approx([3.0, 3.0])
    assert bonus[:, [0, 1, 2, 3, 4, 7, 8, 9]].abs().max() < 1e-6
    horse = Tagger(_one_class_encoder("sorrel"), words, counts, IMAGENET_CATEGORIES).word_bonus(torch.zeros(1, 4), 3.0)
    assert horse[0, 7] == pytest.approx(3.0) and horse[0, 5] < 1e-6
    mug = Tagger(_one_class_encoder("coffee mug"), words, counts, IMAGENET_CATEGORIES).word_bonus(torch.zeros(1, 4), 3.0)
    assert mug.abs().max() < 1e-6  # an object is not a subject: no bonus, as it would not guide
    partner = Tagger(_one_class_encoder("sorrel"), words, counts, IMAGENET_CATEGORIES).number_partner.tolist()
    assert partner[5:7] == [6, 5] and partner[:5] + partner[7:] == [0, 1, 2, 3, 4, 7, 8, 9]  # dog <-> dogs only


def test_the_bundled_model_names_what_its_head_sees_with_the_bonus_alone():
    """scikit-image's motorcycle and cat: plain, unguided beam search says "bike" and "a little girl"; the head's
    motorcycle and cat as a bonus make the beam name them without guidance's constraint, the cat (a word the decoder
    finds far less likely there) only with a larger bonus."""
    cap = Captioner.from_pretrained(device="cpu")
    plain = plain_options(strategy="beam", beam_size=3)  # unguided, no tag bonus: not the model's decoding.json
    bonus = lambda b: plain_options(strategy="beam", beam_size=3, tag_bonus=b)  # noqa: E731
    motorcycle, cat = skimage.data.stereo_motorcycle()[0], skimage.data.chelsea()
    assert "motorcycle" not in cap.caption(motorcycle, **plain).split()
    assert "motorcycle" in cap.caption(motorcycle, **bonus(3.0)).split()
    assert "cat" not in cap.caption(cat, **bonus(3.0)).split()
    assert "cat" in cap.caption(cat, **bonus(6.0)).split()


def test_tune_decoding_measures_each_tag_bonus_as_evaluate_does(model, data_dir, capsys):
    if not Captioner.from_pretrained(model, device="cpu", calibrated=False).can_tag:
        pytest.skip("the test model has no ImageNet head")
    assert_tuned_rows_are_what_evaluate_measures(model, data_dir, capsys, "tag_bonus", (0.0, 4.0))
