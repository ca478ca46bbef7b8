"""Training: exact resume, DDP with gloo, divergence and bad-input handling, checkpoint contents."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioner.checkpoint import load_checkpoint
from captioner.cli import main

from conftest import TEST_ENCODER

TINY = ["--encoder", TEST_ENCODER.name, "--weights", "none", "--image-size", "64", "--hidden", "32", "--embed", "16",
        "--batch-size", "16", "--workers", "0", "--warmup-steps", "3", "--log-every", "1"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines())}


def test_resume_continues_exactly(data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [str(data_dir), *TINY, "--epochs", "2", "--dropout", "0.3", "--lr", "0.005"]
    assert main(["train", *common, "--out", str(full), "--max-steps", "20"]) == 0
    assert main(["train", *common, "--out", str(part), "--max-steps", "7"]) == 0  # stops mid-epoch 1
    assert max(losses(part)) == 7
    assert main(["train", str(data_dir), "--out", str(part), "--resume", "--epochs", "2", "--max-steps", "20"]) == 0
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 21))  # steps 8..20, across the epoch boundary, appended once
    assert [b[s] for s in range(8, 21)] == [a[s] for s in range(8, 21)]  # bit-identical on CPU


def test_checkpoint_rebuilds_the_model_alone(trained_run):
    loaded = load_checkpoint(trained_run / "best")
    assert loaded.config.vocab_size == len(loaded.vocab)
    assert loaded.config.encoder.name == TEST_ENCODER.name and loaded.config.encoder.feature_dim > 0
    assert {p.name for p in (trained_run / "best").iterdir()} == {"model.safetensors", "config.json", "vocab.json"}
    assert (trained_run / "last" / "trainer_state.safetensors").is_file()
    epochs = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_loss", "Bleu_1", "Bleu_4"} <= set(e) for e in epochs)
    assert epochs[-1]["best_bleu4"] == max(e["Bleu_4"] for e in epochs)


def test_trained_model_describes_the_shapes(trained_run):
    epochs = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] * 0.8
    assert max(e["Bleu_1"] for e in epochs) > 0.5


def test_early_stopping_by_patience(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(data_dir), "--out", str(run), *TINY, "--epochs", "30", "--lr", "0.0",
                 "--patience", "2"]) == 0  # lr 0: BLEU never improves after epoch 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data_dir), "--out", str(run), *TINY, "--epochs", "1"]) == 0
    good = (run / "last" / "model.safetensors").read_bytes()
    poisoned = tmp_path / "data"
    shutil.copytree(data_dir, poisoned)
    features = next((poisoned / "features").glob("*/features.npy"))
    array = np.load(features, mmap_mode="r+")
    array[:] = np.nan  # a corrupt cache makes the loss NaN at the first step
    array.flush()
    assert main(["train", str(poisoned), "--out", str(run), "--resume", "--epochs", "3"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert (run / "last" / "model.safetensors").read_bytes() == good


def test_unwritable_output_fails_before_training(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", str(data_dir), "--out", str(blocker / "run"), *TINY, "--epochs", "1"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_missing_manifest_is_one_clear_error(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_resume_with_another_vocabulary_is_refused(data_dir, trained_run, tmp_path, capsys):
    other = tmp_path / "data"
    shutil.copytree(data_dir, other)
    vocab = json.loads((other / "vocab.json").read_text())
    vocab["words"].append("zebra")
    (other / "vocab.json").write_text(json.dumps(vocab))
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    assert main(["train", str(other), "--out", str(run), "--resume"]) == 2
    assert "vocab.json differs" in capsys.readouterr().err


def test_ddp_two_gloo_processes_write_one_checkpoint(data_dir, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "captioner.cli", "train", str(data_dir), "--out", str(run), *TINY, "--epochs", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 only
    assert load_checkpoint(run / "best").config.vocab_size > 4
    assert len([p for p in run.iterdir() if p.name.startswith(".last.v")]) == 1
    steps = losses(run)
    assert max(steps) == 2 * math.ceil(240 / 2 / 16)  # each rank sees half of the 240 pairs per epoch
