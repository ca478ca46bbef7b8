"""Training: exact resume, DDP with gloo, divergence and bad-input handling, checkpoint contents, clipping,
validation scored like ``captioner evaluate``, and defaults that are the shipped recipe."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.checkpoint import load_checkpoint, load_trainer_state
from captioner.cli import _encoder_config, _model_options, _train_config, build_parser, main
from captioner.config import ModelConfig, default_encoder
from captioner.errors import ConfigError
from captioner.features import cache_dir
from captioner.train import TrainConfig, Trainer

from conftest import TEST_ENCODER

MODEL_CARD = Path(__file__).resolve().parents[1] / "checkpoints" / "flickr8k-mobilenet_v2-lstm" / "MODEL_CARD.md"

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


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_without_epochs_trains_to_the_runs_own_length(data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [str(data_dir), *TINY, "--epochs", "3", "--dropout", "0.3", "--lr", "0.005"]  # not the default 20
    assert main(["train", *common, "--out", str(full)]) == 0
    assert main(["train", *common, "--out", str(part), "--max-steps", "7"]) == 0  # stops in epoch 1
    assert main(["train", str(data_dir), "--out", str(part), "--resume", "--max-steps", "0"]) == 0  # no --epochs
    assert records(part / "steps.jsonl") == records(full / "steps.jsonl")  # same steps, losses, cosine lr
    assert len(records(full / "steps.jsonl")) == 3 * 15  # 240 pairs / batch 16 per epoch
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in records(run / "metrics.jsonl")] for run in (part, full)]
    assert untimed[0] == untimed[1]
    a, b = load_checkpoint(part / "last").decoder_state, load_checkpoint(full / "last").decoder_state
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((part / "train_config.json").read_text()) == json.loads((full / "train_config.json").read_text())


def test_resume_refuses_flags_that_would_change_the_run(trained_run, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    assert main(["train", str(data_dir), "--out", str(run), "--resume", "--lr", "0.1", "--hidden", "8"]) == 2
    err = capsys.readouterr().err
    assert "--hidden, --lr cannot change" in err and "only --epochs, --max-steps" in err
    with pytest.raises(ConfigError, match="--lr cannot change"):  # the Python API refuses it the same way
        Trainer.resume(data_dir, run, {"lr": 0.1})


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_trainer_applies_the_gradient_clipped_to_clip(data_dir, tmp_path, clip):
    run = tmp_path / "run"
    assert main(["train", str(data_dir), "--out", str(run), *TINY, "--clip", str(clip), "--max-steps", "1"]) == 0
    preclip = records(run / "steps.jsonl")[0]["grad_norm_preclip"]
    tensors, _ = load_trainer_state(run / "last")
    # after AdamW's first step its first moment is exactly (1 - beta1) * the gradient the step applied
    applied = torch.cat([v.flatten() for k, v in tensors.items() if k.endswith(".exp_avg")]).norm().item() / 0.1
    assert preclip > 10 * 0.05
    assert applied == pytest.approx(clip if clip else preclip, rel=1e-4)


def test_validation_scores_best_as_evaluate_reports_it(trained_run, data_dir, tmp_path):
    epochs = records(trained_run / "metrics.jsonl")
    best = next(e for e in epochs if e["Bleu_4"] == epochs[-1]["best_bleu4"])  # the epoch saved as best/
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(data_dir), "--split", "val", "--from-cache", "--checkpoint", str(trained_run / "best"),
                 "-o", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert best["Bleu_4"] > 0.3  # a model that learned something, so the comparison means something
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L"):
        assert best[key] == pytest.approx(evaluated[key], abs=1e-12), key


def shipped_train_command() -> list[str]:
    """The model card's exact ``captioner train`` command, as argv."""
    lines = MODEL_CARD.read_text().replace("\\\n", " ").splitlines()
    return shlex.split(next(line for line in lines if line.startswith("captioner train ")))[1:]


def configs(argv: list[str]) -> tuple:
    args = build_parser().parse_args(argv)
    return _train_config(args), ModelConfig(vocab_size=100, **_model_options(args)), _encoder_config(args)


def test_defaults_are_the_shipped_recipe():
    shipped, default = configs(shipped_train_command()), configs(["train", "data/flickr8k", "--out", "runs/x"])
    assert shipped[1:] == default[1:]  # architecture, encoder
    assert shipped[0].patience == 0 and shipped[0].epochs == 20  # the card's command was found and read
    # --workers is the number of image-decoding processes, not part of the recipe
    assert dataclasses.replace(shipped[0], workers=0) == dataclasses.replace(default[0], workers=0)


def test_features_defaults_to_the_encoder_train_defaults_to():
    features = _encoder_config(build_parser().parse_args(["features", "data"]))
    assert features == configs(["train", "data", "--out", "run"])[2] == default_encoder()
    assert (features.name, features.weights) == ("mobilenet_v2", "IMAGENET1K_V1")


def test_unknown_schedule_or_precision_is_refused(capsys):
    for flag, typo in (("--schedule", "cosin"), ("--precision", "bf61")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "data", "--out", "run", flag, typo])
        assert f"invalid choice: '{typo}'" in capsys.readouterr().err
    for field, typo in (("schedule", "cosin"), ("precision", "bf61")):
        with pytest.raises(ConfigError, match=f"{field} must be one of .*'{typo}'"):
            TrainConfig(**{field: typo})


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
    features = cache_dir(poisoned, TEST_ENCODER) / "features.npy"  # the run's cache (not another one beside it)
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
