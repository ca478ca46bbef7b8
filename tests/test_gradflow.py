"""The BPTT lesson as measured properties of our decoders, plus the run/plot/CLI plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from captioner.cli import main
from captioner.encoder import EncoderConfig
from captioner.gradflow import (SYNTHETIC_VOCAB, GradflowConfig, build_decoder, hidden_grad_norms, load_data,
                                run_gradflow, sigma_max)
from captioner.manifest import Record, save_manifest, write_json_atomic
from captioner.vocab import Vocab

SMALL = dict(batch_size=8, hidden=64, embed=64, max_len=39, seed=0)  # T = 40 teacher-forced steps


def _ratio(cell: str, config: GradflowConfig) -> float:
    data = load_data(None, config)
    decoder = build_decoder(cell, data.vocab_size, data.features.shape[1], config)
    norms = hidden_grad_norms(decoder, data.probe_features, data.probe)
    assert len(norms) == config.max_len + 2  # h_0 .. h_T
    return norms[0] / norms[-1]


def test_rnn_gradient_vanishes_orders_of_magnitude_faster_than_lstm() -> None:
    config = GradflowConfig(**SMALL)
    rnn, lstm = _ratio("rnn", config), _ratio("lstm", config)
    assert rnn < 1e-6  # vanished over 40 steps
    assert rnn * 100 <= lstm


def test_large_w_hh_makes_the_rnn_gradient_explode() -> None:
    config = GradflowConfig(**SMALL, init_scale=4.0)
    assert sigma_max(build_decoder("rnn", SYNTHETIC_VOCAB, config.feature_dim, config)) > 1
    assert _ratio("rnn", config) > 1


def _tiny_data_dir(root: Path) -> Path:
    words = "a dog runs on the green grass near a small red house".split()
    records = [Record(i, f"img{i}.jpg", "train" if i < 6 else "val",
                      [" ".join(words[: 4 + (i + j) % 8]) for j in range(3)]) for i in range(8)]
    save_manifest(root, records, "synthetic")
    Vocab.build([c.split() for r in records for c in r.captions], min_count=1).save(root / "vocab.json")
    return root


def _run_cli(data_dir: Path, out: Path, *extra: str) -> dict:
    assert main(["gradflow", str(data_dir), "--cells", "rnn,lstm", "--steps", "2",
                 "-o", str(out / "g.png"), "--json", str(out / "g.json"), *extra]) == 0
    assert (out / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "g.json").read_text())


def test_cli_writes_png_and_json_with_random_features_when_cache_incomplete(tmp_path: Path, capsys) -> None:
    data_dir = _tiny_data_dir(tmp_path)
    partial = data_dir / "features" / "x-none-224"
    partial.mkdir(parents=True)
    write_json_atomic(partial / "index.json", {"ids": list(range(8)), "encoder": {}})
    write_json_atomic(partial / "progress.json", {"done": 3})
    result = _run_cli(data_dir, tmp_path)
    assert "random normal features" in result["features"] and "incomplete" in result["features"]
    assert set(result["cells"]) == {"rnn", "lstm"}
    rnn = result["cells"]["rnn"]
    assert len(rnn["init"]["grad_norms"]) == result["steps_T"] + 1
    assert len(rnn["clip"]["train_grad_norms"]) == 2 and rnn["init"]["sigma_max"] > 0
    assert result["cells"]["lstm"]["init"]["sigma_max"] is None
    assert "random normal features" in capsys.readouterr().out


def test_json_is_written_beside_the_plot_by_default(tmp_path: Path, monkeypatch) -> None:
    data_dir, elsewhere, docs = _tiny_data_dir(tmp_path), tmp_path / "cwd", tmp_path / "docs"
    elsewhere.mkdir()
    docs.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["gradflow", str(data_dir), "--cells", "lstm", "--steps", "1", "-o", str(docs / "flow.png")]) == 0
    assert set(json.loads((docs / "flow.json").read_text())["cells"]) == {"lstm"}
    assert list(elsewhere.iterdir()) == []  # nothing in the working directory


def test_complete_feature_cache_is_used(tmp_path: Path) -> None:
    data_dir = _tiny_data_dir(tmp_path)
    cache = data_dir / "features" / "x-none-224"
    cache.mkdir(parents=True)
    encoder = EncoderConfig(name="x", weights="none", feature_dim=12)
    write_json_atomic(cache / "index.json", {"ids": list(range(8)), "encoder": encoder.to_json()})
    write_json_atomic(cache / "progress.json", {"done": 8})
    np.save(cache / "features.npy", np.arange(8 * 12, dtype=np.float16).reshape(8, 12))
    config = GradflowConfig(cells=("gru",), steps=1, batch_size=4, hidden=8, embed=8)
    data = load_data(data_dir, config)
    assert data.features_source == f"feature cache {cache}"
    assert data.features.shape == (6, 12) and data.features[1, 0] == 12  # train images 0..5, rows in order
    assert run_gradflow(data_dir, config)["cells"]["gru"]["init"]["ratio"] > 0


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite shares a 2-core machine with long jobs: oversubscribed BLAS threads slow it tenfold."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
