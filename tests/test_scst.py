"""Self-critical training: the trained log-probability is the sampling policy's, the baselines, and a run
that raises the CIDEr-D reward and leaves a loadable best checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.api import Captioner
from captioner.cli import main
from captioner.config import ModelConfig
from captioner.decoding import DecodeConfig, Hypothesis, decode
from captioner.errors import ConfigError
from captioner.model import CaptionDecoder
from captioner.scst import ScstConfig, advantages, sampled_tokens, sequence_logprob
from captioner.vocab import SpecialIds

from conftest import draw


def test_sequence_logprob_is_what_decode_sampled_with():
    torch.manual_seed(0)
    decoder = CaptionDecoder(ModelConfig(vocab_size=40, hidden=24, embed=12, max_len=6)).eval()
    features = torch.randn(8, decoder.config.encoder.feature_dim)
    config = DecodeConfig(strategy="sample", num_return=10, max_len=6, seed=5, suppress_unk=False)
    hyps = [h for per in decode(decoder, features, config) for h in per]
    assert any(len(h.tokens) == 6 for h in hyps) and any(len(h.tokens) < 6 for h in hyps)  # cut and ended samples
    tokens = sampled_tokens(hyps, 6, SpecialIds())
    with torch.no_grad():
        logp = sequence_logprob(decoder, features.repeat_interleave(10, 0), tokens, pad_id=0, banned=[])
    # decode keeps <pad>/<start> out without renormalising: the untrained model gives them ~1/40 each, so the
    # sums agree only up to that mass; with nothing banned on either side they agree exactly
    assert logp.tolist() == pytest.approx([h.logprob for h in hyps], abs=0.1 * 7)
    unbanned = torch.stack([_teacher_forced(decoder, f, t) for f, t in zip(features.repeat_interleave(10, 0), tokens)])
    assert logp.tolist() == pytest.approx(unbanned.tolist(), abs=1e-4)


def _teacher_forced(decoder: CaptionDecoder, feature: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Sum of log p(next token) over one row, one ``step`` at a time (the decoding path)."""
    state, total = decoder.init_state(feature[None]), torch.zeros(())
    with torch.no_grad():
        for prev, nxt in zip(row[:-1], row[1:]):
            if nxt == 0:
                break
            logits, state = decoder.step(prev[None], state)
            total += torch.log_softmax(logits[0], -1)[nxt]
    return total


def test_banned_ids_are_renormalised_away():
    torch.manual_seed(1)
    decoder = CaptionDecoder(ModelConfig(vocab_size=30, hidden=16, embed=8, max_len=5)).eval()
    features = torch.randn(2, decoder.config.encoder.feature_dim)
    tokens = sampled_tokens([Hypothesis([5, 6], 0.0, 0.0), Hypothesis([7], 0.0, 0.0)], 5, SpecialIds())
    with torch.no_grad():
        free = sequence_logprob(decoder, features, tokens, 0, [])
        banned = sequence_logprob(decoder, features, tokens, 0, [0, 1, 3])
    assert (banned > free).all()  # the same words are likelier once three ids cannot be drawn


def test_a_sample_cut_at_max_len_has_no_end_token():
    rows = sampled_tokens([Hypothesis([5, 6, 7], 0.0, 0.0), Hypothesis([5], 0.0, 0.0)], 3, SpecialIds())
    assert rows.tolist() == [[1, 5, 6, 7, 0], [1, 5, 2, 0, 0]]


def test_baselines():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    assert advantages(rewards, "mean").tolist() == [[-1.5, 0.0, 1.5], [-1.5, -1.5, 3.0]]
    assert advantages(rewards, "greedy", torch.tensor([2.0, 1.0])).tolist() == [[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]
    with pytest.raises(ConfigError):
        ScstConfig(init_from="fast", samples=1)
    with pytest.raises(ConfigError, match="--init-from is required"):
        ScstConfig()


def test_scst_raises_the_reward_and_keeps_a_loadable_best(trained_run, data_dir, tmp_path):
    out = tmp_path / "scst"
    assert main(["scst", str(data_dir), "--out", str(out), "--init-from", str(trained_run / "best"), "--epochs", "6",
                 "--batch-size", "16", "--lr", "3e-3", "--log-every", "1", "--val-beam", "2"]) == 0
    rewards = [json.loads(line)["reward"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(rewards) == 6 * 3  # 48 training images in steps of 16
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05  # CIDEr-D of the samples went up
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(7))  # the starting model is scored as epoch 0
    cap = Captioner.from_pretrained(out / "best")
    assert cap.caption(draw("red", "circle", "white")).split()


def test_xe_weight_pulls_the_policy_towards_the_references(trained_run, data_dir, tmp_path):
    """The same SCST steps raise the training references' cross-entropy without ``xe_weight`` (the policy drifts
    towards what scores) and lower it with a strong one (measured: +0.005 and -0.006 nats per token)."""
    from captioner.scst import ScstConfig, ScstTrainer
    index = torch.arange(16)
    change = {}
    for weight in (0.0, 20.0):
        trainer = ScstTrainer(data_dir, tmp_path / f"w{weight}", ScstConfig(init_from=str(trained_run / "best"),
                                                                            lr=1e-3, batch_size=16, xe_weight=weight))
        feats = trainer.features[index, trainer.view_of[index]]

        def reference_xe() -> float:  # over five draws of references, the same for both runs
            with torch.no_grad():
                return sum(trainer.reference_loss(index, feats, torch.Generator().manual_seed(s)).item()
                           for s in range(5)) / 5
        before = reference_xe()
        for k in range(10):
            row = trainer.step(index, torch.Generator().manual_seed(k + 1))
            assert (row["xe"] is None) == (weight == 0.0)
        change[weight] = reference_xe() - before
    assert change[20.0] < 0 < change[0.0] and change[0.0] - change[20.0] > 0.005, change


def test_match_weight_rewards_captions_that_match_their_photo(model, data_dir, tmp_path):
    """The same SCST steps raise the samples' match with their photos more when the reward includes it, and
    best/ carries the matching model that shaped the reward."""
    from captioner.scst import ScstConfig, ScstTrainer
    assert main(["matching", str(data_dir), "--checkpoint", str(model), "--views", "0", "--epochs", "30",
                 "--embed", "16", "--hidden", "32", "--joint", "32", "--batch-size", "16"]) == 0
    index = torch.arange(16)
    rise = {}
    for weight in (0.0, 50.0):
        trainer = ScstTrainer(data_dir, tmp_path / f"w{weight}", ScstConfig(
            init_from=str(model), lr=3e-3, batch_size=16, match_weight=weight))
        judge = Captioner.from_pretrained(model).matcher  # the same model scores both runs
        feats = trainer.features[index, trainer.view_of[index]]

        def mean_match() -> float:  # of 10 samples per photo, the same draws for both runs
            with torch.no_grad():
                hyps = decode(trainer.decoder, feats, DecodeConfig(strategy="sample", num_return=10, seed=7,
                                                                   max_len=trainer.model_config.max_len),
                              trainer.vocab.specials)
            flat = [(i, h) for i, per in enumerate(hyps) for h in per]
            sims = judge.similarity(feats, trainer.vocab, [trainer.vocab.decode(h.tokens) for _, h in flat],
                                    [i for i, _ in flat])
            return sum(sims) / len(sims)
        before = mean_match()
        for k in range(20):
            row = trainer.step(index, torch.Generator().manual_seed(k + 1))
            assert ("match" in row) == (weight > 0)
        rise[weight] = mean_match() - before
    assert rise[50.0] > rise[0.0] + 0.02, rise
    trainer.config.epochs = 0
    trainer.fit()  # scores the start and writes it as best/
    assert Captioner.from_pretrained(tmp_path / "w50.0" / "best").matcher is not None


def test_match_weight_needs_a_matching_model(trained_run, data_dir, tmp_path):
    from captioner.scst import ScstConfig, ScstTrainer
    with pytest.raises(ConfigError, match="no matching model"):
        ScstTrainer(data_dir, tmp_path / "x", ScstConfig(init_from=str(trained_run / "best"), match_weight=1.0))
    with pytest.raises(ConfigError, match="match_weight must be >= 0"):
        ScstConfig(init_from="fast", match_weight=-1.0)
