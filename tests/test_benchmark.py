"""The benchmark script's synthetic checkpoint: an untrained model with the bundled model's shapes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from captioner.api import BUNDLED, REPO_CHECKPOINTS
from captioner.checkpoint import MODEL, load_checkpoint, read_tensors

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    """benchmarks/run.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_synthetic_checkpoint_has_the_bundled_models_shapes():
    synthetic = load_benchmark().synthetic_checkpoint()
    shapes = {k: tuple(v.shape) for k, v in read_tensors(synthetic / MODEL).items() if k.startswith("decoder.")}
    bundled = {k: tuple(v.shape) for k, v in read_tensors(REPO_CHECKPOINTS / BUNDLED / MODEL).items()
               if k.startswith("decoder.")}
    assert shapes == bundled
    decoder = [v for k, v in read_tensors(synthetic / MODEL).items() if k.startswith("decoder.")]
    assert all(torch.equal(v.half().to(v.dtype), v) for v in decoder)  # float16 values, as exported: the same CPU step
    config = load_checkpoint(synthetic).config
    assert (config.hidden, config.encoder.name, config.encoder.weights) == (1024, "mobilenet_v2", "none")


def test_cross_encoder_ensemble_feeds_each_member_its_own_cnns_features():
    """benchmarks/cross_encoder_ensemble.py: members with different feature sizes (different CNNs) each start
    from their own slice of the concatenated features, and the step averages their probabilities."""
    from captioner.config import ModelConfig
    from captioner.decoding import DecodeConfig, decode
    from captioner.encoder import EncoderConfig
    from captioner.model import CaptionDecoder

    spec = importlib.util.spec_from_file_location("cross_encoder_ensemble", REPO / "benchmarks" / "cross_encoder_ensemble.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    members = [CaptionDecoder(ModelConfig(vocab_size=30, hidden=16, embed=8, dropout=0.0,
                                          encoder=EncoderConfig(name=name, weights="none", feature_dim=dim))).eval()
               for name, dim in (("mobilenet_v2", 12), ("resnet152", 20))]
    fa, fb = torch.randn(3, 12), torch.randn(3, 20)
    mixed = module.MixedEnsemble(members, [12, 20])
    state = mixed.init_state(torch.cat([fa, fb], dim=1))
    expected = members[0].init_state(fa) + members[1].init_state(fb)
    assert all(torch.equal(s, e) for s, e in zip(state, expected)) and len(state) == len(expected)
    tokens = torch.tensor([1, 5, 7])
    logp, _ = mixed.step(tokens, state)
    each = [torch.log_softmax(m.step(tokens, s)[0], -1) for m, s in zip(members, (expected[:2], expected[2:]))]
    assert torch.allclose(logp.exp(), (each[0].exp() + each[1].exp()) / 2, atol=1e-6)
    hyps = decode(mixed, torch.cat([fa, fb], dim=1), DecodeConfig(strategy="beam", beam_size=3, max_len=8))
    assert len(hyps) == 3


def test_gender_words_counts_the_misgendered_against_agreeing_references():
    """``benchmarks/gender_words.py`` (behind MODEL_CARD's gender numbers): a photo joins a group only when >= 3
    references agree and none disagrees; a caption is wrong only with the other gender's words and none of its own."""
    spec = importlib.util.spec_from_file_location("gender_words", REPO / "benchmarks" / "gender_words.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    woman = ["A woman runs .", "a woman in red", "The lady smiles .", "a person", "someone runs"]
    rows = [{"caption": "a man is running", "references": woman},  # female photo called male
            {"caption": "a man and a woman", "references": woman},  # both words: not wrong
            {"caption": "a person is running", "references": woman},
            {"caption": "a man is running", "references": woman[:2] + ["a man runs", "x", "y"]},  # no agreement
            {"caption": "a girl is running", "references": ["a boy runs", "the boy", "a boy", "a child", "kid"]}]
    counts = module.count(rows)
    assert counts["female"] == {"photos": 3, "says female": 1, "says male": 2, "says person": 1, "says child": 0,
                                "says young": 0, "wrong gender": 1}
    assert counts["male"]["photos"] == 1 and counts["male"]["wrong gender"] == 1
    assert counts["young"]["photos"] == 1 and counts["young"]["says young"] == 1


def load_script(name: str):
    """benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_what_the_benchmarks_call_beam_3_is_plain_beam_3():
    """``strategy="beam", beam_size=3`` keeps the rest of the model's recommended beam settings (API semantics): on
    the bundled model five specificity levels, matching reranking and no repeated 4-grams, 5x the work. The
    benchmarks' "beam3" rows (the stream target, the probe, demo latency) measured that under the name beam 3."""
    from captioner.api import Captioner
    from captioner.decoding import plain_options
    cap = Captioner.from_pretrained(device="cpu")
    assert cap.decode_config(strategy="beam", beam_size=3).describe() != "beam 3"  # why the helper exists
    configs = load_benchmark().stream_configs(cap)
    assert configs["beam3"].describe() == "beam 3" and configs["greedy"].describe() == "greedy"
    assert configs["default"] == cap.decode_config()
    for name in ("probe_ood", "demo_latency"):
        settings = load_script(name).SETTINGS
        assert cap.decode_config(**settings["beam3"]).describe() == "beam 3", name
        assert cap.decode_config(**settings["beam3+guide"]).describe() == "beam 3, guided", name
    assert cap.decode_config(**plain_options(strategy="greedy")) == cap.decode_config(strategy="greedy")
