"""Faults: SIGKILL during training and during batch captioning loses nothing already saved."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from captioner.checkpoint import load_checkpoint, load_trainer_state
from captioner.cli import main

from conftest import TEST_ENCODER, draw

TINY = ["--encoder", TEST_ENCODER.name, "--weights", "none", "--image-size", "64", "--hidden", "32", "--embed", "16",
        "--batch-size", "8", "--workers", "0", "--warmup-steps", "3", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captioner.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out waiting for the process"
        time.sleep(0.05)


def _steps(run: Path) -> int:
    """The highest step logged (a resumed run logs the step lost in flight again)."""
    path = run / "steps.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def test_sigkill_during_training_keeps_a_loadable_checkpoint_and_resumes(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(data_dir), "--out", str(run), *TINY, "--epochs", "3", "--save-every", "1"]
    rng = random.Random(0)
    proc = _start(args)
    for kill in range(3):  # saving every step: kills land during checkpoint writes too
        target = _steps(run) + rng.randint(2, 8)
        _wait_for(lambda: _steps(run) >= target or proc.poll() is not None)
        time.sleep(rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = load_checkpoint(run / "last")  # never a half-written checkpoint
        _, meta = load_trainer_state(run / "last")
        saved_step = meta["train_state"]["step"]
        assert saved_step >= _steps(run) - 1  # at most the step in flight is lost
        assert loaded.config.vocab_size > 4
        proc = _start(["train", str(data_dir), "--out", str(run), "--resume", "--epochs", "3"])
    assert proc.wait(timeout=600) == 0
    _, meta = load_trainer_state(run / "last")
    assert meta["train_state"]["epoch"] == 3


def test_sigkill_during_batch_captioning_then_resume_captions_each_image_once(trained_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(60):
        draw(["red", "blue", "green", "yellow"][i % 4], ["square", "circle"][i % 2], "white", seed=i).save(
            folder / f"img_{i:03d}.jpg")
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(folder), "-o", str(out), "--checkpoint", str(trained_run / "best"), "--batch-size", "2",
            "--decode-batch", "2", "--workers", "0"]
    proc = _start(args)
    _wait_for(lambda: out.exists() and out.read_text().count("\n") >= 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(out, "a") as f:
        f.write('{"path": "half-written')  # what a kill in the middle of a write would leave
    before = out.read_text().count("\n")
    assert main([*args, "--resume"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole JSON
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == 60
    assert before < 60
