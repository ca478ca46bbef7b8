"""Decoding strategies: shapes, determinism, and the identities that pin down their correctness."""

from __future__ import annotations

import pytest
import torch

from captioner.config import ModelConfig
from captioner.decoding import DecodeConfig, decode
from captioner.errors import ConfigError
from captioner.vocab import SpecialIds

from decoder_fixtures import decoder, feats, model_logprob  # noqa: F401 (fixtures)


@pytest.mark.parametrize("options", [dict(strategy="greedy"), dict(strategy="sample", num_return=3, seed=0),
                                     dict(strategy="beam", beam_size=4, num_return=2)])
def test_output_shape(decoder, feats, options):
    out = decode(decoder, feats, DecodeConfig(max_len=12, **options))
    assert len(out) == 6
    assert all(len(h) == options.get("num_return", 1) for h in out)
    for hyps in out:
        for h in hyps:
            assert len(h.tokens) <= 12 and all(t not in (0, 1, 2, 3) for t in h.tokens)


@pytest.mark.parametrize("options", [dict(strategy="greedy"), dict(strategy="sample", seed=7, temperature=1.3),
                                     dict(strategy="beam", beam_size=3)])
def test_deterministic(decoder, feats, options):
    a = decode(decoder, feats, DecodeConfig(max_len=12, **options))
    b = decode(decoder, feats, DecodeConfig(max_len=12, **options))
    assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]


def test_sampling_seed_matters(decoder, feats):
    a = decode(decoder, feats, DecodeConfig(strategy="sample", seed=1, temperature=2.0, max_len=12))
    b = decode(decoder, feats, DecodeConfig(strategy="sample", seed=2, temperature=2.0, max_len=12))
    assert [x[0].tokens for x in a] != [x[0].tokens for x in b]


def test_beam_size_one_equals_greedy(decoder, feats):
    greedy = decode(decoder, feats, DecodeConfig(strategy="greedy", max_len=12))
    beam = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=1, max_len=12))
    assert [g[0].tokens for g in greedy] == [b[0].tokens for b in beam]
    assert [g[0].logprob for g in greedy] == pytest.approx([b[0].logprob for b in beam], abs=1e-5)


def test_top_k_one_sampling_equals_greedy(decoder, feats):
    greedy = decode(decoder, feats, DecodeConfig(strategy="greedy", max_len=12))
    sampled = decode(decoder, feats, DecodeConfig(strategy="sample", top_k=1, seed=5, max_len=12))
    assert [g[0].tokens for g in greedy] == [s[0].tokens for s in sampled]


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_beam_hypotheses_sorted_by_penalised_score(decoder, feats, alpha):
    out = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=5, num_return=5, length_penalty=alpha,
                                              max_len=12))
    for hyps in out:
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:  # score is logprob / len**alpha, len counting <end> when it was produced
            length = len(h.tokens) + (1 if len(h.tokens) < 12 else 0)
            assert h.score == pytest.approx(h.logprob / length ** alpha, rel=1e-5)


def test_beam_finds_at_least_the_greedy_logprob(decoder, feats):
    greedy = decode(decoder, feats, DecodeConfig(strategy="greedy", max_len=12))
    beam = decode(decoder, feats, DecodeConfig(strategy="beam", beam_size=5, max_len=12))
    for g, b in zip(greedy, beam):
        assert b[0].logprob >= g[0].logprob - 1e-5


def test_logprob_is_the_model_probability_of_the_caption(decoder, feats):
    hyp = decode(decoder, feats[:1], DecodeConfig(strategy="beam", beam_size=3, max_len=12))[0][0]
    assert hyp.logprob == pytest.approx(model_logprob(decoder, feats[0], hyp.tokens, 12), abs=1e-4)


def test_batched_and_one_by_one_beam_identical(decoder, feats):
    config = DecodeConfig(strategy="beam", beam_size=4, num_return=3, length_penalty=0.5, max_len=12)
    batched = decode(decoder, feats, config)
    single = [decode(decoder, feats[i:i + 1], config)[0] for i in range(len(feats))]
    assert [[h.tokens for h in x] for x in batched] == [[h.tokens for h in x] for x in single]
    flat = lambda out: [h.score for x in out for h in x]  # noqa: E731
    assert flat(batched) == pytest.approx(flat(single), abs=1e-5)


def test_batched_greedy_skips_finished_rows_without_changing_results(decoder, feats):
    """Rows that finished early are left out of later steps; the others must not notice."""
    config = DecodeConfig(strategy="greedy", max_len=12)
    batched = decode(decoder, feats, config)
    single = [decode(decoder, feats[i:i + 1], config)[0] for i in range(len(feats))]
    assert len({len(x[0].tokens) for x in batched}) > 1  # captions end at different steps
    assert [x[0].tokens for x in batched] == [x[0].tokens for x in single]
    assert [x[0].logprob for x in batched] == pytest.approx([x[0].logprob for x in single], abs=1e-5)


def test_no_repeat_ngram_blocks_repeats(decoder, feats):
    for strategy in ("greedy", "beam"):
        out = decode(decoder, feats, DecodeConfig(strategy=strategy, no_repeat_ngram=2, max_len=20))
        for hyps in out:
            bigrams = list(zip(hyps[0].tokens, hyps[0].tokens[1:]))
            assert len(bigrams) == len(set(bigrams))


def test_unk_suppressed_unless_allowed(decoder, feats):
    with torch.no_grad():
        decoder.out.bias[3] += 50.0
    try:
        assert all(3 not in h[0].tokens for h in decode(decoder, feats, DecodeConfig(max_len=5)))
        allowed = decode(decoder, feats, DecodeConfig(max_len=5, suppress_unk=False))
        assert all(h[0].tokens[0] == 3 for h in allowed)
    finally:
        with torch.no_grad():
            decoder.out.bias[3] -= 50.0


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_the_special_ids_given_are_the_ones_used(decoder, feats, strategy):
    """``decode`` ends, pads and bans with the ``SpecialIds`` it is given, not with fixed numbers: a caption
    ends at the given <end> and never contains the given <unk>."""
    config = DecodeConfig(strategy=strategy, max_len=12)
    plain = decode(decoder, feats, config)
    first = plain[0][0].tokens[0]  # the first word of image 0's caption becomes <end>, then <unk>
    ended = decode(decoder, feats, config, SpecialIds(end=first))
    assert ended[0][0].tokens == []
    banned = decode(decoder, feats, config, SpecialIds(unk=first))
    assert all(first not in h[0].tokens for h in banned)


def test_top_p_keeps_the_nucleus_only():
    from captioner.decoding import _draw
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(_draw(logp, DecodeConfig(strategy="sample", top_p=0.7), torch.Generator().manual_seed(s)))
             for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 so the token crossing 0.7 (0.3) is kept; the rest never


@pytest.mark.parametrize("bad", [dict(strategy="nope"), dict(strategy="beam", beam_size=2, num_return=3),
                                 dict(temperature=0), dict(strategy="greedy", num_return=2)])
def test_invalid_options_are_rejected(bad):
    with pytest.raises(ValueError):
        DecodeConfig(**bad)


def test_ensemble_of_identical_members_decodes_like_the_single_model(decoder, feats):
    from captioner.model import EnsembleDecoder
    config = ModelConfig.from_json({**decoder.config.to_json(), "members": 2})
    ensemble = EnsembleDecoder(config).eval()
    for member in ensemble.members:
        member.load_state_dict(decoder.state_dict())
    options = DecodeConfig(strategy="beam", beam_size=3, num_return=2, max_len=12)
    single, double = decode(decoder, feats, options), decode(ensemble, feats, options)
    assert [[h.tokens for h in x] for x in single] == [[h.tokens for h in x] for x in double]
    assert [h.logprob for x in single for h in x] == pytest.approx([h.logprob for x in double for h in x], abs=1e-4)


@pytest.mark.parametrize("options", [dict(strategy="greedy"), dict(strategy="sample", num_return=3, seed=0),
                                     dict(strategy="beam", beam_size=4, num_return=2),
                                     dict(strategy="beam", beam_size=3, specificity_levels=(0.0, 0.5))])
def test_neutral_never_uses_banned_words(decoder, feats, options):
    """Gender-neutral decoding: the ids given as ``banned`` (the vocabulary's gendered words) never appear, in every
    strategy, and the captions are still whole (each one ends). The banned ids are the words the plain decoding
    uses most, so the test fails if the ban is not applied."""
    rarity = torch.linspace(0, 3, decoder.config.vocab_size)
    plain = decode(decoder, feats, DecodeConfig(max_len=12, **options), rarity=rarity)
    used = torch.bincount(torch.tensor([t for hyps in plain for h in hyps for t in h.tokens]))
    banned = used.topk(3).indices
    assert sum(int(used[i]) for i in banned) > 0
    neutral = decode(decoder, feats, DecodeConfig(max_len=12, neutral=True, **options), rarity=rarity, banned=banned)
    assert len(neutral) == len(plain)
    for hyps in neutral:
        for h in hyps:
            assert not set(h.tokens) & set(banned.tolist())
            assert h.logprob > float("-inf")
    # the ids only act with neutral set; neutral without them is an error, not a silent no-op
    again = decode(decoder, feats, DecodeConfig(max_len=12, **options), rarity=rarity, banned=banned)
    assert [[h.tokens for h in x] for x in again] == [[h.tokens for h in x] for x in plain]
    with pytest.raises(ConfigError, match="gender-neutral"):
        decode(decoder, feats, DecodeConfig(max_len=12, neutral=True, **options), rarity=rarity)


def test_neutral_greedy_static_equals_greedy_and_needs_the_ids(decoder, feats):
    """The CUDA-graph greedy path (``greedy_static``, also runnable on the CPU) bans the same ids as ``decode``."""
    from captioner.decoding import finish_static, greedy_static
    plain = decode(decoder, feats, DecodeConfig(strategy="greedy", max_len=12))
    banned = torch.tensor(sorted({h[0].tokens[0] for h in plain if h[0].tokens}))
    config = DecodeConfig(strategy="greedy", max_len=12, neutral=True)
    expected = decode(decoder, feats, config, banned=banned)
    got = finish_static(*greedy_static(decoder, feats, config, SpecialIds(), banned), config, SpecialIds())
    assert [h[0].tokens for h in got] == [h[0].tokens for h in expected]
    assert all(h[0].tokens[:1] != plain_h[0].tokens[:1] for h, plain_h in zip(got, plain) if plain_h[0].tokens)
    with pytest.raises(ConfigError, match="gender-neutral"):
        greedy_static(decoder, feats, config, SpecialIds())


# enough photos that greedy decoding with the random decoder ends some captions after a word (most loop to max_len)
MANY_FEATS = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))


def _ended_on(nbest: list[list], max_len: int) -> set[int]:
    """The last words of the captions that ended (a caption of ``max_len`` words was cut, not ended)."""
    return {h.tokens[-1] for hyps in nbest for h in hyps if 0 < len(h.tokens) < max_len}


@pytest.mark.parametrize("options", [dict(strategy="greedy"), dict(strategy="sample", num_return=3, seed=0),
                                     dict(strategy="beam", beam_size=4, num_return=2),
                                     dict(strategy="beam", beam_size=3, specificity_levels=(0.0, 0.5))])
def test_no_caption_ends_on_a_non_final_word(decoder, options):
    """``non_final`` words (``Vocab.non_final``) are never a caption's last word, in every strategy. The marked
    words are the ones plain decoding ends on, so the test fails if the rule is not applied."""
    feats = MANY_FEATS
    rarity = torch.linspace(0, 3, decoder.config.vocab_size)
    config = DecodeConfig(max_len=20, **options)
    plain = decode(decoder, feats, config, rarity=rarity)
    last = _ended_on(plain, 20)
    non_final = torch.zeros(decoder.config.vocab_size, dtype=torch.bool)
    non_final[sorted(last)] = True
    ruled = decode(decoder, feats, config, rarity=rarity, non_final=non_final)
    assert len(ruled) == len(plain) and all(h.logprob > float("-inf") for hyps in ruled for h in hyps)
    assert not _ended_on(ruled, 20) & last
    assert [[h.tokens for h in x] for x in ruled] != [[h.tokens for h in x] for x in plain]


def test_greedy_static_ends_like_greedy(decoder):
    """The CUDA-graph greedy path (``greedy_static``, also runnable on the CPU) keeps ``non_final`` as ``decode`` does."""
    from captioner.decoding import finish_static, greedy_static
    feats = MANY_FEATS
    config = DecodeConfig(strategy="greedy", max_len=20)
    plain = decode(decoder, feats, config)
    non_final = torch.zeros(decoder.config.vocab_size, dtype=torch.bool)
    non_final[sorted(_ended_on(plain, 20))] = True
    expected = decode(decoder, feats, config, non_final=non_final)
    got = finish_static(*greedy_static(decoder, feats, config, SpecialIds(), None, non_final), config, SpecialIds())
    assert [h[0].tokens for h in got] == [h[0].tokens for h in expected]
    assert [h[0].tokens for h in got] != [h[0].tokens for h in plain]


@pytest.mark.parametrize("option, value", [("beam_size", "5"), ("guide", "no"), ("neutral", 1), ("max_len", 2.5),
                                           ("length_penalty", None), ("seed", "1"), ("specificity_levels", [0.1, "x"])])
def test_options_of_the_wrong_type_are_refused_by_name(option, value):
    with pytest.raises(ConfigError, match=f"option {option} must be "):
        DecodeConfig(strategy="beam", **{option: value})


def test_numpy_numbers_and_json_lists_are_options_of_their_type():
    import numpy as np

    config = DecodeConfig(strategy="beam", beam_size=np.int64(4), length_penalty=np.float32(0.5), seed=None,
                          specificity_levels=[0, 0.5])
    assert (config.beam_size, config.specificity_levels) == (4, (0.0, 0.5))
    assert DecodeConfig(strategy="beam", specificity_levels=None).specificity_levels == ()


def test_rows_that_repeat_another_are_stepped_once_with_the_same_results(monkeypatch):
    """The recommended decoding runs a beam per specificity level (five on the bundled model), and the levels'
    beams share their first words: a row repeating another (same token, same state) is stepped once and given its
    twin's result (``decoding._step_unfinished``). Same n-best lists, log-probabilities and scores as stepping
    every row; far fewer rows stepped."""
    from captioner import decoding
    from captioner.api import Captioner
    cap = Captioner.from_pretrained(device="cpu")
    assert len(cap.decode_config().specificity_levels) > 1
    features = torch.rand(16, cap.config.encoder.feature_dim, generator=torch.Generator().manual_seed(0)) * 2
    stepped: list[int] = []
    real = decoding._step
    monkeypatch.setattr(decoding, "_step", lambda d, t, s: (stepped.append(t.shape[0]), real(d, t, s))[1])
    once = cap.generate(features, cap.decode_config())
    rows_once = sum(stepped)
    stepped.clear()
    monkeypatch.setattr(decoding, "DEDUP_MIN_ROWS", 10 ** 9)  # every row stepped
    every = cap.generate(features, cap.decode_config())
    assert once == every
    assert rows_once < 0.8 * sum(stepped), (rows_once, sum(stepped))
